"""Score prediction files of a plan's cases the way a run scores itself (minimal version for the nnU-Net
bridge; the persisted score stage replaces it with the same signature).

`score_predictions(plan, pred_dir)` reads `pred_dir/<source>/<case_id>.nii.gz` (common label values on
each case's stored grid) for every case of a role, scores it against the stored reference with the
run's evaluation classes (`lightning_modules.segmentation.eval_classes`), ignore label and severity
columns, and aggregates as the test stage does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.harmonize import check_pair, load_original
from datamodules.io import read_volume, spacing_of
from datamodules.sources import policy_named
from evaluation.scoring import attach_severity, score_case
from experiments.plan import case_from_record
from lightning_modules.segmentation import aggregate, eval_classes


def annotated_vector(plan: dict, rec: dict) -> list[bool]:
    names = set(rec.get("annotated") or ())
    return [c in names for c in plan["classes"]]


def score_predictions(plan: dict, pred_dir: Path, role: str = "test") -> tuple[dict, list[dict]]:
    """(metrics as `aggregate` names them, per-case rows) of the predictions of `role`'s cases."""
    pred_dir = Path(pred_dir)
    rows: list[dict] = []
    space = plan.get("evaluation", {}).get("space", "original")
    for key in plan["roles"][role]:
        rec = plan["cases"][key]
        path = pred_dir / rec["source"] / f"{rec['case_id']}.nii.gz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no prediction for {key}")
        case = case_from_record(rec)
        hu, ref, affine = load_original(case, policy_named(rec["label_policy"]) if rec.get("label_policy") else None)
        if ref is None:
            raise ValueError(f"{key}: no reference mask to score against ({case.image})")
        pred, pred_affine = read_volume(path)
        check_pair(case.image, ref.shape, affine, path, pred.shape, pred_affine)
        pred = np.asarray(pred).astype(np.uint8)
        classes = eval_classes(plan["evaluation"], annotated_vector(plan, rec))
        spacing = spacing_of(affine).tolist()
        scored = score_case(pred, ref, spacing, classes, ignore=plan.get("ignore"))
        attach_severity(scored, classes, pred, ref, spacing, hu=hu)
        rows.extend({"case": rec["case_id"], "source": rec["source"], "space": space, **r} for r in scored)
    rows.sort(key=lambda r: (r["source"], r["case"]))
    return aggregate(rows, role), rows
