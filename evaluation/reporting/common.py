"""Vocabulary shared by the report modules: what a run folder may hold, the phantom marker, errors, notes."""
from __future__ import annotations

import sys
from typing import NamedTuple

PHANTOM_MARK = "PHANTOM DATA (synthetic sources)"
METRICS = ("dice", "iou", "nsd", "hd95", "asd", "rv")


class Measure(NamedTuple):
    name: str
    unit: str
    top: float  # axis top of the plots
    kind: str  # evaluation.agreement kind: "percent" (clinical bins) or "score" (integers 0..20)


# Severity measures as reference/predicted pairs `ref_<x>`, `pred_<x>` on lesion rows.
SEVERITY = {"po": Measure("PO", "%", 100.0, "percent"), "pho": Measure("PHO", "%", 100.0, "percent"),
            "wal_pct": Measure("WAL", "%", 100.0, "percent"), "lss": Measure("LSS", "score", 20.0, "score"),
            "lhos": Measure("LHOS", "score", 20.0, "score")}
DEFAULT_SPACE = "harmonized"  # what runs without `eval_space` scored in (README: metrics in the harmonized space)


class ReportError(ValueError):
    """Input a report cannot be trusted with (corrupt file, inconsistent runs); the message names the file."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def note(notes: list, msg: str) -> None:
    """A caveat worth printing now and listing in the report's Notes."""
    print(f"note: {msg}", flush=True)
    notes.append(msg)
