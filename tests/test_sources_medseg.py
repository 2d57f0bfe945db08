"""MedSeg COVID-19 adapter on the tiny phantom tree: the rp volumes are the 3D cases, the 2D slice stack is
listed separately, GGO and consolidation both become lesion and pleural effusion is ignored."""
import json
import shutil

import numpy as np
import pytest

from datamodules.harmonize import HarmonizerConfig, decode_intensity, harmonize_case
from datamodules.io import read_volume
from datamodules.label_policy import CLASS_INDEX, CLASSES, IGNORE, LESION
from datamodules.sources import SOURCES, DataLayoutError, policy_named
from datamodules.sources.medseg import fine_labels


@pytest.fixture(scope="module")
def medseg(phantom_root):
    return phantom_root / "medseg"


@pytest.fixture(scope="module")
def rows(phantom_root):
    return {r["case"]: r for r in json.loads((phantom_root / "medseg.json").read_text(encoding="utf-8"))["cases"]}


def test_discover_returns_exactly_the_rp_volumes(medseg, rows):
    adapter = SOURCES["medseg"](medseg)
    cases = adapter.discover()
    assert [c.case_id for c in cases] == ["rp_1", "rp_2", "rp_3"] == sorted(k for k in rows if k.startswith("rp_"))
    assert adapter.problems == []
    for c in cases:
        n = c.case_id[3:]
        assert c.labelled and c.policy == "lesion" and c.patient_id == c.case_id
        assert (c.image.parent.name, c.image.name) == ("rp_im", f"{n}.nii.gz")
        assert (c.label.parent.name, c.label.name) == ("rp_msk", f"{n}.nii.gz")
        assert c.meta["lung_mask"] == medseg / "rp_lung_msk" / f"{n}.nii.gz"
        assert c.encoding == "hu" and c.window is None and c.image_flips == ()
        assert not c.meta["two_d"]


def test_slices_are_2d_cases_of_the_stacks(medseg):
    adapter = SOURCES["medseg"](medseg)
    cases = adapter.slices()
    assert [c.case_id for c in cases] == [f"tr_{k:03d}" for k in range(6)] + ["val_000", "val_001"]
    assert adapter.problems == []
    for c in cases:
        tr = c.case_id.startswith("tr_")
        assert c.image == medseg / ("tr_im.nii.gz" if tr else "val_im.nii.gz")
        assert c.label == (medseg / "tr_mask.nii.gz" if tr else None)
        assert c.policy == ("lesion" if tr else None)
        assert c.meta["two_d"] and c.meta["stack"] and c.meta["intensity"] == "jpg-derived"
        assert c.meta["slice"] == int(c.case_id.split("_")[1])
        assert c.encoding == "jpg-derived"   # no decoder accepts it: never read as HU by accident
    with pytest.raises(ValueError, match="unknown intensity encoding 'jpg-derived'"):
        decode_intensity(np.zeros(2), cases[0].encoding)
    # The stack files hold one slice per case; the JPG-like grey levels are 0..255, not HU.
    img, _ = read_volume(medseg / "tr_im.nii.gz")
    assert img.shape[2] == 6 and img.min() >= 0 and img.max() <= 255


def test_policy_merges_ggo_and_consolidation_and_ignores_effusion(medseg, rows):
    pol = policy_named("medseg/lesion")
    assert pol.annotated == ("lesion",)
    np.testing.assert_array_equal(pol.remap(np.array([0, 1, 2, 3])), [0, LESION, LESION, IGNORE])
    assert (LESION, IGNORE) == (3, 254)
    # The planted case: rp_2 carries all of GGO, consolidation and effusion.
    eff_case = [k for k, r in rows.items() if k.startswith("rp_") and r["effusion_voxels"]]
    assert eff_case == ["rp_2"] and rows["rp_2"]["ggo_voxels"] and rows["rp_2"]["consolidation_voxels"]
    adapter = SOURCES["medseg"](medseg)
    case = next(c for c in adapter.discover() if c.case_id == "rp_2")
    raw, _ = read_volume(case.label)
    mapped = adapter.policy(case).remap(raw, where=str(case.label))
    expected = {0: 0, 1: 3, 2: 3, 3: 254}   # hand-written: bg, GGO -> lesion, consolidation -> lesion, effusion
    for code, want in expected.items():
        voxel = tuple(np.argwhere(raw == code)[0])
        assert mapped[voxel] == want, (code, voxel)
    assert set(np.unique(mapped).tolist()) == {0, LESION, IGNORE}
    # Effusion is exactly the planted fluid (stored RAS, no flips: the truth grid) and lies outside the lung mask.
    eff_truth, _ = read_volume(medseg.parent / "_truth" / "medseg" / "rp_2_effusion.nii.gz")
    np.testing.assert_array_equal(raw == 3, eff_truth > 0)
    lung, _ = read_volume(case.meta["lung_mask"])
    assert set(np.unique(lung).tolist()) == {0, 1} and not (lung[raw == 3] > 0).any()
    fine = fine_labels(raw)
    assert sorted(fine) == ["consolidation", "ggo", "pleural_effusion"]
    assert int(fine["ggo"].sum()) == rows["rp_2"]["ggo_voxels"]
    assert int(fine["pleural_effusion"].sum()) == rows["rp_2"]["effusion_voxels"]


def test_stack_mask_has_all_three_codes(medseg, rows):
    raw, _ = read_volume(medseg / "tr_mask.nii.gz")
    assert set(np.unique(raw).tolist()) == {0, 1, 2, 3}
    assert rows["tr_001"]["effusion_voxels"] and 3 in np.unique(raw[:, :, 1])
    mapped = policy_named("medseg/lesion").remap(raw)
    assert (mapped[raw == 3] == IGNORE).all() and (mapped[(raw == 1) | (raw == 2)] == LESION).all()


def test_missing_rp_mask_and_orphan_mask_are_problems(tmp_path, medseg):
    # Nested one level deeper, as an unzip may leave it.
    root = tmp_path / "download" / "medseg"
    shutil.copytree(medseg, root)
    (root / "rp_msk" / "2.nii.gz").unlink()
    shutil.copy(root / "rp_msk" / "3.nii.gz", root / "rp_msk" / "7.nii.gz")
    adapter = SOURCES["medseg"](tmp_path)
    assert [c.case_id for c in adapter.discover()] == ["rp_1", "rp_3"]
    msgs = [str(p) for p in adapter.problems]
    assert len(msgs) == 2
    assert str(root / "rp_im" / "2.nii.gz") in msgs[0] and "rp_msk/2.nii[.gz]" in msgs[0] and "left out" in msgs[0]
    assert str(root / "rp_msk" / "7.nii.gz") in msgs[1] and "without an image" in msgs[1]


def test_missing_stack_mask_is_a_problem(tmp_path, medseg):
    shutil.copytree(medseg, tmp_path / "m")
    (tmp_path / "m" / "tr_mask.nii.gz").unlink()
    adapter = SOURCES["medseg"](tmp_path / "m")
    assert [c.case_id for c in adapter.slices()] == ["val_000", "val_001"]
    assert len(adapter.problems) == 1 and "tr_im.nii.gz" in str(adapter.problems[0])


def test_missing_layout_raises_naming_the_folder(tmp_path):
    (tmp_path / "empty" / "rp_msk").mkdir(parents=True)
    with pytest.raises(DataLayoutError, match=f"medseg: no MedSeg folder .* under {tmp_path / 'empty'}"):
        SOURCES["medseg"](tmp_path / "empty").discover()
    with pytest.raises(DataLayoutError, match="does not exist"):
        SOURCES["medseg"](tmp_path / "nope")


def test_stack_only_download_has_no_3d_cases(tmp_path, medseg):
    (tmp_path / "m").mkdir()
    for name in ("tr_im.nii.gz", "tr_mask.nii.gz"):
        shutil.copy(medseg / name, tmp_path / "m" / name)
    adapter = SOURCES["medseg"](tmp_path / "m")
    assert adapter.discover() == [] and len(adapter.slices()) == 6 and adapter.problems == []


def test_rp_case_harmonizes(medseg):
    adapter = SOURCES["medseg"](medseg)
    case = next(c for c in adapter.discover() if c.case_id == "rp_2")
    h = harmonize_case(case, adapter.policy(case), HarmonizerConfig())
    assert set(np.unique(h.label).tolist()) == {0, LESION, IGNORE}
    assert h.meta["policy"] == "medseg/lesion"
    assert h.meta["annotated"] == [c in ("background", "lesion") for c in CLASSES]
    assert h.image.shape == h.label.shape and np.isfinite(h.image).all()


def test_effusion_as_class_policy(medseg):
    adapter = SOURCES["medseg"](medseg, policy="effusion_as_class")
    case = next(c for c in adapter.discover() if c.case_id == "rp_2")
    pol = adapter.policy(case)
    assert pol.name == "medseg/effusion_as_class" and set(pol.annotated) == {"lesion", "effusion"}
    raw, _ = read_volume(case.label)
    mapped = pol.remap(raw)
    assert (mapped[raw == 3] == CLASS_INDEX["effusion"]).all() and (mapped[raw == 2] == LESION).all()
    with pytest.raises(ValueError, match="unknown label policy 'ggo_as_class'"):
        SOURCES["medseg"](medseg, policy="ggo_as_class")


def test_verify_counts_the_2d_only_slices(phantom_root, manifests, capsys):
    import json

    from datamodules.verify import main as verify_main

    assert verify_main(["--root", str(phantom_root), "--sources", "medseg", "--json", "--no-duplicates"]) == 0
    report = json.loads(capsys.readouterr().out)
    flat = SOURCES["medseg"](phantom_root / "medseg").slices()
    assert report["sources"]["medseg"]["slices_2d"] == {"cases": len(flat), "labelled": sum(c.labelled for c in flat)}
    assert report["sources"]["medseg"]["slices_2d"]["labelled"] > 0
