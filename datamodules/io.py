"""Reading and writing NIfTI volumes with errors that name the file and the problem."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np


class VolumeError(ValueError):
    """A volume file is unreadable or its content is invalid."""


def read_volume(path: str | Path, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """Return (array, affine) of a 3D NIfTI file; scaling (scl_slope/inter) is applied by nibabel.

    A trailing singleton 4th dimension (seen in some converters' output) is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError, ValueError) as exc:
        raise VolumeError(f"{path}: corrupt or truncated NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{path}: header affine is singular or not finite:\n{affine}")
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return data, affine


def write_volume(path: str | Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write a NIfTI file atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    nib.save(img, str(tmp))
    os.replace(tmp, path)


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along each voxel axis: the column norms of the affine's 3x3 part."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
