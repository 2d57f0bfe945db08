"""Score nnU-Net's predictions of an exported plan with our metrics, as a run folder beside our runs.

    python -m experiments.import_nnunet PRED_DIR --plan FILE [--runs DIR] [--name NAME] [--dataset DIR]

PRED_DIR holds `<case>.nii.gz` as `nnUNetv2_predict` writes them for the export's `imagesTs` (with the
`dataset.json` it copies there, whose `covid_dg` block maps nnU-Net labels and cases back; `--dataset`
names the exported `DatasetXXX_<name>` folder instead). Every test case of the plan must be there, on
its stored grid. The labels go back to our common values (lesion 3, lungs 1 and 2, ...), are written
as `predictions/<source>/<case_id>.nii.gz` and scored by `experiments.score.score_predictions`, exactly
as a run scores itself. The run folder `<runs>/<plan kind>/<plan name>-nnunet-<hash>/` (hash over the
plan and the prediction files) gets plan.json, run.json (`method: nnunet`, `network: nnunet`),
per_case.csv, metrics.json and `done`, so `experiments.report` shows nnU-Net as one more row.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from datamodules.harmonize import grid_mismatch
from datamodules.io import read_volume
from datamodules.label_policy import CLASSES
from evaluation.aggregate import ROW_COLUMNS
from evaluation.records import RunInfo
from experiments.export_nnunet import FILE_ENDING, MAPPING_FILE
from experiments.plan import PLAN_FILE, PlanError, plan_hash, read_plan
from experiments.runfolder import mark_run_folder, remove_run_folder, run_folder
from experiments.score import score_predictions
from experiments.tracking import atomic_write_text, write_csv, write_json
from rundir.cli import command_name, run_cli

METHOD = "nnunet"


class PredictionImportError(ValueError):
    """Predictions that cannot be imported as given: names the file and what is wrong."""


def read_mapping(pred_dir: Path, dataset: Path | None) -> dict:
    """The export's mapping: `--dataset`'s covid_dg.json, else the `covid_dg` block of the dataset.json
    nnUNetv2_predict copies into its output folder."""
    if dataset is not None:
        path = dataset / MAPPING_FILE
        if not path.is_file():
            raise PredictionImportError(f"{dataset}: no {MAPPING_FILE} (not a folder written by experiments.export_nnunet)")
        return json.loads(path.read_text(encoding="utf-8"))
    path = pred_dir / "dataset.json"
    block = json.loads(path.read_text(encoding="utf-8")).get("covid_dg") if path.is_file() else None
    if not block:
        raise PredictionImportError(f"{pred_dir}: no dataset.json with a covid_dg block (nnUNetv2_predict copies the "
                           "exported dataset.json there); pass --dataset DIR, the exported DatasetXXX_<name> folder")
    return block


def stored_grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a case's stored image, from the header where it is a NIfTI file."""
    if path.is_file():
        img = nib.load(str(path))
        return tuple(int(s) for s in img.shape[:3]), img.affine
    data, affine = read_volume(path)
    return data.shape, affine


def common_labels(pred: np.ndarray, lut: np.ndarray, path: Path) -> np.ndarray:
    arr = np.asarray(pred)
    if arr.dtype.kind == "f":
        if not np.all(arr == np.rint(arr)):
            raise PredictionImportError(f"{path}: non-integer label values (probabilities? pass label maps)")
    arr = arr.astype(np.int64)
    bad = sorted(int(v) for v in np.unique(arr[(arr < 0) | (arr >= lut.size)]))
    if not bad:
        bad = sorted(int(v) for v in np.unique(arr[lut[arr] == 255]))
    if bad:
        raise PredictionImportError(f"{path}: label values {bad} are not labels of the export "
                           f"(known: {sorted(int(v) for v in np.flatnonzero(lut != 255))})")
    return lut[arr]


def import_predictions(pred_dir: Path, plan_path: Path, runs: Path, name: str | None = None,
                       dataset: Path | None = None, say=print) -> Path:
    t0 = time.time()
    plan = read_plan(plan_path)
    plan_file = plan_path / PLAN_FILE if plan_path.is_dir() else plan_path
    mapping = read_mapping(pred_dir, dataset)
    if mapping.get("plan_hash") != plan_hash(plan):
        raise PredictionImportError(f"the predictions come from an export of another plan (plan hash {mapping.get('plan_hash')}, "
                           f"{plan_file} has {plan_hash(plan)})")
    lut = np.full(max(int(v) for v in mapping["labels"]) + 1, 255, np.uint8)
    for nn_value, common in mapping["labels"].items():
        lut[int(nn_value)] = int(common)
    ident = {key: i for i, key in mapping["cases"].items()}
    files, problems = {}, []
    for key in plan["roles"]["test"]:
        if key not in ident:
            problems.append(f"{key}: not a case of the export")
            continue
        path = pred_dir / f"{ident[key]}{FILE_ENDING}"
        if not path.is_file():
            problems.append(f"{path}: missing (test case {key})")
            continue
        files[key] = path
    if problems:
        raise PredictionImportError(f"{len(problems)} test case(s) without a prediction:\n  " + "\n  ".join(problems))
    digest = hashlib.sha256(plan_hash(plan).encode())
    for key in sorted(files):
        digest.update(key.encode() + hashlib.sha256(files[key].read_bytes()).digest())
    name = name or f"{plan.get('name') or 'plan'}-{METHOD}-{digest.hexdigest()[:8]}"
    run_dir = run_folder(runs, plan["kind"], name)
    if (run_dir / "done").exists():
        say(f"{run_dir}: already imported (same plan, same prediction files)")
        return run_dir
    remove_run_folder(run_dir)
    mark_run_folder(run_dir)
    for key, path in files.items():
        rec = plan["cases"][key]
        pred, affine = read_volume(path)
        shape, stored_affine = stored_grid(Path(rec["image"]))
        why = grid_mismatch(shape, stored_affine, pred.shape, affine)
        if why is not None:
            raise PredictionImportError(f"{path}: not on the stored grid of {key} ({rec['image']}): {why}")
        labels = common_labels(pred, lut, path)
        out = run_dir / "predictions" / rec["source"] / f"{rec['case_id']}.nii.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(labels.astype(np.uint8), stored_affine)
        img.set_qform(stored_affine, code=1)
        img.set_sform(stored_affine, code=1)
        nib.save(img, str(out))
    metrics, rows = score_predictions(plan, run_dir / "predictions", "test")
    metrics["data"] = plan.get("data", "unknown")
    shutil.copyfile(plan_file, run_dir / PLAN_FILE)
    source_run = _source_run(plan_file)
    split = []
    for role in ("train", "val", "test"):
        by_src: dict[str, list[dict]] = {}
        for key in plan["roles"][role]:
            by_src.setdefault(plan["cases"][key]["source"], []).append(plan["cases"][key])
        split += [{"role": role, "source": s, "cases": len(rs), "patients": len({r["patient_id"] for r in rs})}
                  for s, rs in sorted(by_src.items())]
    info = {
        "kind": plan["kind"], "name": name, "data": metrics["data"], "data_root": plan.get("data_root"),
        "experiment": source_run.get("experiment", METHOD), "preset": source_run.get("preset"),
        "seed": plan.get("seed"), "method": METHOD, "network": METHOD, "loss": METHOD, "config_hash": plan_hash(plan),
        "plan_hash": plan_hash(plan),
        "eval_space": (plan.get("evaluation") or {}).get("space", "original"),
        "train_sources": list(plan.get("train_sources") or []), "test_sources": list(plan.get("test_sources") or []),
        "split_args": plan.get("split_args", {}), "split": split, "duplicates": plan.get("duplicates", []),
        "dropped": plan.get("dropped", []), "skipped": plan.get("skipped", []),
        "nnunet": {"predictions": str(pred_dir.resolve()), "plan_hash": mapping["plan_hash"],
                   "labels": {str(k): CLASSES[v] for k, v in ((int(a), int(b)) for a, b in mapping["labels"].items())},
                   **_nnunet_details(pred_dir)},
        "wall_s": round(time.time() - t0, 1),
    }
    write_csv(run_dir / "per_case.csv", [dict(r, split="test") for r in rows], first=ROW_COLUMNS)
    write_json(run_dir / "metrics.json", metrics)
    # the typed record the runner writes and the report reads: a key it does not know stays in `extra`
    write_json(run_dir / "run.json", RunInfo.from_json(info).to_json())
    atomic_write_text(run_dir / "done", time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")
    say(f"run folder: {run_dir}")
    for k in sorted(metrics):
        if k.startswith("test/") and k.rsplit("/", 1)[-1] in ("dice", "nsd", "hd95", "dice_lung"):
            say(f"  {k} = {metrics[k]:.4f}")
    return run_dir


def _source_run(plan_file: Path) -> dict:
    """run.json of the run folder the plan belongs to (its experiment and preset group the tables)."""
    path = plan_file.parent / "run.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}


def _nnunet_details(pred_dir: Path) -> dict:
    """What nnUNetv2_predict recorded beside its predictions (configuration, folds, checkpoint)."""
    out = {}
    args = pred_dir / "predict_from_raw_data_args.json"
    plans = pred_dir / "plans.json"
    try:
        if args.is_file():
            out["predict_args"] = json.loads(args.read_text(encoding="utf-8"))
        if plans.is_file():
            p = json.loads(plans.read_text(encoding="utf-8"))
            out["plans"] = {k: p.get(k) for k in ("dataset_name", "plans_name")}
    except ValueError:
        pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=command_name("python -m experiments.import_nnunet"), description=__doc__.split("\n\n")[0])
    ap.add_argument("pred_dir", type=Path, help="nnUNetv2_predict's output folder")
    ap.add_argument("--plan", required=True, type=Path, help="the exported plan.json (or its run folder)")
    ap.add_argument("--runs", type=Path, default=Path("runs"), help="runs folder (default runs)")
    ap.add_argument("--name", default=None, help="run folder name (default <plan name>-nnunet-<hash>)")
    ap.add_argument("--dataset", type=Path, default=None, help="the exported DatasetXXX_<name> folder (default: "
                    "the dataset.json nnUNetv2_predict copied into PRED_DIR)")
    args = ap.parse_args(argv)
    try:
        import_predictions(args.pred_dir, args.plan, args.runs, args.name, args.dataset)
    except (PredictionImportError, PlanError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.import_nnunet"))
