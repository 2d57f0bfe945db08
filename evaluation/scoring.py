"""Turn label maps into per-case result rows, and rows into summaries.

One code path for every number we report: LOSO/transfer runs (`SegmentationModule.test_step`) and
`python -m experiments.evaluate` both call `score_case`, `severity_columns` and `summarize`, so a
run's `per_case.csv` and a standalone evaluation of its saved predictions agree.

A *class* here is an evaluation class: a name, the label values that make up its mask (several values
merge, e.g. `lung=1+2+3` for both lungs with the lesions inside them, or `opacity=1+2` for GGO plus
consolidation) and the NSD tolerance in mm. A lung-side class (`lesions_by_side`, values 1 or 2 of the
common codes) takes in the lesions inside that lung (`lesions_to_lung_sides`).
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_erosion
from scipy.spatial import cKDTree

from datamodules.label_policy import CLASS_INDEX, OPACITY
from evaluation import agreement as agreement_mod
from evaluation import severity as severity_mod
from evaluation.metrics import METRIC_NAMES, dice, iou, relative_volume, score_pair, volume_ml

# COVID-19-CT-Seg benchmark (Ma et al., seed 003): 1 mm for lungs, 3 mm for infection.
DEFAULT_TOLERANCE_MM: dict[str, float] = {
    "lung": 1.0, "lung_left": 1.0, "lung_right": 1.0,
    "lesion": 3.0, "infection": 3.0, "opacity": 3.0, "ggo": 3.0, "consolidation": 3.0,
}
# Severity measures: percentages use the clinical bins in the chi-squared test, scores the integers.
SEVERITY_MEASURES: dict[str, str] = {"po": "percent", "pho": "percent", "wal_pct": "percent",
                                     "lss": "score", "lhos": "score"}


# Common codes (datamodules.label_policy) of the two lungs, which lung-side classes take lesions into.
LUNG_SIDES = (CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"])


@dataclass(frozen=True)
class EvalClass:
    name: str
    values: tuple[int, ...]
    tolerance_mm: float
    # Scored on `lesions_to_lung_sides` of both label maps: a lung side with the lesions inside it.
    lesions_by_side: bool = False

    def __post_init__(self) -> None:
        if self.lesions_by_side and not set(self.values) <= set(LUNG_SIDES):
            raise ValueError(f"class {self.name!r}: lesions join lung sides {LUNG_SIDES} (the common codes), so "
                             f"its values must be among them, got {self.values}")

    def mask(self, labels: np.ndarray) -> np.ndarray:
        return np.isin(labels, self.values)


def lesions_to_lung_sides(labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """`labels` with every opacity voxel (codes 3, 6, 7) recoded as the side (1 left, 2 right) of the
    nearest lung voxel in mm. A lesion lies inside one lung, and a lung mask such as COVID-19-CT-Seg's
    Lung_Mask includes it, but the common label map codes it as lesion, not by side. Without lesions or
    lungs the map is returned as it is."""
    lesion = np.isin(labels, OPACITY)
    lung = np.isin(labels, LUNG_SIDES)
    if not lesion.any() or not lung.any():
        return labels
    # The lung voxel nearest to a voxel outside the lungs lies on their boundary (an inner one always has a
    # nearer neighbour), so a k-d tree over the boundary finds it: memory grows with the lung surface, where
    # a distance transform with indices would hold three integers per voxel of the scan.
    edge = np.argwhere(lung & ~binary_erosion(lung))
    sp = np.asarray(spacing, dtype=np.float64)
    _, nearest = cKDTree(edge * sp).query(np.argwhere(lesion) * sp, k=1, workers=-1)
    out = labels.copy()
    out[lesion] = labels[tuple(edge[nearest].T)]
    return out


def _pairs(text: str, what: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{what}: expected name=value items separated by commas, got {item!r} in {text!r}")
        out.append((name.strip(), value.strip()))
    return out


def parse_labels(text: str) -> dict[str, tuple[int, ...]]:
    """`lesion=1,lung=1+2+3` -> {"lesion": (1,), "lung": (1, 2, 3)}."""
    out: dict[str, tuple[int, ...]] = {}
    for name, value in _pairs(text, "--labels"):
        try:
            values = tuple(int(v) for v in value.split("+"))
        except ValueError:
            raise ValueError(f"--labels: class {name!r} needs integer label values joined by '+', got {value!r}") from None
        if any(v <= 0 for v in values):
            raise ValueError(f"--labels: class {name!r} uses label value <= 0 (0 is background): {value!r}")
        out[name] = values
    if not out:
        raise ValueError("--labels: no class given")
    return out


def parse_tolerances(text: str | None) -> dict[str, float]:
    """`lesion=3,lung=1` -> {"lesion": 3.0, "lung": 1.0} (mm)."""
    out = {}
    for name, value in _pairs(text or "", "--tolerance"):
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--tolerance: {name}={value!r} is not a number of mm") from None
        if out[name] < 0:
            raise ValueError(f"--tolerance: {name}={value} mm is negative")
    return out


def make_classes(labels: Mapping[str, Sequence[int]], tolerances: Mapping[str, float] | None = None,
                 by_side: Sequence[str] = ()) -> list[EvalClass]:
    """Classes of `parse_labels`; `by_side` names the lung-side classes (EvalClass.lesions_by_side)."""
    tolerances = dict(tolerances or {})
    unknown = set(tolerances) - set(labels)
    if unknown:
        raise ValueError(f"tolerance given for {sorted(unknown)}, which are not among the classes {sorted(labels)}")
    unknown = set(by_side) - set(labels)
    if unknown:
        raise ValueError(f"--lesions-by-side names {sorted(unknown)}, which are not among the classes {sorted(labels)}")
    classes = []
    for name, values in labels.items():
        if name in tolerances:
            tol = tolerances[name]
        elif name in DEFAULT_TOLERANCE_MM:
            tol = DEFAULT_TOLERANCE_MM[name]
        else:
            raise ValueError(f"class {name!r} has no default NSD tolerance: pass --tolerance {name}=MM "
                             f"(defaults exist for {sorted(DEFAULT_TOLERANCE_MM)})")
        classes.append(EvalClass(name, tuple(int(v) for v in values), float(tol), name in by_side))
    return classes


def score_case(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], classes: Iterable[EvalClass],
               surface: bool = True, ignore: int | None = None) -> list[dict]:
    """One row per class: metrics of `class.mask(pred)` against `class.mask(ref)` on this grid.

    `surface=False` skips the surface-distance metrics (nsd/hd95/asd become NaN): cheap enough to run
    on every validation epoch, where only Dice selects the model. Voxels where `ref == ignore` are
    background in both masks: whatever is predicted there counts neither as hit nor as false positive.
    Lung-side classes (`lesions_by_side`) are scored on `lesions_to_lung_sides` of both maps.
    `surface_worst_case` marks the rows whose hd95/asd are the grid diagonal because exactly one mask is
    empty (`score_pair`): counting them counts the total misses (and the false alarms on empty references).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if ignore is not None:
        out = ref == ignore
        if out.any():
            pred, ref = np.where(out, 0, pred), np.where(out, 0, ref)
    classes = list(classes)
    sided = ((lesions_to_lung_sides(pred, spacing), lesions_to_lung_sides(ref, spacing))
             if any(c.lesions_by_side for c in classes) else None)
    rows = []
    for cls in classes:
        p, r = (cls.mask(x) for x in (sided if cls.lesions_by_side else (pred, ref)))
        m = score_pair(p, r, spacing, cls.tolerance_mm) if surface else _volume_only(p, r, spacing)
        rows.append({"class": cls.name, **{k: float(m[k]) for k in METRIC_NAMES},
                     "surface_worst_case": bool(m["surface_worst_case"]), "tolerance_mm": cls.tolerance_mm})
    return rows


def _volume_only(p: np.ndarray, r: np.ndarray, spacing: Sequence[float]) -> dict:
    return {"dice": dice(p, r), "iou": iou(p, r), "nsd": math.nan, "hd95": math.nan, "asd": math.nan,
            "rv": relative_volume(p, r), "ref_ml": volume_ml(r, spacing), "pred_ml": volume_ml(p, spacing),
            "surface_worst_case": False}


def severity_columns(pred_lesion: np.ndarray, ref_lesion: np.ndarray, spacing: Sequence[float],
                     lung: np.ndarray | None = None, pred_lung: np.ndarray | None = None,
                     hu: np.ndarray | None = None, lobes: np.ndarray | None = None) -> dict:
    """`ref_<measure>` and `pred_<measure>` for PO, PHO, WAL, LSS, LHOS (those the inputs allow).

    `lung` is the reference lung mask; the prediction is scored inside `pred_lung` when given (a model
    that segments lungs), else inside the reference lung, so the difference measures the lesion
    segmentation alone. With `lobes`, the lung is the union of the lobes for both.
    """
    if lobes is None and lung is None:
        return {}
    ref = severity_mod.severity(ref_lesion, lung=lung, spacing=spacing, hu=hu, lobes=lobes)
    pred = severity_mod.severity(pred_lesion, lung=pred_lung if (pred_lung is not None and lobes is None) else lung,
                                 spacing=spacing, hu=hu, lobes=lobes)
    out = {}
    for key in SEVERITY_MEASURES:
        if key in ref and ref[key] is not None:
            out[f"ref_{key}"] = float(ref[key])
            out[f"pred_{key}"] = float(pred[key])
    return out


# Classes whose mask severity reads as the lesion, in order of preference.
SEVERITY_CLASSES = ("opacity", "lesion")


def attach_severity(rows: list[dict], classes: Sequence[EvalClass], pred: np.ndarray, ref: np.ndarray,
                    spacing: Sequence[float], hu: np.ndarray | None = None, lobes: np.ndarray | None = None,
                    pred_lung: bool = False) -> None:
    """Add `severity_columns` to the lesion class's row when the inputs allow (HU or lobes, and a lung:
    the lobes' union, else the reference's `lung` class; `pred_lung`: the prediction inside its own lung)."""
    by_name = {c.name: c for c in classes}
    lesion = next((by_name[n] for n in SEVERITY_CLASSES if n in by_name), None)
    lung = by_name.get("lung")
    if lesion is None or (hu is None and lobes is None) or (lobes is None and lung is None):
        return
    sev = severity_columns(lesion.mask(pred), lesion.mask(ref), spacing,
                           lung=None if lobes is not None else lung.mask(ref),
                           pred_lung=lung.mask(pred) if (lobes is None and pred_lung) else None, hu=hu, lobes=lobes)
    for r in rows:
        if r["class"] == lesion.name:
            r.update(sev)


def _finite(values: Iterable) -> tuple[list[float], int]:
    vals, undefined = [], 0
    for v in values:
        if v is None or v == "":
            undefined += 1
            continue
        f = float(v)
        if math.isfinite(f):
            vals.append(f)
        else:
            undefined += 1
    return vals, undefined


def describe(values: Iterable) -> dict:
    """mean, std (ddof=1), median over the defined values; `n_undefined` counts NaN/empty ones."""
    vals, undefined = _finite(values)
    a = np.asarray(vals, dtype=np.float64)
    return {"mean": float(a.mean()) if a.size else math.nan,
            "std": float(a.std(ddof=1)) if a.size > 1 else math.nan,
            "median": float(np.median(a)) if a.size else math.nan, "n": int(a.size), "n_undefined": undefined}


def summarize(rows: Sequence[dict], metrics: Sequence[str] = METRIC_NAMES) -> dict:
    """Per class and overall (every case-class row): mean/std/median of each metric; per class the
    pooled relative volume (sum of predicted over sum of reference volume: Lensink et al.'s RV over a
    test set) and the agreement of the severity measures when rows carry them."""
    by_class: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_class[r["class"]].append(r)
    out: dict = {"classes": {}, "overall": {m: describe(r.get(m) for r in rows) for m in metrics},
                 "cases": len({r.get("case") for r in rows})}
    for name, rs in by_class.items():
        entry = {m: describe(r.get(m) for r in rs) for m in metrics}
        ref_total = sum(float(r["ref_ml"]) for r in rs)
        entry["rv_pooled"] = sum(float(r["pred_ml"]) for r in rs) / ref_total if ref_total > 0 else math.nan
        sev = {}
        for key, kind in SEVERITY_MEASURES.items():
            pairs = [(float(r[f"ref_{key}"]), float(r[f"pred_{key}"])) for r in rs
                     if r.get(f"ref_{key}") not in (None, "") and r.get(f"pred_{key}") not in (None, "")]
            if pairs:
                ref_v, pred_v = zip(*pairs)
                sev[key] = agreement_mod.agreement(list(ref_v), list(pred_v), kind=kind)
        if sev:
            entry["severity_agreement"] = sev
        out["classes"][name] = entry
    return out
