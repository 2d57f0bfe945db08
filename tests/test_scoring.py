"""Label maps -> rows -> summaries: class parsing, merged classes, pooled RV, severity columns."""
import math

import numpy as np
import pytest

from evaluation.scoring import (
    lesions_to_lung_sides,
    make_classes,
    parse_labels,
    parse_tolerances,
    score_case,
    severity_columns,
    summarize,
)


def test_labels_and_tolerances_parse_and_fail_clearly():
    assert parse_labels("lesion=1, lung=1+2+3") == {"lesion": (1,), "lung": (1, 2, 3)}
    assert parse_tolerances("lesion=2.5") == {"lesion": 2.5}
    classes = make_classes(parse_labels("lesion=3,lung=1+2"), {"lesion": 2.0})
    assert [(c.name, c.tolerance_mm) for c in classes] == [("lesion", 2.0), ("lung", 1.0)]
    with pytest.raises(ValueError, match="background"):
        parse_labels("lesion=0")
    with pytest.raises(ValueError, match="name=value"):
        parse_labels("lesion")
    with pytest.raises(ValueError, match="integer label values"):
        parse_labels("lesion=a")
    with pytest.raises(ValueError, match=r"--tolerance effusion=MM"):
        make_classes({"effusion": (4,)})
    with pytest.raises(ValueError, match="not among the classes"):
        make_classes({"lesion": (1,)}, {"lung": 1.0})
    sides = make_classes({"lesion": (3,), "lung_left": (1,)}, by_side=["lung_left"])
    assert [c.lesions_by_side for c in sides] == [False, True]
    with pytest.raises(ValueError, match="--lesions-by-side names"):
        make_classes({"lesion": (3,)}, by_side=["lung_left"])
    with pytest.raises(ValueError, match="must be among them"):
        make_classes({"lesion": (3,)}, by_side=["lesion"])


def test_lesions_join_the_nearer_lung_side_in_mm():
    """Spacing 1 x 1 x 3 mm. The lesion at (2, 0, 3) is 2 voxels = 2 mm from the left lung voxel and 1 voxel
    = 3 mm from the right one: left, although the right is nearer in voxels. The lesion at (2, 0, 6) is
    6 mm from the right voxel and sqrt(2^2 + 9^2) mm from the left: right."""
    labels = np.zeros((5, 1, 7), np.uint8)
    labels[0, 0, 3], labels[2, 0, 4] = 1, 2
    labels[2, 0, 3], labels[2, 0, 6] = 3, 7  # a lesion and a consolidation
    sided = lesions_to_lung_sides(labels, (1.0, 1.0, 3.0))
    assert (sided[2, 0, 3], sided[2, 0, 6]) == (1, 2)
    assert np.array_equal(np.delete(sided.ravel(), [17, 20]), np.delete(labels.ravel(), [17, 20]))  # nothing else
    assert labels[2, 0, 3] == 3  # the input is left as it is
    no_lungs = np.where(np.isin(labels, (1, 2)), 0, labels)
    assert lesions_to_lung_sides(no_lungs, (1.0, 1.0, 3.0)) is no_lungs


def test_lung_sides_show_a_left_right_swap_that_whole_lungs_hide():
    """Left lung x = 0..1 (24 voxels, one of them a lesion), right lung x = 4..5. A prediction with the two
    sides exchanged scores Dice 1 on whole lungs and 0 on each side; a prediction that calls the lesion
    lung (as COVID-19-CT-Seg's Lung_Mask does) scores 1 on the left lung, the lesion being inside it."""
    ref = np.zeros((4, 6, 3), np.uint8)
    ref[:, 0:2], ref[:, 4:6] = 1, 2
    ref[1, 1, 1] = 3
    classes = make_classes({"lung": (1, 2, 3, 6, 7), "lung_left": (1,), "lung_right": (2,)},
                           by_side=["lung_left", "lung_right"])
    swapped = np.choose(ref, [0, 2, 1, 3]).astype(np.uint8)
    rows = {r["class"]: r for r in score_case(swapped, ref, (1.0, 1.0, 1.0), classes)}
    assert rows["lung"]["dice"] == 1.0 and rows["lung"]["hd95"] == 0.0
    assert rows["lung_left"]["dice"] == rows["lung_right"]["dice"] == 0.0
    assert rows["lung_left"]["ref_ml"] == rows["lung_left"]["pred_ml"] == pytest.approx(24 / 1000)
    lung_mask_style = np.where(ref == 3, 1, ref)
    rows = {r["class"]: r for r in score_case(lung_mask_style, ref, (1.0, 1.0, 1.0), classes)}
    assert rows["lung_left"]["dice"] == rows["lung_right"]["dice"] == rows["lung"]["dice"] == 1.0


def test_merged_opacity_class_and_pooled_relative_volume():
    # GGO = 1, consolidation = 2: the prediction calls some GGO consolidation; merged, it is perfect.
    ref = np.zeros((6, 6, 4), np.uint8)
    ref[1:3, 1:3, 1:3] = 1   # 8 voxels GGO
    ref[3:5, 1:3, 1:3] = 2   # 8 voxels consolidation
    pred = ref.copy()
    pred[2, 1:3, 1:3] = 2    # 4 GGO voxels predicted as consolidation
    classes = make_classes({"ggo": (1,), "consolidation": (2,), "opacity": (1, 2)})
    rows = {r["class"]: r for r in score_case(pred, ref, (1.0, 1.0, 2.0), classes)}
    assert rows["opacity"]["dice"] == 1.0 and rows["opacity"]["hd95"] == 0.0
    assert rows["ggo"]["dice"] == pytest.approx(2 * 4 / (4 + 8))
    assert rows["consolidation"]["rv"] == pytest.approx(12 / 8)
    assert rows["ggo"]["ref_ml"] == pytest.approx(8 * 2.0 / 1000)
    # pooled RV: sum of predicted / sum of reference volumes, not the mean of ratios
    case_rows = [{"case": "a", "class": "lesion", "pred_ml": 2.0, "ref_ml": 1.0, "dice": 0.5, "hd95": float("nan")},
                 {"case": "b", "class": "lesion", "pred_ml": 1.0, "ref_ml": 3.0, "dice": 0.7, "hd95": 4.0}]
    s = summarize(case_rows, metrics=("dice", "hd95"))
    assert s["classes"]["lesion"]["rv_pooled"] == pytest.approx(3.0 / 4.0)
    assert s["classes"]["lesion"]["dice"]["mean"] == pytest.approx(0.6)
    assert s["classes"]["lesion"]["hd95"] == {"mean": 4.0, "std": pytest.approx(math.nan, nan_ok=True),
                                               "median": 4.0, "n": 1, "n_undefined": 1}


def test_severity_columns_use_the_reference_lung_for_both():
    lung = np.zeros((10, 10, 2), bool)
    lung[:, :5] = True                    # 100 lung voxels
    ref = np.zeros_like(lung)
    ref[:2, :5] = True                    # 20 % of the lung
    pred = np.zeros_like(lung)
    pred[:4, :5] = True                   # 40 %
    pred[:, 8:] = True                    # outside the lung: ignored
    hu = np.full(lung.shape, -800.0)
    hu[0, :5] = 0.0                       # 10 high-opacity voxels inside both lesions
    cols = severity_columns(pred, ref, (1.0, 1.0, 1.0), lung=lung, hu=hu)
    assert cols["ref_po"] == pytest.approx(20.0) and cols["pred_po"] == pytest.approx(40.0)
    assert cols["ref_pho"] == pytest.approx(10.0) and cols["pred_pho"] == pytest.approx(10.0)
    assert cols["ref_wal_pct"] == pytest.approx(80.0) and cols["pred_wal_pct"] == pytest.approx(60.0)
    assert "ref_lss" not in cols  # no lobes, no lobe scores
    assert severity_columns(pred, ref, (1, 1, 1)) == {}


def test_ignored_reference_voxels_are_neither_hit_nor_false_positive():
    ref = np.zeros((6, 6, 2), np.uint8)
    ref[:2, :2] = 3          # 8 lesion voxels
    ref[4:, 4:] = 254        # 8 ignored (e.g. a tumour)
    pred = np.zeros_like(ref)
    pred[:2, :2] = 3
    pred[4:, 4:] = 3         # predicted lesion inside the ignored region
    classes = make_classes({"lesion": (3,)})
    assert score_case(pred, ref, (1, 1, 1), classes)[0]["dice"] == pytest.approx(16 / 24)
    row = score_case(pred, ref, (1, 1, 1), classes, ignore=254)[0]
    assert row["dice"] == 1.0 and row["pred_ml"] == pytest.approx(0.008)
