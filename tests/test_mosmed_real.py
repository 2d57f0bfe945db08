"""The 50 real MosMedData expert masks (../shared/data/mosmed_masks, CC BY-NC-ND 3.0), read in place."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from datamodules.harmonize import resample, to_canonical
from datamodules.io import read_volume, spacing_of
from datamodules.label_policy import CLASS_INDEX
from datamodules.phantom.suite import load_profiles
from datamodules.sources import SOURCES
from tests.conftest import MOSMED_MASKS

pytestmark = pytest.mark.skipif(not MOSMED_MASKS.is_dir(),
                                reason=f"real MosMed masks not present at {MOSMED_MASKS} (shared/ is beside the repo in CI)")


def masks():
    return sorted(MOSMED_MASKS.glob("study_*_mask.nii.gz"))


def test_fifty_masks_with_real_spacing_and_orientation():
    files = masks()
    assert len(files) == 50
    assert files[0].name == "study_0255_mask.nii.gz" and files[-1].name == "study_0304_mask.nii.gz"
    policy = SOURCES["mosmed"].POLICIES["lesion"]
    for f in files:
        arr, aff = read_volume(f)
        assert arr.dtype == np.int16 and arr.shape[:2] == (512, 512), f
        assert nib.aff2axcodes(aff) == ("L", "A", "S"), f
        sp = spacing_of(aff)
        assert sp[2] == pytest.approx(8.0), f
        assert sp[0] == pytest.approx(sp[1]) and 0.58 <= sp[0] <= 1.16, f
        lab = policy.remap(arr, where=str(f))
        assert set(np.unique(lab)) <= {0, CLASS_INDEX["lesion"]}
        can, caff = to_canonical(lab, aff)
        assert nib.aff2axcodes(caff) == ("R", "A", "S")
        # the first stored voxel column sits at the canonical array's last x index, same world point
        np.testing.assert_allclose(caff @ [arr.shape[0] - 1, 0, 0, 1], aff @ [0, 0, 0, 1], atol=1e-4)


def test_phantom_profile_is_calibrated_on_real_masks():
    stats = []
    for f in masks():
        arr, aff = read_volume(f)
        sp = spacing_of(aff)
        stats.append((sp[0], arr.shape[2], (arr > 0).sum() * np.prod(sp) / 1000))
    s = np.array(stats)
    prof = load_profiles()["profiles"]["mosmed"]
    assert prof["spacing_xy"][0] == pytest.approx(s[:, 0].min(), abs=0.005)
    assert prof["spacing_xy"][1] == pytest.approx(s[:, 0].max(), abs=0.005)
    assert prof["slices"] == [int(s[:, 1].min()), int(s[:, 1].max())]
    assert prof["spacing_z"] == [8.0, 8.0]
    assert 30 < np.median(s[:, 2]) < 120  # the real median lesion volume the phantom profile targets (mL)


def test_real_mask_resamples_with_volume_preserved():
    arr, aff = read_volume(masks()[0])
    can, caff = to_canonical(arr, aff)
    out, naff = resample(can, caff, (2.0, 2.0, 8.0), is_label=True)
    v0 = (arr > 0).sum() * np.prod(spacing_of(aff))
    v1 = (out > 0).sum() * 2.0 * 2.0 * 8.0
    assert v1 == pytest.approx(v0, rel=0.15)


def test_real_registry_parses_with_bom_crlf_and_leading_slashes():
    from datamodules.sources.mosmed import read_registry

    reg = read_registry(MOSMED_MASKS / "dataset_registry.csv")
    assert len(reg) == 1110 and "study_0001" in reg  # the BOM did not eat the first column
    labelled = {s: r for s, r in reg.items() if r["mask_file"]}
    assert sorted(labelled) == [f"study_{i:04d}" for i in range(255, 305)]
    assert {r["category"] for r in labelled.values()} == {"CT-1"}
    for study, r in labelled.items():
        assert r["mask_file"] == f"masks/{study}_mask.nii.gz"  # leading slash stripped
        assert (MOSMED_MASKS / Path(r["mask_file"]).name).is_file()
    assert reg["study_0001"]["study_file"] == "studies/CT-0/study_0001.nii.gz"
    assert {r["category"] for r in reg.values()} == {"CT-0", "CT-1", "CT-2", "CT-3", "CT-4"}
