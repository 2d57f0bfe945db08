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

    A trailing singleton 4th dimension (seen in some converters' output) is dropped. A folder is read
    as the one DICOM series it holds (NSCLC-Radiomics, COVID-19-AR), in the same x, y, z / RAS convention.
    """
    path = Path(path)
    if path.is_dir():
        series = dicom_series(path)
        if len(series) != 1:
            raise VolumeError(f"{path}: expected one DICOM series in the folder, found {len(series)}")
        data, affine = read_dicom_series(series[0][1], str(path))
        return (data.astype(dtype, copy=False) if dtype is not None else data), affine
    if not path.is_file():
        raise VolumeError(f"{path}: file not found")
    try:
        img, data = _load_nifti(path)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError, ValueError,
            *_ISAL_ERRORS) as exc:
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


try:  # python-isal (Intel ISA-L) inflates gzip about twice as fast as zlib; nibabel is used if it is absent
    from isal import igzip as _igzip
    from isal import isal_zlib as _isal_zlib

    _ISAL_ERRORS: tuple = (_isal_zlib.error,)
except ImportError:  # pragma: no cover - isal is a declared dependency
    _igzip, _ISAL_ERRORS = None, ()


def _load_nifti(path: Path):
    """(image, data array) of a NIfTI file. A `.nii.gz` NIfTI-1 file is inflated by ISA-L, straight
    into the array's buffer (nibabel's own `readinto` on our stream); everything else by `nib.load`.
    Decompression is most of the cost of reading a CT, and the harmonizer reads every case once."""
    if _igzip is None or not path.name.endswith(".gz"):
        img = nib.load(str(path))
        return img, np.asanyarray(img.dataobj)
    with _igzip.open(str(path), "rb") as f:
        sizeof_hdr = f.read(4)
        f.seek(0)
        if sizeof_hdr not in (np.int32(348).tobytes(), np.int32(348).byteswap().tobytes()):
            img = nib.load(str(path))  # NIfTI-2 (540-byte header) or not NIfTI: nibabel decides
            return img, np.asanyarray(img.dataobj)
        holder = nib.FileHolder(filename=str(path), fileobj=f)
        img = nib.Nifti1Image.from_file_map({"header": holder, "image": holder})
        return img, np.asanyarray(img.dataobj)


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


# DICOM patient coordinates are LPS+, NIfTI world coordinates RAS+: negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def dicom_series(folder: str | Path) -> list[tuple[str, list[str]]]:
    """The DICOM series in `folder` as (series uid, sorted file names); empty when there are none."""
    import SimpleITK as sitk

    folder = str(folder)
    return [(uid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)))
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder) or ()]


def read_dicom_series(files: list[str], where: str) -> tuple[np.ndarray, np.ndarray]:
    """One DICOM series -> (array indexed x, y, z in HU, RAS affine), like `read_volume` for NIfTI.

    SimpleITK (GDCM) sorts the slices by position and applies the rescale slope/intercept; we only
    translate its LPS geometry into the NIfTI convention so the rest of the pipeline sees one kind of
    volume.
    """
    import SimpleITK as sitk

    check_slice_positions(files, where)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise VolumeError(f"{where}: unreadable DICOM series ({exc})") from exc
    data = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))  # SimpleITK gives z, y, x
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ direction @ np.diag(img.GetSpacing())
    affine[:3, 3] = LPS_TO_RAS @ np.asarray(img.GetOrigin(), dtype=np.float64)
    if data.ndim != 3 or min(data.shape) < 1:
        raise VolumeError(f"{where}: DICOM series does not form a 3D volume (shape {data.shape})")
    return data, affine


# Accepted variation of the distance between consecutive slices, relative to the median distance.
SLICE_GAP_RTOL = 0.1


def check_slice_positions(files: list[str], where: str) -> None:
    """Duplicate or missing slices make a series' geometry wrong without any reader noticing (GDCM
    stacks whatever it is given): compare the slice positions along the slice normal first."""
    import SimpleITK as sitk

    positions = []
    normal = None
    for f in files:
        r = sitk.ImageFileReader()
        r.SetFileName(f)
        try:
            r.ReadImageInformation()
            pos = np.array([float(v) for v in r.GetMetaData("0020|0032").split("\\")])
            if normal is None:
                cos = np.array([float(v) for v in r.GetMetaData("0020|0037").split("\\")])
                normal = np.cross(cos[:3], cos[3:])
        except RuntimeError as exc:
            raise VolumeError(f"{where}: {f}: unreadable DICOM slice or no position/orientation tags ({exc})") from exc
        positions.append((float(pos @ normal), f))
    if len(positions) < 2:
        return
    positions.sort()
    z = np.array([p for p, _ in positions])
    gaps = np.diff(z)
    dup = np.flatnonzero(gaps < 1e-3)
    if dup.size:
        i = int(dup[0])
        raise VolumeError(f"{where}: {dup.size} duplicate slice(s), e.g. {positions[i][1]} and {positions[i + 1][1]} "
                          f"both at {z[i]:.3f} mm along the slice normal")
    step = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - step) > SLICE_GAP_RTOL * step)
    if bad.size:
        i = int(bad[0])
        raise VolumeError(f"{where}: uneven slice spacing: {gaps[i]:.3f} mm between {positions[i][1]} and "
                          f"{positions[i + 1][1]} where the series steps {step:.3f} mm (missing slice?)")
