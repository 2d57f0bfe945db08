"""Synthetic full-size CT cases for the benchmarks: written once, reused by every benchmark in a run.

A 512x512x300 int16 volume at 0.7 x 0.7 x 1.0 mm (the issue's reference case) in LPS orientation (so
reorientation is exercised), HU-like values: air -1000 outside an elliptic body of soft tissue (40 HU),
two lungs (-850 HU) holding a few lesion blobs (-300 HU), noise. The label marks lesions 1 and lungs 2.
Written with nibabel as `.nii.gz` (what users download) and, for loaders that want it, uncompressed.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (512, 512, 300)
SPACING = (0.7, 0.7, 1.0)
QUICK_SHAPE = (512, 512, 120)


def ct_arrays(shape=SHAPE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, label uint8: 1 lesion, 2 lung) on a voxel grid of `shape`."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = np.linspace(-1, 1, nx, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, ny, dtype=np.float32)[None, :, None]
    z = np.linspace(-1, 1, nz, dtype=np.float32)[None, None, :]
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 <= 1.0
    image = np.full(shape, -1000, np.int16)
    image[np.broadcast_to(body, shape)] = 40
    label = np.zeros(shape, np.uint8)
    for cx in (-0.42, 0.42):
        lung = ((x - cx) / 0.33) ** 2 + (y / 0.5) ** 2 + (z / 0.95) ** 2 <= 1.0
        label[lung] = 2
    for _ in range(8):
        c = rng.uniform([-0.6, -0.35, -0.7], [0.6, 0.35, 0.7])
        r = rng.uniform(0.04, 0.12)
        blob = ((x - c[0]) ** 2 + (y - c[1]) ** 2 + ((z - c[2]) * 0.7) ** 2 <= r * r) & (label == 2)
        label[blob] = 1
    image[label == 2] = -850
    image[label == 1] = -300
    image += rng.normal(0, 20, shape).astype(np.int16)
    return image, label


def lps_affine(spacing=SPACING) -> np.ndarray:
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])


def write_case(folder: Path, shape=SHAPE, spacing=SPACING, seed: int = 0, gz: bool = True) -> tuple[Path, Path]:
    """`folder/ct.nii[.gz]`, `folder/seg.nii[.gz]`; reused when present."""
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if gz else ".nii"
    image_path, label_path = folder / f"ct{ext}", folder / f"seg{ext}"
    if image_path.exists() and label_path.exists():
        return image_path, label_path
    image, label = ct_arrays(shape, seed)
    affine = lps_affine(spacing)
    for arr, path in ((image, image_path), (label, label_path)):
        img = nib.Nifti1Image(arr, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        tmp = path.with_name(f".tmp-{path.name}")
        nib.save(img, str(tmp))
        tmp.replace(path)
    return image_path, label_path
