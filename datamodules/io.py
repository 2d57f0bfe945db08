"""Reading and writing NIfTI volumes with errors that name the file and the problem.

Before any voxel is read, the header is checked against the file (`check_declared_size`: a damaged or
hostile header cannot make us allocate what the file does not hold) and against a voxel limit
(`max_voxels`, environment variable COVID_DG_MAX_VOXELS); its scaling fields must be usable
(`check_scaling`) and its affine a real, unsheared voxel grid (`check_affine`).
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np


class VolumeError(ValueError):
    """A volume file is unreadable or its content is invalid."""


# The largest volume we read, in voxels. 2^30 = 1024 x 1024 x 1024: four times the largest chest CT of
# the public sources (MSD Task06, 512 x 512 x 636) and room for 1024-matrix or photon-counting scans;
# that is 2 GiB as int16 and 4 GiB once decoded to float32, which the harmonizer holds at once. A
# header claiming more is refused before anything is allocated. COVID_DG_MAX_VOXELS overrides it
# (spawned cache builders inherit the environment, so one setting covers every process).
DEFAULT_MAX_VOXELS = 1024 ** 3
MAX_VOXELS_ENV = "COVID_DG_MAX_VOXELS"
# Deflate never compresses better than about 1032:1 (RFC 1951: a 258-byte match costs at least two
# bits), so a .nii.gz of N bytes cannot hold more than 1032 * N bytes of voxels, whatever its trailer says.
DEFLATE_MAX_RATIO = 1032
# Largest departure from right angles between the voxel axes of an affine that we still read as an
# orthogonal grid. Float32 header rounding stays below 0.001 degrees; 0.1 degrees shifts the last slice
# of a 300 mm scan by 0.5 mm, a third of a harmonized 1.5 mm voxel. A real gantry tilt (5-30 degrees)
# kept as shear in the header would have the resampler treat parallelogram voxels as boxes (the probe's
# 41 slices became 51), so it is refused, naming the angle.
SHEAR_MAX_DEG = 0.1


def max_voxels() -> int:
    """The voxel limit: COVID_DG_MAX_VOXELS when set, else DEFAULT_MAX_VOXELS."""
    raw = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"{MAX_VOXELS_ENV}={raw!r}: expected a positive number of voxels")
    return value


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
    except VolumeError:
        raise
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, nib.filebasedimages.ImageFileError, ValueError,
            OverflowError, nib.spatialimages.HeaderDataError, *_ISAL_ERRORS) as exc:
        raise VolumeError(f"{path}: corrupt or truncated NIfTI file ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {data.shape}")
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(affine, str(path))
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
    Decompression is most of the cost of reading a CT, and the harmonizer reads every case once.
    The header is checked (`check_header`) before the array is allocated."""
    check_scaling(path, header_scaling(path))  # before nibabel, which raises on some without naming the file
    if _igzip is None or not path.name.endswith(".gz"):
        img = nib.load(str(path))
        check_header(path, img)
        return img, np.asanyarray(img.dataobj)
    with _igzip.open(str(path), "rb") as f:
        sizeof_hdr = f.read(4)
        f.seek(0)
        if sizeof_hdr not in (np.int32(348).tobytes(), np.int32(348).byteswap().tobytes()):
            img = nib.load(str(path))  # NIfTI-2 (540-byte header) or not NIfTI: nibabel decides
            check_header(path, img)
            return img, np.asanyarray(img.dataobj)
        holder = nib.FileHolder(filename=str(path), fileobj=f)
        img = nib.Nifti1Image.from_file_map({"header": holder, "image": holder})
        check_header(path, img)
        return img, np.asanyarray(img.dataobj)


def check_header(path: Path, img) -> None:
    """What the parsed header says that can be checked before reading the voxels."""
    check_declared_size(path, img)


def declared_shape(img) -> tuple[int, ...]:
    """The shape the header declares, from its raw `dim` field where there is one (nibabel's `shape`
    drops what follows a zero dimension)."""
    dim = img.header.get("dim") if hasattr(img.header, "get") else None
    if dim is None:
        return tuple(int(n) for n in img.shape)
    ndim = int(dim[0])
    return tuple(int(n) for n in dim[1: 1 + ndim]) if 1 <= ndim <= 7 else (ndim,)


def gzip_isize(path: Path) -> tuple[int, int]:
    """(compressed file size, the gzip trailer's ISIZE: the uncompressed size modulo 2^32)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    return size, (struct.unpack("<I", tail)[0] if len(tail) == 4 else -1)


def check_declared_size(path: Path, img) -> None:
    """Refuse a header whose shape x dtype exceeds the voxel limit or what the file can hold, before
    any buffer is allocated (a 160 kB file claiming 10^9 voxels used to allocate 2 GB first).

    `.nii`: the file must hold vox_offset + the data bytes. `.nii.gz`: the gzip trailer records the
    uncompressed size modulo 2^32; when it disagrees (a truncated file, or a multi-member gzip whose
    trailer covers the last member only), the data must still fit the deflate ratio bound, and a
    truncation then fails while reading, with at most the voxel limit allocated.
    """
    shape = declared_shape(img)
    if len(shape) < 1 or min(shape) < 1:
        raise VolumeError(f"{path}: header declares shape {shape}, with an empty or negative dimension")
    n = math.prod(shape)
    limit = max_voxels()
    if n > limit:
        raise VolumeError(f"{path}: header declares shape {shape} = {n} voxels, over the limit of {limit} "
                          f"voxels ({MAX_VOXELS_ENV} raises it)")
    dtype = img.get_data_dtype()
    offset = int(getattr(img.dataobj, "offset", 0))
    need = offset + n * dtype.itemsize
    what = f"header declares shape {shape} of {dtype} from byte {offset}: {need} bytes"
    if path.name.endswith(".gz"):
        size, isize = gzip_isize(path)
        if isize != need % 2 ** 32 and need > DEFLATE_MAX_RATIO * size:
            raise VolumeError(f"{path}: {what}, but the file holds {size} compressed bytes, at most "
                              f"{DEFLATE_MAX_RATIO * size} once inflated (gzip trailer: {isize}); truncated or damaged")
    else:
        size = path.stat().st_size
        if size < need:
            raise VolumeError(f"{path}: {what}, but the file holds only {size}; truncated or damaged")


def header_scaling(path: str | Path) -> tuple[float, float] | None:
    """The raw (scl_slope, scl_inter) of a NIfTI file's header, as stored (nibabel's image hides them
    once it applied or ignored them); None for other files."""
    path = Path(path)
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    if len(head) < 4:
        return None
    for order in "<>":
        sizeof_hdr = struct.unpack(order + "i", head[:4])[0]
        if sizeof_hdr == 348 and len(head) >= 120:
            return tuple(float(v) for v in struct.unpack(order + "ff", head[112:120]))
        if sizeof_hdr == 540 and len(head) >= 192:
            return tuple(float(v) for v in struct.unpack(order + "dd", head[176:192]))
    return None


def describe_scaling(scaling: tuple[float, float] | None) -> str:
    return "" if scaling is None else f"scl_slope={scaling[0]:g}, scl_inter={scaling[1]:g}"


def check_scaling(path: Path, scaling: tuple[float, float] | None) -> None:
    """The NIfTI standard reads scl_slope 0 as "no scaling", and nibabel does the same with NaN (it writes
    NaN itself); an infinite slope, which nibabel silently ignores too, or a non-finite intercept beside
    a real slope, is a damaged header."""
    if scaling is None:
        return
    slope, inter = scaling
    if math.isinf(slope) or (math.isfinite(slope) and slope != 0 and not math.isfinite(inter)):
        raise VolumeError(f"{path}: header scaling is not usable ({describe_scaling(scaling)}): a damaged header")


def shear_of(affine: np.ndarray) -> tuple[float, int, int]:
    """(degrees, axis a, axis b): the largest departure from a right angle between two voxel axes of the
    affine (0 for any rotation or flip of a box grid)."""
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = cols / np.linalg.norm(cols, axis=0)
    worst = (0.0, 0, 1)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        deg = math.degrees(math.asin(min(1.0, abs(float(unit[:, a] @ unit[:, b])))))
        worst = max(worst, (deg, a, b))
    return worst


def check_affine(affine: np.ndarray, where: str) -> None:
    """A usable voxel grid: finite, not singular, and not sheared (a pure rotation, an oblique scan, is
    exact: the harmonizer keeps it in its output affine)."""
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(f"{where}: header affine is singular or not finite:\n{affine}")
    deg, a, b = shear_of(affine)
    if deg > SHEAR_MAX_DEG:
        raise VolumeError(f"{where}: sheared affine: voxel axes {a} and {b} meet at {90 - deg:.2f}° instead of 90° "
                          f"(shear {deg:.2f}°, more than {SHEAR_MAX_DEG}°; e.g. a gantry tilt kept in the header). "
                          f"Resample it onto an orthogonal grid first (dcm2niix corrects gantry tilt):\n{np.round(affine, 4)}")


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
    check_affine(affine, where)
    return data, affine


# Accepted variation of the distance between consecutive slices, relative to the median distance.
SLICE_GAP_RTOL = 0.1


def check_slice_positions(files: list[str], where: str) -> None:
    """Duplicate or missing slices make a series' geometry wrong without any reader noticing (GDCM
    stacks whatever it is given): compare the slice positions along the slice normal first. Slices
    that also move sideways (a gantry tilt: the stack is sheared) are refused as `check_affine`
    refuses a sheared NIfTI header: GDCM would stack them as a box."""
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
        positions.append((float(pos @ normal), f, pos))
    if len(positions) < 2:
        return
    positions.sort(key=lambda p: p[0])
    z = np.array([p for p, _, _ in positions])
    first, last = positions[0], positions[-1]
    along = last[0] - first[0]
    sideways = float(np.linalg.norm((last[2] - first[2]) - along * normal))
    if along > 0 and math.degrees(math.atan2(sideways, along)) > SHEAR_MAX_DEG:
        raise VolumeError(f"{where}: gantry tilt: the slices move {sideways:.2f} mm sideways over {along:.2f} mm "
                          f"along the slice normal ({first[1]} to {last[1]}), a shear of "
                          f"{math.degrees(math.atan2(sideways, along)):.2f}° (more than {SHEAR_MAX_DEG}°); "
                          "convert it with gantry-tilt correction (dcm2niix) first")
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
