"""One sweep run: `python -m experiments.sweep_run protocol=NAME key=value ...` (what every sweep backend
executes: sweeps.launch's local and SLURM backends, and `wandb agent` through the sweep file's `command`).

The run folder is `<paths.runs>/<kind>/<label>-<hash of the overrides>` (rundir.naming): the same
overrides always reach the same folder, so a finished run (its `done` marker) is skipped and an unfinished
one resumes from its last checkpoint with the same W&B run id (experiments.tracking derives the id from the
folder). It lives here, not in `sweeps`: the sweep layer launches experiments as a program and imports
nothing from them.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

from experiments.config import load_config
from experiments.protocols import PROTOCOLS, Plan, run_protocol
from experiments.runfolder import run_folder
from rundir.cli import run_cli
from sweeps.expand import overrides_hash, split_run_overrides


def split_protocol(overrides: list[str]) -> tuple[str, list[str]]:
    protocol = [o.split("=", 1)[1] for o in overrides if o.startswith("protocol=")]
    if len(protocol) != 1:
        raise ValueError("a sweep run needs exactly one protocol=NAME (loso, transfer, fewshot)")
    return protocol[0], [o for o in overrides if not o.startswith("protocol=")]


def plan_run(overrides: list[str]) -> tuple[str, DictConfig, Plan, Path]:
    """(protocol, config with run.name set, plan, run folder) for one sweep run; trains nothing."""
    protocol, rest = split_protocol(list(overrides))
    cfg = load_config(rest)
    plan = PROTOCOLS.lookup(protocol)(cfg)
    cfg.run.name = f"{plan.label}-{overrides_hash(overrides)}"
    return protocol, cfg, plan, run_folder(cfg.paths.runs, plan.kind, cfg.run.name)


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.WARNING)
    try:
        # a hyperparameter search under `wandb agent` passes each run's overrides as one argument
        protocol, cfg, _plan, run_dir = plan_run(split_run_overrides(sys.argv[1:] if argv is None else argv))
    except ValueError as e:  # a config error names its key: one line in the run's log, not a traceback
        raise SystemExit(f"error: {e}") from None
    # the first line of the run's log (sweeps.launch writes one per run): which run folder this log belongs to
    print(f"sweep run ({protocol}): {run_dir}", flush=True)
    # a sweep's run waits for its folder instead of failing: another launcher (or an agent on another
    # machine sharing the runs folder) may be finishing the same run, which is then skipped as done
    return run_protocol(protocol, cfg, wait=True)


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.sweep_run"))
