"""Run folders, atomic result files and the W&B logger (offline unless the user configures online)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

# Keys that do not change what a run computes, so they do not enter its name hash.
NAME_EXCLUDED = ("paths.runs", "paths.cache", "run.name", "run.overwrite", "wandb.mode", "wandb.entity", "wandb.tags",
                 "wandb.group", "data.num_workers", "data.cache_workers", "trainer.threads",
                 "trainer.checkpoint_every_n_steps")


def config_hash(cfg: DictConfig, length: int = 8) -> str:
    c = OmegaConf.to_container(cfg, resolve=True)
    for dotted in NAME_EXCLUDED:
        node = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest()[:length]


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")  # never the locale: reports hold ±, ², …
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def write_csv(path: str | Path, rows: Sequence[dict], first: Sequence[str] = ("case", "source")) -> None:
    keys = list(first) + sorted({k for r in rows for k in r} - set(first))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def make_wandb_logger(cfg: DictConfig, run_dir: Path, run_name: str, job_type: str, tags: Sequence[str]):
    """A WandbLogger in cfg.wandb.mode; `disabled` gives None. The run id derives from the run folder,
    so a resumed run continues the same W&B run (except under a W&B sweep agent, which sets the id)."""
    mode = cfg.wandb.mode
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"wandb.mode must be offline, online or disabled, got {mode!r}")
    if mode == "disabled":
        return None
    from pytorch_lightning.loggers import WandbLogger

    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    # The run id must be stable across restarts of one run folder, and distinct between folders. Under a
    # `wandb agent` (BACKEND=wandb) the agent owns the id (WANDB_RUN_ID): passing ours would detach the
    # run from its sweep, so the agent's is kept.
    run_id = None if os.environ.get("WANDB_SWEEP_ID") else hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return WandbLogger(project=cfg.wandb.project, entity=cfg.wandb.entity, name=run_name, id=run_id,
                       save_dir=str(run_dir), job_type=job_type, group=cfg.wandb.group or f"{job_type}-{cfg.experiment}",
                       tags=list(tags) + list(cfg.wandb.tags), resume="allow",
                       config=OmegaConf.to_container(cfg, resolve=True))
