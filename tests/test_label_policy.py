import numpy as np
import pytest

from datamodules.label_policy import CLASS_INDEX, LabelError, LabelPolicy
from datamodules.sources import SOURCES


def test_policy_rejects_code_zero_not_background():
    with pytest.raises(LabelError, match="code 0"):
        LabelPolicy("bad", {0: "lesion", 1: "background"}, ("lesion",))


def test_policy_rejects_mapped_class_not_declared_annotated():
    with pytest.raises(LabelError, match="differ from annotated"):
        LabelPolicy("bad", {0: "background", 1: "lesion", 2: "lung_left"}, ("lesion",))


def test_policy_rejects_unknown_class():
    with pytest.raises(LabelError, match="unknown class"):
        LabelPolicy("bad", {0: "background", 1: "tumor"}, ("tumor",))


@pytest.mark.parametrize("source,policy,raw,expected", [
    ("covid19_20", "lesion", [0, 1, 1, 0], ["background", "lesion", "lesion", "background"]),
    ("mosmed", "lesion", [1, 0], ["lesion", "background"]),
    ("ctseg", "lung_and_infection", [0, 1, 2, 3], ["background", "lung_left", "lung_right", "lesion"]),
    ("ctseg", "infection", [0, 1], ["background", "lesion"]),
    ("ctseg", "lung", [2, 1, 0], ["lung_right", "lung_left", "background"]),
])
def test_remap_per_source(source, policy, raw, expected):
    pol = SOURCES[source].POLICIES[policy]
    out = pol.remap(np.array(raw, dtype=np.int16))
    assert out.tolist() == [CLASS_INDEX[c] for c in expected]
    assert out.dtype == np.uint8


def test_annotated_vectors_mark_unannotated_lungs():
    # MosMed and COVID-19-20 annotate lesions only: lungs are unknown there, never background.
    for src in ("mosmed", "covid19_20"):
        vec = SOURCES[src].POLICIES["lesion"].annotated_vector()
        assert vec.tolist() == [True, False, False, True, False, False, False, False]
    assert SOURCES["ctseg"].POLICIES["lung_and_infection"].annotated_vector().tolist() == [True] * 4 + [False] * 4


def test_unknown_code_names_file_and_code():
    pol = SOURCES["mosmed"].POLICIES["lesion"]
    with pytest.raises(LabelError, match=r"study_0255_mask.nii.gz: mask codes \[2\]"):
        pol.remap(np.array([0, 1, 2]), where="masks/study_0255_mask.nii.gz")


def test_float_masks_with_integer_values_accepted_fractional_rejected():
    pol = SOURCES["ctseg"].POLICIES["lung_and_infection"]
    assert pol.remap(np.array([0.0, 3.0, 1.0])).tolist() == [0, 3, 1]
    with pytest.raises(LabelError, match="non-integer"):
        pol.remap(np.array([0.0, 0.5]), where="x.nii")
    with pytest.raises(LabelError, match="NaN"):
        pol.remap(np.array([0.0, np.nan]), where="x.nii")
