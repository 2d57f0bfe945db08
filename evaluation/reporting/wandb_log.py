"""Logging a finished report (its tables and plots) as one W&B run."""
from __future__ import annotations

import os
from pathlib import Path

from evaluation.reporting.common import PHANTOM_MARK
from evaluation.reporting.render import Table, clean


def log_wandb(tables: dict, written: dict[str, Table], out: str | Path, group: str | None = None,
              extra_images: dict[str, Path] | None = None) -> str:
    """One W&B run (job_type report) with every table and plot; offline unless WANDB_MODE says otherwise.
    `group`: a sweep's name, so its report sits beside its runs in the dashboard."""
    import wandb

    out = Path(out)
    os.environ.setdefault("WANDB_SILENT", "true")
    meta, mode = tables["meta"], os.environ.get("WANDB_MODE") or "offline"
    try:
        # init_timeout: an online mode without network fails after a minute instead of waiting
        run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "covid-dg", job_type="report", mode=mode,
                         dir=str(out), tags=["phantom" if meta["phantom"] else "real"], group=group,
                         config={"metric": meta["metric"], "class": meta["class"], "bootstrap": meta["bootstrap"],
                                 "runs": [r["path"] for r in tables["runs"]]},
                         settings=wandb.Settings(init_timeout=60))
    except Exception as e:  # wandb raises its own error types (CommError, UsageError, ...)
        raise SystemExit(f"error: W&B could not start in mode {mode!r} ({e}); the report files in {out} are "
                         "written; WANDB_MODE=offline logs without network") from e
    try:
        logged = {f"table/{t.name}": wandb.Table(columns=t.csv_columns, allow_mixed_types=True,
                                                 data=[[clean(r.get(c)) for c in t.csv_columns] for r in t.csv_rows])
                  for t in written.values()}
        logged.update({f"plot/{Path(p['file']).stem}": wandb.Image(str(out / p["file"]), caption=p["title"])
                       for p in tables["plots"]})
        logged.update({key: wandb.Image(str(path), caption=key) for key, path in (extra_images or {}).items()})
        run.log(logged)
        run.summary.update({"phantom": meta["phantom"], "data": PHANTOM_MARK if meta["phantom"] else "real",
                            "n_runs": meta["n_runs"]})
        return str(getattr(run, "dir", ""))
    finally:
        wandb.finish()
        wandb.teardown()  # completes the offline files and clears WANDB_SERVICE (no child attaches to it)
