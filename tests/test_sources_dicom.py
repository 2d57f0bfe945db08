"""DICOM sources (NSCLC-Radiomics + PleThora, COVID-19-AR) read from the phantom's NBIA layouts."""
import json
import shutil

import numpy as np
import pytest

from datamodules.io import read_volume
from datamodules.label_policy import IGNORE
from datamodules.sources import SOURCES
from datamodules.sources.nsclc import dicom_files, dicom_geometry


@pytest.fixture(scope="module")
def nsclc(phantom_root):
    adapter = SOURCES["nsclc"](phantom_root / "nsclc")
    return adapter, {c.case_id: c for c in adapter.discover()}


@pytest.fixture(scope="module")
def ar(phantom_root):
    adapter = SOURCES["covid19_ar"](phantom_root / "covid19_ar")
    return adapter, {c.case_id: c for c in adapter.discover()}


def test_nsclc_finds_the_written_patients_and_aligns_the_reversed_mask(nsclc, manifests, phantom_root):
    from datamodules.harmonize import load_original
    from datamodules.io import read_volume

    adapter, cases = nsclc
    rows = {r["case"]: r for r in manifests["nsclc"]["cases"]}
    reversed_ = [cid for cid, r in rows.items() if r["cavity_z_reversed"]]
    assert len(reversed_) == 1
    assert sorted(cases) == sorted(rows) and not adapter.problems
    for cid, c in cases.items():
        assert c.patient_id == rows[cid]["patient"] == cid
        assert c.labelled == rows[cid]["labelled"]
        assert c.image.is_dir() and c.image.name == rows[cid]["series_folder"].split("/")[-1]
    assert any(not c.labelled for c in cases.values()) and any(c.labelled for c in cases.values())
    # The RPI/RAI mask is kept with a warning and reoriented onto the series grid by its header.
    case = cases[reversed_[0]]
    (warning,) = case.meta["warnings"]
    assert "reversed" in warning and rows[reversed_[0]]["cavity_file"].split("/")[-1] in warning
    hu, label, affine = load_original(case, adapter.policy(case))
    stored, _ = read_volume(case.label)
    assert label.shape == hu.shape
    np.testing.assert_array_equal(label, adapter.policy(case).remap(stored[:, :, ::-1]))
    assert not np.array_equal(label, adapter.policy(case).remap(stored))  # the reversal mattered


def test_nsclc_earliest_study_ct_series_and_effusions(nsclc, manifests):
    _, cases = nsclc
    rows = {r["case"]: r for r in manifests["nsclc"]["cases"]}
    decoyed = [cid for cid, r in rows.items() if r["decoys"]]
    assert decoyed
    for cid in decoyed:   # a later study sorting first as text, and a SEG series beside the CT
        note = cases[cid].meta["series_note"]
        assert "earliest of 2 studies" in note and "Segmentation" in note
    for cid, c in cases.items():
        eff = c.meta["effusion_mask"]
        if rows[cid]["effusion"]:
            assert [p.name for p in eff] == [f"{cid}_effusion_first_reviewer.nii.gz",
                                             f"{cid}_effusion_second_reviewer.nii.gz"]
            assert all(p.is_file() for p in eff)
        else:
            assert eff == []


def test_nsclc_cavity_is_ignored_never_lung(nsclc):
    adapter, cases = nsclc
    case = next(c for c in cases.values() if c.labelled)
    policy = adapter.policy(case)
    assert policy.name == "nsclc/cavity_ignored" and policy.annotated == ()
    vec = policy.annotated_vector().tolist()
    assert vec[0] and not any(vec[1:])   # nothing annotated: the cavity never counts as lung
    raw, _ = read_volume(case.label)
    assert set(np.unique(raw).tolist()) == {0, 1}
    out = policy.remap(raw, where=str(case.label))
    assert set(np.unique(out).tolist()) == {0, IGNORE}
    assert (out == IGNORE).sum() == (raw == 1).sum()


def test_dicom_volume_geometry_is_the_written_truth(nsclc, ar, manifests):
    for source, (_, cases) in (("nsclc", nsclc), ("covid19_ar", ar)):
        rows = {r["case"]: r for r in manifests[source]["cases"]}
        for cid, case in cases.items():
            arr, affine = read_volume(case.image)
            assert list(arr.shape) == rows[cid]["shape_stored"], cid
            np.testing.assert_allclose(affine, np.array(rows[cid]["affine_stored"]), atol=1e-3)
            assert arr.min() >= -1024 and arr.max() <= 3071
            shape, cheap = dicom_geometry(dicom_files(case.image))   # the adapter's two-header geometry
            assert shape == arr.shape
            np.testing.assert_allclose(cheap, affine, atol=1e-3)


def test_covid19_ar_ct_only_patients_and_clinical(ar, manifests):
    adapter, cases = ar
    rows = {r["case"]: r for r in manifests["covid19_ar"]["cases"]}
    assert sorted(cases) == sorted(rows)
    assert not adapter.problems
    for cid, c in cases.items():
        assert c.patient_id == rows[cid]["patient"] and not c.labelled
    patients = {c.patient_id for c in cases.values()}
    multi = [p for p in patients if sum(c.patient_id == p for c in cases.values()) > 1]
    assert len(multi) == 1 and {f"{multi[0]}_1", f"{multi[0]}_2"} <= set(cases)
    # The CR radiograph series is skipped (counted, not a case).
    assert sum(n.get("CR", 0) for n in adapter.skipped.values()) == 1
    cr_patient = next(iter(adapter.skipped))
    assert all(c.meta["skipped_series"] == {"CR": 1} for c in cases.values() if c.patient_id == cr_patient)
    assert not any("XR" in c.image.parent.name for c in cases.values())
    for c in cases.values():
        clin = c.meta["clinical"]
        assert clin["patient_id"] == c.patient_id
        assert {"icu_admit", "num_icu_admits", "mortality", "age", "sex"} <= set(clin)
        assert all(k == k.lower() for k in clin)


def test_harmonize_runs_on_dicom_cases(nsclc, ar):
    from datamodules.harmonize import HarmonizerConfig, harmonize_case

    cfg = HarmonizerConfig()
    adapter, cases = nsclc
    case = next(c for c in cases.values() if c.labelled)
    h = harmonize_case(case, adapter.policy(case), cfg)
    assert h.label is not None and set(np.unique(h.label).tolist()) <= {0, IGNORE} and (h.label == IGNORE).any()
    assert h.meta["policy"] == "nsclc/cavity_ignored" and h.meta["annotated"][0] and not any(h.meta["annotated"][1:])
    assert h.image.shape == h.label.shape
    adapter, cases = ar
    case = next(iter(cases.values()))
    h = harmonize_case(case, adapter.policy(case), cfg)
    assert h.label is None and np.isfinite(h.image).all()


def test_nsclc_known_bad_and_orphan_masks(tmp_path, phantom_root, nsclc):
    _, cases = nsclc
    src = phantom_root / "nsclc"
    dst = tmp_path / "nsclc"
    shutil.copytree(src, dst)
    coll = next(dst.glob("manifest-*/NSCLC-Radiomics"))
    unlabelled = next(c for c in cases.values() if not c.labelled).case_id
    shutil.copytree(coll / unlabelled, coll / "LUNG1-014")
    orphan = dst / "Thoracic_Cavities" / "LUNG1-300"
    orphan.mkdir()
    first = next((dst / "Thoracic_Cavities").glob("*/*_thor_cav_primary_reviewer.nii.gz"))
    shutil.copy(first, orphan / "LUNG1-300_thor_cav_primary_reviewer.nii.gz")
    adapter = SOURCES["nsclc"](dst)
    found = {c.case_id for c in adapter.discover()}
    assert found == set(cases)
    msgs = {p.file: p.message for p in adapter.problems}
    assert "known bad case" in msgs[str(coll / "LUNG1-014")]
    assert "no image" in msgs[str(orphan / "LUNG1-300_thor_cav_primary_reviewer.nii.gz")]


def test_verify_lists_counts_and_the_planted_problem(phantom_root, manifests, capsys):
    from datamodules.verify import main as verify_main

    rc = verify_main(["--root", str(phantom_root), "--json", "--sources", "nsclc,covid19_ar"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0   # the planted RPI/RAI mask is aligned by its header, not a problem
    n = report["sources"]["nsclc"]
    rows = manifests["nsclc"]["cases"]
    assert n["cases"] == len(rows) and n["n_patients"] == len(rows)
    assert n["labelled"] == sum(r["labelled"] for r in rows)
    assert n["codes_seen"] == {"0": n["labelled"], "1": n["labelled"]} and n["codes_declared"] == [0, 1]
    a = report["sources"]["covid19_ar"]
    ar_rows = manifests["covid19_ar"]["cases"]
    assert a["cases"] == len(ar_rows) and a["labelled"] == 0
    assert a["n_patients"] == len({r["patient"] for r in ar_rows})
    assert report["problems"] == []
