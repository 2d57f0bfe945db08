"""Score any tool's NIfTI predictions against reference masks, the way our runs score themselves.

    python -m experiments.evaluate --pred DIR --ref DIR --out DIR [--labels lesion=1,...]
        [--tolerance lesion=3,...] [--lesions-by-side lung_left,lung_right] [--image DIR] [--lobes DIR]
        [--allow-missing] [--allow-unknown-labels]

Files are matched by case id: the path below DIR without `.nii`/`.nii.gz` (so `mosmed/study_0255`
in a run folder's `predictions/` matches the same path in its `references/`; flat folders match by
file name). `--labels` maps class names to label values, `+` merging values into one mask
(`lesion=3,lung=1+2+3`); the same values apply to prediction and reference. `--lesions-by-side` names
lung-side classes (values 1 or 2 of the common codes, as run folders and COVID-19-CT-Seg's masks store
them): lesion voxels (3, 6, 7) join the nearer lung side first, as runs score lung_left/lung_right. Metrics are computed on
the reference's grid with its voxel spacing; a prediction on another grid is an error, not resampled.
With `--image` (CT on the same grid, found by case id or its file name, nnU-Net's `<case>_0000` names
accepted; `--source ctseg` decodes that source's 8-bit exports to HU) the lesion rows get
severity columns (PO, PHO, WAL; LSS/LHOS with `--lobes`). The lung for PO comes from `--lobes` when
given, otherwise from the reference's class named `lung` for both reference and prediction (as
training-time evaluation does; `--pred-lung` scores the prediction inside its own lung instead).

A prediction holding a label value that is neither background (0), nor named by `--labels`, nor `--ignore`,
nor used by any reference is an error naming the file and the values (a tool writing lesions as 255 or
lungs as 2 would otherwise score as an empty prediction); `--allow-unknown-labels` scores anyway, and
`summary.json` records them under `unknown_labels` either way.

Writes `per_case.csv` (one row per case and class) and `summary.json` (mean/std/median per class and
overall, pooled relative volume, severity agreement) atomically.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from datamodules.harmonize import check_intensity, check_pair, decode_intensity
from datamodules.io import VolumeError, read_volume, spacing_of
from datamodules.sources import get_source
from datamodules.sources.base import NIFTI_RE
from evaluation.metrics import METRIC_NAMES
from evaluation.scoring import (
    EvalClass,
    attach_severity,
    make_classes,
    parse_labels,
    parse_tolerances,
    score_case,
    summarize,
)
from experiments.tracking import write_csv, write_json
from rundir.cli import command_name, run_cli

COLUMNS = ("source", "case", "class", *METRIC_NAMES, "surface_worst_case", "tolerance_mm")


class EvaluationError(ValueError):
    """Inputs that cannot be scored as given (missing cases, geometry mismatch, bad label values)."""


def index_niftis(folder: Path) -> dict[str, Path]:
    """Case id (relative path without extension) -> file; hidden and macOS `._*` files are skipped."""
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: not a folder")
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and NIFTI_RE.search(p.name) and not any(part.startswith(".") for part in p.relative_to(folder).parts):
            out[NIFTI_RE.sub("", p.relative_to(folder).as_posix())] = p
    return out


def match_cases(pred: dict[str, Path], ref: dict[str, Path], allow_missing: bool) -> tuple[list[str], dict]:
    only_pred, only_ref = sorted(set(pred) - set(ref)), sorted(set(ref) - set(pred))
    common = sorted(set(pred) & set(ref))
    if not common:
        raise EvaluationError(f"no case id is in both folders (predictions: {sorted(pred)[:5]}..., "
                              f"references: {sorted(ref)[:5]}...)")
    if (only_pred or only_ref) and not allow_missing:
        raise EvaluationError(
            f"case ids differ between the folders: {len(only_ref)} reference case(s) without a prediction "
            f"{only_ref[:10]}, {len(only_pred)} prediction(s) without a reference {only_pred[:10]}; "
            "pass --allow-missing to score only the cases in both")
    return common, {"without_prediction": only_ref, "without_reference": only_pred}


def read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A mask as integers; float masks (Kaggle's COVID-19-CT-Seg copies) must hold whole numbers."""
    data, affine = read_volume(path)
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            raise VolumeError(f"{path}: mask contains NaN or inf")
        rounded = np.rint(data)
        if np.abs(data - rounded).max() > 1e-3:
            raise VolumeError(f"{path}: mask holds non-integer values (e.g. {data[np.abs(data - rounded) > 1e-3][:3]}); "
                              "threshold probabilities into labels first")
        data = rounded
    return data.astype(np.int32, copy=False), affine


def label_values(labels: np.ndarray) -> set[int]:
    """The distinct values of an integer label map (a histogram when they are small: far quicker than
    np.unique's sort on a CT-sized volume)."""
    lo, hi = int(labels.min(initial=0)), int(labels.max(initial=0))
    if lo >= 0 and hi < 2 ** 16:
        return {int(v) for v in np.flatnonzero(np.bincount(labels.reshape(-1), minlength=1))}
    return {int(v) for v in np.unique(labels)}


def unknown_labels(pred_values: dict[str, set[int]], ref_values: set[int], classes: list[EvalClass],
                   ignore: int | None) -> dict[str, list[int]]:
    """Per case, the prediction values nobody declared: not 0, not in `--labels`, not `--ignore`, and
    in no reference (so a lung code beside the scored lesion code is known when the references use it)."""
    known = {0, *ref_values, *(int(v) for c in classes for v in c.values)} | ({ignore} if ignore is not None else set())
    return {cid: sorted(v - known) for cid, v in pred_values.items() if v - known}


def find_companion(folder: Path | None, case_id: str) -> Path | None:
    if folder is None:
        return None
    base = case_id.rpartition("/")[2]
    for stem in dict.fromkeys((case_id, f"{case_id}_0000", base, f"{base}_0000")):
        for ext in (".nii.gz", ".nii"):
            if (folder / f"{stem}{ext}").is_file():
                return folder / f"{stem}{ext}"
    return None


def evaluate_case(case_id: str, pred_path: Path, ref_path: Path, classes: list[EvalClass],
                  image_path: Path | None = None, lobes_path: Path | None = None, source: str | None = None,
                  pred_lung: bool = False, ignore: int | None = None, values: dict | None = None) -> list[dict]:
    """Rows of one case; `values` (optional) receives the label values of its prediction and reference."""
    ref, ref_affine = read_labels(ref_path)
    pred, pred_affine = read_labels(pred_path)
    check_pair(ref_path, ref.shape, ref_affine, pred_path, pred.shape, pred_affine)
    if values is not None:
        values.update(pred=label_values(pred), ref=label_values(ref))
    spacing = spacing_of(ref_affine).tolist()
    rows = score_case(pred, ref, spacing, classes, ignore=ignore)
    folder, _, case = case_id.rpartition("/")
    for r in rows:
        r.update(source=folder, case=case)
    hu = lobes = None
    if image_path is not None:
        stored, img_affine = read_volume(image_path)
        check_pair(ref_path, ref.shape, ref_affine, image_path, stored.shape, img_affine)
        # A source's 8-bit exports hold window positions, not HU: decode them as training does.
        dec = get_source(source).decoding(case) if source else {"encoding": "hu", "window": None}
        check_intensity(stored, dec["encoding"], str(image_path), image_path)
        hu = decode_intensity(stored, dec["encoding"], dec["window"], str(image_path))
    if lobes_path is not None:
        lobes, lobes_affine = read_labels(lobes_path)
        check_pair(ref_path, ref.shape, ref_affine, lobes_path, lobes.shape, lobes_affine)
    attach_severity(rows, classes, pred, ref, spacing, hu=hu, lobes=lobes, pred_lung=pred_lung)
    return rows


def evaluate_folders(pred_dir: Path, ref_dir: Path, out_dir: Path, classes: list[EvalClass],
                     image_dir: Path | None = None, lobes_dir: Path | None = None,
                     allow_missing: bool = False, source: str | None = None, pred_lung: bool = False,
                     ignore: int | None = None, allow_unknown_labels: bool = False) -> dict:
    pred, ref = index_niftis(pred_dir), index_niftis(ref_dir)
    cases, missing = match_cases(pred, ref, allow_missing)
    problems: list[str] = []
    companions: dict[str, tuple[Path | None, Path | None]] = {}
    for cid in cases:
        img, lob = find_companion(image_dir, cid), find_companion(lobes_dir, cid)
        if image_dir is not None and img is None:
            problems.append(f"{cid}: no image {cid}.nii(.gz) or {cid}_0000.nii(.gz) in {image_dir}")
        if lobes_dir is not None and lob is None:
            problems.append(f"{cid}: no lobe map {cid}.nii(.gz) in {lobes_dir}")
        companions[cid] = (img, lob)
    if problems:
        raise EvaluationError("missing inputs:\n  " + "\n  ".join(problems))
    rows: list[dict] = []
    pred_values: dict[str, set[int]] = {}
    ref_values: set[int] = set()
    t0 = time.time()
    for cid in tqdm(cases, desc="evaluate", unit="case", disable=not sys.stderr.isatty()):
        values: dict = {}
        try:
            rows.extend(evaluate_case(cid, pred[cid], ref[cid], classes, *companions[cid], source=source,
                                      pred_lung=pred_lung, ignore=ignore, values=values))
        except (VolumeError, ValueError) as exc:
            problems.append(f"{cid}: {exc}")
        if values:
            pred_values[cid], ref_values = values["pred"], ref_values | values["ref"]
    unknown = unknown_labels(pred_values, ref_values, classes, ignore)
    hint = ""
    if unknown and not allow_unknown_labels:
        problems += [f"{cid}: {pred[cid]}: prediction label values {codes} are unknown: not in --labels, not "
                     f"--ignore, in no reference (references use {sorted(ref_values)})" for cid, codes in unknown.items()]
        hint = "\n(--allow-unknown-labels scores them as background and records them in summary.json)"
    if problems:
        raise EvaluationError(f"{len(problems)} case(s) could not be scored:\n  " + "\n  ".join(problems) + hint)
    summary = summarize(rows)
    summary.update(
        inputs={"pred": str(pred_dir), "ref": str(ref_dir), "image": str(image_dir) if image_dir else None,
                "lobes": str(lobes_dir) if lobes_dir else None},
        class_definitions={c.name: {"values": list(c.values), "tolerance_mm": c.tolerance_mm,
                                    "lesions_by_side": c.lesions_by_side} for c in classes},
        missing=missing, unknown_labels=unknown, wall_s=round(time.time() - t0, 2))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "per_case.csv", rows, first=COLUMNS)
    write_json(out_dir / "summary.json", summary)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=command_name("python -m experiments.evaluate"), description=__doc__.split("\n\n")[0])
    ap.add_argument("--pred", required=True, type=Path, help="folder of predicted masks (NIfTI)")
    ap.add_argument("--ref", required=True, type=Path, help="folder of reference masks (NIfTI)")
    ap.add_argument("--out", required=True, type=Path, help="output folder for per_case.csv and summary.json")
    ap.add_argument("--labels", default="lesion=1", help="class=value[+value...],... (default lesion=1)")
    ap.add_argument("--tolerance", default=None, help="class=mm,... NSD tolerance (defaults: lung 1, lesion 3)")
    ap.add_argument("--lesions-by-side", default="", help="class,... lung-side classes (values 1 or 2): lesion "
                    "voxels (3, 6, 7) join the nearer lung side first, e.g. lung_left,lung_right")
    ap.add_argument("--image", type=Path, default=None, help="CT images in HU on the reference grid (severity)")
    ap.add_argument("--lobes", type=Path, default=None, help="lobe maps, values 1..5 = RUL, RML, RLL, LUL, LLL")
    ap.add_argument("--source", default=None, help="decode --image files with this source's storage quirks "
                    "(e.g. ctseg: 8-bit radiopaedia exports)")
    ap.add_argument("--pred-lung", action="store_true", help="predicted PO/PHO inside the predicted lung "
                    "(default: inside the reference lung, so severity errors reflect the lesion segmentation alone)")
    ap.add_argument("--ignore", type=int, default=None, help="reference label value to leave out of scoring "
                    "(run folders write 254 where a source's policy says ignore)")
    ap.add_argument("--allow-missing", action="store_true", help="score the cases present in both folders")
    ap.add_argument("--allow-unknown-labels", action="store_true", help="score predictions holding label values "
                    "that neither --labels, --ignore nor any reference uses (recorded in summary.json); "
                    "default: an error naming the files and values")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        classes = make_classes(parse_labels(args.labels), parse_tolerances(args.tolerance),
                               [c.strip() for c in args.lesions_by_side.split(",") if c.strip()])
        summary = evaluate_folders(args.pred, args.ref, args.out, classes, args.image, args.lobes, args.allow_missing,
                                   args.source, args.pred_lung, args.ignore, args.allow_unknown_labels)
    except (EvaluationError, VolumeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary['cases']} cases scored -> {args.out}/per_case.csv, {args.out}/summary.json")
    for name, entry in summary["classes"].items():
        parts = [f"{m}={entry[m]['mean']:.4f}" for m in ("dice", "nsd", "hd95") if entry[m]["n"]]
        print(f"  {name}: " + " ".join(parts) + f" (rv pooled {entry['rv_pooled']:.3f})")
    for key in ("without_prediction", "without_reference"):
        if summary["missing"][key]:
            print(f"  not scored, {key.replace('_', ' ')}: {summary['missing'][key]}")
    for cid, codes in summary["unknown_labels"].items():
        print(f"  warning: {cid}: prediction label values {codes} unknown, scored as background (--allow-unknown-labels)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "python -m experiments.evaluate"))
