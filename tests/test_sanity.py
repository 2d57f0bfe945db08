"""Sanity of predictions (issue 19): hand-made label maps with known spacing, so every volume is exact."""
import numpy as np
import pytest

from evaluation.sanity import OK, SanityLimits, check_prediction, lesion_outside_lungs, outside_air, sanity_text
from experiments.config import load_config

SPACING = (2.0, 2.0, 2.0)  # 8 mm^3 per voxel: 125,000 voxels per litre
SHAPE = (160, 120, 130)    # x, y, z; axial axis 2


@pytest.fixture(scope="module")
def limits():
    cfg = load_config(["experiment=smoke"])  # the limits base.yaml ships
    return SanityLimits.from_config(dict(cfg.evaluation.sanity))


def body_hu():
    """Soft tissue (40 HU) in an in-plane box, air (-1000 HU) around it: the body never touches the border."""
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[10:150, 5:115, :] = 40.0
    return hu


def lungs(litres_per_side: float) -> np.ndarray:
    """Left (1) and right (2) lung boxes of exactly `litres_per_side` each (50 x, 125 z voxels), inside the body."""
    pred = np.zeros(SHAPE, dtype=np.uint8)
    voxels = round(litres_per_side * 125_000)
    width = voxels // (50 * 125)
    assert width * 50 * 125 == voxels and width <= 100
    pred[20:70, 10:10 + width, 2:127] = 2    # RAS x grows to the patient's left: low x is the right lung
    pred[80:130, 10:10 + width, 2:127] = 1
    return pred


def test_base_yaml_ranges_are_the_documented_adult_ranges(limits):
    assert limits.total_lung_l == (1.5, 9.0) and limits.lung_side_l[1] == 5.0


def test_ten_litres_of_lung_is_flagged_five_is_not(limits):
    hu = body_hu()
    big, normal = lungs(5.0), lungs(2.5)
    hu[np.isin(normal, (1, 2))] = -850.0
    problems = check_prediction(big, SPACING, limits, lungs_predicted=True, hu=hu)
    assert any("lung volume 10.00 L outside the adult range 1.5-9 L" in p for p in problems), problems
    assert check_prediction(normal, SPACING, limits, lungs_predicted=True, hu=hu) == []
    assert sanity_text([]) == OK


def test_tiny_or_missing_lungs_are_flagged_per_side(limits):
    pred = lungs(2.5)
    pred[pred == 1] = 0                      # the left lung missing: 2.5 L in total, inside the range
    problems = check_prediction(pred, SPACING, limits, lungs_predicted=True)
    assert problems == ["left lung 0.00 L outside 0.4-5 L"]


def test_a_lesion_only_model_gets_no_lung_checks(limits):
    pred = np.zeros(SHAPE, dtype=np.uint8)
    pred[60:70, 40:50, 50:60] = 3
    assert check_prediction(pred, SPACING, limits, lungs_predicted=False) == []


def test_lung_in_the_air_around_the_body_is_flagged(limits):
    """The demo's failure: air outside the body labelled lung (there ~28 L per side)."""
    hu = body_hu()
    pred = lungs(2.5)
    hu[np.isin(pred, (1, 2))] = -850.0
    pred[1:8, 30:90, 10:120] = 2             # a slab of outside air, not on the border itself
    pred[152:159, 30:90, 10:120] = 1
    problems = check_prediction(pred, SPACING, limits, lungs_predicted=True, hu=hu)
    assert any(p.startswith("lung predicted in the air outside the body") for p in problems), problems
    assert not any("border" in p for p in problems)
    # lung air is not outside air: enclosed by the body, it never reaches the in-plane border
    assert not (outside_air(hu, 2, -900.0) & np.isin(lungs(2.5), (1, 2))).any()


def test_lung_on_the_volume_border_is_flagged(limits):
    pred = lungs(2.5)
    pred[0:3, :, 2:127] = 2
    problems = check_prediction(pred, SPACING, limits, lungs_predicted=True)
    assert any(p.startswith("lung touches the volume border") for p in problems), problems
    # the first and last axial slices are not border: a scan may end inside the lungs
    pred = lungs(2.5)
    pred[20:70, 10:60, 0:130] = 2
    pred[80:130, 10:60, 0:2] = 1
    assert not any("border" in p for p in check_prediction(pred, SPACING, limits, lungs_predicted=True))


def test_lesions_outside_the_lungs_predicted_or_reference(limits):
    pred = lungs(2.5)
    pred[30:40, 20:30, 50:60] = 3            # inside the right lung: fine
    assert check_prediction(pred, SPACING, limits, lungs_predicted=True) == []
    pred[140:150, 80:100, 50:70] = 3         # 4000 voxels far from any lung: 80 % of the lesion volume
    problems = check_prediction(pred, SPACING, limits, lungs_predicted=True)
    assert problems == ["80 % of the lesion volume outside the predicted lungs"]
    # a lesion-only model: checked against the reference's lungs where the reference has them
    lesion_only = np.where(pred == 3, 3, 0).astype(np.uint8)
    ref = lungs(2.5)
    assert check_prediction(lesion_only, SPACING, limits, lungs_predicted=False, ref=ref, ref_lungs=True) == \
        ["80 % of the lesion volume outside the reference lungs"]
    assert check_prediction(lesion_only, SPACING, limits, lungs_predicted=False, ref=ref, ref_lungs=False) == []
    assert lesion_outside_lungs(np.zeros(SHAPE, bool), ref > 0) == 0.0
