"""Severity measures on a hand-built 20 x 10 x 10 volume; every expected value is counted by hand below.

Layout along axis 0 (each x-slab is 10 x 10 = 100 voxels), spacing (0.8, 0.8, 2.0) mm -> 1.28 mm^3 = 0.00128 mL:

    x 0..3   RUL (label 1) 400 vox  lesion: slab x=0 (100) -> 25 %; high (-100 HU) on y<4: 40 -> 10 %
    x 4..5   RML (label 2) 200 vox  lesion: slab x=4 at -200 HU (high, threshold inclusive, 100)
                                            + x=5, y<5 at -201 HU (not high, 50) -> 150 = 75 %; high 50 %
    x 6..9   RLL (label 3) 400 vox  no lesion; HU x=6: -950, x=7: -700, x=8: -800 (aerated, 300), x=9: -699
    x 10..13 LUL (label 4) 400 vox  lesion: x=10 at -800 HU (aerated band but lesion -> not WAL), x=11 and
                                            voxel (12,0,0) at -600 -> 201 = 50.25 %; no high opacity;
                                            rest of LUL (199 voxels) at -850 HU -> aerated
    x 14..17 LLL (label 5) 400 vox  lesion everywhere at -300 HU, one voxel at 0 HU -> 100 %; high 0.25 %
    x 18..19 outside lung           lesion at x=18 (50 HU, would be high) and x=19 at -800 HU: all ignored
    every other voxel -1000 HU (below the aerated band).
"""

import numpy as np
import pytest

from evaluation.severity import AERATED_HU, HIGH_OPACITY_HU, LOBE_NAMES, lobe_score, severity

SPACING = (0.8, 0.8, 2.0)
VOX_ML = 0.8 * 0.8 * 2.0 / 1000.0
N_LUNG = 400 + 200 + 400 + 400 + 400  # 1800
N_LES = 100 + 150 + 0 + 201 + 400  # 851
N_HIGH = 40 + 100 + 0 + 0 + 1  # 141
N_AERATED = 300 + 199  # 499


def _phantom():
    shape = (20, 10, 10)
    lobes = np.zeros(shape, np.int16)
    for label, (a, b) in enumerate([(0, 4), (4, 6), (6, 10), (10, 14), (14, 18)], start=1):
        lobes[a:b] = label
    hu = np.full(shape, -1000.0)
    lesion = np.zeros(shape, bool)
    # RUL
    lesion[0] = True
    hu[0, :4] = -100.0
    hu[0, 4:] = -500.0
    # RML
    lesion[4] = True
    hu[4] = -200.0
    lesion[5, :5] = True
    hu[5, :5] = -201.0
    # RLL: aerated band edges inclusive, -699 just outside
    hu[6], hu[7], hu[8], hu[9] = -950.0, -700.0, -800.0, -699.0
    # LUL
    lesion[10:12] = True
    lesion[12, 0, 0] = True
    hu[10] = -800.0
    hu[11] = -600.0
    hu[12:14] = -850.0
    hu[12, 0, 0] = -600.0
    # LLL
    lesion[14:18] = True
    hu[14:18] = -300.0
    hu[14, 0, 0] = 0.0
    # outside the lung
    lesion[18] = True
    hu[18] = 50.0
    hu[19] = -800.0
    return lesion, lobes, hu


def test_constants():
    assert HIGH_OPACITY_HU == -200.0
    assert AERATED_HU == (-950.0, -700.0)
    assert LOBE_NAMES == ("RUL", "RML", "RLL", "LUL", "LLL")


@pytest.mark.parametrize(
    "percent, score",
    [(0, 0), (0.0, 0), (0.01, 1), (1, 1), (25, 1), (25.0001, 2), (50, 2), (50.5, 3), (75, 3), (75.5, 4), (100, 4)],
)
def test_lobe_score_boundaries(percent, score):
    assert lobe_score(percent) == score


@pytest.mark.parametrize("bad", [-0.1, 100.01, float("nan")])
def test_lobe_score_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        lobe_score(bad)


def test_full_measures_hand_counted():
    lesion, lobes, hu = _phantom()
    s = severity(lesion, spacing=SPACING, hu=hu, lobes=lobes)
    assert s["po"] == pytest.approx(100 * 851 / 1800)  # 47.28 %
    assert s["pho"] == pytest.approx(100 * 141 / 1800)  # 7.83 %
    assert s["wal_pct"] == pytest.approx(100 * 499 / 1800)  # 27.72 %
    assert s["lung_ml"] == pytest.approx(1800 * 0.00128)  # 2.304 mL
    assert s["lesion_ml"] == pytest.approx(851 * 0.00128)
    assert s["high_opacity_ml"] == pytest.approx(141 * 0.00128)
    assert s["lobe_pct"] == pytest.approx({"RUL": 25.0, "RML": 75.0, "RLL": 0.0, "LUL": 50.25, "LLL": 100.0})
    assert s["lobe_score"] == {"RUL": 1, "RML": 3, "RLL": 0, "LUL": 3, "LLL": 4}
    assert s["lss"] == 11
    assert s["lobe_high_pct"] == pytest.approx({"RUL": 10.0, "RML": 50.0, "RLL": 0.0, "LUL": 0.0, "LLL": 0.25})
    assert s["lobe_high_score"] == {"RUL": 1, "RML": 2, "RLL": 0, "LUL": 0, "LLL": 1}
    assert s["lhos"] == 4
    assert isinstance(s["lss"], int) and isinstance(s["lhos"], int)


def test_explicit_lung_matches_lobe_union_and_outside_lesion_ignored():
    lesion, lobes, hu = _phantom()
    from_lobes = severity(lesion, spacing=SPACING, hu=hu, lobes=lobes)
    explicit = severity(lesion, lung=lobes > 0, spacing=SPACING, hu=hu, lobes=lobes)
    assert explicit == from_lobes
    # Removing the lesion outside the lung changes nothing; spreading it over the lung would.
    inside_only = lesion & (lobes > 0)
    assert severity(inside_only, spacing=SPACING, hu=hu, lobes=lobes) == from_lobes


def test_lung_only_and_hu_only_keys():
    lesion, lobes, hu = _phantom()
    lung = lobes > 0
    s = severity(lesion, lung=lung, spacing=SPACING)
    assert set(s) == {"po", "lung_ml", "lesion_ml"}
    assert s["po"] == pytest.approx(100 * N_LES / N_LUNG)
    s = severity(lesion, lung=lung, spacing=SPACING, hu=hu)
    assert set(s) == {"po", "pho", "wal_pct", "lung_ml", "lesion_ml", "high_opacity_ml"}
    assert s["pho"] == pytest.approx(100 * N_HIGH / N_LUNG)
    assert s["wal_pct"] == pytest.approx(100 * N_AERATED / N_LUNG)
    s = severity(lesion, spacing=SPACING, lobes=lobes)
    assert "lss" in s and "lhos" not in s and "pho" not in s
    assert s["lss"] == 11


def test_nonzero_lesion_labels_are_merged_and_lung_can_be_smaller_than_lesion():
    lesion, lobes, hu = _phantom()
    classes = lesion.astype(np.uint8)
    classes[0] = 2  # a second opacity class in the RUL slab: still lesion
    s = severity(classes, lung=lobes > 0, spacing=SPACING)
    assert s["po"] == pytest.approx(100 * N_LES / N_LUNG)
    # A lung restricted to the LLL (400 voxels, fully lesioned): PO 100 %.
    assert severity(lesion, lung=lobes == 5, spacing=SPACING)["po"] == pytest.approx(100.0)


def test_custom_lobe_values_map_to_names_in_order():
    lesion, lobes, hu = _phantom()
    relabelled = np.where(lobes > 0, 6 - lobes, 0)  # 1<->5, 2<->4, 3 stays
    s = severity(lesion, spacing=SPACING, hu=hu, lobes=relabelled, lobe_values=(5, 4, 3, 2, 1))
    assert s["lobe_pct"]["RUL"] == pytest.approx(25.0) and s["lobe_pct"]["LLL"] == pytest.approx(100.0)
    s = severity(lesion, spacing=SPACING, hu=hu, lobes=relabelled)  # default labels: names swap
    assert s["lobe_pct"]["RUL"] == pytest.approx(100.0) and s["lobe_pct"]["LUL"] == pytest.approx(75.0)


def test_thresholds_are_parameters():
    lesion, lobes, hu = _phantom()
    # At -600 HU the LUL lesion (x=11 slab + one voxel) and RUL/RML lesion become high as well.
    s = severity(lesion, spacing=SPACING, hu=hu, lobes=lobes, high_opacity_hu=-600.0)
    assert s["lobe_high_pct"]["LUL"] == pytest.approx(100 * 101 / 400)
    assert s["lobe_high_pct"]["RUL"] == pytest.approx(100.0 * 100 / 400)
    # Aerated band -900..-800: RLL x=8 (100) and LUL non-lesion (199) at -850.
    s = severity(lesion, spacing=SPACING, hu=hu, lobes=lobes, aerated_hu=(-900.0, -800.0))
    assert s["wal_pct"] == pytest.approx(100 * 299 / N_LUNG)


def test_errors():
    lesion, lobes, hu = _phantom()
    with pytest.raises(ValueError, match=r"\(20, 10, 10\).*\(20, 10, 9\)"):
        severity(lesion, lung=(lobes > 0)[..., :9])
    with pytest.raises(ValueError, match="shape"):
        severity(lesion, lobes=lobes, hu=hu[:, :5])
    with pytest.raises(ValueError, match="lung"):
        severity(lesion)
    with pytest.raises(ValueError, match="empty"):
        severity(lesion, lung=np.zeros_like(lesion))
    missing = np.where(lobes == 2, 0, lobes)
    with pytest.raises(ValueError, match="RML"):
        severity(lesion, lobes=missing)
    bad_hu = hu.copy()
    bad_hu[3, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        severity(lesion, lobes=lobes, hu=bad_hu)
    with pytest.raises(ValueError, match="spacing"):
        severity(lesion, lobes=lobes, spacing=(1.0, 1.0))
