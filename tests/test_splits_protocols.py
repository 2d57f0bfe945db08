"""Transfer-matrix diagonal, fixed test parts, few-shot folds and LOSO model selection (splits only)."""
import pytest

from datamodules.cases import Case
from datamodules.splits import LeakageError, Split, assert_no_leakage, transfer_split
from experiments.config import load_config

CTSEG_IDS = load_config([]).fewshot.folds


def _c(src, cid, pid=None):
    from pathlib import Path
    return Case(src, cid, pid or cid, image=Path(f"/x/{src}/{cid}"), label=Path(f"/x/{src}/{cid}_m"))


def _source(src, n, per_patient=1):
    return [_c(src, f"{src}{i:02d}_{k}", f"{src}{i:02d}") for i in range(n) for k in range(per_patient)]


def test_diagonal_cell_tests_held_out_patients_of_the_training_source():
    cases = _source("a", 10, per_patient=2) + _source("b", 5)
    split = transfer_split(cases, ["a"], ["a", "b"], val_fraction=0.25, seed=0, test_fraction=0.3)
    test_a = [c for c in split.test if c.source == "a"]
    # 30 % of 10 patients, both scans of each
    assert len({c.patient_id for c in test_a}) == 3 and len(test_a) == 6
    # out-of-domain source b: every case
    assert sorted(c.case_id for c in split.test if c.source == "b") == sorted(c.case_id for c in _source("b", 5))
    trained = {c.patient_id for c in split.train + split.val}
    assert not trained & {c.patient_id for c in test_a}
    assert len({c.patient_id for c in split.train + split.val}) == 7  # nothing else is lost
    assert split.in_domain == ("a",) and split.held_out == ("b",)


def test_fixed_test_part_is_the_same_patients_in_every_row_of_a_matrix():
    cases = _source("a", 10) + _source("b", 12) + _source("c", 9)
    parts = {}
    for train in ("a", "b", "c"):
        split = transfer_split(cases, [train], ["a", "b", "c"], 0.2, seed=3, test_fraction=0.34, fixed_test_part=True)
        parts[train] = {src: sorted(c.case_id for c in split.test if c.source == src) for src in "abc"}
    assert parts["a"] == parts["b"] == parts["c"]
    assert [len(parts["a"][s]) for s in "abc"] == [3, 4, 3]  # round(0.34 * n) patients
    # a different seed draws other patients
    other = transfer_split(cases, ["a"], ["a", "b", "c"], 0.2, seed=4, test_fraction=0.34, fixed_test_part=True)
    assert sorted(c.case_id for c in other.test if c.source == "b") != parts["a"]["b"]


def test_official_fewshot_fold_trains_listed_cases_and_drops_a_test_copy_of_a_training_patient(capsys):
    ids = [i for fold in CTSEG_IDS for i in fold]
    assert len(ids) == 20 and len(set(ids)) == 20  # the 5 official folds partition the 20 cases
    patient = {"radiopaedia_10_85902_1": "radiopaedia_10_85902", "radiopaedia_10_85902_3": "radiopaedia_10_85902"}
    cases = [_c("ctseg", i, patient.get(i)) for i in ids]
    fold2 = transfer_split(cases, ["ctseg"], ["ctseg"], 0.2, 0, train_cases={"ctseg": CTSEG_IDS[2]})
    assert sorted(c.case_id for c in fold2.train) == sorted(CTSEG_IDS[2]) and not fold2.val
    # fold 2 trains radiopaedia_10_85902_1: its twin series _3 must not be tested
    assert len(fold2.test) == 15 and "radiopaedia_10_85902_3" not in {c.case_id for c in fold2.test}
    assert [c.case_id for c in fold2.dropped] == ["radiopaedia_10_85902_3"]
    assert "radiopaedia_10_85902_3" in capsys.readouterr().out
    fold0 = transfer_split(cases, ["ctseg"], ["ctseg"], 0.2, 0, train_cases={"ctseg": CTSEG_IDS[0]})
    assert len(fold0.train) == 4 and len(fold0.test) == 16 and not fold0.dropped


def test_task3_adds_fold_cases_to_other_sources_whose_patients_validate():
    cases = [_c("ctseg", i) for fold in CTSEG_IDS for i in fold] + _source("msd_lung", 10)
    split = transfer_split(cases, ["msd_lung", "ctseg"], ["ctseg"], 0.2, 0, train_cases={"ctseg": CTSEG_IDS[1]})
    assert {c.source for c in split.val} == {"msd_lung"} and len(split.val) == 2
    assert sorted(c.case_id for c in split.train if c.source == "ctseg") == sorted(CTSEG_IDS[1])
    assert len(split.test) == 16 and {c.source for c in split.test} == {"ctseg"}


def test_fewshot_case_list_errors_name_the_missing_cases():
    cases = [_c("ctseg", "coronacases_001")]
    with pytest.raises(ValueError, match="coronacases_002"):
        transfer_split(cases, ["ctseg"], ["ctseg"], 0.2, 0, train_cases={"ctseg": ["coronacases_002"]})
    with pytest.raises(ValueError, match="not training sources"):
        transfer_split(cases, ["a"], ["ctseg"], 0.2, 0, train_cases={"ctseg": ["coronacases_001"]})


def test_loso_selection_validates_on_a_whole_untrained_source():
    cases = _source("a", 6) + _source("b", 5) + _source("c", 4)
    split = transfer_split(cases, ["a", "b"], ["c"], 0.2, 0, val_sources=["b"])
    assert {c.source for c in split.val} == {"b"} and len(split.val) == 5
    assert {c.source for c in split.train} == {"a"} and len(split.train) == 6  # a trains whole
    assert split.train_sources == ("a",)
    with pytest.raises(ValueError, match="nothing left to train"):
        transfer_split(cases, ["a"], ["c"], 0.2, 0, val_sources=["a"])


def test_leakage_check_allows_in_domain_sources_by_patient_only():
    a1, a2 = _c("a", "1"), _c("a", "2")
    assert_no_leakage(Split((a1,), (), (a2,), ("a",), ("a",)))  # diagonal: other patients of a trained source
    with pytest.raises(LeakageError, match="patient a/p"):
        assert_no_leakage(Split((_c("a", "1", "p"),), (), (_c("a", "2", "p"),), ("a",), ("a",)))
    with pytest.raises(LeakageError, match="held-out source"):
        assert_no_leakage(Split((_c("b", "1"),), (), (a1,), ("a",), ("b",)))


def test_a_fewshot_source_cannot_also_be_the_validation_source():
    cases = [_c("ctseg", i) for fold in CTSEG_IDS for i in fold] + _source("msd_lung", 4)
    with pytest.raises(ValueError, match="cannot both validate whole and train"):
        transfer_split(cases, ["msd_lung", "ctseg"], ["ctseg"], 0.2, 0, train_cases={"ctseg": CTSEG_IDS[0]},
                       val_sources=["ctseg"])
