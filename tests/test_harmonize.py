"""Harmonizer: hand-computed geometry (mm) and intensity (HU) checks."""
import nibabel as nib
import numpy as np
import pytest

from datamodules.cases import Case
from datamodules.harmonize import (
    HarmonizerConfig,
    decode_intensity,
    harmonize_case,
    resample,
    to_canonical,
    window_normalize,
)
from datamodules.io import VolumeError, spacing_of, write_volume
from datamodules.label_policy import CLASS_INDEX, CLASSES
from datamodules.sources import SOURCES


def world(affine, ijk):
    return (affine @ np.append(np.asarray(ijk, float), 1.0))[:3]


def test_uint8_decode_hand_values_and_quantization():
    step = 1500.0 / 255.0
    assert decode_intensity(np.array([0, 85, 255], np.uint8), "uint8_window", (-1250, 250)).tolist() == \
        pytest.approx([-1250.0, -1250.0 + 85 * step, 250.0])
    assert -1250.0 + 85 * step == pytest.approx(-750.0)
    hu = np.linspace(-1250, 250, 10001)
    stored = np.clip(np.rint((hu + 1250) / 1500 * 255), 0, 255).astype(np.uint8)
    err = np.abs(decode_intensity(stored, "uint8_window", (-1250, 250)) - hu)
    assert err.max() <= step / 2 + 1e-4  # within half a quantization step (2.94 HU)
    assert err.max() > step / 2 - 0.05   # and the bound is tight, not vacuous


def test_uint8_decode_rejects_out_of_range():
    with pytest.raises(VolumeError, match="case.nii.gz: declared 8-bit"):
        decode_intensity(np.array([0, 300]), "uint8_window", (-1250, 250), where="case.nii.gz")


def test_canonical_keeps_world_positions():
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    las = np.array([[-0.8, 0, 0, 100.0], [0, 0.8, 0, -50.0], [0, 0, 8.0, -1000.0], [0, 0, 0, 1]])
    out, aff = to_canonical(arr, las)
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    assert out[0, 2, 3] == arr[3, 2, 3]  # axis 0 reversed
    np.testing.assert_allclose(world(aff, (0, 2, 3)), world(las, (3, 2, 3)))
    np.testing.assert_allclose(aff[:3, 3], [100 - 3 * 0.8, -50, -1000])


def test_resample_keeps_extent_and_position():
    aff = np.diag([1.0, 1.0, 5.0, 1.0])
    aff[:3, 3] = [10.0, -20.0, 100.0]
    arr = np.zeros((10, 10, 4), np.float32)
    out, new = resample(arr, aff, (2.0, 2.0, 2.5), is_label=False)
    assert out.shape == (5, 5, 8)
    np.testing.assert_allclose(spacing_of(new), [2.0, 2.0, 2.5])
    # Outer corners of the field of view (voxel -0.5 and N-0.5) stay where they were, in mm.
    np.testing.assert_allclose(world(new, (-0.5, -0.5, -0.5)), world(aff, (-0.5, -0.5, -0.5)))
    np.testing.assert_allclose(world(new, np.array(out.shape) - 0.5), world(aff, np.array(arr.shape) - 0.5))
    # Hand value: first new voxel centre is 0.5 mm (x, y) and -1.25 mm (z) from the old first centre.
    np.testing.assert_allclose(new[:3, 3], [10.5, -19.5, 98.75])


def test_resample_label_block_stays_in_place():
    aff = np.diag([0.5, 0.5, 2.0, 1.0])
    lab = np.zeros((40, 40, 10), np.uint8)
    lab[10:20, 8:28, 2:6] = 3  # world x 5..10 mm (edges), y 4..14, z 4..12
    out, new = resample(lab, aff, (1.0, 1.0, 1.0), is_label=True)
    assert out.dtype == np.uint8 and set(np.unique(out)) == {0, 3}
    idx = np.argwhere(out == 3)
    lo, hi = world(new, idx.min(0) - 0.5), world(new, idx.max(0) + 0.5)
    np.testing.assert_allclose(lo, [4.75, 3.75, 3.0], atol=0.51)
    np.testing.assert_allclose(hi, [9.75, 13.75, 11.0], atol=0.51)
    # volume in mL is preserved: 10*20*4 voxels of 0.5 mm^3 = 400 mm^3
    assert (out == 3).sum() * 1.0 == pytest.approx(10 * 20 * 4 * 0.5, rel=0.05)


def test_window_normalize_hand_values():
    cfg = HarmonizerConfig(window=(-1000, 300))
    out = window_normalize(np.array([-2000, -1000, -350, 300, 1000], np.float32), cfg)
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1])
    z = window_normalize(np.array([-500, 0.0], np.float32), HarmonizerConfig(normalize="zscore", mean=-500, std=250))
    np.testing.assert_allclose(z, [0, 2])


def _harmonize(phantom_root, source, case_id, cfg):
    adapter = SOURCES[source](phantom_root / source)
    case = next(c for c in adapter.discover() if c.case_id == case_id)
    return case, harmonize_case(case, adapter.policy(case), cfg)


@pytest.mark.parametrize("case_id", ["radiopaedia_10_85902_1", "radiopaedia_7_85703_0", "coronacases_001"])
def test_ctseg_harmonized_matches_world_truth(phantom_root, case_id):
    """Flipped 8-bit radiopaedia cases land on the phantom's truth in world space after harmonization."""
    cfg = HarmonizerConfig(target_spacing=(6.0, 6.0, 8.0))
    case, h = _harmonize(phantom_root, "ctseg", case_id, cfg)
    timg = nib.load(str(phantom_root / "_truth" / "ctseg" / f"{case_id}_lobes.nii.gz"))
    lobes = np.asarray(timg.dataobj)
    # Truth lobes 1-3 are the right lung; truth is stored unflipped in RAS.
    truth, taff = resample(((lobes >= 1) & (lobes <= 3)).astype(np.uint8), timg.affine, cfg.target_spacing, True)
    np.testing.assert_allclose(h.affine, taff, atol=1e-6)
    right = h.label == CLASS_INDEX["lung_right"]
    assert right.shape == truth.shape
    dice = 2 * (right & (truth > 0)).sum() / (right.sum() + truth.sum())
    assert dice > 0.9, dice
    # RAS+: the subject's left lung lies at negative world x.
    left_idx = np.argwhere(h.label == CLASS_INDEX["lung_left"]).mean(0)
    assert world(h.affine, left_idx)[0] < 0 < world(h.affine, np.argwhere(right).mean(0))[0]


def test_harmonized_geometry_and_intensity(phantom_root, manifests):
    cfg = HarmonizerConfig(target_spacing=(4.0, 4.0, 8.0))
    case, h = _harmonize(phantom_root, "mosmed", "study_0255", cfg)
    np.testing.assert_allclose(h.meta["spacing"], [4.0, 4.0, 8.0])
    assert h.meta["original"]["axcodes"] == "LAS"
    orig = np.array(h.meta["original"]["affine"])
    n0 = np.array(h.meta["original"]["shape"])
    ext0 = n0 * spacing_of(orig)
    assert np.all(np.abs(np.array(h.image.shape) * np.array([4.0, 4.0, 8.0]) - ext0) < np.array([4.0, 4.0, 8.0]))
    assert h.image.dtype == np.float32 and 0.0 <= h.image.min() and h.image.max() <= 1.0
    assert set(np.unique(h.label)) <= {0, CLASS_INDEX["lesion"]}
    assert h.meta["annotated"] == [True, False, False, True, False, False, False, False]
    # Air outside the body decodes to ~ -1000 HU -> 0 after the [-1000, 300] window.
    assert np.median(h.image[:2, :2, :]) < 0.02


def _pair(tmp_path, img_shape=(8, 8, 4), lab_shape=(8, 8, 4), lab_shift=0.0, nan=False):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    img = np.full(img_shape, -800, np.float32 if nan else np.int16)
    img[:2] = -1000  # some air: a constant image is refused before the mask is looked at
    if nan:
        img[0, 0, 0] = np.nan
    write_volume(tmp_path / "img.nii.gz", img, aff)
    laff = aff.copy()
    laff[0, 3] += lab_shift
    write_volume(tmp_path / "lab.nii.gz", np.zeros(lab_shape, np.uint8), laff)
    return Case("mosmed", "x", "x", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", "lesion")


def test_bad_pairs_name_the_file(tmp_path):
    pol = SOURCES["mosmed"].POLICIES["lesion"]
    cfg = HarmonizerConfig()
    with pytest.raises(VolumeError, match=r"lab.nii.gz: mask shape \(8, 8, 5\) differs"):
        harmonize_case(_pair(tmp_path, lab_shape=(8, 8, 5)), pol, cfg)
    with pytest.raises(VolumeError, match="lab.nii.gz: mask affine differs"):
        harmonize_case(_pair(tmp_path, lab_shift=2.0), pol, cfg)
    with pytest.raises(VolumeError, match="img.nii.gz: image contains NaN"):
        harmonize_case(_pair(tmp_path, nan=True), pol, cfg)


def test_truncated_file_named(tmp_path):
    case = _pair(tmp_path)
    data = case.image.read_bytes()
    case.image.write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match=r"img.nii.gz: corrupt or truncated"):
        harmonize_case(case, SOURCES["mosmed"].POLICIES["lesion"], HarmonizerConfig())


def _one_hot(label: np.ndarray):
    import torch

    return torch.nn.functional.one_hot(torch.from_numpy(label.astype(np.int64)), len(CLASSES)).permute(3, 0, 1, 2).float()


@pytest.mark.parametrize("source,case_id", [("covid19_20", "volume-covid19-A-0003"), ("mosmed", "study_0255"),
                                            ("ctseg", "radiopaedia_7_85703_0"), ("ctseg", "radiopaedia_10_85902_1")])
def test_restore_inverts_orientation_and_resampling(phantom_root, source, case_id):
    """LPS, LAS and image-flipped 8-bit cases: harmonize the mask, restore it onto the stored grid."""
    from datamodules.harmonize import load_original, restore_to_original, to_canonical

    adapter = SOURCES.lookup(source)(phantom_root / source)
    (case,) = [c for c in adapter.discover() if c.case_id == case_id]
    policy = adapter.policy(case)
    hu, label, affine = load_original(case, policy)
    assert hu.shape == label.shape
    # Target spacing = the stored spacing: no resampling, so the round trip must be exact.
    same = HarmonizerConfig(target_spacing=tuple(spacing_of(to_canonical(hu, affine)[1])))
    h = harmonize_case(case, policy, same)
    assert np.array_equal(restore_to_original(_one_hot(h.label), h.meta), label)
    # Coarser grid: geometry exact, the mask close (it went through a 2-4x coarser grid and back).
    h = harmonize_case(case, policy, HarmonizerConfig(target_spacing=(6.0, 6.0, 10.0)))
    restored = restore_to_original(_one_hot(h.label), h.meta)
    assert restored.shape == label.shape and restored.dtype == np.uint8
    lesion = CLASS_INDEX["lesion"]
    inter = np.logical_and(restored == lesion, label == lesion).sum()
    assert 2 * inter / ((restored == lesion).sum() + (label == lesion).sum()) > 0.75
    if case.image_flips:
        # The image was mirrored onto its masks (A-P, declared and measured), the masks never moved:
        # the harmonized lungs hold air (~ -850 HU -> ~0.12 after the window), and the restored
        # prediction needs no flip to sit on the stored mask (checked above).
        assert h.meta["image_flips"] == list(case.image_flips) and h.meta["alignment"]["status"] == "fixed"
        lungs = np.isin(h.label, [CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"]])
        assert h.image[lungs].mean() < 0.25


def test_align_mask_reorients_a_mask_stored_in_another_axis_order(tmp_path):
    from datamodules.harmonize import align_mask

    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, size=(5, 4, 3)).astype(np.uint8)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 30.0]
    # the same voxels stored transposed (z, y, x) and with x reversed: every voxel keeps its world position
    stored = np.ascontiguousarray(label[::-1].transpose(2, 1, 0))
    perm = np.zeros((4, 4))
    perm[0, 2] = perm[1, 1] = perm[2, 0] = 1.0  # stored index (k, j, i') -> (i', j, k)
    perm[3, 3] = 1.0
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, label.shape[0] - 1
    stored_affine = affine @ flip @ perm
    out = align_mask(stored, stored_affine, label.shape, affine, "mask.nii.gz", "image.nii.gz")
    np.testing.assert_array_equal(out, label)
    shifted = stored_affine.copy()
    shifted[0, 3] += 3.0  # a real geometry difference is still an error naming the files
    with pytest.raises(VolumeError, match=r"mask\.nii\.gz: mask shape \(3, 4, 5\) differs from image image\.nii\.gz"):
        align_mask(stored, shifted, label.shape, affine, "mask.nii.gz", "image.nii.gz")


def test_shear_of_hand_built_affines():
    """Rotations and flips of a box grid are not shear; a tilted column is, by its angle."""
    from datamodules.io import SHEAR_MAX_DEG, check_affine, shear_of

    t = np.radians(30.0)
    rot = np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])
    oblique = np.eye(4)
    oblique[:3, :3] = rot @ np.diag([0.7, -0.7, 5.0])
    assert shear_of(oblique)[0] < 1e-9
    check_affine(oblique, "oblique")
    for deg, refused in ((0.05, False), (0.2, True), (15.0, True)):
        sheared = np.diag([0.7, 0.7, 5.0, 1.0])
        sheared[1, 2] = np.tan(np.radians(deg)) * 5.0  # slice k moves k * that along y
        got, a, b = shear_of(sheared)
        assert got == pytest.approx(deg, abs=1e-6) and (a, b) == (1, 2)
        if refused:
            with pytest.raises(VolumeError, match=rf"sheared affine: voxel axes 1 and 2 .*\(shear {deg:.2f}°"):
                check_affine(sheared, "x.nii.gz")
        else:
            assert deg <= SHEAR_MAX_DEG
            check_affine(sheared, "x.nii.gz")
