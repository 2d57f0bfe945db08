"""Harmonization audit: measured numbers against hand-computed ones, the flags, and the phantom labelling."""
import json
from pathlib import Path

import numpy as np
import pytest

from datamodules.audit import audit, main
from datamodules.harmonize import HarmonizerConfig
from datamodules.io import write_volume
from datamodules.sources import SOURCES
from datamodules.sources.custom import register_custom_source

TOY_YAML = """name: audit_toy
images: "images/*.nii.gz"
masks: "masks/{case}_mask.nii.gz"
encoding: hu
codes: {0: background, 1: lung_left, 2: lung_right, 3: lesion}
annotated: [lung_left, lung_right, lesion]
"""
SHAPE = (40, 40, 20)
LEFT, RIGHT = np.s_[4:16, 8:32, 2:18], np.s_[24:36, 8:32, 2:18]  # 12 x 24 x 16 = 4608 voxels each
LESION = np.s_[6:10, 10:18, 4:13]                                # 4 x 8 x 9 = 288 voxels, inside the left lung


def _chest(lesion_hu: float) -> tuple[np.ndarray, np.ndarray]:
    """Air around a soft-tissue body, two lungs at -850 HU, one lesion of uniform HU; the mask that fits."""
    hu = np.full(SHAPE, -1000, np.int16)
    hu[1:39, 4:36, :] = 40
    mask = np.zeros(SHAPE, np.uint8)
    for code, box in ((1, LEFT), (2, RIGHT)):
        hu[box], mask[box] = -850, code
    hu[LESION], mask[LESION] = lesion_hu, 3
    return hu, mask


@pytest.fixture()
def toy_root(tmp_path):
    """Five hand-made cases of one custom source (spacing in mm, x y z):
    good (5, 5, 10), hot (lesion at +500 HU), small_lungs (4, 4, 10), eight_bit (uint8 0..255 declared HU,
    unlabelled), thick (25 mm slices, unlabelled)."""
    spec = tmp_path / "audit_toy.yaml"
    spec.write_text(TOY_YAML, encoding="utf-8")
    register_custom_source(spec)
    src = tmp_path / "data" / "audit_toy"
    for case, spacing, lesion_hu in (("good", (5, 5, 10), -500), ("hot", (5, 5, 10), 500),
                                     ("small_lungs", (4, 4, 10), -500)):
        hu, mask = _chest(lesion_hu)
        write_volume(src / "images" / f"{case}.nii.gz", hu, np.diag([*spacing, 1.0]))
        write_volume(src / "masks" / f"{case}_mask.nii.gz", mask, np.diag([*spacing, 1.0]))
    eight = np.zeros(SHAPE, np.uint8)
    eight[1:39, 4:36, :] = 150
    eight[LEFT] = eight[RIGHT] = 20
    eight[0, 0, 0] = 255
    write_volume(src / "images" / "eight_bit.nii.gz", eight, np.diag([5, 5, 10, 1.0]))
    write_volume(src / "images" / "thick.nii.gz", _chest(-500)[0], np.diag([5, 5, 25, 1.0]))
    yield tmp_path / "data"
    SOURCES.pop("audit_toy", None)  # keep the global registry as other tests expect it


def _cases(report):
    return {c["case"]: c for c in report["sources"]["audit_toy"]["cases"]}


def _warnings(report):
    return {(f["kind"], c) for f in report["flags"] if f["level"] != "info" for c in f["cases"]}


def test_volumes_geometry_and_codes_are_exact(toy_root):
    # target spacing exactly half the stored one: nearest-neighbour labels double per axis, volumes unchanged
    report = audit(toy_root, ["audit_toy"], HarmonizerConfig(target_spacing=(2.5, 2.5, 5.0)))
    good = _cases(report)["good"]
    b, a = good["before"], good["after"]
    assert b["spacing_mm"] == [5.0, 5.0, 10.0] and b["thickness_mm"] == 10.0 and b["fov_mm"] == [200.0, 200.0, 200.0]
    assert a["spacing_mm"] == [2.5, 2.5, 5.0] and a["shape"] == [80, 80, 40] and a["fov_mm"] == [200.0, 200.0, 200.0]
    assert b["voxel_ml"] == pytest.approx(0.25) and a["voxel_ml"] == pytest.approx(0.03125)
    # lungs 2 x 4608 voxels (the lesion's 288 included) x 0.25 mL = 2304 mL; lesion 288 x 0.25 = 72 mL; 288 / 9216
    for stage in (b, a):
        assert stage["lung_l"] == pytest.approx(2.304, abs=1e-12)
        assert stage["lesion_ml"] == pytest.approx(72.0, abs=1e-12)
        assert stage["involvement_pct"] == pytest.approx(3.125, abs=1e-12)
    assert b["codes"] == {"0": 32000 - 9216, "1": 4608 - 288, "2": 4608, "3": 288}
    assert a["classes"] == {"background": 8 * (32000 - 9216), "lung_left": 8 * 4320, "lung_right": 8 * 4608,
                            "lesion": 8 * 288}
    # more than half of the upsampled lesion lies away from its border: the median is the planted -500 HU
    assert a["lesion_hu"]["median"] == -500.0 and _cases(report)["hot"]["after"]["lesion_hu"]["median"] == 500.0
    assert b["values"]["min"] == -1000.0 and b["values"]["max"] == 40.0 and b["dtype"] == "int16"
    assert report["data"] == "real" and report["sources"]["audit_toy"]["n_labelled"] == 3
    small = _cases(report)["small_lungs"]["before"]
    assert small["lung_l"] == pytest.approx(9216 * 0.16 / 1000, abs=1e-12)  # 4 x 4 x 10 mm voxels: 1.47456 L


def test_flags_name_the_case_and_the_numbers(toy_root):
    report = audit(toy_root, ["audit_toy"], HarmonizerConfig(target_spacing=(2.5, 2.5, 5.0)))
    # the harmonizer refuses the 8-bit export declared HU (check_intensity): unreadable, and still explained
    assert _warnings(report) == {("lesion_hu", "hot"), ("lung_volume", "small_lungs"), ("unreadable", "eight_bit"),
                                 ("undecoded_8bit", "eight_bit"), ("spacing_outlier", "thick")}
    reasons = {f["kind"]: f["reason"] for f in report["flags"]}
    assert "eight_bit.nii.gz" in reasons["undecoded_8bit"] and "0..255" in reasons["undecoded_8bit"]
    assert "audit_toy/hot" in reasons["lesion_hu"] and "is 500 " in reasons["lesion_hu"]
    assert "1.475 L" in reasons["lung_volume"] and "2-8 L" in reasons["lung_volume"]
    # slice thickness 25 mm against the median of 10, 10, 10, 10, 25
    assert "audit_toy/thick" in reasons["spacing_outlier"] and "2.50x the source median 10.000 mm" in reasons["spacing_outlier"]


def test_phantom_decode_ablation_is_flagged_only_when_the_decode_is_off(phantom_root):
    on = audit(phantom_root, ["ctseg"], HarmonizerConfig())
    assert not any(f["kind"] == "undecoded_8bit" for f in on["flags"])
    off = audit(phantom_root, ["ctseg"], HarmonizerConfig(decode=False))
    flagged = sorted(c for f in off["flags"] if f["kind"] == "undecoded_8bit" for c in f["cases"])
    eight_bit = sorted(c["case"] for c in on["sources"]["ctseg"]["cases"] if c["encoding"] == "uint8_window")
    assert flagged == eight_bit and eight_bit  # the radiopaedia cases, and only they
    assert all("switches the decode off" in f["reason"] for f in off["flags"] if f["kind"] == "undecoded_8bit")


def test_phantom_audit_matches_the_suite_truth_and_says_phantom(phantom_root, tmp_path, capsys):
    cache = phantom_root.parent.parent  # <cache>/phantom/tiny-seed0-v<N>: the suite is reused, not rewritten
    assert main(["--out", str(tmp_path / "out"), "experiment=smoke", f"paths.cache={cache}"]) == 0
    printed = capsys.readouterr().out
    assert "*** PHANTOM DATA" in printed and "SYNTHETIC" in printed
    out = tmp_path / "out"
    for name in ("audit.json", "audit.md", "hu_histograms.png", "volumes.png", "spacing.png"):
        assert (out / name).stat().st_size > 0, name
    report = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert report["data"] == "phantom" and report["label"].startswith("PHANTOM DATA")
    assert (out / "audit.md").read_text(encoding="utf-8").startswith("**PHANTOM DATA (synthetic sources)**")
    assert report["overrides"] == ["experiment=smoke", f"paths.cache={cache}"]
    # volumes measured on the stored masks equal those the suite wrote down when it drew them
    for source in ("covid19_20", "mosmed", "ctseg"):
        truth = {c["case"]: c for c in json.loads((phantom_root / f"{source}.json").read_text(encoding="utf-8"))["cases"]}
        for case in report["sources"][source]["cases"]:
            if not case["labelled"]:
                continue
            t = truth[case["case"]]
            assert case["before"]["lesion_ml"] == pytest.approx(t["lesion_ml_annotated"], rel=1e-5)
            if source == "ctseg":  # the only one of the three that delineates lungs
                assert case["before"]["lung_l"] == pytest.approx(t["lung_ml"] / 1000.0, rel=1e-5)
            else:
                assert case["before"]["lung_l"] is None
    assert Path(report["root"]).resolve() == phantom_root.resolve()
