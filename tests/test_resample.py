"""Resampling from the stored array (datamodules.resample) against the chain it replaces, and by hand."""
import gzip

import nibabel as nib
import numpy as np
import pytest

from datamodules.harmonize import HU_MAX, HU_MIN, resample, to_canonical
from datamodules.io import VolumeError, read_volume, spacing_of, write_volume
from datamodules.label_policy import LabelError, LabelPolicy
from datamodules.resample import plan_grid, resample_linear, resample_nearest


def _reference(arr, affine, target, flips, label):
    """The straightforward chain: RAS reorder, mirror flips, clip, F.interpolate on a contiguous copy."""
    can, can_affine = to_canonical(arr if label else arr.astype(np.float32), affine)
    for ax in flips:
        can = np.flip(can, axis=ax)
    if not label:
        can = np.clip(can, HU_MIN, HU_MAX)
    return resample(np.ascontiguousarray(can), can_affine, target, is_label=label)


def _random_geometry(rng):
    shape = tuple(int(n) for n in rng.integers(4, 30, 3))
    perm, signs, spacing = rng.permutation(3), rng.choice([-1.0, 1.0], 3), rng.uniform(0.4, 5.0, 3)
    affine = np.eye(4)
    affine[:3, :3] = 0
    for i in range(3):
        affine[perm[i], i] = signs[i] * spacing[i]
    affine[:3, 3] = rng.uniform(-100, 100, 3)
    return shape, affine, tuple(float(t) for t in rng.uniform(0.6, 3.0, 3))


@pytest.mark.parametrize("seed", range(12))
def test_matches_reorient_then_interpolate(seed):
    """Any axis order, direction, mirror flip, memory order and scale: labels identical, images within
    float rounding (HU), same grid wherever an axis is resampled."""
    rng = np.random.default_rng(seed)
    shape, affine, target = _random_geometry(rng)
    flips = tuple(int(a) for a in np.flatnonzero(rng.random(3) < 0.4))
    image = rng.integers(-3000, 5000, shape).astype(np.int16)  # beyond the clip range on both sides
    label = rng.integers(0, 5, shape).astype(np.uint8)
    if seed % 2:
        image, label = np.asfortranarray(image), np.asfortranarray(label)
    plan = plan_grid(shape, affine, target, flips)
    ref_image, ref_affine = _reference(image, affine, target, flips, label=False)
    ref_label, _ = _reference(label, affine, target, flips, label=True)
    out = resample_linear(image, plan, lambda t: t.float().clamp_(HU_MIN, HU_MAX))
    assert out.shape == ref_image.shape == plan.shape and out.dtype == np.float32
    assert np.abs(out - ref_image).max() < 0.01  # HU; float32 rounding of values up to 3071
    np.testing.assert_array_equal(resample_nearest(label, plan), ref_label)
    changed = [k for k in range(3) if plan.axes[k].size_out != plan.axes[k].size_in]
    np.testing.assert_allclose(plan.affine[:3, changed], ref_affine[:3, changed], atol=1e-9)
    if len(changed) == 3:
        np.testing.assert_allclose(plan.affine, ref_affine, atol=1e-9)


def test_hand_values_lps_downsample():
    """x stored R->L (LPS), 4 voxels of 1 mm -> 2 voxels of 2 mm: each output voxel is the mean of the
    two input voxels it covers (positions 0.5 and 2.5), read from the far end because of the flip."""
    image = np.zeros((4, 1, 1), np.int16)
    image[:, 0, 0] = [0, 100, 200, 400]
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])
    plan = plan_grid(image.shape, affine, (2.0, 1.0, 1.0))
    out = resample_linear(image, plan)
    np.testing.assert_allclose(out[:, 0, 0], [300.0, 50.0])  # RAS order: (400+200)/2, (100+0)/2
    np.testing.assert_allclose(spacing_of(plan.affine), [2.0, 1.0, 1.0])
    # the new voxel 0 is centred between stored voxels 3 and 2, i.e. at x = -2.5 mm
    np.testing.assert_allclose(plan.affine @ [0, 0, 0, 1], [-2.5, 0, 0, 1])
    assert plan.axes[1].identity and plan.axes[2].identity


def test_axis_whose_size_does_not_change_keeps_its_spacing():
    """4 voxels of 1.2 mm asked at 1.0 mm: floor(4 x 1.2) = 4 voxels, which PyTorch copies; the grid
    must then say 1.2 mm (the data were not moved), not 1.0."""
    plan = plan_grid((4, 6, 2), np.diag([1.2, 1.0, 1.0, 1.0]), (1.0, 0.5, 1.0))
    assert plan.shape == (4, 12, 2)
    np.testing.assert_allclose(spacing_of(plan.affine), [1.2, 0.5, 1.0])
    image = np.arange(48, dtype=np.int16).reshape(4, 6, 2)
    out = resample_linear(image, plan)
    np.testing.assert_array_equal(out[:, 0, :], image[:, 0, :])  # y sample 0 sits at -0.25 -> clamped to 0
    np.testing.assert_allclose(out[:, 1, :], 0.75 * image[:, 0, :] + 0.25 * image[:, 1, :])  # at 0.25


def test_prepare_sees_only_stored_values_and_runs_once():
    """The decode hook is elementwise on stored values: an 8-bit window decode gives the hand value."""
    image = np.full((4, 4, 4), 85, np.uint8)
    plan = plan_grid(image.shape, np.eye(4), (2.0, 2.0, 2.0))
    out = resample_linear(image, plan, lambda t: t.float().mul_(1500.0 / 255.0).add_(-1250.0))
    np.testing.assert_allclose(out, -750.0, atol=1e-3)


def test_isal_reader_matches_nibabel_and_applies_scaling(tmp_path):
    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    affine = np.diag([-0.7, -0.7, 2.5, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(0.5, -1024.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    got, got_affine = read_volume(tmp_path / "scaled.nii.gz")
    ref = nib.load(tmp_path / "scaled.nii.gz")
    np.testing.assert_array_equal(got, np.asanyarray(ref.dataobj))
    assert got[1, 0, 0] == pytest.approx(42 * 0.5 - 1024.0)  # data[1,0,0] = 42
    np.testing.assert_allclose(got_affine, ref.affine)


def test_truncated_gzip_named_by_the_isal_reader(tmp_path):
    write_volume(tmp_path / "ct.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (40, 40, 40)).astype(np.int16),
                 np.eye(4))
    raw = (tmp_path / "ct.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError, match=r"cut\.nii\.gz: corrupt or truncated"):
        read_volume(tmp_path / "cut.nii.gz")
    (tmp_path / "garbage.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(VolumeError, match=r"garbage\.nii\.gz"):
        read_volume(tmp_path / "garbage.nii.gz")


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.dtype(">i2")])
def test_label_remap_small_integer_masks(dtype):
    policy = LabelPolicy("t", {0: "background", 1: "lesion", 2: "lung_left", -1: "background"},
                         ("lesion", "lung_left"), "test")
    codes = [0, 1, 2] + ([-1] if np.dtype(dtype).kind == "i" else [])
    raw = np.array(codes, dtype=dtype).reshape(-1, 1, 1)
    out = policy.remap(raw)
    ref = policy.remap(raw.astype(np.int64))  # the general path
    np.testing.assert_array_equal(out, ref)
    assert out.dtype == np.uint8 and out[0, 0, 0] == 0 and out[1, 0, 0] != out[2, 0, 0]
    bad = np.array(codes + [7], dtype=dtype).reshape(-1, 1, 1)
    with pytest.raises(LabelError, match=r"m\.nii\.gz: mask codes \[7\] not declared"):
        policy.remap(bad, where="m.nii.gz")

