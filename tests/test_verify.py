"""Bad input: `datamodules.verify` lists every planted fault with its file; training follows data.on_error."""
import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from datamodules.datamodule import DataError, MultiSourceDataModule
from datamodules.harmonize import HarmonizerConfig
from datamodules.io import VolumeError, read_dicom_series, read_volume, write_volume
from datamodules.phantom.suite import PHANTOM_SOURCES
from datamodules.verify import main as verify_main
from tests.dicom_util import write_dicom_series

SOURCES3 = ["covid19_20", "mosmed", "ctseg"]


@pytest.fixture(scope="module")
def faulty_root(phantom_root, tmp_path_factory):
    """The tiny suite with one planted fault per kind; returns (root, {fault: file name})."""
    root = tmp_path_factory.mktemp("faulty")
    for s in PHANTOM_SOURCES:  # every source, so verify reports on all of them at once
        shutil.copytree(phantom_root / s, root / s)
    faults = {}
    c20 = sorted((root / "covid19_20").rglob("*_seg.nii.gz"))
    c20[0].unlink()                                                   # labelled case without its mask
    faults["missing_mask"] = c20[0].name.replace("_seg", "_ct")
    data, affine = read_volume(c20[1])
    write_volume(c20[1], data[:-2], affine)                           # mask shape differs from image
    faults["shape"] = c20[1].name
    studies = sorted((root / "mosmed").rglob("study_*.nii.gz"))
    image = [p for p in studies if "mask" not in p.name and "CT-1" in str(p)][0]
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])                            # truncated .nii.gz
    faults["truncated"] = image.name
    masks = sorted((root / "mosmed").rglob("*_mask.nii.gz"))
    data, affine = read_volume(masks[-1])
    shifted = affine.copy()
    shifted[:3, 3] += 2.0
    write_volume(masks[-1], data, shifted)                            # affine beyond tolerance
    faults["affine"] = masks[-1].name
    lai = sorted((root / "ctseg" / "Lung_and_Infection_Mask").glob("coronacases_*.nii.gz"))
    data, affine = read_volume(lai[0])
    data = data.copy()
    data[0, 0, 0] = 7
    write_volume(lai[0], data, affine)                                # undeclared mask code
    faults["code"] = lai[0].name
    img = root / "ctseg" / "COVID-19-CT-Seg_20cases" / lai[1].name
    data, affine = read_volume(img)
    data = data.astype(np.float32)
    data[3, 3, 3] = np.nan
    write_volume(img, data, affine)                                   # NaN voxel
    faults["nan"] = img.name
    return root, faults


def test_verify_reports_every_planted_fault(faulty_root, phantom_root, capsys):
    # the clean suite (its nsclc RPI/RAI mask is aligned by its header: no problem)
    assert verify_main(["--root", str(phantom_root), "--json", "--no-duplicates"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["problems"] == []
    root, faults = faulty_root
    assert verify_main(["--root", str(root), "--json", "--no-duplicates"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert set(report["sources"]) >= set(PHANTOM_SOURCES)
    for name in set(PHANTOM_SOURCES) - set(SOURCES3):  # untouched sources: same counts as the clean tree
        got, want = report["sources"][name], clean["sources"][name]
        assert (got["cases"], got["labelled"], got["n_patients"]) == (want["cases"], want["labelled"], want["n_patients"])
        assert got["cases"] > 0, name
    by_file = {}
    for p in report["problems"]:
        by_file.setdefault(p["file"].rsplit("/", 1)[-1], []).append(p["message"])
    expect = {"missing_mask": "no mask", "shape": "shape", "truncated": "truncated", "affine": "affine",
              "code": "7", "nan": "NaN"}
    for fault, needle in expect.items():
        messages = by_file.get(faults[fault], [])
        assert any(needle in m for m in messages), (fault, faults[fault], messages, report["problems"])
    assert len(report["problems"]) == len(faults)
    s = report["sources"]
    # counts: the case without its mask is left out; every other file is still found and counted
    assert (s["covid19_20"]["cases"], s["covid19_20"]["labelled"], s["covid19_20"]["n_patients"]) == (6, 5, 5)
    assert (s["mosmed"]["cases"], s["mosmed"]["labelled"]) == (8, 6)
    assert (s["ctseg"]["cases"], s["ctseg"]["labelled"], s["ctseg"]["n_patients"]) == (7, 7, 6)
    assert s["ctseg"]["codes_seen"]["7"] == 1 and 7 not in s["ctseg"]["codes_declared"]


def test_verify_clean_tree_and_empty_or_missing_sources(phantom_root, tmp_path, capsys):
    assert verify_main(["--root", str(phantom_root), "--sources", ",".join(SOURCES3), "--no-duplicates"]) == 0
    assert "no problem found" in capsys.readouterr().out
    (tmp_path / "mosmed" / "COVID19_1110" / "studies").mkdir(parents=True)
    # no case anywhere: nothing was checked (exit 2, issue 19), and the empty folder is still named
    assert verify_main(["--root", str(tmp_path), "--sources", "mosmed,ctseg", "--json", "--no-duplicates"]) == 2
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["sources"]["ctseg"]["found"] is False
    assert "holds no case" in report["sources"]["mosmed"]["problems"][0]["message"]
    assert "nothing to check: the source folder(s) of ['mosmed']" in captured.err


def test_verify_on_an_empty_root_is_an_error_naming_what_it_searched(tmp_path, capsys):
    """Issue 19, item 8: an empty or wrong --root printed "no problem found" and exited 0."""
    assert verify_main(["--root", str(tmp_path), "--no-duplicates"]) == 2
    captured = capsys.readouterr()
    assert "no problem found" not in captured.out and "no case found, so none checked" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: nothing to check: no source folder found under {tmp_path}")
    assert "mosmed" in err[0] and "covid19_20" in err[0]  # it says where it looked
    assert verify_main(["--root", str(tmp_path), "--sources", "mosmed", "--no-duplicates"]) == 2
    assert f"searched {tmp_path / 'mosmed'}" in capsys.readouterr().err
    assert verify_main(["--root", str(tmp_path), "--sources", "mosmd"]) == 2
    assert "unknown source(s) ['mosmd']; did you mean 'mosmed'?" in capsys.readouterr().err


def test_training_fails_or_skips_bad_cases_as_configured(faulty_root, tmp_path, capsys):
    root, faults = faulty_root
    kwargs = dict(harmonizer=HarmonizerConfig(target_spacing=(8.0, 8.0, 10.0)), patch_size=(16, 16, 8))
    dm = MultiSourceDataModule(root, tmp_path / "h", SOURCES3, holdout="mosmed", **kwargs)
    with pytest.raises(DataError) as err:
        dm.prepare_data()
    assert faults["missing_mask"] in str(err.value)
    dm = MultiSourceDataModule(root, tmp_path / "h", SOURCES3, holdout="mosmed", on_error="skip", **kwargs)
    dm.prepare_data()
    out = capsys.readouterr().out
    for fault in ("missing_mask", "shape", "truncated", "affine", "code", "nan"):
        assert faults[fault].split(".")[0].replace("_seg", "").replace("_mask", "") in out, fault
    loaded = {c.key for role in ("train", "val", "test") for c in dm.cached[role]}
    assert len(dm.skipped) == 6
    assert not any(f"/{faults['truncated'].split('.')[0]}" in k for k in loaded)
    assert {c.key for c in dm.split.test} == {c.key for c in dm.cached["test"]}  # the split is what was loaded


def test_dicom_series_with_missing_or_duplicate_slices(tmp_path):
    hu = np.random.default_rng(0).integers(-1000, 400, size=(8, 8, 6)).astype(np.int16)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    series = tmp_path / "ok"
    write_dicom_series(hu, affine, series)
    files = sorted(str(p) for p in series.glob("*.dcm"))
    data, got = read_dicom_series(files, str(series))
    assert np.array_equal(data, hu) and np.allclose(got, affine, atol=1e-4)
    with pytest.raises(VolumeError, match=r"uneven slice spacing: 5\.000 mm .* steps 2\.500 mm"):
        read_dicom_series(files[:2] + files[3:], str(series))
    dup = tmp_path / "dup.dcm"
    shutil.copy(files[2], dup)
    with pytest.raises(VolumeError, match="duplicate slice"):
        read_dicom_series(files + [str(dup)], str(series))


def test_corrupt_gzip_names_the_file(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti header at all" * 10))
    with pytest.raises(VolumeError, match=r"scan\.nii\.gz: corrupt or truncated"):
        read_volume(bad)
    img = nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4))
    nib.save(img, str(tmp_path / "flat.nii.gz"))
    with pytest.raises(VolumeError, match=r"flat\.nii\.gz: expected a 3D volume"):
        read_volume(tmp_path / "flat.nii.gz")


def test_scan_planted_under_two_sources_is_found_and_kept_on_one_side(phantom_root, tmp_path, capsys):
    """A MosMed study re-shipped as a COVID-19-CT-Seg radiopaedia case: 8-bit windowed, stored mirrored
    (R-L, mask too), and its image mirrored along A-P relative to its mask, as that source is believed to
    store radiopaedia images (declared, and confirmed by the alignment check)."""
    root = tmp_path / "data"
    for s in SOURCES3:
        shutil.copytree(phantom_root / s, root / s)
    study = sorted((root / "mosmed").rglob("CT-1/study_*.nii.gz"))[0]
    mask = next((root / "mosmed").rglob(study.name.replace(".nii.gz", "_mask.nii.gz")))
    hu, affine = read_volume(study)
    lab, _ = read_volume(mask)
    copy_id = "radiopaedia_99_99999_0"
    v8 = np.round((np.clip(hu.astype(np.float64), -1250, 250) + 1250) * 255 / 1500).astype(np.uint8)
    assert nib.aff2axcodes(affine) == ("L", "A", "S")  # stored axis 1 runs along A-P
    write_volume(root / "ctseg" / "COVID-19-CT-Seg_20cases" / f"{copy_id}.nii.gz",
                 np.ascontiguousarray(v8[::-1, ::-1]), affine)
    write_volume(root / "ctseg" / "Infection_Mask" / f"{copy_id}.nii.gz", np.ascontiguousarray(lab[::-1]), affine)

    assert verify_main(["--root", str(root), "--sources", ",".join(SOURCES3), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sources"]["ctseg"]["alignment"][copy_id]["status"] == "fixed"
    assert [sorted(d["cases"]) for d in report["duplicates"]] == [sorted([f"ctseg/{copy_id}", f"mosmed/{study.name[:-7]}"])]

    dm = MultiSourceDataModule(root, tmp_path / "h", SOURCES3, holdout="mosmed",
                               harmonizer=HarmonizerConfig(target_spacing=(8.0, 8.0, 10.0)), patch_size=(16, 16, 8))
    dm.prepare_data()
    assert [c.key for c in dm.split.dropped] == [f"ctseg/{copy_id}"]
    trained = {c.key for c in dm.split.train + dm.split.val}
    assert f"ctseg/{copy_id}" not in trained and f"mosmed/{study.name[:-7]}" in {c.key for c in dm.split.test}
    assert "[duplicates]" in capsys.readouterr().out


def test_exit_2_when_verify_could_not_check(tmp_path, monkeypatch, capsys):
    """1 means "problems found"; a crash is "could not check" (2), whether it hits one case or the run."""
    import datamodules.verify as verify_mod
    from tests.badinputs.verify_eval import mosmed_tree

    root, image, _ = mosmed_tree(tmp_path)
    args = ["--root", str(root), "--sources", "mosmed", "--no-duplicates"]
    assert verify_main(args) == 0
    capsys.readouterr()

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(verify_mod, "check_case", broken)
    assert verify_main(args) == 2
    out = capsys.readouterr()
    assert f"{image}: could not check: RuntimeError: boom" in out.out and "could not be checked" in out.err
    monkeypatch.setattr(verify_mod, "verify_source", broken)
    assert verify_main(args) == 2
    assert "could not check" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        verify_main(["--help"])
    assert "2 could not check" in capsys.readouterr().out


def test_training_refuses_a_case_id_found_twice(tmp_path):
    from datamodules.datamodule import discover_sources
    from tests.badinputs.verify_eval import mosmed_tree

    root, first, _ = mosmed_tree(tmp_path)
    _, second, _ = mosmed_tree(tmp_path, category="CT-2")
    with pytest.raises(FileNotFoundError, match="(?s)no labelled case .* duplicate case id study_0255"):
        discover_sources(root, ["mosmed"])  # the only labelled study is the repeated one: say so
    mosmed_tree(tmp_path, study="study_0256")
    with pytest.raises(DataError, match="duplicate case id study_0255") as err:
        discover_sources(root, ["mosmed"])
    assert str(first) in str(err.value) and str(second) in str(err.value)
    cases, _ = discover_sources(root, ["mosmed"], on_error="skip")  # both copies left out, the rest kept
    assert [c.case_id for c in cases] == ["study_0256"]
