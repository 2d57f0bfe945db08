"""Rows -> the run's metric keys: which evaluation classes a source is scored on, and the means.

Evaluation-side (no Lightning): validation inside the training loop (`SegmentationModule`) and the
score stage (`experiments.score`, which computes a run's test numbers from its written predictions) use
the same functions, so a metric key means the same thing wherever it is computed.

Keys follow `{stage}/{source}/{metric}` for the primary class (lesion) and `{metric}_{class}` for the
others; `{stage}/mean/...` averages the sources equally. Every mean `<key>` comes with `<key>/n` (values
that entered it) and `<key>/n_undefined` (NaN values left out).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from datamodules.label_policy import CLASS_INDEX, CLASSES, ancestors
from evaluation.metrics import METRIC_NAMES
from evaluation.scoring import EvalClass, describe


def eval_classes(evaluation: dict, annotated: Sequence[bool]) -> list[EvalClass]:
    """The configured evaluation classes this case's source annotates completely: every value of the
    class (or of its `requires` list) is annotated, or is a typed child (GGO, consolidation) of an
    annotated value in the class. A class merging a value the source leaves unlabelled would be scored
    against voxels nobody delineated; `requires` names the exceptions, e.g. whole lungs from a lung
    mask that already contains the lesions (COVID-19-CT-Seg's Lung_Mask, StructSeg's lungs)."""
    def known(v: int, values: Sequence[int]) -> bool:
        if v < len(annotated) and annotated[v]:
            return True
        return any(CLASS_INDEX[a] in values and annotated[CLASS_INDEX[a]] for a in ancestors(CLASSES[v]))

    out = []
    for name, spec in evaluation["classes"].items():
        values = [int(v) for v in spec["values"]]
        required = [int(v) for v in (spec.get("requires") or values)]
        if all(known(v, values) for v in required):
            out.append(EvalClass(name, tuple(values), float(spec["tolerance_mm"]), bool(spec.get("lesions_by_side"))))
    return out


def annotated_vector(names: Sequence[str]) -> list[bool]:
    """The annotated flags over the common classes (cache meta's form) of a list of class names (the plan's)."""
    return [c in set(names) for c in CLASSES]


def metric_key(stage: str, source: str, metric: str, cls: str, primary: str) -> str:
    """`{stage}/{source}/{metric}` for the primary class (lesion), `{metric}_{class}` for the others."""
    return f"{stage}/{source}/{metric}" if cls == primary else f"{stage}/{source}/{metric}_{cls}"


# Every logged mean `<key>` comes with `<key>/n` (values that entered it) and `<key>/n_undefined` (NaN values
# left out): a child of the mean's own key, so `{metric}_{class}` names stay unambiguous.
COUNT_SUFFIXES = ("/n", "/n_undefined")


def is_count(key: str) -> bool:
    return key.endswith(COUNT_SUFFIXES)


def _mean_with_counts(key: str, mean: float, n: int, n_undefined: int) -> dict[str, float]:
    return {key: mean, f"{key}/n": float(n), f"{key}/n_undefined": float(n_undefined)}


def aggregate(rows: Sequence[dict], stage: str, primary: str = "lesion") -> dict[str, float]:
    """Mean of each metric per source and class, and the mean over sources (each source weighs the same),
    each with its counts (COUNT_SUFFIXES). Undefined values (RV against an empty reference, surface metrics
    of a validation without them) are left out of the means and counted; `{stage}/mean/...` counts the
    case values of all its sources. A metric with no defined value gets no key rather than NaN."""
    by_src: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_src[r["source"]].append(r)
    out: dict[str, float] = {}
    source_means: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for src, rs in sorted(by_src.items()):
        for cls in sorted({r["class"] for r in rs}):
            for m in METRIC_NAMES:
                stats = describe(r[m] for r in rs if r["class"] == cls)
                mean_key = metric_key(stage, "mean", m, cls, primary)
                counts[mean_key][0] += stats["n"]
                counts[mean_key][1] += stats["n_undefined"]
                if stats["n"]:
                    out.update(_mean_with_counts(metric_key(stage, src, m, cls, primary), stats["mean"],
                                                 stats["n"], stats["n_undefined"]))
                    source_means[mean_key].append(stats["mean"])
        out[f"{stage}/{src}/cases"] = float(len({r["case"] for r in rs}))
    for key, vals in source_means.items():
        out.update(_mean_with_counts(key, float(np.mean(vals)), *counts[key]))
    # The model-selection score: the primary class's Dice (lesion) where it is scored; a task that scores
    # no lesion (lungs only) selects on the mean Dice of the classes it scores. Its counts are those of the
    # Dice keys it copies or averages.
    if f"{stage}/mean/dice" in out:
        out[f"{stage}/mean/selection_dice"] = out[f"{stage}/mean/dice"]
    else:
        dice = [out[k] for k in source_means if k.startswith(f"{stage}/mean/dice_")]
        if dice:
            out[f"{stage}/mean/selection_dice"] = float(np.mean(dice))
    return out


def unique_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per (source, case, class), in a rank-independent order (by source and case, classes in
    scoring order): the same table whatever the number of processes or the order cases came in."""
    seen, out = set(), []
    for r in rows:
        key = (r["source"], r["case"], r["class"])
        if key not in seen:  # a padded (repeated) case scores identically: keep the first
            seen.add(key)
            out.append(r)
    return sorted(out, key=lambda r: (r["source"], r["case"]))


# per_case.csv's leading columns (the rest follow sorted: severity columns)
ROW_COLUMNS = ("split", "source", "case", "class", *METRIC_NAMES, "surface_worst_case", "tolerance_mm", "space")
