"""The run's record: `run.json` (evaluation.records.RunInfo), per_case.csv / val_per_case.csv /
metrics.json, overlays and the W&B summary, and the lines printed when a run ends."""
from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from datamodules.harmonize import decode_intensity
from datamodules.io import read_volume
from evaluation.aggregate import ROW_COLUMNS
from evaluation.records import RunInfo
from evaluation.selection_rules import DEGENERATE_MARK
from experiments.build import variant
from experiments.tracking import config_hash, write_csv, write_json


def run_info(cfg: DictConfig, kind: str, name: str, plan: dict, dm, selection: dict, data_root: Path,
             world_size: int, wall_s: float, schedule: dict | None = None) -> RunInfo:
    return RunInfo(
        kind=kind, name=name, data=plan["data"], data_root=str(data_root), experiment=cfg.experiment,
        preset=cfg.preset, seed=int(cfg.run.seed), **variant(cfg),
        **({"task": cfg.fewshot.task, "fold": int(cfg.fewshot.fold)} if kind == "fewshot" else {}),
        config_hash=config_hash(cfg), plan_hash=plan.get("hash"), plan_origin=plan.get("origin"),
        eval_space=str(cfg.evaluation.space), best_checkpoint=selection["checkpoints"][selection["method"]]["path"],
        selection=selection, train_sources=list(dm.split.train_sources), test_sources=list(dm.split.test_sources),
        split_args=dict(plan["split_args"]), split=dm.split.summary(), skipped=list(dm.skipped),
        alignment=dm.alignment(), duplicates=[list(g.keys) for g in dm.duplicates],
        dropped=[c.key for c in dm.split.dropped], world_size=world_size, wall_s=round(wall_s, 1), schedule=schedule,
        torch=torch.__version__, pytorch_lightning=pl.__version__)


def write_results(run_dir: Path, metrics: dict, val_rows: list, test_rows: list, info: RunInfo) -> None:
    write_csv(run_dir / "per_case.csv", [dict(r, split="test") for r in test_rows], first=ROW_COLUMNS)
    write_csv(run_dir / "val_per_case.csv", [dict(r, split="val") for r in val_rows], first=ROW_COLUMNS)
    write_json(run_dir / "metrics.json", metrics)
    write_json(run_dir / "run.json", info.to_json())


def print_summary(run_dir: Path, metrics: dict, selection: dict, names: list[str], phantom: bool) -> None:
    print(f"run folder: {run_dir}")
    for k in sorted(metrics):
        if k.startswith(("test/", "val/mean/dice")) and k.rsplit("/", 1)[-1] in ("dice", "nsd", "hd95", "dice_lung", "nsd_lung"):
            print(f"  {k} = {metrics[k]:.4f}")
    head = selection["checkpoints"][names[0]]
    print(f"  selection {names[0]}: epoch {head['epoch']} (step {head['global_step']})"
          + (f" {DEGENERATE_MARK}degenerate: {head['degenerate']}; the last epoch was tested" if head.get("degenerate") else ""))
    for n in names[1:]:
        flat = selection["checkpoints"][n].get("degenerate")
        print(f"  selection {n}: test/mean/selection_dice = "
              f"{selection['test'][n].get('test/mean/selection_dice', float('nan')):.4f} "
              f"(epoch {selection['checkpoints'][n]['epoch']})" + (f" {DEGENERATE_MARK}degenerate" if flat else ""))
    if phantom:
        print("  (phantom data: synthetic sources)")


def mark_done(run_dir: Path) -> None:
    from experiments.checkpoints import PREVIOUS
    from experiments.tracking import atomic_write_text

    atomic_write_text(run_dir / "done", time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    (run_dir / "checkpoints" / PREVIOUS).unlink(missing_ok=True)  # the fallback is needed while training only


def example_overlays(run_dir: Path, dm, n_per_source: int = 1, sanity: dict | None = None) -> list[Path]:
    """Overlay PNGs of the saved test predictions: the most affected slice of the first case per source,
    image, reference (`references/`, written with evaluation.save_predictions) and prediction side by side;
    `sanity` ((source, case) -> the per-case sanity text) puts a case's problems under its panels."""
    from experiments.predict import overlay_slices  # matplotlib only when asked

    out, seen = [], {}
    (run_dir / "overlays").mkdir(exist_ok=True)
    for case in dm.split.test:
        if seen.get(case.source, 0) >= n_per_source:
            continue
        pred_path = run_dir / "predictions" / case.source / f"{case.case_id}.nii.gz"
        if not pred_path.exists():
            continue
        seen[case.source] = seen.get(case.source, 0) + 1
        hu, affine = read_volume(case.image)
        hu = decode_intensity(hu, case.encoding, case.window, str(case.image))
        pred = np.asarray(nib.load(str(pred_path)).dataobj)
        if pred.shape != hu.shape:  # evaluation.space=harmonized: the prediction is on the training grid
            continue
        ref_path = run_dir / "references" / case.source / f"{case.case_id}.nii.gz"
        ref = np.asarray(nib.load(str(ref_path)).dataobj) if ref_path.exists() else None
        if ref is not None and ref.shape != pred.shape:  # harmonized-space references: another grid than the image's
            ref = None
        problems = (sanity or {}).get((case.source, case.case_id))
        out += overlay_slices(hu, pred, affine, run_dir / "overlays" / f"{case.source}_{case.case_id}", n=1,
                              reference=ref, note=f"implausible: {problems}" if problems not in (None, "ok") else None)
    return out


def log_to_wandb(wandb_logger, metrics: dict, test_rows: list, selection: dict, overlays: list[Path]) -> None:
    import wandb

    cols = sorted({k for r in test_rows for k in r})
    run_obj = wandb_logger.experiment
    logged = {"test/per_case": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in test_rows])}
    sel_cols = ["selection", "checkpoint", "epoch", "score", *sorted({k for t in selection["test"].values() for k in t})]
    logged["selection/table"] = wandb.Table(columns=sel_cols, data=[
        [name, Path(c["path"]).name, c["epoch"], c["score"], *[selection["test"][name].get(k) for k in sel_cols[4:]]]
        for name, c in selection["checkpoints"].items()])
    for path in overlays:
        logged[f"overlay/{path.stem}"] = wandb.Image(str(path), caption=path.stem)
    run_obj.log(logged)
    run_obj.summary.update(metrics)
    wandb.finish()
    # the offline record log is completed by wandb's service process; teardown waits for it, so the
    # run folder is whole when this function returns (and a later run in this process starts clean)
    wandb.teardown()




def record_stage(cfg: DictConfig, kind: str, name: str, run_dir: Path, planned, fit, data_root: Path, names: list[str],
                 results: tuple[dict, list, list, dict], t0: float) -> dict:
    """Rank zero, after testing: write the run's files, log to W&B, mark the folder `done`, print the summary."""
    metrics, val_rows, test_rows, sel = results
    metrics["data"] = planned.plan["data"]
    info = run_info(cfg, kind, name, planned.plan, planned.dm, sel, data_root, fit.trainer.world_size,
                    time.time() - t0, fit.schedule)
    write_results(run_dir, metrics, val_rows, test_rows, info)
    # overlays/ with or without W&B: the first look at what the model predicts
    overlays = example_overlays(run_dir, planned.dm, sanity={(r["source"], r["case"]): r.get("sanity") for r in test_rows}) \
        if cfg.evaluation.save_predictions else []
    if fit.wandb_logger is not None:
        log_to_wandb(fit.wandb_logger, metrics, test_rows, sel, overlays)
    mark_done(run_dir)
    print_summary(run_dir, metrics, sel, names, planned.plan["data"] == "phantom")
    print(wall_time_line(info.wall_s, fit.schedule), flush=True)
    return metrics


def wall_time_line(wall_s: float, schedule: dict | None) -> str:
    """`wall time 3:05 (training 2:40, estimated ~3 min after step 7)`: how the estimate held up."""
    from experiments.progress import duration, minutes

    line = f"  wall time {duration(wall_s)}"
    actual = (schedule or {}).get("actual") or {}
    estimate = (schedule or {}).get("estimate") or {}
    if actual.get("wall_s") is not None:
        line += f" (training {duration(actual['wall_s'])}"
        if estimate.get("wall_s") is not None:
            line += f", estimated {minutes(estimate['wall_s'])} after step {estimate['steps'][1]}"
        line += ")"
    return line
