"""Image-mask alignment is measured from the data: planted image-only flips are found, declarations are
confirmed or refused, and the anatomy that cannot decide is never called `ok`.

The planting code here shares nothing with the detector (`datamodules.alignment`) or the harmonizer:
volumes are rendered from the phantom anatomy in RAS, stored in a hand-written orientation with a
hand-computed affine, mirrored with plain numpy slicing on the stored array, encoded by hand and written
with nibabel directly.
"""
import json
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest

from datamodules.alignment import AXES, MIRRORINGS, AlignmentConfig, AlignmentError, measure_case, symmetric_indices
from datamodules.cases import Case
from datamodules.harmonize import HarmonizerConfig, harmonize_case
from datamodules.io import spacing_of
from datamodules.label_policy import CLASS_INDEX
from datamodules.phantom.anatomy import LesionConfig, acquire, render, sample_patient
from datamodules.sources import SOURCES

CFG = AlignmentConfig()
LUNG_AND_LESION = np.zeros(8, bool)
LUNG_AND_LESION[[0, 1, 2, 3]] = True
LESION_ONLY = np.zeros(8, bool)
LESION_ONLY[[0, 3]] = True
LUNG_ONLY = np.zeros(8, bool)
LUNG_ONLY[[0, 1, 2]] = True
LUNGS = [CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"]]


def chest(seed: int, shape=(96, 96, 40), spacing=(3.6, 3.6, 6.5)):
    """(HU, common-class labels: 1 left lung, 2 right lung, 3 lesion, RAS affine) of one phantom patient, RAS order."""
    rng = np.random.default_rng(seed)
    patient = sample_patient(rng, LesionConfig(n_min=3, n_max=6, radius_mm=(12.0, 30.0)))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    r = render(patient, shape, affine)
    hu = acquire(r.hu, spacing, rng, noise_hu=20.0, blur_mm=0.8)
    labels = np.where((r.lesion_field > 0.5) & (r.lung > 0), 3, r.lung).astype(np.uint8)
    return hu, labels, affine


# Hand-written storage layouts: stored array from the RAS array, the stored axis each canonical axis
# lands on, and the matrix M with ras_index = M @ stored_index (so stored affine = RAS affine @ M).
def store_lps(ras: np.ndarray):
    nx, ny, _ = ras.shape
    m = np.array([[-1, 0, 0, nx - 1], [0, -1, 0, ny - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return np.ascontiguousarray(ras[::-1, ::-1, :]), {0: 0, 1: 1, 2: 2}, m


def store_pri(ras: np.ndarray):
    """Stored axes: (A-P running posterior, R-L running right, S-I running inferior)."""
    nx, ny, nz = ras.shape
    out = np.ascontiguousarray(ras.transpose(1, 0, 2)[::-1, :, ::-1])
    # stored (a, b, c) holds RAS (i, j, k) = (b, ny - 1 - a, nz - 1 - c)
    m = np.array([[0, 1, 0, 0], [-1, 0, 0, ny - 1], [0, 0, -1, nz - 1], [0, 0, 0, 1]], float)
    return out, {0: 1, 1: 0, 2: 2}, m


LAYOUTS = {"LPS": store_lps, "PRI": store_pri}


def to_8bit(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint((np.clip(hu, -1250.0, 250.0) + 1250.0) * (255.0 / 1500.0)), 0, 255).astype(np.uint8)


def plant(hu, labels, affine, layout: str, image_flips, eight_bit: bool):
    """Store image and labels in `layout`; mirror the IMAGE ONLY along the named canonical axes."""
    img, axis_of, m = LAYOUTS[layout](hu)
    lab, _, _ = LAYOUTS[layout](labels)
    for name in image_flips:
        img = np.flip(img, axis=axis_of[("R-L", "A-P", "S-I").index(name)])
    img = to_8bit(img) if eight_bit else np.rint(img).astype(np.int16)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab), affine @ m


@pytest.fixture(scope="module")
def chests():
    return [chest(seed) for seed in (0, 1)]


@pytest.mark.parametrize("layout", ["LPS", "PRI"])
@pytest.mark.parametrize("eight_bit", [False, True], ids=["hu", "8bit"])
def test_every_planted_image_flip_is_found(chests, layout, eight_bit):
    """All 8 mirrorings (none, single axes, pairs, all three), HU and 8-bit, two storage layouts,
    anisotropic voxels: the detector names exactly the planted axes, decisively."""
    encoding, window = ("uint8_window", (-1250.0, 250.0)) if eight_bit else ("hu", None)
    for hu, labels, affine in chests:
        for planted in MIRRORINGS:
            img, lab, aff = plant(hu, labels, affine, layout, planted, eight_bit)
            a = measure_case(img, aff, lab, LUNG_AND_LESION, encoding, window, (), CFG)
            assert a.best == planted, (layout, planted, a.scores)
            assert a.margin >= CFG.margin, (layout, planted, a.margin)
            assert a.flips == planted and a.status == ("ok" if not planted else "mismatch")
            # declared as planted: confirmed
            confirmed = measure_case(img, aff, lab, LUNG_AND_LESION, encoding, window, planted, CFG)
            assert confirmed.status == ("ok" if not planted else "fixed") and confirmed.flips == planted


@pytest.mark.parametrize("annotated,name", [(LESION_ONLY, "lesion"), (LUNG_ONLY, "lung")])
def test_single_mask_kinds_find_the_planted_a_p_flip(chests, annotated, name):
    """Lesion-only masks (COVID-19-20, MosMed) and lung-only masks (a Lung_Mask) each decide alone."""
    for hu, labels, affine in chests:
        kept = np.where(labels == 3, 3, 0) if name == "lesion" else np.where(labels == 3, 1, labels)
        for planted in [(), ("A-P",), ("R-L", "S-I")]:
            img, lab, aff = plant(hu, kept.astype(np.uint8), affine, "LPS", planted, eight_bit=False)
            a = measure_case(img, aff, lab, annotated, "hu", None, (), CFG)
            assert list(a.measures) == [name]
            assert a.best == planted and a.margin >= CFG.margin, (name, planted, a.scores)


def test_symmetric_axis_is_ambiguous_never_ok(chests):
    """Make the chest exactly left-right symmetric (image and masks): mirroring the image along R-L then
    fits as well as not mirroring it, so the anatomy cannot decide and the status says so."""
    hu, labels, affine = chests[0]
    n = hu.shape[0]
    half = n // 2
    sym_hu, sym_lab = hu.copy(), labels.copy()
    sym_hu[:half] = hu[n - half:][::-1]
    sym_lab[:half] = np.where(labels[n - half:][::-1] == 2, 1, labels[n - half:][::-1])
    assert np.array_equal(sym_hu, sym_hu[::-1])
    img, lab, aff = plant(sym_hu, sym_lab, affine, "LPS", (), eight_bit=False)
    a = measure_case(img, aff, lab, LUNG_AND_LESION, "hu", None, (), CFG)
    assert a.status == "ambiguous" and a.margin < CFG.margin
    assert a.scores["none"] == pytest.approx(a.scores["R-L"])
    # an ambiguous case keeps the declared flips (applied unconfirmed), whatever they are
    assert measure_case(img, aff, lab, LUNG_AND_LESION, "hu", None, ("S-I",), CFG).flips == ("S-I",)


def test_nothing_to_measure_is_unverifiable(chests):
    hu, labels, affine = chests[0]
    img, lab, aff = plant(hu, labels, affine, "LPS", (), eight_bit=False)
    assert measure_case(img, aff, None, LUNG_AND_LESION, "hu", None, ("A-P",), CFG).status == "unverifiable"
    tiny = np.zeros_like(lab)
    tiny[tuple(np.argwhere(lab == 3)[0])] = 3  # one lesion voxel, no lung mask
    a = measure_case(img, aff, tiny, LESION_ONLY, "hu", None, ("A-P",), CFG)
    assert a.status == "unverifiable" and a.flips == ("A-P",)


def test_symmetric_indices_mirror_exactly():
    for n in range(1, 40):
        for m in range(1, n + 2):
            idx = symmetric_indices(n, m)
            assert np.array_equal(idx, np.sort(idx)) and idx.min() >= 0 and idx.max() < n
            assert np.array_equal(n - 1 - idx[::-1], idx), (n, m)


# --------------------------------------------------------------------------- harmonizer and verify
def write_case(folder, case_id, img, lab, affine):
    folder.mkdir(parents=True, exist_ok=True)
    for sub, arr in (("images", img), ("masks", lab)):
        (folder / sub).mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(arr, affine), str(folder / sub / f"{case_id}.nii.gz"))
    return folder / "images" / f"{case_id}.nii.gz", folder / "masks" / f"{case_id}.nii.gz"


def test_harmonizer_applies_the_confirmed_flip_to_the_image_only(chests, tmp_path):
    hu, labels, affine = chests[1]
    img, lab, aff = plant(hu, labels, affine, "PRI", ("A-P",), eight_bit=True)
    image, mask = write_case(tmp_path, "rp", img, lab, aff)
    policy = SOURCES["ctseg"].POLICIES["lung_and_infection"]
    cfg = HarmonizerConfig(target_spacing=(4.0, 4.0, 6.5))
    base = Case("ctseg", "rp", "rp", image, mask, "lung_and_infection", "uint8_window", (-1250.0, 250.0))
    h = harmonize_case(replace(base, image_flips=("A-P",)), policy, cfg)
    assert h.meta["alignment"]["status"] == "fixed" and h.meta["image_flips"] == ["A-P"]
    # The masks did not move: the harmonized lungs equal the planted lungs resampled (RAS, no flip),
    # and the image now shows air inside them (window [-1000, 300]: -850 HU -> 0.12).
    lungs = np.isin(h.label, LUNGS)
    assert h.image[lungs].mean() < 0.2
    assert 0.9 < lungs.sum() * 4.0 * 4.0 * 6.5 / (np.isin(labels, LUNGS).sum() * np.prod(spacing_of(affine))) < 1.1
    # Undeclared, the same files are refused with the measured numbers.
    with pytest.raises(AlignmentError, match=r"rp\.nii\.gz: ctseg/rp: image-mask mismatch: .* mirrored along A-P "
                                             r"\(score 0\.\d+, as stored 0\.\d+, margin 0\.\d+"):
        harmonize_case(base, policy, cfg)


def test_verify_json_reports_planted_a_p_image_flips(chests, tmp_path, capsys):
    """A COVID-19-CT-Seg tree (Zenodo layout) whose radiopaedia images are mirrored along A-P relative
    to their masks, one coronacases image planted the same way (nothing declares it), one left alone."""
    from datamodules.verify import main as verify_main

    root = tmp_path / "data" / "ctseg"
    planted = {"coronacases_001": ((), False), "coronacases_002": (("A-P",), False),
               "radiopaedia_4_85506_1": (("A-P",), True), "radiopaedia_29_86490_1": (("A-P",), True),
               "radiopaedia_29_86491_1": (("A-P",), True)}
    for i, (cid, (flips, eight_bit)) in enumerate(planted.items()):
        hu, labels, affine = chests[i % 2]
        img, lab, aff = plant(hu, labels, affine, "LPS", flips, eight_bit)
        for folder, arr in (("COVID-19-CT-Seg_20cases", img), ("Lung_and_Infection_Mask", lab)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(arr, aff), str(root / folder / f"{cid}.nii.gz"))
    code = verify_main(["--root", str(tmp_path / "data"), "--sources", "ctseg", "--json", "--no-duplicates"])
    report = json.loads(capsys.readouterr().out)
    align = report["sources"]["ctseg"]["alignment"]
    assert {cid: a["flips"] for cid, a in align.items()} == {cid: list(f) for cid, (f, _) in planted.items()}
    assert {cid: a["status"] for cid, a in align.items()} == {
        "coronacases_001": "ok", "coronacases_002": "mismatch", "radiopaedia_4_85506_1": "fixed",
        "radiopaedia_29_86490_1": "fixed", "radiopaedia_29_86491_1": "fixed"}
    assert all(a["margin"] >= CFG.margin for a in align.values())
    # the undeclared flip is a problem naming the case (exit 1); the two studies of case 29 are one patient
    assert code == 1 and [p["file"].rsplit("/", 1)[-1] for p in report["problems"]] == ["coronacases_002.nii.gz"]
    assert "ctseg/coronacases_002: image-mask mismatch" in report["problems"][0]["message"]
    assert report["sources"]["ctseg"]["patients"]["radiopaedia_29"] == ["radiopaedia_29_86490_1",
                                                                        "radiopaedia_29_86491_1"]
    assert report["sources"]["ctseg"]["n_patients"] == 4
    # declaring it (as data.image_flips does) makes the data agree: fixed, no problem
    assert verify_main(["--root", str(tmp_path / "data"), "--sources", "ctseg", "--json", "--no-duplicates",
                        "--image-flips", "ctseg/coronacases_002=A-P"]) == 0
    assert json.loads(capsys.readouterr().out)["sources"]["ctseg"]["alignment"]["coronacases_002"]["status"] == "fixed"


def test_axis_names_are_canonical():
    assert AXES == ("R-L", "A-P", "S-I") and len(MIRRORINGS) == 8 and MIRRORINGS[0] == ()


def test_training_refuses_or_skips_a_contradicted_declaration(phantom_root, tmp_path, capsys):
    """`data.image_flips` declares an A-P image flip for a coronacases scan stored as its header says:
    the measurement contradicts it, training stops naming the case (or skips it with on_error=skip)."""
    from datamodules.datamodule import DataError, MultiSourceDataModule

    kwargs = dict(harmonizer=HarmonizerConfig(target_spacing=(8.0, 8.0, 10.0)), patch_size=(16, 16, 8),
                  image_flips={"ctseg": {"coronacases_001": ["A-P"]}})
    dm = MultiSourceDataModule(phantom_root, tmp_path / "h", ["ctseg", "mosmed"], holdout="mosmed", **kwargs)
    with pytest.raises(DataError, match=r"ctseg/coronacases_001 \(\w+\): .*image-mask mismatch: the masks fit the "
                                        r"image best mirrored along none .* but A-P is declared"):
        dm.prepare_data()
    dm = MultiSourceDataModule(phantom_root, tmp_path / "h", ["ctseg", "mosmed"], holdout="mosmed",
                               on_error="skip", **kwargs)
    dm.prepare_data()
    loaded = {c.key for role in ("train", "val", "test") for c in dm.cached[role]}
    assert "ctseg/coronacases_001" not in loaded and "ctseg/coronacases_002" in loaded
    assert any("ctseg/coronacases_001" in p and "mismatch" in p for p in dm.skipped)
    statuses = dm.alignment()["ctseg"]
    assert statuses["statuses"] == {"ok": 2, "fixed": 4} and statuses["cases"]["radiopaedia_7_85703_0"]["flips"] == [
        "A-P", "S-I"]
