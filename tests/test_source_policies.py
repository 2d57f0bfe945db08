"""data.policies overrides that choose which mask file a case is read from.

COVID-19-CT-Seg: `lung` / `infection` / `lung_and_infection` pick the mask folder (Ma et al.'s three
subtasks). NSCLC-Radiomics: `effusion_as_lesion` / `effusion_as_class` read the PleThora effusion mask
(first reviewer, else second) instead of the thoracic cavity, through the same RPI/RAI geometry check.
"""
import shutil

import nibabel as nib
import numpy as np
import pytest

from datamodules.harmonize import HarmonizerConfig, harmonize_case, load_original
from datamodules.io import read_volume
from datamodules.label_policy import CLASS_INDEX, LESION, LabelError
from datamodules.sources import SOURCES, policy_named

LUNGS = (CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"])
EFFUSION = CLASS_INDEX["effusion"]
CTSEG_FOLDERS = {"lung": "Lung_Mask", "infection": "Infection_Mask", "lung_and_infection": "Lung_and_Infection_Mask"}


def _raw(path) -> np.ndarray:
    """A mask file as stored, read with nibabel (not the project's reader)."""
    return np.asanyarray(nib.load(str(path)).dataobj)


# ------------------------------------------------------------------------------------------ ctseg
@pytest.fixture(scope="module")
def ctseg_cases(phantom_root):
    out = {}
    for policy in CTSEG_FOLDERS:
        adapter = SOURCES["ctseg"](phantom_root / "ctseg", policy=policy)
        out[policy] = adapter, {c.case_id: c for c in adapter.discover()}
    return out


@pytest.mark.parametrize("policy", list(CTSEG_FOLDERS))
def test_ctseg_override_chooses_the_mask_folder(phantom_root, manifests, ctseg_cases, policy):
    adapter, cases = ctseg_cases[policy]
    assert not adapter.problems
    assert sorted(cases) == sorted(r["case"] for r in manifests["ctseg"]["cases"])
    for cid, case in cases.items():
        assert case.policy == policy and adapter.policy(case).name == f"ctseg/{policy}"
        assert case.label == phantom_root / "ctseg" / CTSEG_FOLDERS[policy] / f"{cid}.nii.gz"


@pytest.mark.parametrize("policy", list(CTSEG_FOLDERS))
def test_ctseg_override_decodes_the_chosen_mask(phantom_root, ctseg_cases, policy):
    adapter, cases = ctseg_cases[policy]
    for cid, case in sorted(cases.items())[:3]:   # coronacases and 8-bit radiopaedia ones
        _, label, _ = load_original(case, adapter.policy(case))
        infection = _raw(phantom_root / "ctseg" / "Infection_Mask" / f"{cid}.nii.gz")
        lung = _raw(phantom_root / "ctseg" / "Lung_Mask" / f"{cid}.nii.gz")
        assert (infection == 1).any() and lung.any()
        lung_voxels = np.isin(label, LUNGS)
        if policy == "lung":   # the official Lung_Mask: lungs include the infection, no lesion class
            assert lung_voxels.sum() == np.count_nonzero(lung)
            np.testing.assert_array_equal(lung_voxels, lung > 0)
            assert not (label == LESION).any()
        else:
            assert (label == LESION).sum() == (infection == 1).sum()
            np.testing.assert_array_equal(label == LESION, infection == 1)
        if policy == "infection":
            assert not lung_voxels.any()
        if policy == "lung_and_infection":   # the lesion is carved out of the lungs
            assert lung_voxels.sum() == np.count_nonzero(lung) - (infection == 1).sum()


def test_ctseg_without_override_is_unchanged(phantom_root):
    adapter = SOURCES["ctseg"](phantom_root / "ctseg")
    cases = adapter.discover()
    assert adapter.override is None and not adapter.problems
    assert all(c.policy == "lung_and_infection" and c.label.parent.name == "Lung_and_Infection_Mask" for c in cases)


def test_ctseg_missing_chosen_mask_is_unlabelled_and_a_problem(tmp_path, phantom_root):
    shutil.copytree(phantom_root / "ctseg", tmp_path / "ctseg")
    gone = sorted((tmp_path / "ctseg" / "Lung_Mask").glob("*.nii.gz"))[1]
    gone.unlink()
    cid = gone.name[: -len(".nii.gz")]
    adapter = SOURCES["ctseg"](tmp_path / "ctseg", policy="lung")
    cases = {c.case_id: c for c in adapter.discover()}
    assert not cases[cid].labelled and cases[cid].policy is None      # kept, image only
    assert cases[cid].image.is_file()
    assert all(c.labelled and c.label.parent.name == "Lung_Mask" for k, c in cases.items() if k != cid)
    (problem,) = adapter.problems
    assert problem.file == str(gone) and "Lung_Mask" in problem.message and "unlabelled" in problem.message
    # the other masks of that case are never used in its place
    assert (tmp_path / "ctseg" / "Lung_and_Infection_Mask" / gone.name).is_file()
    # without an override the case still gets its richest mask, and nothing is a problem
    plain = SOURCES["ctseg"](tmp_path / "ctseg")
    assert all(c.labelled for c in plain.discover()) and not plain.problems


def test_ctseg_missing_chosen_folder_is_one_problem(tmp_path, phantom_root):
    for name in ("COVID-19-CT-Seg_20cases", "Lung_and_Infection_Mask"):
        shutil.copytree(phantom_root / "ctseg" / name, tmp_path / "ctseg" / name)
    adapter = SOURCES["ctseg"](tmp_path / "ctseg", policy="infection")
    cases = adapter.discover()
    assert cases and not any(c.labelled for c in cases)
    (problem,) = adapter.problems
    assert problem.file == str(tmp_path / "ctseg" / "Infection_Mask") and f"all {len(cases)} cases" in problem.message


def _kaggle_tree(src, root, n=2):
    """Kaggle andrewmvd/covid19-ct-scans: `_org_` image names, lower-case mask folders, float .nii masks."""
    images = sorted((src / "COVID-19-CT-Seg_20cases").glob("*.nii.gz"))[:n]
    for image in images:
        cid = image.name[: -len(".nii.gz")]
        (root / "ct_scans").mkdir(parents=True, exist_ok=True)
        img = nib.load(str(image))
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine),
                 str(root / "ct_scans" / f"{cid.replace('coronacases_', 'coronacases_org_')}.nii"))
        for folder in CTSEG_FOLDERS.values():
            m = nib.load(str(src / folder / image.name))
            noisy = np.asanyarray(m.dataobj).astype(np.float32)
            noisy += np.float32(0.004) * (noisy > 0)   # interpolation residue
            (root / folder.lower()).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(noisy, m.affine), str(root / folder.lower() / f"{cid}.nii"))
    return [i.name[: -len(".nii.gz")] for i in images]


@pytest.mark.parametrize("override", ["lung", "kaggle_lung", "infection"])
def test_ctseg_kaggle_mirror_accepts_plain_and_prefixed_names(tmp_path, phantom_root, override):
    ids = _kaggle_tree(phantom_root / "ctseg", tmp_path / "ctseg" / "covid19-ct-scans")
    adapter = SOURCES["ctseg"](tmp_path / "ctseg", policy=override)
    cases = adapter.discover()
    base = override.removeprefix("kaggle_")
    assert sorted(c.case_id for c in cases) == sorted(ids) and not adapter.problems
    for case in cases:
        assert case.policy == f"kaggle_{base}" and case.label.parent.name == CTSEG_FOLDERS[base].lower()
        policy = adapter.policy(case)
        assert policy.float_tolerance == 0.5
        _, label, _ = load_original(case, policy)
        expected = SOURCES["ctseg"].POLICIES[base].remap(_raw(phantom_root / "ctseg" / CTSEG_FOLDERS[base]
                                                              / f"{case.case_id}.nii.gz"))
        np.testing.assert_array_equal(label, expected)


def test_ctseg_override_flows_through_discover_sources(phantom_root):
    from datamodules.datamodule import discover_sources

    cases, adapters = discover_sources(phantom_root, ["ctseg"], "fail", {"ctseg": "infection"})
    assert all(c.policy == "infection" and c.label.parent.name == "Infection_Mask" for c in cases)
    assert adapters["ctseg"].policy(cases[0]) is policy_named("ctseg/infection")


# ------------------------------------------------------------------------------------------ nsclc
def _effusion_rows(manifests):
    return {r["case"] for r in manifests["nsclc"]["cases"] if r["effusion"]}


@pytest.fixture(scope="module")
def nsclc_effusion(phantom_root):
    adapter = SOURCES["nsclc"](phantom_root / "nsclc", policy="effusion_as_lesion")
    return adapter, {c.case_id: c for c in adapter.discover()}


def test_nsclc_effusion_as_lesion_labels_exactly_the_effusion_cases(nsclc_effusion, manifests, phantom_root):
    adapter, cases = nsclc_effusion
    rows = {r["case"]: r for r in manifests["nsclc"]["cases"]}
    with_effusion = _effusion_rows(manifests)
    assert with_effusion and not adapter.problems
    assert sorted(cases) == sorted(rows)        # every patient stays a case; the others image-only
    assert {cid for cid, c in cases.items() if c.labelled} == with_effusion
    assert any(rows[cid]["labelled"] for cid in cases if cid not in with_effusion)   # had a cavity mask
    for cid in with_effusion:
        case = cases[cid]
        assert case.label == phantom_root / "nsclc" / "Effusions" / cid / f"{cid}_effusion_first_reviewer.nii.gz"
        assert case.policy == "effusion_as_lesion" and case.meta["effusion_reviewer"] == "first"
        policy = adapter.policy(case)
        assert policy.name == "nsclc/effusion_as_lesion" and policy.annotated == ("lesion",)
        vec = policy.annotated_vector()
        assert vec[LESION] and not vec[list(LUNGS)].any() and not vec[EFFUSION]
        hu, label, _ = load_original(case, policy)
        raw = _raw(case.label)
        assert set(np.unique(raw).tolist()) == {0, 1}
        assert label.shape == hu.shape and set(np.unique(label).tolist()) == {0, LESION}
        assert (label == LESION).sum() == np.count_nonzero(raw)
    for cid, case in cases.items():
        if cid not in with_effusion:
            assert case.label is None and case.policy is None and "effusion_reviewer" not in case.meta


def test_nsclc_default_policy_still_reads_the_cavity(phantom_root, manifests):
    adapter = SOURCES["nsclc"](phantom_root / "nsclc")
    cases = {c.case_id: c for c in adapter.discover()}
    for cid in _effusion_rows(manifests):
        assert "thor_cav" in cases[cid].label.name and cases[cid].policy == "cavity_ignored"


def test_nsclc_effusion_as_lesion_harmonizes(nsclc_effusion):
    adapter, cases = nsclc_effusion
    case = next(c for c in cases.values() if c.labelled)
    h = harmonize_case(case, adapter.policy(case), HarmonizerConfig())
    assert (h.label == LESION).any() and set(np.unique(h.label).tolist()) <= {0, LESION}
    assert h.meta["policy"] == "nsclc/effusion_as_lesion" and h.meta["annotated"][LESION]


def test_nsclc_effusion_as_class(phantom_root, manifests):
    adapter = SOURCES["nsclc"](phantom_root / "nsclc", policy="effusion_as_class")
    cases = [c for c in adapter.discover() if c.labelled]
    assert {c.case_id for c in cases} == _effusion_rows(manifests)
    for case in cases:
        _, label, _ = load_original(case, adapter.policy(case))
        assert (label == EFFUSION).sum() == np.count_nonzero(_raw(case.label)) and not (label == LESION).any()


def _nsclc_copy(tmp_path, phantom_root):
    dst = tmp_path / "nsclc"
    shutil.copytree(phantom_root / "nsclc", dst)
    return dst


def test_nsclc_second_reviewer_only_without_the_first(tmp_path, phantom_root, manifests):
    dst = _nsclc_copy(tmp_path, phantom_root)
    (cid,) = sorted(_effusion_rows(manifests))[:1]
    (dst / "Effusions" / cid / f"{cid}_effusion_first_reviewer.nii.gz").unlink()
    adapter = SOURCES["nsclc"](dst, policy="effusion_as_lesion")
    case = next(c for c in adapter.discover() if c.case_id == cid)
    assert case.label == dst / "Effusions" / cid / f"{cid}_effusion_second_reviewer.nii.gz"
    assert case.meta["effusion_reviewer"] == "second" and not adapter.problems


def test_nsclc_effusion_of_a_patient_without_cavity_mask_is_labelled(tmp_path, phantom_root, manifests):
    dst = _nsclc_copy(tmp_path, phantom_root)
    rows = manifests["nsclc"]["cases"]
    donor = sorted(_effusion_rows(manifests))[0]
    bare = next(r["case"] for r in rows if not r["labelled"] and not r["effusion"])
    # an effusion mask drawn on the bare patient's own grid (the donor's would not fit it)
    bare_case = next(c for c in SOURCES["nsclc"](dst).discover() if c.case_id == bare)
    hu, affine = read_volume(bare_case.image)
    mask = np.zeros(hu.shape, np.uint8)
    mask[10:20, 10:20, 5:9] = 1
    (dst / "Effusions" / bare).mkdir()
    path = dst / "Effusions" / bare / f"{bare}_effusion_second_reviewer.nii.gz"
    nib.save(nib.Nifti1Image(mask, affine), str(path))
    adapter = SOURCES["nsclc"](dst, policy="effusion_as_lesion")
    cases = {c.case_id: c for c in adapter.discover()}
    assert not adapter.problems
    assert {cid for cid, c in cases.items() if c.labelled} == {donor, bare}
    _, label, _ = load_original(cases[bare], adapter.policy(cases[bare]))
    assert (label == LESION).sum() == mask.sum() == 400


def test_nsclc_effusion_goes_through_the_rpi_rai_geometry_check(tmp_path, phantom_root, manifests):
    dst = _nsclc_copy(tmp_path, phantom_root)
    cid = sorted(_effusion_rows(manifests))[0]
    path = dst / "Effusions" / cid / f"{cid}_effusion_first_reviewer.nii.gz"
    img = nib.load(str(path))
    stored = np.asanyarray(img.dataobj)
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1.0, stored.shape[2] - 1
    # same world positions, slices stored the other way round (PleThora RPI vs DICOM RAI)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(stored[:, :, ::-1]), img.affine @ flip), str(path))
    adapter = SOURCES["nsclc"](dst, policy="effusion_as_lesion")
    case = next(c for c in adapter.discover() if c.case_id == cid)
    assert not adapter.problems
    (warning,) = case.meta["warnings"]
    assert "reversed" in warning and path.name in warning
    policy = adapter.policy(case)
    _, label, _ = load_original(case, policy)
    np.testing.assert_array_equal(label, policy.remap(stored))   # back on the series' grid
    assert (label == LESION).sum() == np.count_nonzero(stored)

    # a mask on another grid cannot be verified: a problem naming it, the case left out
    nib.save(nib.Nifti1Image(stored[:, :, :-1], img.affine), str(path))
    adapter = SOURCES["nsclc"](dst, policy="effusion_as_lesion")
    assert cid not in {c.case_id for c in adapter.discover()}
    (problem,) = adapter.problems
    assert problem.file == str(path) and "mask grid differs" in problem.message


def test_nsclc_effusion_codes_are_validated(tmp_path, phantom_root, manifests):
    dst = _nsclc_copy(tmp_path, phantom_root)
    cid = sorted(_effusion_rows(manifests))[0]
    path = dst / "Effusions" / cid / f"{cid}_effusion_first_reviewer.nii.gz"
    img = nib.load(str(path))
    stored = np.asanyarray(img.dataobj).copy()
    stored[stored > 0] = 2   # an undeclared code is reported, never silently merged into the lesion
    nib.save(nib.Nifti1Image(stored, img.affine), str(path))
    adapter = SOURCES["nsclc"](dst, policy="effusion_as_lesion")
    case = next(c for c in adapter.discover() if c.case_id == cid)
    with pytest.raises(LabelError, match=r"codes \[2\] not declared by policy 'nsclc/effusion_as_lesion'"):
        load_original(case, adapter.policy(case))


def test_nsclc_unknown_policy_is_refused(phantom_root):
    with pytest.raises(ValueError, match="unknown label policy 'effusion'"):
        SOURCES["nsclc"](phantom_root / "nsclc", policy="effusion")
