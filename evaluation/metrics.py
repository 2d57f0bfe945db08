"""Pure, spacing-aware segmentation metrics on numpy arrays (no Lightning)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks. Both empty: 1.0 (nothing to find, nothing found); one empty: 0.0."""
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    denom = int(p.sum()) + int(r.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / denom


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    return float(np.asarray(mask, bool).sum()) * float(np.prod(spacing)) / 1000.0
