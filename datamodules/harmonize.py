"""Harmonizer: every source's volumes into one geometry and intensity convention.

Pure functions on arrays + affines, and `harmonize_case` chaining them for one `Case`:
label remap into the common classes -> image-mask alignment measured (`datamodules.alignment`: which
mirroring of the image its masks fit; declared image flips confirmed or refused) -> canonical
orientation (RAS+) with those image-only flips -> intensity decode to HU -> resample to the target
spacing (image linear, labels nearest) -> HU window and normalization.

`HarmonizerConfig.decode`, `.resample` and `normalize: none` switch single steps off for the
harmonization ablation (`data.harmonize_off`, sweeps/harmonization.yaml); the defaults run every step.

Why our own resampler instead of MONAI `Spacing`: `torch.nn.functional.interpolate` with an explicit
scale factor maps output voxel i to input coordinate (i + 0.5) * new/old - 0.5, i.e. it keeps the
outer corner of the field of view fixed, so the affine of the result is exact and cheap to derive,
and it is several times faster on CPU (issue 6 benchmarks it).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from datamodules.alignment import AlignmentConfig, AlignmentError, flip_indices, measure_case
from datamodules.cases import Case
from datamodules.choices import NORMALIZE
from datamodules.io import VolumeError, describe_scaling, header_scaling, read_volume, spacing_of
from datamodules.label_policy import CLASSES, LabelPolicy, decide_labels, labels_from_probs
from datamodules.resample import plan_grid, resample_linear, resample_nearest

# Accepted disagreement between an image's and its mask's affine (mm / direction cosines). Converters
# round headers differently; anything beyond this means the mask belongs to another geometry.
AFFINE_ATOL_MM = 0.05
DIRECTION_ATOL = 1e-3
HU_MIN, HU_MAX = -1024.0, 3071.0
# Intensity sanity of a scan, measured on its stored values (after the header's scl scaling), before
# anything trains on it (`check_intensity`):
# - A chest CT in HU always holds air (outside the body, -1000 HU) and aerated lung (about -850 HU; even
#   a badly diseased lung keeps voxels far below -500). A scan declared HU with no voxel below
#   AIR_MAX_HU is not HU: an 8-bit windowed export (0..255), a normalized copy, a wrong scl_slope or
#   scl_inter.
AIR_MAX_HU = -500.0
# - Physical CT numbers run from about -1024 (air) to about 3071 (dense bone; extended scales go higher
#   for metal), and padding outside the reconstruction circle (-2048, -3024, -32768) lies below. Padding
#   and metal never make up half of a chest scan, so at least MIN_PHYSICAL_FRACTION of the voxels must lie
#   in HU_PHYSICAL: a slope or intercept off by an order of magnitude moves nearly all of them out.
HU_PHYSICAL = (-1100.0, 4000.0)
MIN_PHYSICAL_FRACTION = 0.5
# The physical-range fraction is measured on every SAMPLE_STEP-th voxel along each axis (1/8 of a
# 512x512x300 scan: ~40 ms instead of ~300 ms); min and max are measured on every voxel.
SAMPLE_STEP = 2


# Steps the harmonization ablation can switch off (data.harmonize_off; sweeps/harmonization.yaml).
ABLATABLE_STEPS = ("decode", "resample", "normalize")


@dataclass(frozen=True)
class HarmonizerConfig:
    target_spacing: tuple[float, float, float] = (1.5, 1.5, 5.0)
    window: tuple[float, float] = (-1000.0, 300.0)
    normalize: str = "minmax"  # minmax: window -> [0, 1]; zscore: (clip(hu) - mean) / std; none: HU as they are
    mean: float = -500.0
    std: float = 500.0
    # Ablation switches (every step on by default). decode=False reads stored values as HU, so 8-bit
    # windowed exports reach the network undecoded; resample=False keeps each case's own voxel spacing.
    decode: bool = True
    resample: bool = True
    alignment: AlignmentConfig = AlignmentConfig()

    def __post_init__(self) -> None:
        # a config's Choice member becomes its plain string: this config is a checkpoint hyperparameter
        object.__setattr__(self, "normalize", str(self.normalize))
        if self.normalize not in NORMALIZE:
            raise ValueError(f"harmonizer.normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if len(self.target_spacing) != 3 or min(self.target_spacing) <= 0:
            raise ValueError(f"harmonizer.target_spacing must be three positive mm values, got {self.target_spacing}")
        if self.window[0] >= self.window[1]:
            raise ValueError(f"harmonizer.window must be (low, high) HU with low < high, got {self.window}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_spacing"] = [float(s) for s in self.target_spacing]
        d["window"] = [float(w) for w in self.window]
        d["alignment"] = self.alignment.as_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HarmonizerConfig:
        """Inverse of `as_dict`; keys an older checkpoint or cache did not record keep their defaults."""
        d = dict(d)
        for k in ("target_spacing", "window"):
            if k in d:
                d[k] = tuple(float(v) for v in d[k])
        if "alignment" in d:
            d["alignment"] = AlignmentConfig(**d["alignment"])
        return cls(**d)


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip voxel axes so they run R, A, S (closest canonical); world positions are unchanged."""
    ornt = nib.orientations.io_orientation(affine)
    target = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, target)
    out = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out), new_affine


def decode_intensity(array: np.ndarray, encoding: str, window: tuple[float, float] | None = None,
                     where: str = "<array>") -> np.ndarray:
    """Stored values -> HU (float32).

    `hu`: values already are HU. `uint8_window`: 0..255 stands for `window` linearly (COVID-19-CT-Seg
    radiopaedia cases, [-1250, 250]); the decode is exact up to half a quantization step
    ((high - low) / 255 / 2 HU) inside the window, and values outside it were clipped at export.
    """
    arr = np.asarray(array)
    if encoding == "hu":
        return arr.astype(np.float32, copy=False)
    if encoding == "uint8_window":
        if window is None:
            raise ValueError(f"{where}: uint8_window encoding needs a window")
        check_uint8_range(arr, where)
        w0, w1 = window
        return (w0 + arr.astype(np.float32) * np.float32((w1 - w0) / 255.0)).astype(np.float32)
    raise ValueError(f"{where}: unknown intensity encoding {encoding!r}")


def check_uint8_range(arr: np.ndarray, where: str, lo: float | None = None, hi: float | None = None) -> None:
    lo = float(np.min(arr)) if lo is None else lo
    hi = float(np.max(arr)) if hi is None else hi
    if lo < 0 or hi > 255:
        raise VolumeError(f"{where}: declared 8-bit windowed, but values span {lo:g}..{hi:g} (expected 0..255)")


def _scaling_note(path) -> str:
    scaling = header_scaling(path) if path is not None else None
    return f" (header {describe_scaling(scaling)})" if scaling is not None else ""


def check_intensity(stored: np.ndarray, encoding: str, where: str, path=None) -> None:
    """Refuse stored intensities that cannot be what the case declares (VolumeError naming the file and
    what was measured): NaN/inf voxels, a constant image, values outside 0..255 for an 8-bit export, and
    for HU a scan without air or with most voxels outside the physical range (see AIR_MAX_HU,
    HU_PHYSICAL). `path`: the image file, whose header scl_slope/scl_inter the message quotes.
    Unknown encodings are left to `decode_intensity`, which refuses them."""
    arr = np.asarray(stored)
    lo, hi = float(np.min(arr)), float(np.max(arr))  # NaN propagates through both, inf shows in one
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise VolumeError(f"{where}: image contains NaN or inf voxels")
    if lo == hi:
        raise VolumeError(f"{where}: constant image: every voxel is {lo:g}{_scaling_note(path)}")
    if encoding == "uint8_window":
        check_uint8_range(arr, where, lo, hi)
    if encoding != "hu":
        return
    if lo > AIR_MAX_HU:
        if lo >= 0 and hi <= 255:
            raise VolumeError(f"{where}: declared HU, but it looks like an 8-bit export: values span {lo:g}..{hi:g}, "
                              f"within 0..255, none below {AIR_MAX_HU:g} HU (no air){_scaling_note(path)}; declare "
                              "its encoding uint8_window with the export's window")
        raise VolumeError(f"{where}: declared HU, but no air or lung: values span {lo:g}..{hi:g}, none below "
                          f"{AIR_MAX_HU:g} HU{_scaling_note(path)}; a wrong scl_slope/scl_inter or a normalized copy?")
    sample = arr[::SAMPLE_STEP, ::SAMPLE_STEP, ::SAMPLE_STEP] if arr.ndim == 3 else arr
    inside = float(np.count_nonzero((sample >= HU_PHYSICAL[0]) & (sample <= HU_PHYSICAL[1]))) / max(sample.size, 1)
    if inside < MIN_PHYSICAL_FRACTION:
        raise VolumeError(f"{where}: declared HU, but only {inside:.0%} of the voxels lie in the physical range "
                          f"{HU_PHYSICAL[0]:g}..{HU_PHYSICAL[1]:g} HU (values span {lo:g}..{hi:g}){_scaling_note(path)}; "
                          "a wrong scl_slope/scl_inter?")


def resample(array: np.ndarray, affine: np.ndarray, target_spacing, is_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Resample to `target_spacing` (mm per voxel axis), keeping the field of view's outer corner.

    Image: trilinear. Labels: nearest (`nearest-exact`, whose sampling points match trilinear's; plain
    `nearest` is shifted by half an input voxel). Returns (array, new affine).
    """
    old = spacing_of(affine)
    new = np.asarray(target_spacing, dtype=np.float64)
    scale = old / new
    if np.allclose(scale, 1.0, rtol=1e-6, atol=0):
        return array, affine.copy()
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    mode = "nearest-exact" if is_label else "trilinear"
    kwargs = {} if is_label else {"align_corners": False}
    out = F.interpolate(t, scale_factor=tuple(float(s) for s in scale), mode=mode,
                        recompute_scale_factor=False, **kwargs)[0, 0].numpy()
    # Output voxel i samples input coordinate (i + 0.5) / scale - 0.5: express that in the affine.
    vox = np.eye(4)
    vox[:3, :3] = np.diag(1.0 / scale)
    vox[:3, 3] = 0.5 / scale - 0.5
    new_affine = affine @ vox
    if is_label:
        out = out.astype(array.dtype)
    return out, new_affine


def window_normalize(hu: np.ndarray, cfg: HarmonizerConfig) -> np.ndarray:
    if cfg.normalize == "none":  # ablation: the network sees HU, unclipped and unscaled
        return hu.astype(np.float32, copy=False)
    lo, hi = cfg.window
    clipped = np.clip(hu, lo, hi)
    if cfg.normalize == "minmax":
        return ((clipped - lo) / (hi - lo)).astype(np.float32)
    return ((clipped - cfg.mean) / cfg.std).astype(np.float32)


def grid_mismatch(image_shape, image_affine: np.ndarray, label_shape, label_affine: np.ndarray) -> str | None:
    """None when the label lies on the image's voxel grid (within tolerance); else "shape" or "affine"."""
    if tuple(image_shape) != tuple(label_shape):
        return "shape"
    d_img, d_lab = image_affine[:3, :3], label_affine[:3, :3]
    sp = spacing_of(image_affine)
    if (np.abs(d_img / sp - d_lab / sp).max() > DIRECTION_ATOL
            or np.abs(image_affine[:3, 3] - label_affine[:3, 3]).max() > AFFINE_ATOL_MM
            or np.abs(sp - spacing_of(label_affine)).max() > AFFINE_ATOL_MM):
        return "affine"
    return None


def check_pair(image_path, image_shape, image_affine, label_path, label_shape, label_affine) -> None:
    mismatch = grid_mismatch(image_shape, image_affine, label_shape, label_affine)
    if mismatch == "shape":
        raise VolumeError(f"{label_path}: mask shape {tuple(label_shape)} differs from image {image_path} "
                          f"shape {tuple(image_shape)}")
    if mismatch == "affine":
        raise VolumeError(f"{label_path}: mask affine differs from image {image_path} beyond tolerance "
                          f"({AFFINE_ATOL_MM} mm):\nimage\n{np.round(image_affine, 4)}\nmask\n{np.round(label_affine, 4)}")


def reorientation(label_shape, label_affine: np.ndarray, image_shape, image_affine: np.ndarray) -> np.ndarray | None:
    """The nibabel orientation transform that stores the label on the image's grid, or None.

    Only headers are read: a label stored in another axis order or direction (PleThora's RPI masks
    beside RAI DICOM series) whose voxels sit at the same world positions gets that transform (the
    identity when the grids already agree); any other difference gets None.
    """
    transform = nib.orientations.ornt_transform(nib.orientations.io_orientation(label_affine),
                                                nib.orientations.io_orientation(image_affine))
    moved_shape = [0, 0, 0]
    for src_axis, (dst_axis, _) in enumerate(transform.astype(int)):
        moved_shape[dst_axis] = int(label_shape[src_axis])
    moved_affine = label_affine @ nib.orientations.inv_ornt_aff(transform, label_shape)
    return transform if grid_mismatch(image_shape, image_affine, moved_shape, moved_affine) is None else None


@dataclass
class Harmonized:
    image: np.ndarray          # float32, normalized
    label: np.ndarray | None   # uint8 common-class indices, 0 also where a class is unannotated
    affine: np.ndarray         # voxel -> world (RAS mm) of the harmonized arrays
    meta: dict[str, Any]


def align_mask(label: np.ndarray, label_affine: np.ndarray, image_shape, image_affine: np.ndarray,
               label_path, image_path) -> np.ndarray:
    """The mask on the image's voxel grid.

    A mask stored in another axis order or direction than its image but whose header places every voxel
    at the same world position is reoriented onto the image grid (`reorientation`): the headers prove
    the correspondence, nothing is guessed. Anything else is the `check_pair` error naming both files.
    """
    if grid_mismatch(image_shape, image_affine, label.shape, label_affine) is None:
        return label
    transform = reorientation(label.shape, label_affine, image_shape, image_affine)
    if transform is None:
        check_pair(image_path, image_shape, image_affine, label_path, label.shape, label_affine)
    return np.ascontiguousarray(nib.orientations.apply_orientation(label, transform))


def load_original(case: Case, policy: LabelPolicy | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Read one case in its stored geometry: (HU float32, label in common classes or None, affine).

    Nothing is reoriented, flipped or resampled: this is the grid the official mask lives on, where
    evaluation in original geometry scores predictions (and where severity reads HU).
    """
    image, affine = read_volume(case.image)
    where = str(case.image)
    check_intensity(image, case.encoding, where, case.image)
    hu = decode_intensity(image, case.encoding, case.window, where)
    del image
    return hu, read_label(case, policy, hu.shape, affine), affine


def read_label(case: Case, policy: LabelPolicy | None, image_shape, image_affine: np.ndarray) -> np.ndarray | None:
    """The case's mask on its image's stored grid, in common classes (uint8); None for unlabelled cases."""
    if case.label is None:
        return None
    if policy is None:
        raise ValueError(f"{case.key}: labelled case without a label policy")
    raw, lab_affine = read_volume(case.label)
    raw = align_mask(raw, lab_affine, image_shape, image_affine, case.label, case.image)
    return policy.remap(raw, where=str(case.label))


def _hu_tensor(encoding: str, window) -> Callable[[torch.Tensor], torch.Tensor]:
    """Stored values -> HU clipped to the scanner range, on torch tensors (elementwise, so the resampler
    applies it to the planes it gathers instead of the whole volume); the same formulas as
    `decode_intensity`, whose range check `harmonize_case` runs on the full stored array first."""
    if encoding == "hu":
        return lambda t: t.float().clamp_(HU_MIN, HU_MAX)
    w0, w1 = window
    step = float(np.float32((w1 - w0) / 255.0))
    return lambda t: t.float().mul_(step).add_(float(w0)).clamp_(HU_MIN, HU_MAX)


def harmonize_case(case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig) -> Harmonized:
    """One case from its stored files to the harmonized grid (see the module docstring for the chain).

    The geometry is that of reorienting to RAS, mirroring the image along its measured flips, clipping
    and `resample` in sequence, but computed by `datamodules.resample` straight from the stored array
    (one axis at a time, in memory order), which never makes a full-size reordered or float copy of the
    volume. Image flips move the image only: the masks stay where their header puts them.
    Raises `AlignmentError` (a `VolumeError`, so `data.on_error` applies) when the masks decisively fit
    another mirroring of the image than the one declared for the case.
    """
    image, affine = read_volume(case.image)
    where = str(case.image)
    # measured against what the case declares, also when the ablation reads 8-bit exports undecoded
    check_intensity(image, case.encoding, where, case.image)
    encoding, window = (case.encoding, case.window) if cfg.decode else ("hu", None)
    decode_intensity(image[:1, :1, :1], encoding, window, where)  # unknown encoding, no window
    label = read_label(case, policy, image.shape, affine)
    annotated = policy.annotated_vector() if (policy and label is not None) else np.zeros(len(CLASSES), bool)
    align = measure_case(image, affine, label, annotated, encoding, window, case.image_flips, cfg.alignment)
    if align.status == "mismatch":
        raise AlignmentError(f"{where}: {align.describe(case.key)}")
    original = {"shape": list(image.shape), "affine": affine.tolist(), "axcodes": "".join(nib.aff2axcodes(affine))}
    spacing = cfg.target_spacing if cfg.resample else None
    plan = plan_grid(image.shape, affine, spacing, flip_indices(align.flips))
    hu = resample_linear(image, plan, _hu_tensor(encoding, window))
    del image
    if label is not None:
        label_plan = plan_grid(original["shape"], affine, spacing) if align.flips else plan
        label = np.ascontiguousarray(resample_nearest(label, label_plan), dtype=np.uint8)
    image_n = np.ascontiguousarray(window_normalize(hu, cfg))
    new_affine, can_affine = plan.affine, plan.canonical_affine
    meta = {
        "source": case.source, "case": case.case_id, "patient": case.patient_id,
        "shape": list(image_n.shape), "spacing": [float(s) for s in spacing_of(new_affine)],
        "affine": new_affine.tolist(), "canonical_affine": can_affine.tolist(), "original": original,
        "image_flips": list(align.flips), "declared_image_flips": list(case.image_flips),
        "alignment": align.as_dict(), "encoding": case.encoding,
        "window": list(case.window) if case.window else None,
        "policy": policy.name if (policy and label is not None) else None, "annotated": annotated.tolist(),
        "classes": list(CLASSES), "harmonizer": cfg.as_dict(),
    }
    return Harmonized(image_n, label, new_affine, meta)


def _orientation_back(original_affine: np.ndarray) -> np.ndarray:
    """The orientation transform that takes the RAS-canonical array back to the stored axis order."""
    ornt = nib.orientations.io_orientation(original_affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    return nib.orientations.ornt_transform(ras, ornt)


def canonical_shape(original_shape, original_affine: np.ndarray) -> tuple[int, ...]:
    ornt = nib.orientations.io_orientation(original_affine)
    perm = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt(("R", "A", "S")))[:, 0].astype(int)
    out = [0, 0, 0]
    for src_axis, dst_axis in enumerate(perm):
        out[dst_axis] = int(original_shape[src_axis])
    return tuple(out)


def _resize_to(t: torch.Tensor, scale: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """Invert `resample` for one channel (1, 1, *harmonized) -> (*shape): canonical voxel j sits at
    harmonized coordinate (j + 0.5) * scale - 0.5, which interpolate computes for scale_factor 1/scale.
    The forward pass floored the size, so the last canonical voxel may lie beyond the harmonized grid:
    pad by edge replication (interpolate clamps there anyway) and crop any excess."""
    out = F.interpolate(t, scale_factor=tuple(float(1.0 / s) for s in scale), mode="trilinear",
                        align_corners=False, recompute_scale_factor=False)[0, 0]
    pads = []
    for ax in (2, 1, 0):
        pads += [0, max(0, shape[ax] - out.shape[ax])]
    if any(pads):
        out = F.pad(out[None, None], pads, mode="replicate")[0, 0]
    return out[: shape[0], : shape[1], : shape[2]]


def restore_to_original(scores: torch.Tensor, meta: dict[str, Any]) -> np.ndarray:
    """Class probabilities on the harmonized grid (C, X, Y, Z) -> label map (uint8) on the stored grid.

    Inverse of `harmonize_case`'s geometry: resample the scores (probabilities interpolate smoothly;
    resampling a label map would stair-step) back to the canonical grid, decide each voxel by class
    group (`label_policy.decide_labels`), then restore the stored axis order. Image flips are not undone:
    they moved the image onto its masks, so predictions already lie where the stored masks do. Channels
    (group sums, then the members of a group that wins somewhere) are resampled one at a time, so a
    512x512x300 volume never holds all class channels at full size.
    """
    orig_shape = tuple(meta["original"]["shape"])
    orig_affine = np.asarray(meta["original"]["affine"], dtype=np.float64)
    can_affine = np.asarray(meta["canonical_affine"], dtype=np.float64)
    can_shape = canonical_shape(orig_shape, orig_affine)
    scale = spacing_of(can_affine) / np.asarray(meta["spacing"], dtype=np.float64)
    scores = scores.detach().float().cpu()
    if np.allclose(scale, 1.0, rtol=1e-6, atol=0) and tuple(scores.shape[1:]) == can_shape:
        labels = labels_from_probs(scores)
    else:
        def channel(idx):
            # probabilities resample linearly, so a group's sum is resampled once, as one channel
            if idx[0] > 0 and not bool(scores[list(idx)].gt(0).any()):
                return None  # zero probability everywhere (never trained): cannot win
            return _resize_to(scores[list(idx)].sum(0)[None, None], scale, can_shape)

        labels = decide_labels(channel, scores.shape[0])
    out = labels.numpy()
    back = _orientation_back(orig_affine)
    out = np.ascontiguousarray(nib.orientations.apply_orientation(out, back), dtype=np.uint8)
    # The restored grid must be the stored one: a mismatch here would score against a misaligned mask.
    restored_affine = can_affine @ nib.orientations.inv_ornt_aff(back, can_shape)
    if out.shape != orig_shape or not np.allclose(restored_affine, orig_affine, atol=1e-4):
        raise AssertionError(f"restoring {meta.get('source')}/{meta.get('case')}: got shape {out.shape} "
                             f"affine\n{restored_affine}\nexpected {orig_shape}\n{orig_affine}")
    return out


def probabilities_to_original(scores: torch.Tensor, meta: dict[str, Any]) -> np.ndarray:
    """Class probabilities on the harmonized grid (C, X, Y, Z) -> float32 (X, Y, Z, C) on the stored grid:
    every channel resampled as `restore_to_original` resamples the group sums, then the stored axis order
    restored (what `experiments.predict --probabilities` and `evaluation.save_probabilities` write)."""
    orig_affine = np.asarray(meta["original"]["affine"], dtype=np.float64)
    can_affine = np.asarray(meta["canonical_affine"], dtype=np.float64)
    can_shape = canonical_shape(tuple(meta["original"]["shape"]), orig_affine)
    scale = spacing_of(can_affine) / np.asarray(meta["spacing"], dtype=np.float64)
    scores = scores.detach().float().cpu()
    same = np.allclose(scale, 1.0, rtol=1e-6, atol=0) and tuple(scores.shape[1:]) == can_shape
    back = _orientation_back(orig_affine)
    channels = []
    for c in range(scores.shape[0]):
        t = scores[c] if same else _resize_to(scores[c][None, None], scale, can_shape)
        channels.append(nib.orientations.apply_orientation(t.numpy(), back))
    return np.ascontiguousarray(np.stack(channels, axis=-1), dtype=np.float32)
