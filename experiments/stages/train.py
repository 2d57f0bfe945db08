"""Train stage: the Lightning fit of a planned split, with the checkpoints every selection rule needs
(experiments.selection) and resume from `checkpoints/last.ckpt` (experiments.checkpoints)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from evaluation.selection_rules import epoch_number
from experiments.build import build_module, is_rank_zero, run_tags, say
from experiments.checkpoints import AtomicCheckpointIO, resume_point
from experiments.epoch_records import EpochRecords, truncate_records
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


class EpochSummary(pl.Callback):
    """One line per validation epoch: readable in CI logs where progress bars are off.

    Hooked on `on_train_epoch_end`, which Lightning calls after the epoch's validation and after the
    epoch-mean training loss is reduced; earlier hooks print the previous epoch's values.
    """

    def __init__(self):
        self.validated_epoch = -1

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, module):
        if not trainer.is_global_zero:
            return
        # callback_metrics keep the last validation's values: show them only in the epoch that validated
        validated = self.validated_epoch == trainer.current_epoch
        parts = [f"{k}={float(v):.4f}" for k, v in sorted(trainer.callback_metrics.items())
                 if k == "train/loss_epoch" or (validated and k.startswith("val/") and k.rsplit("/", 1)[-1].startswith("dice"))]
        print(f"[epoch {epoch_number(trainer.current_epoch)}/{trainer.max_epochs}] " + " ".join(parts), flush=True)


def make_trainer(cfg: DictConfig, run_dir: Path, loggers: list, callbacks: list, has_val: bool,
                 profiler=None) -> pl.Trainer:
    t = cfg.trainer
    # without a rule's ModelCheckpoint Lightning would add a default one writing epoch=...ckpt files
    checkpointing = any(isinstance(c, pl.callbacks.Checkpoint) for c in callbacks)
    # test-time methods (bn_adapt, tent) need gradients in the test loop: no_grad there instead of inference mode
    return pl.Trainer(inference_mode=not METHODS.lookup(cfg.method.name).test_time, max_epochs=t.max_epochs,
                      accelerator=t.accelerator, devices=t.devices, strategy=t.strategy, precision=t.precision, check_val_every_n_epoch=t.check_val_every_n_epoch,
                      log_every_n_steps=t.log_every_n_steps, deterministic=t.deterministic, logger=loggers,
                      callbacks=[*callbacks, EpochSummary()], default_root_dir=str(run_dir), num_sanity_val_steps=0,
                      plugins=[AtomicCheckpointIO()], enable_checkpointing=checkpointing,
                      limit_val_batches=None if has_val else 0,
                      enable_progress_bar=sys.stderr.isatty(), enable_model_summary=False, profiler=profiler)


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
    trainer = make_trainer(cfg, run_dir, loggers, [records, *callbacks.values()], bool(dm.split.val) or dm.oracle)
    resume, finished, mid_epoch = resume_point(run_dir / "checkpoints", module, say, repair=is_rank_zero())
    if resume is not None:
        say(f"resuming from epoch {finished}{mid_epoch} ({resume})")
    if is_rank_zero():  # the records of epochs the resumed run redoes (all of them when it starts afresh)
        truncate_records(records.path, finished if resume is not None else 0)
    trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    return Trained(trainer, module, callbacks, wandb_logger)
