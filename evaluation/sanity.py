"""Sanity of a predicted label map: anatomically implausible outputs, found without a reference.

A model that labels the air around the body as lung still gets a Dice (and a lung volume of tens of
litres) and nothing in the metrics says why. `check_prediction` lists the problems of one predicted case
in words; the score stage (`per_case.csv`'s `sanity` column, one warning line per case) and
`experiments.predict` (`<case>_severity.json`, `predictions.csv`) report them. Pure numpy/scipy: labels
in the common label space (datamodules.label_policy), on a grid with known voxel spacing (mm).

The checks, with their limits in `evaluation.sanity` (base.yaml, where the ranges' sources are cited):
- total and per-side lung volume outside an adult range (only where the model predicts lungs);
- predicted lesion volume outside the lungs (predicted ones, else the reference's): lesion components
  touching no lung voxel;
- predicted lung on the in-plane border of the volume (the body never fills the field of view);
- predicted lung in the air outside the body (with HU: air connected to the in-plane border).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from datamodules.label_policy import CLASS_INDEX, OPACITY

LUNG_SIDES = {"left": CLASS_INDEX["lung_left"], "right": CLASS_INDEX["lung_right"]}
LUNG_VALUES = tuple(LUNG_SIDES.values())
OK = "ok"


@dataclass(frozen=True)
class SanityLimits:
    total_lung_l: tuple[float, float]      # whole lungs (lesions inside included), litres
    lung_side_l: tuple[float, float]       # each lung
    lesion_outside_lung: float             # largest share of the predicted lesion volume outside the lungs
    lung_on_border: float                  # largest share of the lung voxels on the in-plane volume border
    lung_in_outside_air: float             # largest share of the lung voxels in the air outside the body
    outside_air_hu: float                  # voxels below this HU connected to the in-plane border: outside air

    @classmethod
    def from_config(cls, spec: dict) -> SanityLimits:
        return cls(total_lung_l=tuple(float(v) for v in spec["total_lung_l"]),
                   lung_side_l=tuple(float(v) for v in spec["lung_side_l"]),
                   lesion_outside_lung=float(spec["lesion_outside_lung"]), lung_on_border=float(spec["lung_on_border"]),
                   lung_in_outside_air=float(spec["lung_in_outside_air"]), outside_air_hu=float(spec["outside_air_hu"]))


def in_plane_axes(axial_axis: int) -> tuple[int, int]:
    return tuple(a for a in range(3) if a != axial_axis)


def border_mask(shape: Sequence[int], axial_axis: int) -> np.ndarray:
    """The voxels on the faces of the volume across the in-plane axes (not the first and last slice: a scan
    may end inside the lungs)."""
    edge = np.zeros(shape, dtype=bool)
    for a in in_plane_axes(axial_axis):
        index = [slice(None)] * 3
        for end in (0, shape[a] - 1):
            index[a] = end
            edge[tuple(index)] = True
    return edge


def outside_air(hu: np.ndarray, axial_axis: int, air_hu: float) -> np.ndarray:
    """Air connected (3D, faces) to the in-plane volume border: around the body, never inside the lungs,
    whose air reaches the border only through the airways at the scan's top slice (not an in-plane face)."""
    air = hu < air_hu
    components, _ = ndimage.label(air)
    touching = np.unique(components[border_mask(hu.shape, axial_axis) & air])
    return np.isin(components, touching[touching > 0])


def lesion_outside_lungs(lesion: np.ndarray, lung: np.ndarray) -> float:
    """Share of the lesion voxels in connected lesion components (26-connected) that touch no lung voxel."""
    if not lesion.any():
        return 0.0
    components, n = ndimage.label(lesion, structure=np.ones((3, 3, 3), dtype=bool))
    near_lung = ndimage.binary_dilation(lung, structure=np.ones((3, 3, 3), dtype=bool))
    inside = np.unique(components[near_lung & lesion])
    outside = lesion & ~np.isin(components, inside[inside > 0])
    return float(outside.sum() / lesion.sum())


def _range(value: float, bounds: tuple[float, float]) -> bool:
    return bounds[0] <= value <= bounds[1]


def check_prediction(pred: np.ndarray, spacing: Sequence[float], limits: SanityLimits, lungs_predicted: bool,
                     axial_axis: int = 2, hu: np.ndarray | None = None, ref: np.ndarray | None = None,
                     ref_lungs: bool = False) -> list[str]:
    """The problems of one predicted label map, in words (empty: none found).

    `lungs_predicted`: the model was trained on lungs, so their volume and position are checked (a
    lesion-only model predicts no lung: nothing to check). `hu` (same grid) enables the outside-air check;
    `ref` with `ref_lungs` (the reference annotates lungs) gives the lungs lesions are checked against when
    the model predicts none."""
    problems: list[str] = []
    voxel_l = float(np.prod(spacing)) / 1e6
    lesion = np.isin(pred, OPACITY)
    if lungs_predicted:
        lung = np.isin(pred, LUNG_VALUES)
        whole = lung | lesion  # a lung with its lesions: lesion voxels replace lung labels
        total = float(whole.sum()) * voxel_l
        if not _range(total, limits.total_lung_l):
            problems.append(f"lung volume {total:.2f} L outside the adult range {limits.total_lung_l[0]:g}-"
                            f"{limits.total_lung_l[1]:g} L")
        for side, value in LUNG_SIDES.items():
            litres = float((pred == value).sum()) * voxel_l
            if not _range(litres, limits.lung_side_l):
                problems.append(f"{side} lung {litres:.2f} L outside {limits.lung_side_l[0]:g}-{limits.lung_side_l[1]:g} L")
        if lung.any():
            on_edge = float((lung & border_mask(pred.shape, axial_axis)).sum() / lung.sum())
            if on_edge > limits.lung_on_border:
                problems.append(f"lung touches the volume border ({100 * on_edge:.1f} % of lung voxels on it)")
            if hu is not None:
                in_air = float((lung & outside_air(hu, axial_axis, limits.outside_air_hu)).sum() / lung.sum())
                if in_air > limits.lung_in_outside_air:
                    problems.append(f"lung predicted in the air outside the body ({100 * in_air:.1f} % of lung voxels)")
        lungs_for_lesions = lung
    elif ref is not None and ref_lungs:
        lungs_for_lesions = np.isin(ref, LUNG_VALUES + OPACITY)
    else:
        lungs_for_lesions = None
    if lungs_for_lesions is not None and lesion.any():
        outside = lesion_outside_lungs(lesion, lungs_for_lesions)
        if outside > limits.lesion_outside_lung:
            which = "predicted" if lungs_predicted else "reference"
            problems.append(f"{100 * outside:.0f} % of the lesion volume outside the {which} lungs")
    return problems


def sanity_text(problems: Sequence[str]) -> str:
    """The per-case column's value: `ok`, or the problems joined by `; `."""
    return "; ".join(problems) if problems else OK
