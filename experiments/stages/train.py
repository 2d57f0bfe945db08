"""Train stage: the Lightning fit of a planned split, with the checkpoints every selection rule needs
(experiments.selection) and resume from `checkpoints/last.ckpt` (experiments.checkpoints)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from experiments.build import build_module, is_rank_zero, run_tags, say
from experiments.checkpoints import AtomicCheckpointIO, resume_point
from experiments.epoch_records import EpochRecords, truncate_records
from experiments.progress import RunProgress, RunProgressBar, schedule_of, stdout_is_terminal, write_schedule
from experiments.selection import checkpoint_callbacks
from experiments.stages.plan import Planned
from experiments.tracking import make_wandb_logger
from lightning_modules.methods import METHODS
from lightning_modules.segmentation import SegmentationModule


@dataclass
class Trained:
    trainer: pl.Trainer
    module: SegmentationModule
    callbacks: dict          # selection rule -> its checkpoint callback (experiments.selection)
    wandb_logger: object | None
    schedule: dict | None = None  # experiments.progress: the plan, estimates and actual times (run.json)


def run_progress(cfg: DictConfig, planned: Planned, run_dir: Path, name: str, kind: str, phantom: bool,
                 bar: bool) -> RunProgress:
    """The plan block, wall-time estimate and epoch lines of this run (experiments.progress); the schedule is
    read from the trainer once its data are set up (steps per epoch, device), and saved to schedule.json."""
    d, t, p = cfg.data, cfg.trainer, cfg.trainer.progress
    has_val = bool(planned.dm.split.val) or planned.dm.oracle

    def schedule(trainer: pl.Trainer) -> dict:
        device = trainer.strategy.root_device
        return schedule_of(kind=kind, name=name, split_rows=planned.dm.split.summary(), max_epochs=trainer.max_epochs,
                           steps_per_epoch=int(trainer.num_training_batches), val_every=int(t.check_val_every_n_epoch),
                           has_val=has_val, batch_size=int(d.batch_size), patch_size=list(d.patch_size),
                           device=device.type, threads=torch.get_num_threads(), precision=str(trainer.precision),
                           world_size=trainer.world_size, phantom=phantom, warmup=int(p.warmup_steps),
                           measure=int(p.measure_steps))

    from tqdm import tqdm

    return RunProgress(schedule, int(p.warmup_steps), int(p.measure_steps), float(p.max_measure_s),
                       save=write_schedule(run_dir), write=tqdm.write if bar else None)


def make_trainer(cfg: DictConfig, run_dir: Path, loggers: list, callbacks: list, has_val: bool,
                 bar: bool = False, profiler=None) -> pl.Trainer:
    """`callbacks` end with the run's RunProgress (its epoch line comes after the checkpoints are safe);
    `bar`: Lightning's progress bar, counting the whole run's steps (RunProgressBar), on a terminal only."""
    t = cfg.trainer
    # without a rule's ModelCheckpoint Lightning would add a default one writing epoch=...ckpt files
    checkpointing = any(isinstance(c, pl.callbacks.Checkpoint) for c in callbacks)
    # test-time methods (bn_adapt, tent) need gradients in the test loop: no_grad there instead of inference mode
    return pl.Trainer(inference_mode=not METHODS.lookup(cfg.method.name).test_time, max_epochs=t.max_epochs,
                      accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=t.precision, check_val_every_n_epoch=t.check_val_every_n_epoch,
                      log_every_n_steps=t.log_every_n_steps, deterministic=t.deterministic, logger=loggers,
                      callbacks=[*callbacks, *([RunProgressBar()] if bar else [])], default_root_dir=str(run_dir), num_sanity_val_steps=0,
                      plugins=[AtomicCheckpointIO()], enable_checkpointing=checkpointing,
                      limit_val_batches=None if has_val else 0,
                      enable_progress_bar=bar, enable_model_summary=False, profiler=profiler)


def train_stage(cfg: DictConfig, planned: Planned, run_dir: Path, name: str, kind: str, names: list[str],
                phantom: bool) -> Trained:
    """Fit on the plan's training cases, validating on its validation cases (and the test cases for the
    oracle rule); resumes an interrupted run from its last epoch."""
    dm = planned.dm
    trained = sorted({n for c in dm.cached["train"] for n, a in zip(c.meta["classes"], c.meta["annotated"]) if a})
    module = build_module(cfg, dm.split.held_out, trained, dm.split.train_sources)
    wandb_logger = make_wandb_logger(cfg, run_dir, name, kind, run_tags(cfg, kind, dm.split, phantom))
    loggers = [pl.loggers.CSVLogger(str(run_dir), name="csv", version="")]
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    callbacks = checkpoint_callbacks(run_dir, names, bool(dm.split.val), int(cfg.trainer.checkpoint_every_n_steps))
    # records.jsonl (experiments.epoch_records): listed before LastCheckpoint, so an epoch's record is on disk
    # before the last.ckpt a resume would start after it
    records = EpochRecords(run_dir, oracle="oracle" in names)
    bar = stdout_is_terminal()  # in a log file: the plain epoch lines alone
    progress = run_progress(cfg, planned, run_dir, name, kind, phantom, bar)
    trainer = make_trainer(cfg, run_dir, loggers, [records, *callbacks.values(), progress],
                           bool(dm.split.val) or dm.oracle, bar)
    resume, finished, mid_epoch = resume_point(run_dir / "checkpoints", module, say, repair=is_rank_zero())
    if resume is not None:
        say(f"resuming from epoch {finished}{mid_epoch} ({resume})")
    if is_rank_zero():  # the records of epochs the resumed run redoes (all of them when it starts afresh)
        truncate_records(records.path, finished if resume is not None else 0)
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    return Trained(trainer, module, callbacks, wandb_logger, progress.schedule)
