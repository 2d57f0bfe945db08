"""Resampling a stored volume onto the harmonized RAS grid without first reordering the full volume.

A downloaded CT is typically a 512x512x300 int16 array in Fortran order (NIfTI) and LPS orientation. The
straightforward chain (reorient -> contiguous float copy -> clip -> interpolate) touches the full-size
volume four times, and the reordering copy alone costs more than reading the file. Trilinear and
nearest interpolation are separable, so the same samples can be computed one axis at a time, straight
from the stored array:

* `plan_grid` computes, per canonical (R, A, S) axis, which stored axis it comes from and the stored
  indices and weights of every output sample, with reorientation and any image mirror flips folded
  into the indices (a flipped axis reads index N-1-i);
* `resample_linear` / `resample_nearest` apply them axis by axis in MEMORY order (the slowest-varying
  axis first, so the first pass copies whole planes), shrinking axes before growing ones, and decode
  intensities on the first gathered planes only. Only the small output is reordered to RAS.

The sampling positions are exactly those of `torch.nn.functional.interpolate(scale_factor=s,
align_corners=False, recompute_scale_factor=False)` on the RAS-reordered volume (float32 position
arithmetic, as in PyTorch's CPU kernel; `nearest-exact` for labels), so the harmonized grid and its
affine are those of `harmonize.resample`: output voxel i samples input coordinate (i + 0.5) / s - 0.5,
the field of view's outer corner stays fixed. An axis whose size does not change is copied, like
PyTorch does.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch

from datamodules.io import spacing_of


@dataclass(frozen=True)
class AxisSampling:
    """How one canonical output axis samples its stored input axis."""
    stored_axis: int
    size_in: int
    size_out: int
    lo: np.ndarray       # stored index below each output sample (int64)
    hi: np.ndarray       # stored index above it
    weight: np.ndarray   # float32 weight of `hi` (0 where the sample falls on `lo`)
    nearest: np.ndarray  # stored index of the nearest input voxel (`nearest-exact`)

    @property
    def identity(self) -> bool:
        return self.size_out == self.size_in and bool(np.all(self.nearest == np.arange(self.size_in)))


@dataclass(frozen=True)
class GridPlan:
    axes: tuple[AxisSampling, AxisSampling, AxisSampling]  # canonical axis k -> its sampling
    canonical_affine: np.ndarray  # affine of the RAS-reordered (not resampled) volume
    affine: np.ndarray            # affine of the harmonized grid

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(a.size_out for a in self.axes)


def _axis_sampling(n: int, scale: float, flip: bool, stored_axis: int) -> AxisSampling:
    m = int(np.floor(float(n) * scale))  # F.interpolate's output size (double precision floor)
    if m < 1:
        raise ValueError(f"resampling an axis of {n} voxels by {scale:g} leaves no voxel")
    dst = np.arange(m, dtype=np.float32)
    if m == n:  # PyTorch copies an axis whose size does not change
        lo = np.arange(n, dtype=np.int64)
        hi, w, near = lo.copy(), np.zeros(n, np.float32), lo.copy()
    else:
        ratio = np.float32(1.0 / scale)
        real = np.maximum(ratio * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
        lo = np.minimum(np.floor(real).astype(np.int64), n - 1)
        w = np.clip(real - lo.astype(np.float32), 0.0, 1.0).astype(np.float32)
        hi = np.minimum(lo + 1, n - 1)
        near = np.minimum(np.floor(ratio * (dst + np.float32(0.5))).astype(np.int64), n - 1)
    if flip:
        lo, hi, near = n - 1 - lo, n - 1 - hi, n - 1 - near
    return AxisSampling(stored_axis, n, m, lo, hi, w, near)


def plan_grid(shape, affine: np.ndarray, target_spacing=None, flip_axes=()) -> GridPlan:
    """Sampling of a stored volume (`shape`, `affine`) onto the RAS grid at `target_spacing` mm (None:
    the volume's own spacing, i.e. reorientation only).

    `flip_axes`: canonical axes along which the stored data are mirrored while sampling (the data are
    flipped, the affine is kept: `harmonize_case` mirrors an image onto its masks this way).
    """
    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("R", "A", "S")))
    can_affine = affine @ nib.orientations.inv_ornt_aff(transform, shape)
    old = spacing_of(can_affine)
    scale = old / (old if target_spacing is None else np.asarray(target_spacing, dtype=np.float64))
    axes: list[AxisSampling | None] = [None, None, None]
    for stored_axis, (k, direction) in enumerate(transform):
        k = int(k)
        flip = (direction < 0) != (k in tuple(flip_axes))
        axes[k] = _axis_sampling(int(shape[stored_axis]), float(scale[k]), flip, stored_axis)
    vox = np.eye(4)
    for k, ax in enumerate(axes):
        if ax.size_out != ax.size_in:  # output voxel i samples input coordinate (i + 0.5) / s - 0.5
            vox[k, k] = 1.0 / scale[k]
            vox[k, 3] = 0.5 / scale[k] - 0.5
    return GridPlan(tuple(axes), can_affine, can_affine @ vox)


def _memory_view(array: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The array with its axes in memory order (largest stride first): a C-contiguous view of a
    Fortran- or C-ordered volume, so gathers along view axis 0 copy whole planes. Returns (view, the
    stored axis of each view axis)."""
    order = sorted(range(3), key=lambda a: -abs(array.strides[a]))
    return array.transpose(order), order


def _pass_order(plan: GridPlan, order: list[int]) -> list[int]:
    """Canonical axes in the order to resample them: shrinking axes first (less data for the next pass),
    each group from the slowest-varying stored axis in memory."""
    by_memory = sorted(range(3), key=lambda k: order.index(plan.axes[k].stored_axis))
    return ([k for k in by_memory if plan.axes[k].size_out < plan.axes[k].size_in]
            + [k for k in by_memory if plan.axes[k].size_out >= plan.axes[k].size_in])


def _to_canonical_order(result: np.ndarray, plan: GridPlan, order: list[int]) -> np.ndarray:
    return np.ascontiguousarray(result.transpose([order.index(plan.axes[k].stored_axis) for k in range(3)]))


# dtypes torch indexes natively; others (uint16, big-endian) are converted by numpy on the gathered planes
_TORCH_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32,
                                        np.float64)}


def _tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a if a.dtype in _TORCH_DTYPES else a.astype(np.float32))


def resample_linear(array: np.ndarray, plan: GridPlan,
                    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """Trilinear resampling of a stored volume onto `plan`'s grid: float32, canonical axis order.

    `prepare` (elementwise, on torch tensors: decode to HU, clip) is applied to input voxels before they
    are interpolated, on the first pass's gathered planes rather than on the full volume; it must return
    float32 of the same shape (default: a float32 cast).
    """
    prepare = prepare or (lambda t: t.float())
    view, order = _memory_view(array)
    out = view
    prepared = False
    for k in _pass_order(plan, order):
        ax = plan.axes[k]
        if ax.identity:
            continue
        axis = order.index(ax.stored_axis)
        # numpy gathers (any dtype, byte order, stride; its take copies whole rows, several times faster
        # than torch's index_select here); torch converts and interpolates on all cores
        lo, hi = (np.take(out, idx, axis=axis) for idx in (ax.lo, ax.hi))
        if not prepared:
            lo, hi = prepare(_tensor(lo)), prepare(_tensor(hi))
            prepared = True
        else:
            lo, hi = torch.from_numpy(lo), torch.from_numpy(hi)
        shape = [1, 1, 1]
        shape[axis] = -1
        out = torch.lerp(lo, hi, torch.from_numpy(ax.weight).view(shape)).numpy()
    if not prepared:
        out = prepare(_tensor(out)).numpy()
    return _to_canonical_order(out, plan, order)


def resample_nearest(array: np.ndarray, plan: GridPlan) -> np.ndarray:
    """Nearest (`nearest-exact`) resampling of a stored label volume onto `plan`'s grid; dtype kept."""
    view, order = _memory_view(array)
    out = view
    for k in _pass_order(plan, order):
        ax = plan.axes[k]
        if not ax.identity:
            out = np.take(out, ax.nearest, axis=order.index(ax.stored_axis))
    return _to_canonical_order(out, plan, order)
