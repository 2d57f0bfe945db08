"""Score stage: predictions on files -> per-case rows and the run's metric keys. No network, no GPU.

Reads what the plan says about each case of a role (its files, label policy, annotated classes and cache
entry) and the prediction `<pred_dir>/<source>/<case_id>.nii.gz`, and scores it:
- `evaluation.space=original`: against the stored mask on the stored grid (`load_original`), with that
  grid's spacing, and with the severity columns from the stored image's HU where the source annotates lungs;
- `harmonized`: against the cached harmonized mask, with the harmonized spacing.
Only the evaluation classes the case's source annotates are scored (`evaluation.aggregate.eval_classes`).
A run's own test numbers come from this function, on the files its predict stage wrote, so
`python -m experiments.score RUN` reproduces its `metrics.json` exactly; the nnU-Net import scores through
it as well.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.harmonize import load_original
from datamodules.io import spacing_of, write_volume
from datamodules.label_policy import IGNORE
from datamodules.sources import policy_named
from evaluation.aggregate import ROW_COLUMNS, aggregate, annotated_vector, eval_classes, unique_rows
from evaluation.sanity import SanityLimits, check_prediction, sanity_text
from evaluation.scoring import attach_severity, score_case
from experiments.plan import case_from_record, read_plan
from experiments.stages.predict import PREDICTIONS, prediction_path
from experiments.tracking import write_csv, write_json


class MissingPredictions(FileNotFoundError):
    """Cases of the plan's role without a prediction file: listed with the folder searched."""


def register_plan_sources(plan: dict) -> None:
    """Custom sources (YAML) a plan's configuration declared: their label policies must be known by name."""
    from datamodules.sources.custom import register_custom_source

    for spec in ((plan.get("config") or {}).get("data") or {}).get("custom_sources") or ():
        register_custom_source(spec)


def _read_prediction(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


def trained_classes(plan: dict) -> set[str]:
    """The classes some training case of the plan annotates: what the model learned to predict."""
    return {c for key in plan["roles"].get("train", ()) for c in plan["cases"][key].get("annotated") or ()}


def lungs_predicted(plan: dict) -> bool:
    return {"lung_left", "lung_right"} <= trained_classes(plan)


def case_sanity(pred: np.ndarray, ref: np.ndarray, affine: np.ndarray, evaluation: dict, rec: dict,
                lungs: bool, image: np.ndarray | None) -> str | None:
    """The `sanity` column of one case (evaluation.sanity), printed as one warning line when it finds
    problems; None for a plan written before `evaluation.sanity` existed (its table stays as it was)."""
    from experiments.predict import axial_axis

    if not evaluation.get("sanity"):
        return None
    problems = check_prediction(pred, spacing_of(affine), SanityLimits.from_config(evaluation["sanity"]), lungs,
                                axial_axis=axial_axis(affine), hu=image, ref=ref,
                                ref_lungs={"lung_left", "lung_right"} <= set(rec.get("annotated") or ()))
    if problems:
        print(f"warning: implausible prediction {rec['source']}/{rec['case_id']}: {'; '.join(problems)}", flush=True)
    return sanity_text(problems)


def score_case_files(rec: dict, pred: np.ndarray, evaluation: dict, hu: bool = True,
                     references_out: Path | None = None, lungs: bool = False) -> list[dict]:
    """Rows of one case: `pred` (labels in the common space, on the grid of `evaluation['space']`) against
    the case's reference (what the plan record `rec` points at), each with the case's `sanity` (`lungs`:
    the model predicts lungs, so their volume and position are checked)."""
    classes = eval_classes(evaluation, annotated_vector(rec.get("annotated") or ()))
    space = evaluation.get("space", "original")
    if space == "original":
        case = case_from_record(rec)
        policy = policy_named(rec["label_policy"]) if rec.get("label_policy") else None
        image, ref, affine = load_original(case, policy)
        if ref is None:
            raise ValueError(f"{case.key}: test case without a reference mask ({case.image})")
        spacing = spacing_of(affine).tolist()
        rows = score_case(pred, ref, spacing, classes, ignore=IGNORE)
        attach_severity(rows, classes, pred, ref, spacing, hu=image if hu else None)
        sanity = case_sanity(pred, ref, affine, evaluation, rec, lungs, image if hu else None)
    else:
        entry = Path(rec["cache"])
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        ref = np.load(entry / "label.npy")
        affine = np.asarray(meta["affine"], dtype=np.float64)
        rows = score_case(pred, ref, [float(s) for s in meta["spacing"]], classes, ignore=IGNORE)
        # harmonized grid: the image there is windowed and normalized, not HU: no outside-air check
        sanity = case_sanity(pred, ref, affine, evaluation, rec, lungs, None)
    if sanity is not None:
        for r in rows:
            r["sanity"] = sanity
    if references_out is not None:
        write_volume(prediction_path(references_out, rec["source"], rec["case_id"]), ref, affine)
    return [{"case": rec["case_id"], "source": rec["source"], "space": space, **r} for r in rows]


def score_predictions(plan: dict, pred_dir: Path, role: str = "test", hu: bool = True,
                      references_out: Path | None = None, keys: Sequence[str] | None = None) -> tuple[dict, list[dict]]:
    """Score `pred_dir/<source>/<case_id>.nii.gz` for every case of `plan['roles'][role]` (or `keys`).
    Returns (metrics with the run's keys `<role>/<source>/<metric>`..., rows one per case and class, ordered by
    source and case). `hu=False` leaves the severity columns out; `references_out` also writes the references
    scored against (same codes; classes a source does not annotate 0, ignored voxels 254)."""
    register_plan_sources(plan)
    pred_dir = Path(pred_dir)
    keys = list(plan["roles"][role] if keys is None else keys)
    missing = [k for k in keys if not prediction_path(pred_dir, *k.split("/", 1)).is_file()]
    if missing:
        raise MissingPredictions(f"{pred_dir}: no prediction for {len(missing)} of {len(keys)} case(s) of role "
                                 f"{role!r}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    rows: list[dict] = []
    lungs = lungs_predicted(plan)
    for key in keys:
        rec = plan["cases"][key]
        pred = _read_prediction(prediction_path(pred_dir, rec["source"], rec["case_id"]))
        rows += score_case_files(rec, pred, plan["evaluation"], hu=hu, references_out=references_out, lungs=lungs)
    rows = unique_rows(rows)
    return aggregate(rows, role), rows


def write_scores(out: Path, metrics: dict, rows: list[dict], split: str = "test") -> None:
    """per_case.csv and metrics.json as a run writes them."""
    write_csv(Path(out) / "per_case.csv", [dict(r, split=split) for r in rows], first=ROW_COLUMNS)
    write_json(Path(out) / "metrics.json", metrics)


def merged_metrics(previous: dict, test: dict, data: str | None) -> dict:
    """A run's metrics.json: its validation keys (computed during training) and `test` from the score stage."""
    out = {k: v for k, v in previous.items() if not k.startswith("test/")}
    out.update(test)
    if data:
        out["data"] = data
    return out


def score_run(run_dir: Path, out: Path | None = None, hu: bool = True) -> dict:
    """Re-score a run folder's test predictions (`predictions/`, and each other selection rule's in
    `selection/<rule>/predictions/`) through its `plan.json`; write per_case.csv and metrics.json into `out`
    (default: the run folder itself). Returns the metrics."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    plan = read_plan(run_dir)
    test, rows = score_predictions(plan, run_dir / PREDICTIONS, hu=hu)
    previous = {}
    if (run_dir / "metrics.json").is_file():
        previous = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    metrics = merged_metrics(previous, test, plan.get("data"))
    write_scores(out, metrics, rows)
    # the other selection rules: their own predictions, or (same weights as the headline) the headline's
    rules = sorted({p.parent.name for p in (run_dir / "selection").glob("*/per_case.csv")}
                   | {p.parent.name for p in (run_dir / "selection").glob(f"*/{PREDICTIONS}")})
    for rule in rules:
        own = run_dir / "selection" / rule / PREDICTIONS
        rule_rows = score_predictions(plan, own, hu=hu)[1] if own.is_dir() else rows
        write_csv(out / "selection" / rule / "per_case.csv", [dict(r, split="test") for r in rule_rows],
                  first=ROW_COLUMNS)
    return metrics
