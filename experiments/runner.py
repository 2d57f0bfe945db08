"""One experiment on a split, in stages with files between them, writing the run folder: plan
(`plan.json`) -> train (fit, checkpoints) -> predict (`predictions/`) -> score (`per_case.csv`,
`metrics.json`) -> record (`run.json`, `done`). Each stage is a module of experiments.stages and can be
rerun alone (`experiments.train --plan`, `experiments.test_run`, `experiments.score`). Entry points
(experiments.protocols: loso, transfer, fewshot) only build the config and name the split."""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from datamodules.locking import folder_lock
from experiments import selection
from experiments.build import (
    configure_backends,
    harmonizer_config,
    is_rank_zero,
    resolve_data_root,
    say,
    validate_config,
    variant,
)
from experiments.checkpoints import remove_stale_tmp
from experiments.runfolder import mark_run_folder, remove_run_folder, run_folder
from experiments.stages.plan import plan_stage
from experiments.stages.record import record_stage
from experiments.stages.test import predict_and_score, select_and_test
from experiments.stages.train import train_stage
from experiments.tracking import atomic_write_text, config_hash

# harmonizer_config and variant: re-exported for older imports of experiments.runner
__all__ = ["run", "open_run_folder", "check_config_unchanged", "harmonizer_config", "variant", "validate_config"]


def run(cfg: DictConfig, kind: str, split: dict, label: str, wait: bool = False, roles: dict | None = None,
        origin: dict | None = None) -> dict:
    """Plan the split (or take a plan's `roles`), train, select, predict and score; write
    `<paths.runs>/<kind>/<name>/`. Re-running a finished run folder (`done`) prints its metrics; an
    unfinished one resumes from its last epoch's checkpoint. Under DDP every rank runs this function.

    The run holds its folder's lock throughout (datamodules.locking): a second process on the same folder
    gets FolderInUse ("run folder X in use by pid N"), or with `wait` (sweeps) queues behind the first.
    Only rank zero locks: the other DDP ranks re-run this script while rank zero holds it.
    """
    validate_config(cfg)
    names = selection.wanted(cfg.selection.method, cfg.selection.report)
    name = cfg.run.name or f"{label}-{cfg.experiment}-{config_hash(cfg)}"
    run_dir = run_folder(cfg.paths.runs, kind, name)
    with folder_lock(run_dir, what="run folder", wait=wait, say=say) if is_rank_zero() else nullcontext():
        return _run_locked(cfg, kind, split, label, name, run_dir, names, roles, origin)


def _run_locked(cfg: DictConfig, kind: str, split: dict, label: str, name: str, run_dir: Path, names: list[str],
                roles: dict | None = None, origin: dict | None = None) -> dict:
    finished = open_run_folder(cfg, run_dir)
    if finished is not None:
        return finished
    t0 = time.time()
    data_root, phantom = resolve_data_root(cfg)
    if is_rank_zero():
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    configure_backends(cfg)
    planned = plan_stage(cfg, kind, split, label, name, run_dir, data_root, phantom, "oracle" in names, roles, origin)
    fit = train_stage(cfg, planned, run_dir, name, kind, names, phantom)
    results = select_and_test(fit.trainer, fit.module, planned.dm, run_dir, fit.callbacks, names,
                              predict_and_score(cfg, fit.trainer, fit.module, planned.dm, planned.plan))
    if not is_rank_zero():
        return results[0]
    return record_stage(cfg, kind, name, run_dir, planned, fit, data_root, names, results, t0)


def open_run_folder(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Clear (run.overwrite), check and mark the run folder; a finished run's metrics, printed, else None."""
    if cfg.run.overwrite and is_rank_zero():  # other DDP ranks start once rank 0 is writing
        remove_run_folder(run_dir)
    check_config_unchanged(run_dir, cfg)
    if (run_dir / "done").exists():
        say(f"{run_dir} is already finished (run.overwrite=true to redo); its metrics:")
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        say(json.dumps(metrics, indent=1, sort_keys=True))
        return metrics
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_rank_zero():
        mark_run_folder(run_dir)
        for tmp in remove_stale_tmp(run_dir / "checkpoints"):  # we hold the lock: their writer is dead
            say(f"removed {tmp}, left by a save that was killed")
    return None


def check_config_unchanged(run_dir: Path, cfg: DictConfig) -> None:
    """A run folder resumed or skipped must belong to the same configuration (the name hashes the
    overrides, not code defaults): a changed default must never be mixed into old results silently."""
    stored = run_dir / "config.yaml"
    if not stored.exists():
        return
    old = config_hash(OmegaConf.load(stored))
    new = config_hash(cfg)
    if old != new:
        raise ValueError(f"{run_dir} holds a run of another configuration (config hash {old}, now {new}; compare "
                         f"{stored} with the current config): run.overwrite=true redoes it, or use another paths.runs")
