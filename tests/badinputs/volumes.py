"""Bad volume files: what a download, a converter or a disk can do to a NIfTI/DICOM file.

Files are written with nibabel and then patched byte by byte where a converter's damage cannot be
produced through nibabel's API (scl fields, dims, sform rows). Cases that need a whole case call the
cache (`CaseCache.get`), which is what training calls: read, check, harmonize, store.
"""
from __future__ import annotations

import gzip
import os
import struct
import time

import numpy as np

from tests.badinputs import ACCEPTED, bad_input

# NIfTI-1 header byte offsets (nifti1.h) of the fields the cases patch.
DIM, VOX_OFFSET, SCL_SLOPE, SCL_INTER, SROW = 40, 108, 112, 116, 280
SHAPE = (40, 40, 12)
SPACING = (2.0, 2.0, 5.0)


def _affine(spacing=SPACING):
    return np.diag([*spacing, 1.0])


def _nifti(path, data, affine=None, big_endian=False):
    import nibabel as nib

    data = np.asarray(data)
    header = None
    if big_endian:  # nibabel writes native byte order unless the header says otherwise
        header = nib.Nifti1Header(endianness=">")
        header.set_data_dtype(data.dtype.newbyteorder(">"))
    nib.save(nib.Nifti1Image(data, _affine() if affine is None else affine, header), str(path))
    return path


def _patch(path, offset, fmt, *values):
    """Overwrite header bytes at `offset` (struct format, little-endian), in .nii or .nii.gz."""
    gz = path.name.endswith(".gz")
    raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
    struct.pack_into("<" + fmt, raw, offset, *values)
    path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
    return path


def ct(shape=SHAPE):
    """A small chest CT in HU: air, a body ellipse, two lungs and a lesion in the right one."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    hu = np.full(shape, -1000, np.int16)
    hu[(x / 0.9) ** 2 + (y / 0.7) ** 2 < 1] = 40
    for cx in (-0.45, 0.45):
        hu[((x - cx) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -850
    hu[((x - 0.45) / 0.15) ** 2 + (y / 0.15) ** 2 + (z / 0.5) ** 2 < 1] = -300
    return hu


def lesion(shape=SHAPE):
    return (ct(shape) == -300).astype(np.uint8)


def mosmed_case(tmp, image, label=None, encoding="hu", window=None):
    """A MosMed case (one lesion code) made of these files, as its adapter would return it."""
    from datamodules.cases import Case

    return Case(source="mosmed", case_id="study_0255", patient_id="study_0255", image=image, label=label,
                policy="lesion" if label else None, encoding=encoding, window=window)


def harmonize(tmp, case):
    """What training does with a case: the cache builds (reads, checks, harmonizes) its entry."""
    from datamodules.cache import CaseCache
    from datamodules.harmonize import HarmonizerConfig
    from datamodules.sources import get_source

    policy = get_source("mosmed").POLICIES["lesion"] if case.label else None
    return CaseCache(tmp / "cache").get(case, policy, HarmonizerConfig(target_spacing=(4.0, 4.0, 5.0)))


def harmonize_image(tmp, data, name="ct.nii.gz", affine=None, encoding="hu", window=None, label=True):
    """Write `data` as a case's image (with the phantom lesion mask on the same grid) and harmonize it."""
    image = _nifti(tmp / name, data, affine)
    mask = _nifti(tmp / "mask.nii.gz", lesion(np.asarray(data).shape[:3]), affine) if label else None
    return harmonize(tmp, mosmed_case(tmp, image, mask, encoding, window))


def read(path):
    from datamodules.io import read_volume

    return read_volume(path)


# ----------------------------------------------------------------------------- damaged files
@bad_input("volume", match=r"corrupt or truncated", names=("{tmp}/ct.nii.gz",))
def case_truncated_gzip(tmp):
    path = _nifti(tmp / "ct.nii.gz", np.zeros((16, 16, 8), np.int16))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    read(path)


@bad_input("volume", match=r"truncated", names=("{tmp}/ct.nii",))
def case_truncated_uncompressed(tmp):
    path = _nifti(tmp / "ct.nii", ct())
    path.write_bytes(path.read_bytes()[:20000])
    read(path)


@bad_input("volume", match=r"corrupt or truncated|empty", names=("{tmp}/ct.nii.gz",))
def case_zero_byte_file(tmp):
    (tmp / "ct.nii.gz").write_bytes(b"")
    read(tmp / "ct.nii.gz")


@bad_input("volume", match=r"corrupt or truncated|not a NIfTI", names=("{tmp}/ct.nii.gz",))
def case_wrong_magic_gzip(tmp):
    """A gzip of something else (a PNG renamed by a download script)."""
    (tmp / "ct.nii.gz").write_bytes(gzip.compress(b"\x89PNG\r\n\x1a\n" + bytes(2000)))
    read(tmp / "ct.nii.gz")


@bad_input("volume", match=r"corrupt or truncated|not a NIfTI", names=("{tmp}/ct.nii",))
def case_html_saved_as_nifti(tmp):
    """A login page saved under the file's name (registration-only downloads)."""
    (tmp / "ct.nii").write_text("<!DOCTYPE html><html><body>Please sign in</body></html>\n" * 20, encoding="utf-8")
    read(tmp / "ct.nii")


@bad_input("volume", match=r"corrupt or truncated|not a NIfTI", names=("{tmp}/ct.nii.gz",))
def case_uncompressed_named_gz(tmp):
    """A plain .nii renamed .nii.gz: not gzip at all."""
    (tmp / "ct.nii.gz").write_bytes(_nifti(tmp / "x.nii", ct()).read_bytes())
    read(tmp / "ct.nii.gz")


@bad_input("volume", match=r"expected a 3D volume", names=("{tmp}/ct.nii.gz",))
def case_4d_time_series(tmp):
    read(_nifti(tmp / "ct.nii.gz", np.zeros((8, 8, 4, 3), np.int16)))


@bad_input("volume", match=r"expected a 3D volume", names=("{tmp}/ct.nii.gz",))
def case_2d_slice(tmp):
    read(_nifti(tmp / "ct.nii.gz", np.zeros((16, 16), np.int16)))


@bad_input("volume", match=r"header declares .*file holds|header declares .*gzip", names=("{tmp}/ct.nii.gz",))
def case_huge_header_gz(tmp):
    """A 160 kB file whose header claims 10^9 voxels: refused before any buffer is allocated."""
    import tracemalloc

    path = _nifti(tmp / "ct.nii.gz", np.zeros((64, 64, 20), np.int16))
    _patch(path, DIM, "8h", 3, 1000, 1000, 1000, 1, 1, 1, 1)
    tracemalloc.start()
    try:
        read(path)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 50e6, f"reading allocated {peak / 1e6:.0f} MB before refusing the header"


@bad_input("volume", match=r"header declares .*file holds", names=("{tmp}/ct.nii",))
def case_huge_header_uncompressed(tmp):
    path = _nifti(tmp / "ct.nii", np.zeros((64, 64, 20), np.int16))
    _patch(path, DIM, "8h", 3, 1000, 1000, 1000, 1, 1, 1, 1)
    read(path)


@bad_input("volume", match=r"header declares .*over the limit .*COVID_DG_MAX_VOXELS", names=("{tmp}/ct.nii.gz",))
def case_over_voxel_limit(tmp):
    """A consistent file larger than the configured limit (COVID_DG_MAX_VOXELS, here lowered)."""
    path = _nifti(tmp / "ct.nii.gz", ct())
    old = os.environ.get("COVID_DG_MAX_VOXELS")
    os.environ["COVID_DG_MAX_VOXELS"] = "10000"
    try:
        read(path)
    finally:
        os.environ.pop("COVID_DG_MAX_VOXELS") if old is None else os.environ.__setitem__("COVID_DG_MAX_VOXELS", old)


@bad_input("volume", match=r"header declares .*file holds", names=("{tmp}/ct.nii",))
def case_vox_offset_past_the_data(tmp):
    """vox_offset pointing beyond the end of the file (a header edited by hand)."""
    path = _nifti(tmp / "ct.nii", ct())
    _patch(path, VOX_OFFSET, "f", float(path.stat().st_size))
    read(path)


@bad_input("volume", match=r"corrupt or truncated|dimension|shape", names=("{tmp}/ct.nii.gz",))
def case_zero_dimension(tmp):
    path = _nifti(tmp / "ct.nii.gz", np.zeros((16, 16, 8), np.int16))
    _patch(path, DIM, "4h", 3, 16, 0, 8)
    read(path)


@bad_input("volume", match=r"corrupt or truncated|dimension|shape", names=("{tmp}/ct.nii",))
def case_negative_dimension(tmp):
    path = _nifti(tmp / "ct.nii", np.zeros((16, 16, 8), np.int16))
    _patch(path, DIM, "4h", 3, 16, -16, 8)
    read(path)


# ----------------------------------------------------------------------------- intensities
@bad_input("volume", match=r"NaN or inf", names=("{tmp}/ct.nii.gz",))
def case_nan_voxels(tmp):
    data = ct().astype(np.float32)
    data[3, 3, 3] = np.nan
    harmonize_image(tmp, data)


@bad_input("volume", match=r"NaN or inf", names=("{tmp}/ct.nii.gz",))
def case_inf_voxels(tmp):
    data = ct().astype(np.float32)
    data[5, 5, 5] = np.inf
    harmonize_image(tmp, data)


@bad_input("volume", match=r"constant image", names=("{tmp}/ct.nii.gz",))
def case_constant_image(tmp):
    """An all-zero export (a converter that failed to write the pixel data)."""
    harmonize_image(tmp, np.zeros(SHAPE, np.int16))


@bad_input("volume", match=r"constant image", names=("{tmp}/ct.nii.gz",))
def case_constant_8bit_image(tmp):
    harmonize_image(tmp, np.full(SHAPE, 128, np.uint8), encoding="uint8_window", window=(-1250.0, 250.0))


@bad_input("volume", match=r"8-bit .*0\.\.255", names=("{tmp}/ct.nii.gz",))
def case_8bit_export_declared_hu(tmp):
    """COVID-19-CT-Seg's radiopaedia cases are windowed to 0..255; read as HU they have no air."""
    hu = ct().astype(np.float32)
    stored = np.round((np.clip(hu, -1250, 250) + 1250) / 1500 * 255).astype(np.uint8)
    harmonize_image(tmp, stored)


@bad_input("volume", match=r"8-bit .*0\.\.255", names=("{tmp}/ct.nii.gz",))
def case_8bit_export_as_int16_declared_hu(tmp):
    """The same export stored as int16 (a converter widened the type): the range still tells."""
    hu = ct().astype(np.float32)
    stored = np.round((np.clip(hu, -1250, 250) + 1250) / 1500 * 255).astype(np.int16)
    harmonize_image(tmp, stored)


@bad_input("volume", match=r"no air .*scl_slope", names=("{tmp}/ct.nii.gz",))
def case_tiny_scl_slope(tmp):
    """scl_slope 0.001: every voxel within a few HU of 0, so no air and no lung."""
    path = _nifti(tmp / "ct.nii.gz", ct())
    _patch(path, SCL_SLOPE, "ff", 0.001, 0.0)
    _nifti(tmp / "mask.nii.gz", lesion())
    harmonize(tmp, mosmed_case(tmp, path, tmp / "mask.nii.gz"))


@bad_input("volume", match=r"scl_slope=1000", names=("{tmp}/ct.nii.gz",))
def case_huge_scl_slope(tmp):
    path = _nifti(tmp / "ct.nii.gz", ct())
    _patch(path, SCL_SLOPE, "ff", 1000.0, 0.0)
    _nifti(tmp / "mask.nii.gz", lesion())
    harmonize(tmp, mosmed_case(tmp, path, tmp / "mask.nii.gz"))


@bad_input("volume", match=r"scl_inter=30000", names=("{tmp}/ct.nii.gz",))
def case_huge_scl_inter(tmp):
    path = _nifti(tmp / "ct.nii.gz", ct())
    _patch(path, SCL_SLOPE, "ff", 1.0, 30000.0)
    _nifti(tmp / "mask.nii.gz", lesion())
    harmonize(tmp, mosmed_case(tmp, path, tmp / "mask.nii.gz"))


@bad_input("volume", match=r"scl_slope=-1", names=("{tmp}/ct.nii.gz",))
def case_negative_scl_slope(tmp):
    """A negated slope turns air into +1000 HU: no air left."""
    path = _nifti(tmp / "ct.nii.gz", ct())
    _patch(path, SCL_SLOPE, "ff", -1.0, 0.0)
    _nifti(tmp / "mask.nii.gz", lesion())
    harmonize(tmp, mosmed_case(tmp, path, tmp / "mask.nii.gz"))


@bad_input("volume", match=r"scl_slope=inf", names=("{tmp}/ct.nii.gz",))
def case_infinite_scl_slope(tmp):
    """nibabel ignores an infinite slope (reads the raw values): a damaged header, not 'no scaling'."""
    path = _nifti(tmp / "ct.nii.gz", ct())
    _patch(path, SCL_SLOPE, "ff", float("inf"), 0.0)
    read(path)


@bad_input("volume", match=r"scl_inter=nan", names=("{tmp}/ct.nii.gz",))
def case_nan_scl_inter(tmp):
    path = _nifti(tmp / "ct.nii.gz", ct())
    _patch(path, SCL_SLOPE, "ff", 1.0, float("nan"))
    read(path)


@bad_input("volume", match=r"declared 8-bit windowed, but values span", names=("{tmp}/ct.nii.gz",))
def case_hu_declared_8bit(tmp):
    """The reverse mistake: a HU scan declared as an 8-bit windowed export."""
    harmonize_image(tmp, ct(), encoding="uint8_window", window=(-1250.0, 250.0))


# ----------------------------------------------------------------------------- geometry
def _sheared(deg):
    a = _affine()
    a[1, 2] = np.tan(np.radians(deg)) * SPACING[2]  # each slice shifted along y: a gantry tilt kept in the header
    return a


@bad_input("volume", match=r"shear 1[45]\.\d+°", names=("{tmp}/ct.nii.gz",))
def case_sheared_affine(tmp):
    """41 slices became 51 in the probe: the z column's norm grows with the shear."""
    harmonize_image(tmp, ct(), affine=_sheared(15.0))


@bad_input("volume", match=r"shear", names=("{tmp}/mask.nii.gz",))
def case_sheared_mask_only(tmp):
    """Image fine, mask written by a tool that kept a sheared sform."""
    image = _nifti(tmp / "ct.nii.gz", ct())
    mask = _nifti(tmp / "mask.nii.gz", lesion(), _sheared(5.0))
    harmonize(tmp, mosmed_case(tmp, image, mask))


@bad_input("volume", match=r"singular or not finite", names=("{tmp}/ct.nii.gz",))
def case_singular_affine(tmp):
    a = _affine()
    a[2, 2] = 0.0
    path = _nifti(tmp / "ct.nii.gz", ct())
    _patch(path, SROW, "12f", *a[:3].ravel())
    read(path)


@bad_input("volume", match=r"singular or not finite", names=("{tmp}/ct.nii.gz",))
def case_nan_affine(tmp):
    a = _affine()
    a[0, 3] = np.nan
    path = _nifti(tmp / "ct.nii.gz", ct())
    _patch(path, SROW, "12f", *a[:3].ravel())
    read(path)


@bad_input("volume", match=r"mask shape .* differs", names=("{tmp}/mask.nii.gz", "{tmp}/ct.nii.gz"))
def case_mask_shape_mismatch(tmp):
    image = _nifti(tmp / "ct.nii.gz", ct())
    mask = _nifti(tmp / "mask.nii.gz", lesion()[:, :, :-1])
    harmonize(tmp, mosmed_case(tmp, image, mask))


@bad_input("volume", match=r"mask affine differs", names=("{tmp}/mask.nii.gz", "{tmp}/ct.nii.gz"))
def case_mask_affine_mismatch(tmp):
    image = _nifti(tmp / "ct.nii.gz", ct())
    shifted = _affine()
    shifted[:3, 3] = (3.0, 0.0, 0.0)
    mask = _nifti(tmp / "mask.nii.gz", lesion(), shifted)
    harmonize(tmp, mosmed_case(tmp, image, mask))


@bad_input("volume", match=r"mask affine differs", names=("{tmp}/mask.nii.gz",))
def case_mask_spacing_mismatch(tmp):
    """Same shape, other voxel size: a mask from another reconstruction of the series."""
    image = _nifti(tmp / "ct.nii.gz", ct())
    mask = _nifti(tmp / "mask.nii.gz", lesion(), _affine((2.0, 2.0, 2.5)))
    harmonize(tmp, mosmed_case(tmp, image, mask))


# ----------------------------------------------------------------------------- masks
@bad_input("volume", match=r"non-integer mask values", names=("{tmp}/mask.nii.gz",))
def case_float_mask_fractional_codes(tmp):
    """A resampled mask saved with interpolation: 0.5 on the lesion border."""
    image = _nifti(tmp / "ct.nii.gz", ct())
    soft = lesion().astype(np.float32)
    soft[soft > 0] = 0.5
    harmonize(tmp, mosmed_case(tmp, image, _nifti(tmp / "mask.nii.gz", soft)))


@bad_input("volume", match=r"mask contains NaN", names=("{tmp}/mask.nii.gz",))
def case_nan_mask(tmp):
    image = _nifti(tmp / "ct.nii.gz", ct())
    m = lesion().astype(np.float32)
    m[0, 0, 0] = np.nan
    harmonize(tmp, mosmed_case(tmp, image, _nifti(tmp / "mask.nii.gz", m)))


@bad_input("volume", match=r"mask codes \[2, 255\] not declared", names=("{tmp}/mask.nii.gz",))
def case_unknown_mask_codes(tmp):
    image = _nifti(tmp / "ct.nii.gz", ct())
    m = lesion()
    m[0, 0, 0], m[1, 1, 1] = 2, 255
    harmonize(tmp, mosmed_case(tmp, image, _nifti(tmp / "mask.nii.gz", m)))


@bad_input("volume", match=r"corrupt or truncated|empty", names=("{tmp}/mask.nii.gz",))
def case_empty_mask_file(tmp):
    image = _nifti(tmp / "ct.nii.gz", ct())
    (tmp / "mask.nii.gz").write_bytes(b"")
    harmonize(tmp, mosmed_case(tmp, image, tmp / "mask.nii.gz"))


@bad_input("volume", match=r"expected a 3D volume", names=("{tmp}/mask.nii.gz",))
def case_mask_with_channels(tmp):
    """A one-hot mask (one channel per class) instead of a label map."""
    image = _nifti(tmp / "ct.nii.gz", ct())
    onehot = np.stack([1 - lesion(), lesion()], axis=-1)
    harmonize(tmp, mosmed_case(tmp, image, _nifti(tmp / "mask.nii.gz", onehot)))


# ----------------------------------------------------------------------------- DICOM
def _dicom(tmp, shift_per_slice=(0.0, 0.0, 0.0)):
    from tests.dicom_util import write_dicom_series

    folder = tmp / "series"
    write_dicom_series(ct((16, 16, 6)), _affine((1.0, 1.0, 2.5)), folder, shift_per_slice=shift_per_slice)
    return folder


@bad_input("volume", match=r"uneven slice spacing", names=("{tmp}/series",))
def case_dicom_missing_slice(tmp):
    folder = _dicom(tmp)
    (folder / "0002.dcm").unlink()
    read(folder)


@bad_input("volume", match=r"duplicate slice", names=("{tmp}/series",))
def case_dicom_duplicate_slice(tmp):
    import shutil

    folder = _dicom(tmp)
    shutil.copy(folder / "0002.dcm", folder / "0002b.dcm")
    read(folder)


@bad_input("volume", match=r"gantry tilt|shear", names=("{tmp}/series",))
def case_dicom_gantry_tilt(tmp):
    """Each slice shifted 0.7 mm along y per 2.5 mm step (a 15.6° tilt): the stack is sheared."""
    read(_dicom(tmp, shift_per_slice=(0.0, 0.7, 0.0)))


# ----------------------------------------------------------------------------- valid but unusual
@bad_input("volume", match=ACCEPTED)
def case_trailing_singleton_4d(tmp):
    data, _ = read(_nifti(tmp / "ct.nii.gz", ct()[..., None]))
    assert data.shape == SHAPE


@bad_input("volume", match=ACCEPTED)
def case_big_endian(tmp):
    path = _nifti(tmp / "ct.nii.gz", ct(), big_endian=True)
    data, _ = read(path)
    assert data.dtype == np.dtype(">i2") and np.array_equal(data, ct())
    entry = harmonize(tmp, mosmed_case(tmp, path, _nifti(tmp / "mask.nii.gz", lesion(), big_endian=True)))
    assert entry.image().shape == tuple(entry.meta["shape"]) and entry.meta["voxels"]["lesion"] > 0


@bad_input("volume", match=ACCEPTED)
def case_int16_with_scl_inter_minus_1024(tmp):
    """Stored 0..N with scl_slope 1, scl_inter -1024 (a common scanner export): HU after scaling."""
    path = _nifti(tmp / "ct.nii.gz", (ct() + 1024).astype(np.int16))
    _patch(path, SCL_SLOPE, "ff", 1.0, -1024.0)
    data, _ = read(path)
    assert np.array_equal(data, ct())
    _nifti(tmp / "mask.nii.gz", lesion())
    harmonize(tmp, mosmed_case(tmp, path, tmp / "mask.nii.gz"))


@bad_input("volume", match=ACCEPTED)
def case_scl_slope_zero_means_unscaled(tmp):
    """The NIfTI standard: scl_slope 0 means the stored values are the values."""
    path = _nifti(tmp / "ct.nii.gz", ct())
    _patch(path, SCL_SLOPE, "ff", 0.0, 0.0)
    assert np.array_equal(read(path)[0], ct())
    _nifti(tmp / "mask.nii.gz", lesion())
    harmonize(tmp, mosmed_case(tmp, path, tmp / "mask.nii.gz"))


@bad_input("volume", match=ACCEPTED)
def case_oblique_orthogonal_affine(tmp):
    """A pure rotation (12° about z) is exact geometry: accepted, and the grid keeps its rotation."""
    from datamodules.io import spacing_of

    t = np.radians(12.0)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    a = _affine()
    a[:3, :3] = rot @ np.diag(SPACING)
    entry = harmonize_image(tmp, ct(), affine=a)
    out = np.asarray(entry.meta["affine"])
    assert np.allclose(spacing_of(out), (4.0, 4.0, 5.0), atol=1e-6)
    assert np.allclose(out[:3, :3] / spacing_of(out), rot, atol=1e-6)
    assert entry.image().shape == (20, 20, 12)


@bad_input("volume", match=ACCEPTED)
def case_8bit_export_declared_8bit(tmp):
    hu = ct().astype(np.float32)
    stored = np.round((np.clip(hu, -1250, 250) + 1250) / 1500 * 255).astype(np.uint8)
    entry = harmonize_image(tmp, stored, encoding="uint8_window", window=(-1250.0, 250.0))
    assert 0.0 <= float(entry.image().min()) and float(entry.image().max()) <= 1.0


@bad_input("volume", match=ACCEPTED)
def case_padding_outside_the_field_of_view(tmp):
    """-3024 HU outside the reconstruction circle (a quarter of the voxels): real HU, accepted."""
    data = ct()
    x, y = np.meshgrid(np.linspace(-1, 1, SHAPE[0]), np.linspace(-1, 1, SHAPE[1]), indexing="ij")
    data[x ** 2 + y ** 2 > 1] = -3024
    harmonize_image(tmp, data)


@bad_input("volume", match=ACCEPTED)
def case_metal_above_3071(tmp):
    """Extended-range scanners store metal above 3071 HU: a few voxels there are real."""
    data = ct()
    data[20, 20, 6] = 12000
    harmonize_image(tmp, data)


@bad_input("volume", match=ACCEPTED)
def case_nifti2(tmp):
    import nibabel as nib

    nib.save(nib.Nifti2Image(ct(), _affine()), str(tmp / "ct.nii.gz"))
    assert np.array_equal(read(tmp / "ct.nii.gz")[0], ct())


@bad_input("volume", match=ACCEPTED)
def case_float_mask_whole_numbers(tmp):
    """Kaggle's COVID-19-CT-Seg copies store masks as float: whole numbers are labels."""
    image = _nifti(tmp / "ct.nii.gz", ct())
    entry = harmonize(tmp, mosmed_case(tmp, image, _nifti(tmp / "mask.nii.gz", lesion().astype(np.float64))))
    assert entry.meta["voxels"]["lesion"] > 0


@bad_input("volume", match=ACCEPTED)
def case_mask_stored_in_another_axis_order(tmp):
    """A mask stored LPS beside a RAS image, same world grid: aligned by its header."""
    import nibabel as nib

    image = _nifti(tmp / "ct.nii.gz", ct())
    img = nib.Nifti1Image(lesion(), _affine())
    flipped = img.as_reoriented(nib.orientations.axcodes2ornt(("L", "P", "S")))
    nib.save(flipped, str(tmp / "mask.nii.gz"))
    entry = harmonize(tmp, mosmed_case(tmp, image, tmp / "mask.nii.gz"))
    assert entry.meta["voxels"]["lesion"] > 0


@bad_input("volume", match=ACCEPTED)
def case_dicom_series(tmp):
    data, affine = read(_dicom(tmp))
    assert np.array_equal(data, ct((16, 16, 6))) and np.allclose(affine, _affine((1.0, 1.0, 2.5)), atol=1e-4)


@bad_input("volume", match=ACCEPTED)
def case_multi_member_gzip(tmp):
    """Two gzip members back to back (what some parallel compressors write): valid, though the trailer's
    size covers the last member only, so the header-size check must not refuse it."""
    raw = gzip.decompress(_nifti(tmp / "ct.nii.gz", ct()).read_bytes())
    (tmp / "ct.nii.gz").write_bytes(gzip.compress(raw[:30000]) + gzip.compress(raw[30000:]))
    assert np.array_equal(read(tmp / "ct.nii.gz")[0], ct())


@bad_input("volume", match=ACCEPTED)
def case_reading_is_quick(tmp):
    """The header checks cost nothing noticeable (a guard against re-reading the file to check it)."""
    path = _nifti(tmp / "ct.nii.gz", ct((128, 128, 40)))
    t0 = time.perf_counter()
    read(path)
    assert time.perf_counter() - t0 < 1.0
