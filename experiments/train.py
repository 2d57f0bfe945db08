"""Train exactly the split a plan lists: `python -m experiments.train --plan FILE [key=value ...]`.

FILE is a `plan.json` (a run folder's, or a copy a user edited: e.g. a case moved from `roles.val` to
`roles.train`). The run trains, selects, predicts and scores like any run, on the plan's roles as written,
with the configuration the plan records (`config`) and the overrides given. Leakage checks still apply: a
case of a held-out source, or a patient of the test set, in train or validation raises LeakageError
naming the case. The run is named `<label>-<experiment>-<hash>`, the hash covering the plan
(`experiments.plan.plan_hash`) and the configuration: an edited plan is another run. Its plan.json and
run.json record where it came from and whether that file had been edited since it was written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from experiments.config import load_config
from experiments.config_checks import apply_overrides, check_config
from experiments.plan import PlanError, plan_hash, read_plan
from experiments.tracking import config_hash
from rundir.cli import command_name, run_cli


def plan_config(plan: dict, where: str, overrides: list[str]) -> DictConfig:
    """The configuration a plan records, with `overrides` applied and checked; `run.name` is the plan's own."""
    base = plan.get("config")
    if not isinstance(base, dict):
        raise PlanError(f"{where}: no `config` (a plan written before it was recorded): rerun its experiment to "
                        "write a current plan.json")
    presets = [f"experiment={base.get('experiment') or 'default'}"] + ([f"preset={base['preset']}"] if base.get("preset") else [])
    cfg = OmegaConf.merge(load_config(presets), base)
    cfg.run.name = None
    cfg = apply_overrides(cfg, overrides)
    check_config(cfg)
    return cfg


def check_settings(plan: dict, cfg: DictConfig, where: str) -> None:
    """The plan's harmonizer and network sections must be what the configuration makes: they are recorded,
    not read, so an edit there would be silently ignored. Settings change through key=value overrides."""
    from experiments.build import harmonizer_config

    made = {"harmonizer": harmonizer_config(cfg).as_dict(),
            "network": {"name": cfg.model.name, "spatial_dims": int(cfg.model.spatial_dims),
                        "context_slices": int(cfg.model.context_slices)}}
    for key, value in made.items():
        planned = plan.get(key) or {}
        want = json.loads(json.dumps(value))
        if key == "network":
            planned = {k: planned.get(k) for k in want}
        if planned != want:
            raise PlanError(f"{where}: `{key}` differs from what its configuration makes ({want}); a plan's roles "
                            "are read, its settings are not: change them with key=value overrides")


def plan_origin(plan: dict, path: Path) -> dict:
    now = plan_hash(plan)
    written = plan.get("hash")
    return {"path": str(path.resolve()), "hash": now, "written_hash": written,
            "edited": None if written is None else written != now}


def plan_run_name(plan: dict, cfg: DictConfig, label: str) -> str:
    digest = hashlib.sha256(f"{plan_hash(plan)}:{config_hash(cfg)}".encode()).hexdigest()[:8]
    return f"{label}-{cfg.experiment}-p{digest}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=command_name("python -m experiments.train"), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", type=Path, required=True, help="a plan.json, or a run folder holding one")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (not the split: edit the plan)")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING)
    path = args.plan / "plan.json" if args.plan.is_dir() else args.plan
    plan = read_plan(path)
    cfg = plan_config(plan, str(path), list(args.overrides))
    check_settings(plan, cfg, str(path))
    label = plan.get("label") or "+".join(plan.get("held_out") or plan.get("train_sources") or ["plan"])
    if not cfg.run.name:
        cfg.run.name = plan_run_name(plan, cfg, label)
    from experiments.runner import run  # torch and Lightning only when a run starts

    return run(cfg, plan["kind"], dict(plan.get("split_args") or {}), label, roles=plan["roles"],
               origin=plan_origin(plan, path))


def cli(argv: list[str] | None = None) -> int:
    from datamodules.locking import FolderInUse
    from datamodules.splits import LeakageError
    from lightning_modules.segmentation import NonFiniteLoss

    try:
        main(argv)
    except (PlanError, LeakageError, FolderInUse, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, (PlanError, LeakageError)) else 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(cli, "python -m experiments.train"))
