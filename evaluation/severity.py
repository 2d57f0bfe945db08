"""COVID-19 severity measures from a lesion mask, a lung (or lobe) mask and the CT in HU.

Pure numpy functions (no torch / Lightning), following Chaganti et al. 2020, "Automated quantification of
CT patterns associated with COVID-19 from chest CT" (Radiol Artif Intell), section "COVID-19 Severity
Measures", plus the percentage of well-aerated lung (WAL) named by Lensink et al. and defined by
Colombi et al. 2020 (Radiology, "Well-aerated lung on admitting chest CT to predict adverse outcome in
COVID-19 pneumonia").

Definitions (``les = lesion & lung``; all percentages are of the *lung* volume unless per lobe, in %):

* PO   = 100 * |les| / |lung|                                  percentage of opacity
* PHO  = 100 * |les & (HU >= -200)| / |lung|                   percentage of high opacity
* WAL  = 100 * |lung & ~les & (-950 <= HU <= -700)| / |lung|   percentage of well-aerated lung
* per lobe ``k``: ``lobe_pct[k] = 100 * |les & lobe_k| / |lobe_k|`` scored 0..4 by :func:`lobe_score`;
  LSS  = sum of the five lobe scores (0..20)
* per lobe ``k``: ``lobe_high_pct[k] = 100 * |les & (HU >= -200) & lobe_k| / |lobe_k|``;
  LHOS = sum of the five high-opacity lobe scores (0..20)

Volumes are in millilitres, from the voxel spacing in millimetres (1 mL = 1000 mm^3).

Lobe labels: by default the lobe map holds 1..5 = RUL, RML, RLL, LUL, LLL (right upper / middle / lower,
left upper / lower), i.e. ``lobe_values[i]`` is the label of ``LOBE_NAMES[i]``; anything else is not lobe.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Chaganti et al.: high-opacity regions (consolidation-like) are the lesion voxels at or above -200 HU.
HIGH_OPACITY_HU = -200.0
# Well-aerated lung as in Colombi et al. 2020 (Radiology): lung parenchyma between -950 and -700 HU
# (both ends included). Below -950 HU is emphysema-like hyperinflation, above -700 HU poorly aerated.
AERATED_HU = (-950.0, -700.0)
# Default lobe order: label value 1..5 (``lobe_values``) maps to these names position by position.
LOBE_NAMES = ("RUL", "RML", "RLL", "LUL", "LLL")


def lobe_score(percent: float) -> int:
    """Bernheim / Chaganti lobe involvement score for the affected percentage of one lobe.

    0: not affected (exactly 0 %); 1: (0, 25]; 2: (25, 50]; 3: (50, 75]; 4: (75, 100].

    Boundary choice: a value on a boundary belongs to the lower score (25 % -> 1, 50 % -> 2, 75 % -> 3),
    matching Bernheim et al.'s integer categories 1-25 / 26-50 / 51-75 / 76-100 %. The papers' "1-25 %"
    leaves (0, 1) % unassigned; any involvement > 0 is scored at least 1, because score 0 means "lobe not
    affected" and a voxel-level mask resolves far below the 1 % a radiologist could read visually.
    Raises ValueError for NaN or values outside [0, 100].
    """
    p = float(percent)
    if not 0.0 <= p <= 100.0:  # also catches NaN
        raise ValueError(f"lobe percentage must lie in [0, 100], got {percent!r}")
    if p == 0.0:
        return 0
    # Explicit comparisons rather than ceil(p / 25): exact on the boundaries, no float surprises.
    for score, upper in ((1, 25.0), (2, 50.0), (3, 75.0)):
        if p <= upper:
            return score
    return 4


def _voxel_ml(spacing: Sequence[float], ndim: int) -> float:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise ValueError(f"spacing {sp} has {len(sp)} entries, arrays have {ndim} dimensions")
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be positive and finite (mm), got {sp}")
    return float(np.prod(sp)) / 1000.0  # mm^3 -> mL


def _check_shapes(**arrays: np.ndarray | None) -> None:
    shapes = {name: a.shape for name, a in arrays.items() if a is not None}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"all arrays must have the same shape, got {listed}")


def _pct(count: int, total: int) -> float:
    return 100.0 * count / total


def severity(
    lesion: np.ndarray,
    lung: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    hu: np.ndarray | None = None,
    lobes: np.ndarray | None = None,
    lobe_values: Sequence[int] = (1, 2, 3, 4, 5),
    high_opacity_hu: float = HIGH_OPACITY_HU,
    aerated_hu: tuple[float, float] = AERATED_HU,
) -> dict:
    """Severity measures of one CT (see the module docstring for the definitions).

    Args:
        lesion: opacity mask (bool or nonzero = lesion), all opacity classes (GGO, consolidation, ...) merged.
        lung: lung mask (bool or nonzero). If None, the union of the lobes (``np.isin(lobes, lobe_values)``).
        spacing: voxel spacing in mm, one entry per array axis.
        hu: the CT in Hounsfield units on the same grid; enables PHO, WAL and LHOS.
        lobes: integer lobe label map; ``lobe_values[i]`` is the label of ``LOBE_NAMES[i]``. Enables LSS (and
            LHOS with ``hu``). Lobes are taken as given (not clipped to ``lung``); a lobe map normally lies
            inside the lung mask.
        lobe_values: the five lobe labels in ``LOBE_NAMES`` order.
        high_opacity_hu: lesion voxels with HU >= this are high opacity (Chaganti: -200 HU).
        aerated_hu: inclusive (low, high) HU range of well-aerated lung (Colombi: -950..-700 HU).

    Returns:
        Always: ``po`` (%), ``lung_ml``, ``lesion_ml`` (lesion inside the lung, mL).
        With ``hu``: ``pho`` (%), ``wal_pct`` (%), ``high_opacity_ml``.
        With ``lobes``: ``lobe_pct`` / ``lobe_score`` (dicts keyed by lobe name), ``lss`` (int, 0..20).
        With ``lobes`` and ``hu``: ``lobe_high_pct`` / ``lobe_high_score`` (dicts), ``lhos`` (int, 0..20).
        Keys that cannot be computed from the given inputs are absent (not None).

    Raises:
        ValueError: arrays of different shapes, no ``lung`` and no ``lobes``, empty lung, a lobe with no voxel
            (LSS undefined), NaN/inf in ``hu``, bad spacing or lobe_values.
    """
    lesion_a = np.asarray(lesion)
    lung_a = None if lung is None else np.asarray(lung)
    hu_a = None if hu is None else np.asarray(hu, dtype=np.float64)
    lobes_a = None if lobes is None else np.asarray(lobes)
    _check_shapes(lesion=lesion_a, lung=lung_a, hu=hu_a, lobes=lobes_a)
    vox_ml = _voxel_ml(spacing, lesion_a.ndim)

    values = tuple(int(v) for v in lobe_values)
    if len(values) != len(LOBE_NAMES) or len(set(values)) != len(values):
        raise ValueError(f"lobe_values must be {len(LOBE_NAMES)} distinct labels for {LOBE_NAMES}, got {values}")
    if lung_a is None:
        if lobes_a is None:
            raise ValueError("severity needs a lung mask: pass lung or lobes (PO is a fraction of the lung)")
        lung_m = np.isin(lobes_a, values)
    else:
        lung_m = lung_a != 0
    if hu_a is not None and not np.all(np.isfinite(hu_a)):
        raise ValueError("hu contains NaN or inf values")
    low, high = (float(a) for a in aerated_hu)
    if not low <= high:
        raise ValueError(f"aerated_hu must be (low, high) with low <= high, got {aerated_hu}")

    n_lung = int(lung_m.sum())
    if n_lung == 0:
        raise ValueError("lung mask is empty: PO / PHO / WAL are fractions of the lung volume")
    # Only lesion inside the lung counts: a predicted opacity outside the lung mask is not lung parenchyma
    # (Chaganti filter the abnormality output by the lung segmentation in the same way).
    les = (lesion_a != 0) & lung_m
    n_les = int(les.sum())

    out: dict = {
        "po": _pct(n_les, n_lung),
        "lung_ml": n_lung * vox_ml,
        "lesion_ml": n_les * vox_ml,
    }
    high_op = None
    if hu_a is not None:
        high_op = les & (hu_a >= high_opacity_hu)
        n_high = int(high_op.sum())
        # Well aerated = lung parenchyma in the aerated HU band that is not lesion: a segmented opacity is
        # never counted as healthy lung even if some of its voxels fall in the band (e.g. faint GGO).
        aerated = lung_m & ~les & (hu_a >= low) & (hu_a <= high)
        out["pho"] = _pct(n_high, n_lung)
        out["wal_pct"] = _pct(int(aerated.sum()), n_lung)
        out["high_opacity_ml"] = n_high * vox_ml

    if lobes_a is not None:
        lobe_pct, lobe_sc, lobe_high_pct, lobe_high_sc = {}, {}, {}, {}
        for name, value in zip(LOBE_NAMES, values):
            lobe = lobes_a == value
            n_lobe = int(lobe.sum())
            if n_lobe == 0:
                # LSS sums all five lobes; silently scoring a missing lobe 0 would understate severity.
                raise ValueError(f"lobe {name} (label {value}) has no voxels: LSS / LHOS are not defined")
            lobe_pct[name] = _pct(int((les & lobe).sum()), n_lobe)
            lobe_sc[name] = lobe_score(lobe_pct[name])
            if high_op is not None:
                lobe_high_pct[name] = _pct(int((high_op & lobe).sum()), n_lobe)
                lobe_high_sc[name] = lobe_score(lobe_high_pct[name])
        out["lobe_pct"], out["lobe_score"], out["lss"] = lobe_pct, lobe_sc, int(sum(lobe_sc.values()))
        if high_op is not None:
            out["lobe_high_pct"], out["lobe_high_score"] = lobe_high_pct, lobe_high_sc
            out["lhos"] = int(sum(lobe_high_sc.values()))
    return out
