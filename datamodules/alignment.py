"""Image-mask alignment measured from the data: under which mirroring of the image do its masks sit on
its anatomy?

Why: what is known about stored mirror flips comes from other people's preparation scripts, not from the
files (COVID-19-CT-Seg's radiopaedia cases: TRI flips the *image only* along canonical A-P, and along
S-I for `radiopaedia_7_85703_0`; another public repo flips another axis; reference/datasets.md s.3). A
source may *declare* the image flips it expects per case (data, see `SourceAdapter.DECLARED_IMAGE_FLIPS`
and `data.image_flips`); every labelled case is then scored under all 8 combinations of image mirrorings
along the canonical axes R-L, A-P and S-I, and the declaration is confirmed or contradicted by the
measurement on the user's own files.

Measures, each in [0, 1] (higher: the masks fit the mirrored image better), on a coarse grid of about
`grid_mm` voxels sampled symmetrically, so that mirroring the coarse array is exactly mirroring the
stored one:
- `lung` (sources that annotate lungs): the probability that a voxel of the shell just outside the lung
  mask (`shell_mm`) is denser than a voxel inside it (the ROC AUC; lesions left out of both). It uses
  ranks only, so it holds for any intensity encoding (HU, 8-bit windowed, undecoded).
- `lesion` (sources that annotate lesions): the share of lesion voxels that land in the image's own lung
  field (air inside the body, closed over dense lesions by `field_closing_mm`) and are denser than that
  field's median by `lesion_excess_hu` but below bone (`lesion_max_hu`): a lesion mirrored onto normal
  lung, the mediastinum or outside the body fails. Needs decoded HU.
The score of a mirroring is the mean of the measures the case allows. The best mirroring wins when it
beats the runner-up by `margin`; otherwise the anatomy cannot decide (a symmetric axis, bilateral lesions).

Statuses (never `ok` without a decisive measurement):
- `ok`: as stored, decisively, and nothing declared;
- `fixed`: the declared flips, confirmed decisively;
- `mismatch`: the data decisively want other flips than declared (an error naming the case and numbers;
  `data.on_error` applies);
- `ambiguous`: measured, but the margin is below `margin`: the declared flips are applied, unconfirmed;
- `unverifiable`: nothing to measure (unlabelled case, no lung mask and too little lesion): declared
  flips applied, unconfirmed.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage

from datamodules.io import VolumeError, spacing_of
from datamodules.label_policy import CLASS_INDEX, IGNORE, OPACITY

# Canonical (RAS) axes by index, named by the anatomical direction they run along.
AXES: tuple[str, str, str] = ("R-L", "A-P", "S-I")
STATUSES = ("ok", "fixed", "mismatch", "ambiguous", "unverifiable")
LUNG_VALUES = (CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"])
# Every subset of the three axes, identity first: the 8 mirrorings an image can need.
MIRRORINGS: tuple[tuple[str, ...], ...] = tuple(
    tuple(AXES[i] for i in combo) for r in range(4) for combo in itertools.combinations(range(3), r))


class AlignmentError(VolumeError):
    """A case's image and masks fit another mirroring than the one declared for it."""


def parse_flips(value, where: str = "image flips") -> tuple[str, ...]:
    """A list of axis names (`["A-P", "S-I"]`, or `"A-P,S-I"`) -> canonical order tuple; names checked."""
    if value is None:
        return ()
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v).strip() for v in value]
    items = [v for v in items if v and v.lower() != "none"]
    bad = [v for v in items if v not in AXES]
    if bad:
        raise ValueError(f"{where}: unknown axis {bad}; use names from {list(AXES)}")
    return tuple(a for a in AXES if a in items)


def flip_indices(flips) -> tuple[int, ...]:
    """Axis names -> canonical axis indices (0 R-L, 1 A-P, 2 S-I)."""
    return tuple(AXES.index(a) for a in parse_flips(flips))


def flips_name(flips) -> str:
    return "+".join(flips) if flips else "none"


@dataclass(frozen=True)
class AlignmentConfig:
    grid_mm: float = 3.0            # coarse voxel size the measures run on
    shell_mm: float = 6.0           # thickness of the shell outside the lung mask
    margin: float = 0.05            # best minus runner-up score needed to decide
    min_lung_ml: float = 50.0       # a lung mask smaller than this is not measured
    min_lesion_ml: float = 2.0      # nor is a lesion mask smaller than this
    lesion_excess_hu: float = 100.0  # a lesion voxel is denser than the lung field's median by this
    lesion_max_hu: float = 200.0    # ... and below this (not bone)
    field_closing_mm: float = 15.0  # lung field closed over dense lesions by this radius (in-plane)

    def __post_init__(self) -> None:
        for name in ("grid_mm", "shell_mm", "field_closing_mm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"data.alignment.{name} must be > 0 mm, got {getattr(self, name)}")
        if not 0 < self.margin < 1:
            raise ValueError(f"data.alignment.margin must be in (0, 1), got {self.margin}")

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


# Ties between mirrorings go to the simpler one (identity first, then single axes).
MIRROR_ORDER = {flips_name(m): i for i, m in enumerate(MIRRORINGS)}


@dataclass(frozen=True)
class Measurement:
    """Scores of every mirroring (`flips_name` -> score) and of each measure behind them."""
    scores: dict[str, float]
    measures: dict[str, dict[str, float]]  # measure -> flips_name -> value
    voxels: dict[str, int]                 # coarse voxels each measure used: how much evidence there was

    @property
    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.scores.items(), key=lambda kv: (-kv[1], MIRROR_ORDER[kv[0]]))


@dataclass(frozen=True)
class Alignment:
    """The decision for one case: the image flips to apply and why."""
    # Canonical axes along which the IMAGE is mirrored to match its masks: measured (ok, fixed,
    # mismatch: what the data want), or the declared ones where nothing decides (ambiguous, unverifiable).
    flips: tuple[str, ...]
    status: str
    declared: tuple[str, ...]
    best: tuple[str, ...] | None = None
    margin: float | None = None
    score: float | None = None        # score of the best mirroring
    stored_score: float | None = None  # score of the image as stored
    scores: dict[str, float] = field(default_factory=dict)
    measures: dict[str, dict[str, float]] = field(default_factory=dict)
    voxels: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        def rnd(v):
            return None if v is None else round(float(v), 4)

        return {"flips": list(self.flips), "status": self.status, "margin": rnd(self.margin),
                "declared": list(self.declared), "best": None if self.best is None else list(self.best),
                "score": rnd(self.score), "stored_score": rnd(self.stored_score),
                "scores": {k: rnd(v) for k, v in self.scores.items()},
                "measures": {m: {k: rnd(v) for k, v in d.items()} for m, d in self.measures.items()},
                "voxels": dict(self.voxels)}

    def describe(self, key: str) -> str:
        if self.status in ("ok", "fixed"):
            return f"{key}: {self.status} ({flips_name(self.flips)}, margin {self.margin:.3f})"
        if self.status == "unverifiable":
            return f"{key}: unverifiable (nothing to measure); declared {flips_name(self.declared)} applied"
        if self.status == "ambiguous":
            return (f"{key}: ambiguous (best {flips_name(self.best)} {self.score:.3f}, margin {self.margin:.3f}); "
                    f"declared {flips_name(self.declared)} applied unconfirmed")
        return (f"{key}: image-mask mismatch: the masks fit the image best mirrored along {flips_name(self.best)} "
                f"(score {self.score:.3f}, as stored {self.stored_score:.3f}, margin {self.margin:.3f} over the next), "
                f"but {flips_name(self.declared)} is declared; fix the declaration (data.image_flips) or leave the "
                f"case out (data.on_error=skip). Scores: "
                + ", ".join(f"{k} {v:.3f}" for k, v in sorted(self.scores.items(), key=lambda kv: -kv[1])))


# ------------------------------------------------------------------------------------------- sampling
def symmetric_indices(n: int, m: int) -> np.ndarray:
    """`m` of `n` indices spread evenly and mirror-symmetric (i <-> n-1-i), so that taking them from a
    mirrored axis is the same as mirroring the result. n - m is made even (an odd m needs an odd n for
    its middle sample to sit on the axis centre)."""
    if (n - m) % 2:
        m = m - 1 if m > 1 else m + 1
    if m >= n:
        return np.arange(n)
    i = np.arange(m)
    idx = np.floor((i + 0.5) * n / m).astype(np.int64)
    half = m // 2
    idx[m - half:] = (n - 1 - idx[:half])[::-1]
    if m % 2:
        idx[half] = (n - 1) // 2
    return idx


def coarse_canonical(image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                     grid_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, spacing) sampled on a coarse mirror-symmetric grid, in canonical RAS axis order.

    Nearest sampling (a subset of the stored voxels): labels stay labels, and any intensity encoding is
    kept as stored. Mirroring is direction-agnostic, so the stored axes are sampled first and only the
    small result is reordered."""
    spacing = spacing_of(affine)
    idx = [symmetric_indices(n, int(round(n * s / grid_mm))) for n, s in zip(image.shape, spacing)]
    grid = np.ix_(*idx)
    img, lab = np.asarray(image[grid]), np.asarray(label[grid])
    coarse_spacing = np.array([s * n / len(i) for s, n, i in zip(spacing, image.shape, idx)])
    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("R", "A", "S")))
    img = np.ascontiguousarray(nib.orientations.apply_orientation(img, transform))
    lab = np.ascontiguousarray(nib.orientations.apply_orientation(lab, transform))
    order = np.empty(3, int)
    order[transform[:, 0].astype(int)] = np.arange(3)
    return img, lab, coarse_spacing[order]


# ------------------------------------------------------------------------------------------- measures
def _mirrored(coords: np.ndarray, shape, axes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    c = coords.copy()
    for a in axes:
        c[a] = shape[a] - 1 - c[a]
    return tuple(c)


def _auc_greater(high: np.ndarray, low: np.ndarray) -> float:
    """P(a random value of `high` > a random value of `low`), ties counting half (Mann-Whitney U / n m)."""
    low = np.sort(low)
    below = np.searchsorted(low, high, side="left").astype(np.float64)
    ties = np.searchsorted(low, high, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (high.size * low.size))


def lung_field(hu: np.ndarray, spacing: np.ndarray, closing_mm: float) -> np.ndarray:
    """Air inside the body, slice by slice, closed in-plane over dense lesions: where lung can be."""
    plane = np.zeros((3, 3, 1), bool)
    plane[:, 1, 0] = plane[1, :, 0] = True
    body = ndimage.binary_fill_holes(hu > -500.0, structure=plane)  # per axial slice: lungs are holes
    air = body & (hu < -400.0)
    r = np.maximum(np.round(closing_mm / spacing[:2]).astype(int), 1)
    yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1]
    disk = ((yy * spacing[0]) ** 2 + (xx * spacing[1]) ** 2 <= closing_mm ** 2)[:, :, None]
    padded = np.pad(air, [(r[0], r[0]), (r[1], r[1]), (0, 0)])  # closing must not erode from the array edge
    closed = ndimage.binary_closing(padded, structure=disk)[r[0]:-r[0], r[1]:-r[1], :]
    return closed & body


def measure(image: np.ndarray, label: np.ndarray, spacing, annotated, hu: np.ndarray | None,
            cfg: AlignmentConfig) -> Measurement:
    """Score all 8 mirrorings of a coarse canonical image against its fixed label map.

    `annotated`: bool vector over CLASSES (which classes the source delineates); `hu`: the image in HU
    (None when the encoding has no HU decode: the lesion measure is then skipped)."""
    spacing = np.asarray(spacing, dtype=np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    annotated = np.asarray(annotated, dtype=bool)
    lesion = np.isin(label, OPACITY)
    ignore = label == IGNORE
    measures: dict[str, dict[str, float]] = {}
    voxels: dict[str, int] = {}
    mirror_axes = {flips_name(m): tuple(AXES.index(a) for a in m) for m in MIRRORINGS}

    if annotated[list(LUNG_VALUES)].all():
        lung = np.isin(label, LUNG_VALUES)
        if lung.sum() * voxel_ml >= cfg.min_lung_ml:
            outside = ndimage.distance_transform_edt(~(lung | lesion), sampling=spacing)
            shell = (outside > 0) & (outside <= cfg.shell_mm) & ~ignore
            lc, sc = np.argwhere(lung).T, np.argwhere(shell).T
            if sc.shape[1]:  # a lung mask filling the whole image leaves no shell to compare with
                voxels["lung"] = int(lc.shape[1])
                measures["lung"] = {name: _auc_greater(image[_mirrored(sc, image.shape, ax)],
                                                       image[_mirrored(lc, image.shape, ax)])
                                    for name, ax in mirror_axes.items()}

    if hu is not None and any(annotated[list(OPACITY)]) and lesion.sum() * voxel_ml >= cfg.min_lesion_ml:
        fld = lung_field(hu, spacing, cfg.field_closing_mm)
        if fld.any():
            low = float(np.median(hu[fld])) + cfg.lesion_excess_hu
            fits = fld & (hu > low) & (hu < cfg.lesion_max_hu)
            pc = np.argwhere(lesion).T
            voxels["lesion"] = int(pc.shape[1])
            measures["lesion"] = {name: float(fits[_mirrored(pc, image.shape, ax)].mean())
                                  for name, ax in mirror_axes.items()}

    scores = {name: float(np.mean([m[name] for m in measures.values()])) for name in mirror_axes} if measures else {}
    return Measurement(scores, measures, voxels)


def decide(m: Measurement, declared, cfg: AlignmentConfig) -> Alignment:
    """Turn a measurement and the declared image flips into the flips to apply and a status."""
    declared = parse_flips(declared)
    if not m.scores:
        return Alignment(declared, "unverifiable", declared)
    ranked = m.ranked
    (best_name, best), (_, second) = ranked[0], ranked[1]
    best_flips = parse_flips(best_name.split("+"))
    margin = best - second
    common = dict(declared=declared, best=best_flips, margin=margin, score=best,
                  stored_score=m.scores[flips_name(())], scores=m.scores, measures=m.measures, voxels=m.voxels)
    if margin < cfg.margin:
        return Alignment(declared, "ambiguous", **common)
    if best_flips != declared:  # `flips` says what the image needs; harmonize_case refuses the case
        return Alignment(best_flips, "mismatch", **common)
    return Alignment(declared, "fixed" if declared else "ok", **common)


def measure_case(image: np.ndarray, affine: np.ndarray, label: np.ndarray | None, annotated, encoding: str,
                 window, declared, cfg: AlignmentConfig) -> Alignment:
    """Measure one case in its stored geometry (`label`: common classes on the image's grid, or None)."""
    from datamodules.harmonize import decode_intensity  # harmonize imports this module

    if label is None:
        return Alignment(parse_flips(declared), "unverifiable", parse_flips(declared))
    img, lab, spacing = coarse_canonical(image, label, affine, cfg.grid_mm)
    try:
        hu = decode_intensity(img, encoding, window) if encoding in ("hu", "uint8_window") else None
    except (ValueError, VolumeError):
        hu = None
    return decide(measure(img, lab, spacing, annotated, hu, cfg), declared, cfg)


def summarize(statuses) -> dict[str, int]:
    """How many cases have each status (in STATUSES order, zero counts left out)."""
    statuses = list(statuses)
    return {s: statuses.count(s) for s in STATUSES if s in statuses}


__all__ = ["AXES", "STATUSES", "MIRRORINGS", "AlignmentConfig", "Alignment", "AlignmentError", "Measurement",
           "parse_flips", "flip_indices", "flips_name", "symmetric_indices", "coarse_canonical", "lung_field",
           "measure", "decide", "measure_case", "summarize"]
