"""Run names, result files and the W&B logger (offline unless the user configures online).

The atomic writers and the run hash live in `rundir` (below evaluation and sweeps, which use them too);
they are re-exported here for the experiment modules.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rundir.atomic import atomic_write_text, write_csv, write_json
from rundir.naming import run_hash

__all__ = ["atomic_write_text", "config_hash", "make_wandb_logger", "write_csv", "write_json"]


def config_hash(cfg: DictConfig, length: int | None = None) -> str:
    """The hash in a direct run's folder name (rundir.naming.run_hash of the resolved config)."""
    return run_hash(OmegaConf.to_container(cfg, resolve=True), length)


def make_wandb_logger(cfg: DictConfig, run_dir: Path, run_name: str, job_type: str, tags: Sequence[str]):
    """A WandbLogger in cfg.wandb.mode; `disabled` gives None. The run id derives from the run folder,
    so a resumed run continues the same W&B run (except under a W&B sweep agent, which sets the id)."""
    mode = str(cfg.wandb.mode)  # one of experiments.choices.WandbMode: the config schema checked it
    if mode == "disabled":
        return None
    from pytorch_lightning.loggers import WandbLogger

    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    # The run id must be stable across restarts of one run folder, and distinct between folders. Under a
    # `wandb agent` (BACKEND=wandb) the agent owns the id (WANDB_RUN_ID): passing ours would detach the
    # run from its sweep, so the agent's is kept.
    run_id = None if os.environ.get("WANDB_SWEEP_ID") else hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    logger = WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, name=run_name, id=run_id,
                         save_dir=str(run_dir), job_type=job_type, group=cfg.wandb.group or f"{job_type}-{cfg.experiment}",
                         tags=list(tags) + list(cfg.wandb.tags), resume="allow",
                         config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    # Lightning passes `anonymous=None` to wandb.init even when unset, and wandb (>= 0.19) warns on every
    # run that the setting "has no effect" (issue 19): leave the key out, which is what None meant.
    if getattr(logger, "_wandb_init", {}).get("anonymous", "") is None:
        del logger._wandb_init["anonymous"]
    return logger
