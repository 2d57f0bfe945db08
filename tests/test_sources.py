"""Adapters find exactly what the phantom suite wrote in each official layout."""
import numpy as np
import pytest

from datamodules.io import read_volume
from datamodules.label_policy import LabelError
from datamodules.sources import SOURCES, DataLayoutError


def test_registry_has_the_three_sources():
    assert {"covid19_20", "mosmed", "ctseg"} <= set(SOURCES)


@pytest.mark.parametrize("source", ["covid19_20", "mosmed", "ctseg"])
def test_adapter_finds_exactly_the_written_cases(phantom_root, manifests, source):
    cases = SOURCES[source](phantom_root / source).discover()
    written = {r["case"]: r for r in manifests[source]["cases"]}
    assert sorted(c.case_id for c in cases) == sorted(written)
    for c in cases:
        assert c.labelled == written[c.case_id]["labelled"], c.case_id
        assert c.image.exists() and (c.label is None or c.label.exists())
        assert c.encoding == written[c.case_id]["encoding"]
        assert list(c.image_flips) == written[c.case_id]["image_flips"]  # declared as planted (the
        # detector's own check, independent of both, is tests/test_alignment.py)


def test_covid19_20_layout_and_patients(phantom_root):
    cases = {c.case_id: c for c in SOURCES["covid19_20"](phantom_root / "covid19_20").discover()}
    train = [c for c in cases.values() if c.labelled]
    assert all(c.image.parent.name == "Train" and c.image.name.endswith("_ct.nii.gz") for c in train)
    assert all(c.label.name == c.case_id + "_seg.nii.gz" for c in train)
    unl = [c for c in cases.values() if not c.labelled]
    assert unl and all(c.image.parent.name == "Validation" for c in unl)
    # `_1` marks a second scan of a patient: same patient id as the scan without suffix.
    suffixed = [c for c in train if c.case_id.endswith("_1")]
    assert suffixed
    base = suffixed[0].case_id[:-2]
    assert cases[base].patient_id == suffixed[0].patient_id == base


def test_mosmed_layout_categories_and_int16_las(phantom_root):
    cases = SOURCES["mosmed"](phantom_root / "mosmed").discover()
    lab = [c for c in cases if c.labelled]
    assert all(c.meta["category"] == "CT-1" for c in lab)
    assert all(c.meta["category"] == "CT-0" for c in cases if not c.labelled)
    assert all(c.label.name == f"{c.case_id}_mask.nii.gz" and c.label.parent.name == "masks" for c in lab)
    import nibabel as nib
    img = nib.load(str(lab[0].label))
    assert img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    assert abs(img.header.get_zooms()[2] - 8.0) < 1e-4
    raw = (phantom_root / "mosmed" / "COVID19_1110" / "dataset_registry.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbfstudy_id,category,study_file,mask_file\r\n")
    assert b",/masks/study_0255_mask.nii.gz\r\n" in raw


def test_ctseg_quirks(phantom_root):
    cases = {c.case_id: c for c in SOURCES["ctseg"](phantom_root / "ctseg").discover()}
    assert cases["radiopaedia_10_85902_1"].patient_id == cases["radiopaedia_10_85902_3"].patient_id == "radiopaedia_10"
    assert cases["coronacases_001"].patient_id == "coronacases_001"
    assert cases["radiopaedia_7_85703_0"].image_flips == ("A-P", "S-I")
    assert cases["radiopaedia_10_85902_1"].image_flips == ("A-P",)
    assert cases["coronacases_001"].encoding == "hu" and cases["coronacases_001"].image_flips == ()
    assert all(c.policy == "lung_and_infection" for c in cases.values())
    arr, _ = read_volume(cases["radiopaedia_10_85902_1"].image)
    assert arr.dtype == np.uint8
    coronacases_arr, _ = read_volume(cases["coronacases_001"].image)
    assert coronacases_arr.dtype == np.int16 and coronacases_arr.min() < -900
    # 630-pixel radiopaedia matrices stay larger than 512-pixel coronacases at every size knob.
    assert arr.shape[0] > coronacases_arr.shape[0]
    short, _ = read_volume(cases["radiopaedia_14_85914_0"].image)
    assert short.shape[1] < short.shape[0]


def test_ctseg_falls_back_to_infection_mask(tmp_path, phantom_root):
    import shutil
    src = phantom_root / "ctseg"
    dst = tmp_path / "ctseg" / "download"  # nested one level deeper than usual
    for name in ("COVID-19-CT-Seg_20cases", "Infection_Mask"):
        shutil.copytree(src / name, dst / name)
    cases = SOURCES["ctseg"](tmp_path / "ctseg").discover()
    assert cases and all(c.policy == "infection" for c in cases)


def test_missing_layout_names_folder(tmp_path):
    (tmp_path / "mosmed").mkdir()
    with pytest.raises(DataLayoutError, match=r"mosmed: no studies/ folder found under .*mosmed"):
        SOURCES["mosmed"](tmp_path / "mosmed").discover()
    with pytest.raises(DataLayoutError, match="does not exist"):
        SOURCES["ctseg"](tmp_path / "nothing")


def test_missing_covid19_20_mask_names_image(tmp_path, phantom_root):
    import shutil
    shutil.copytree(phantom_root / "covid19_20", tmp_path / "covid19_20")
    seg = sorted((tmp_path / "covid19_20").rglob("*_seg.nii.gz"))[0]
    seg.unlink()
    adapter = SOURCES["covid19_20"](tmp_path / "covid19_20")
    ids = {c.case_id for c in adapter.discover()}
    missing = seg.name.replace("_seg.nii.gz", "")
    assert missing not in ids and len(ids) == 6  # left out, the other cases still found
    (problem,) = adapter.problems
    assert problem.file.endswith(f"{missing}_ct.nii.gz") and "no mask" in problem.message


def test_ctseg_kaggle_mirror_names_and_float_masks(tmp_path, phantom_root):
    """Kaggle andrewmvd/covid19-ct-scans: `_org_` / `-dcm` names, lower-case mask folders, .nii, float masks."""
    import nibabel as nib

    src = phantom_root / "ctseg"
    root = tmp_path / "ctseg" / "covid19-ct-scans"
    expected = {}
    for image in sorted((src / "COVID-19-CT-Seg_20cases").glob("*.nii.gz")):
        cid = image.name[:-7]
        kaggle = (cid.replace("coronacases_", "coronacases_org_") if cid.startswith("coronacases")
                  else cid.replace("radiopaedia_", "radiopaedia_org_covid-19-pneumonia-") + "-dcm")
        data, affine = read_volume(image)
        (root / "ct_scans").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(root / "ct_scans" / f"{kaggle}.nii"))
        mask, maff = read_volume(src / "Lung_and_Infection_Mask" / image.name)
        noisy = mask.astype(np.float32) + np.float32(0.004) * (mask > 0)  # interpolation residue
        noisy[0, 0, 0] = 0.3                                                # a rounded-away border value
        (root / "lung_and_infection_mask").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(noisy, maff), str(root / "lung_and_infection_mask" / f"{cid}.nii"))
        expected[cid] = mask
    adapter = SOURCES["ctseg"](tmp_path / "ctseg")
    cases = adapter.discover()
    assert sorted(c.case_id for c in cases) == sorted(expected)  # Zenodo ids recovered from mirror names
    for case in cases:
        assert case.policy == "kaggle_lung_and_infection"
        raw, _ = read_volume(case.label)
        out = adapter.policy(case).remap(raw, where=str(case.label))
        exp = expected[case.case_id].copy()
        exp[0, 0, 0] = 0
        assert np.array_equal(out, SOURCES["ctseg"].POLICIES["lung_and_infection"].remap(exp))
    rp = next(c for c in cases if c.case_id == "radiopaedia_7_85703_0")
    assert rp.encoding == "uint8_window" and rp.image_flips == ("A-P", "S-I") and rp.patient_id == "radiopaedia_7"
    # the Zenodo policy itself still refuses float residue: it would hide a wrong file
    with pytest.raises(LabelError, match="non-integer"):
        SOURCES["ctseg"].POLICIES["lung_and_infection"].remap(np.array([[[0.0, 0.3]]]))


def test_mosmed_flat_uncompressed_mirror(tmp_path, phantom_root):
    """Kaggle-style mirror: `studies/study_NNNN.nii` and `masks/study_NNNN_mask.nii`, no CT-k folders."""
    import nibabel as nib

    src = phantom_root / "mosmed" / "COVID19_1110"
    flat = tmp_path / "mosmed" / "mosmed_kaggle"
    for path in sorted(src.rglob("study_*.nii.gz")):
        sub = "masks" if path.name.endswith("_mask.nii.gz") else "studies"
        (flat / sub).mkdir(parents=True, exist_ok=True)
        img = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine), str(flat / sub / path.name.replace(".gz", "")))
    original = {c.case_id: c for c in SOURCES["mosmed"](phantom_root / "mosmed").discover()}
    cases = {c.case_id: c for c in SOURCES["mosmed"](tmp_path / "mosmed").discover()}
    assert sorted(cases) == sorted(original)
    for cid, c in cases.items():
        assert c.image.name == f"{cid}.nii" and c.labelled == original[cid].labelled
        assert c.meta["category"] is None  # no CT-k folder and no registry: unknown, not guessed
    # with the registry beside it, the category comes from there
    (flat / "dataset_registry.csv").write_bytes((src / "dataset_registry.csv").read_bytes())
    cases = {c.case_id: c for c in SOURCES["mosmed"](tmp_path / "mosmed").discover()}
    assert {cid: c.meta["category"] for cid, c in cases.items()} == {cid: c.meta["category"] for cid, c in original.items()}


def test_covid19_20_day_suffix_is_the_same_patient(tmp_path, phantom_root):
    import shutil

    shutil.copytree(phantom_root / "covid19_20", tmp_path / "covid19_20")
    train = next((tmp_path / "covid19_20").rglob("Train"))
    base = sorted(p.name[: -len("_ct.nii.gz")] for p in train.glob("*_ct.nii.gz") if "_1_" not in p.name)[0]
    for kind in ("ct", "seg"):
        shutil.copy(train / f"{base}_{kind}.nii.gz", train / f"{base}_day012_{kind}.nii.gz")
    cases = {c.case_id: c for c in SOURCES["covid19_20"](tmp_path / "covid19_20").discover()}
    assert cases[f"{base}_day012"].patient_id == cases[base].patient_id == base
    assert cases[f"{base}_day012"].labelled
