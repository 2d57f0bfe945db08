"""MSD Task06_Lung and StructSeg 2019 adapters on the tiny phantom tree: what they find, how their
non-COVID tumours and organ labels map into the common classes, and the per-case lung-order check."""
import json
import shutil

import numpy as np
import pytest

from datamodules.harmonize import HarmonizerConfig, harmonize_case, load_original, to_canonical
from datamodules.io import read_volume
from datamodules.label_policy import IGNORE, LESION
from datamodules.sources import SOURCES, DataLayoutError, policy_named


def _truth(phantom_root, source, case_id, kind):
    arr, _ = read_volume(phantom_root / "_truth" / source / f"{case_id}_{kind}.nii.gz")
    return arr


def _canonical_label(adapter, case):
    """The case's label remapped by its policy, in RAS voxel order (the truth maps' grid)."""
    _, label, affine = load_original(case, adapter.policy(case))
    return to_canonical(label, affine)[0]


# ------------------------------------------------------------------------------------------ MSD Task06
def test_registry_and_policy_names():
    assert {"msd_lung", "structseg"} <= set(SOURCES)
    assert policy_named("msd_lung/tumour_ignored").code_map == {0: "background", 1: "ignore"}
    assert policy_named("structseg/oar_swapped").code_map[1] == "lung_right"


def test_msd_finds_exactly_the_written_cases(phantom_root, manifests):
    adapter = SOURCES["msd_lung"](phantom_root / "msd_lung")
    cases = adapter.discover()
    written = {r["case"]: r for r in manifests["msd_lung"]["cases"]}
    assert sorted(c.case_id for c in cases) == sorted(written) == ["lung_001", "lung_002", "lung_003", "lung_004"]
    assert adapter.problems == []
    for c in cases:
        assert c.labelled == written[c.case_id]["labelled"]
        assert c.patient_id == written[c.case_id]["patient"] == c.case_id
        assert c.meta["subset"] == ("imagesTr" if c.labelled else "imagesTs")
        assert c.policy == ("tumour_ignored" if c.labelled else None)
        assert c.label is None or (c.label.parent.name == "labelsTr" and c.label.name == c.image.name)
    # The macOS resource forks are there and were skipped.
    task = phantom_root / "msd_lung" / "Task06_Lung"
    assert (task / "imagesTr" / "._lung_001.nii.gz").exists() and (task / "labelsTr" / "._lung_001.nii.gz").exists()
    assert not any(c.image.name.startswith("._") or (c.label and c.label.name.startswith("._")) for c in cases)


@pytest.mark.parametrize("policy, code", [(None, IGNORE), ("tumour_as_lesion", LESION), ("tumour_as_class", 5)])
def test_msd_tumour_is_ignored_or_lesion_by_config(phantom_root, policy, code):
    adapter = SOURCES["msd_lung"](phantom_root / "msd_lung", policy=policy)
    case = next(c for c in adapter.discover() if c.case_id == "lung_003")
    assert adapter.policy(case).name == f"msd_lung/{policy or 'tumour_ignored'}"
    label = _canonical_label(adapter, case)
    tumour = _truth(phantom_root, "msd_lung", "lung_003", "tumour") > 0
    assert tumour.any()
    expected = np.where(tumour, code, 0).astype(np.uint8)
    np.testing.assert_array_equal(label, expected)
    annotated = adapter.policy(case).annotated_vector()
    assert annotated.tolist() == [True, False, False, policy == "tumour_as_lesion", False, policy == "tumour_as_class",
                                  False, False]


def test_msd_harmonizes_with_ignore(phantom_root):
    adapter = SOURCES["msd_lung"](phantom_root / "msd_lung")
    case = next(c for c in adapter.discover() if c.labelled)
    h = harmonize_case(case, adapter.policy(case), HarmonizerConfig())
    assert set(np.unique(h.label).tolist()) <= {0, IGNORE} and (h.label == IGNORE).any()
    assert h.meta["policy"] == "msd_lung/tumour_ignored" and h.meta["annotated"] == [True] + [False] * 7


def test_msd_missing_label_and_orphan_label_are_problems(tmp_path, phantom_root):
    shutil.copytree(phantom_root / "msd_lung", tmp_path / "msd_lung")
    task = tmp_path / "msd_lung" / "Task06_Lung"
    (task / "labelsTr" / "lung_003.nii.gz").unlink()
    shutil.copy(task / "labelsTr" / "lung_004.nii.gz", task / "labelsTr" / "lung_099.nii.gz")
    adapter = SOURCES["msd_lung"](tmp_path / "msd_lung")
    ids = {c.case_id for c in adapter.discover()}
    assert ids == {"lung_001", "lung_002", "lung_004"}
    missing, orphan = adapter.problems
    assert missing.file.endswith("imagesTr/lung_003.nii.gz") and "no labelsTr/lung_003" in missing.message
    assert orphan.file.endswith("labelsTr/lung_099.nii.gz") and "without an image" in orphan.message


def test_msd_dataset_json_with_other_labels_is_reported(tmp_path, phantom_root):
    shutil.copytree(phantom_root / "msd_lung", tmp_path / "download" / "msd_lung")   # nested one level deeper
    path = tmp_path / "download" / "msd_lung" / "Task06_Lung" / "dataset.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    meta["labels"] = {"0": "background", "1": "cancer", "2": "effusion"}
    path.write_text(json.dumps(meta), encoding="utf-8")
    adapter = SOURCES["msd_lung"](tmp_path / "download")
    cases = adapter.discover()
    assert [c.case_id for c in cases] == ["lung_002"] and not cases[0].labelled   # only imagesTs left
    (problem,) = adapter.problems
    assert problem.file.endswith("dataset.json") and "2: 'effusion'" in problem.message


def test_msd_missing_layout_names_folder(tmp_path):
    (tmp_path / "msd_lung" / "Task06_Lung").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match=r"msd_lung: no Task06_Lung folder with imagesTr/ found under .*msd_lung"):
        SOURCES["msd_lung"](tmp_path / "msd_lung").discover()
    with pytest.raises(ValueError, match="unknown label policy"):
        SOURCES["msd_lung"](tmp_path / "msd_lung", policy="lesion")


# ------------------------------------------------------------------------------------------- StructSeg
def test_structseg_finds_exactly_the_written_cases(phantom_root, manifests):
    adapter = SOURCES["structseg"](phantom_root / "structseg")
    cases = adapter.discover()
    written = {r["case"]: r for r in manifests["structseg"]["cases"]}
    assert sorted(c.case_id for c in cases) == sorted(written) == ["gtv_1", "gtv_2", "oar_1", "oar_2", "oar_3"]
    assert adapter.problems == []
    for c in cases:
        assert c.labelled and c.patient_id == written[c.case_id]["patient"] == c.case_id
        task = "Thoracic_OAR" if c.case_id.startswith("oar_") else "Lung_GTV"
        assert c.meta["task"] == task == written[c.case_id]["task"]
        assert c.image.name == "data.nii.gz" and c.label.name == "label.nii.gz"
        assert c.image.parent.parent.name == task and c.image.parent.name == c.case_id.split("_")[1]
        assert c.policy == ("gtv_ignored" if task == "Lung_GTV" else
                            "oar_swapped" if written[c.case_id]["swapped_lungs"] else "oar")


def test_structseg_swap_check_flags_exactly_the_planted_case(phantom_root, manifests, caplog):
    planted = {r["case"] for r in manifests["structseg"]["cases"] if r.get("swapped_lungs")}
    assert planted == {"oar_2"}
    with caplog.at_level("WARNING"):
        cases = SOURCES["structseg"](phantom_root / "structseg").discover()
    flagged = {c.case_id for c in cases if c.meta["warnings"]}
    assert flagged == planted == {c.case_id for c in cases if c.policy == "oar_swapped"}
    assert "lungs swapped" in cases[[c.case_id for c in cases].index("oar_2")].meta["warnings"][0]
    assert "oar_2" in caplog.text or "Thoracic_OAR/2/label" in caplog.text


@pytest.mark.parametrize("case_id", ["oar_1", "oar_2"])
def test_structseg_oar_remap_matches_truth_lungs(phantom_root, case_id):
    adapter = SOURCES["structseg"](phantom_root / "structseg")
    case = next(c for c in adapter.discover() if c.case_id == case_id)
    raw, affine = read_volume(case.label)
    raw = to_canonical(raw, affine)[0]
    truth_lung = _truth(phantom_root, "structseg", case_id, "lung")   # 1 left, 2 right, RAS
    assert {3, 5, 6} <= set(np.unique(raw).tolist())   # heart, airway, spinal canal written (no esophagus: 4)
    label = _canonical_label(adapter, case)
    # Hand-written expectation: lungs -> 1 left / 2 right (whatever the stored codes), every organ -> 0.
    expected = np.select([truth_lung == 1, truth_lung == 2], [1, 2], 0).astype(np.uint8)
    np.testing.assert_array_equal(label, expected)
    assert not np.isin(label[np.isin(raw, [3, 4, 5, 6])], [1, 2, 3]).any()
    stored_left = 2 if case_id == "oar_2" else 1
    assert (raw[truth_lung == 1] == stored_left).all()


@pytest.mark.parametrize("policy, code", [(None, IGNORE), ("gtv_as_lesion", LESION)])
def test_structseg_gtv_policy_by_config(phantom_root, policy, code):
    adapter = SOURCES["structseg"](phantom_root / "structseg", policy=policy)
    cases = {c.case_id: c for c in adapter.discover()}
    assert cases["gtv_1"].policy == (policy or "gtv_ignored")
    assert cases["oar_1"].policy == "oar"   # the GTV choice leaves the OAR cases alone
    label = _canonical_label(adapter, cases["gtv_1"])
    tumour = _truth(phantom_root, "structseg", "gtv_1", "tumour") > 0
    np.testing.assert_array_equal(label, np.where(tumour, code, 0).astype(np.uint8))


def test_structseg_rejects_oar_policy_in_config(phantom_root):
    with pytest.raises(ValueError, match="Lung_GTV policy"):
        SOURCES["structseg"](phantom_root / "structseg", policy="oar_swapped")


def test_structseg_missing_label_and_non_lung_largest_are_problems(tmp_path, phantom_root):
    shutil.copytree(phantom_root / "structseg", tmp_path / "structseg")
    root = tmp_path / "structseg"
    (root / "Lung_GTV" / "2" / "label.nii.gz").unlink()
    # oar_3 with the heart grown over the right lung: the two largest classes are no longer 1 and 2.
    import nibabel as nib
    img = nib.load(str(root / "Thoracic_OAR" / "3" / "label.nii.gz"))
    arr = np.asanyarray(img.dataobj).copy()
    arr[arr == 2] = 3
    nib.save(nib.Nifti1Image(arr, img.affine), str(root / "Thoracic_OAR" / "3" / "label.nii.gz"))
    # uncompressed `.nii` is accepted as well
    gz = nib.load(str(root / "Lung_GTV" / "1" / "data.nii.gz"))
    nib.save(gz, str(root / "Lung_GTV" / "1" / "data.nii"))
    (root / "Lung_GTV" / "1" / "data.nii.gz").unlink()
    adapter = SOURCES["structseg"](root)
    cases = {c.case_id: c for c in adapter.discover()}
    assert set(cases) == {"oar_1", "oar_2", "gtv_1"}
    assert cases["gtv_1"].image.name == "data.nii"
    missing, wrong = sorted(adapter.problems, key=lambda p: p.file)
    assert missing.file.endswith("Lung_GTV/2/data.nii.gz") and "no label" in missing.message
    assert wrong.file.endswith("Thoracic_OAR/3/label.nii.gz") and "not the lungs 1 and 2" in wrong.message


def test_structseg_missing_layout_names_folder(tmp_path):
    (tmp_path / "structseg" / "Thoracic").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match=r"structseg: no Thoracic_OAR/ or Lung_GTV/ folder found under .*structseg"):
        SOURCES["structseg"](tmp_path / "structseg").discover()
