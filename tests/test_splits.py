import pytest

from datamodules.cases import Case
from datamodules.datamodule import discover_sources
from datamodules.splits import LeakageError, Split, assert_no_leakage, check_batch_sources, loso_split


def _c(src, cid, pid=None, labelled=True):
    return Case(src, cid, pid or cid, image=__import__("pathlib").Path(f"/x/{cid}"),
                label=__import__("pathlib").Path(f"/x/{cid}_m") if labelled else None)


def test_loso_on_phantoms_holds_source_out_and_groups_patients(phantom_root):
    cases, _ = discover_sources(phantom_root, ["covid19_20", "mosmed", "ctseg"])
    split = loso_split(cases, ["covid19_20", "mosmed", "ctseg"], "mosmed", val_fraction=0.2, seed=0)
    assert {c.source for c in split.test} == {"mosmed"}
    assert {c.source for c in split.train + split.val} == {"covid19_20", "ctseg"}
    expected_test = sorted(c.case_id for c in cases if c.source == "mosmed" and c.labelled)
    assert sorted(c.case_id for c in split.test) == expected_test
    assert not any(not c.labelled for c in split.train + split.val + split.test)
    val_sources = {c.source for c in split.val}
    assert val_sources == {"covid19_20", "ctseg"}  # each training source gives validation patients
    # radiopaedia_10_85902_1 and _3 are one patient: never on both sides.
    sides = {c.case_id: role for role in ("train", "val") for c in getattr(split, role)}
    assert sides["radiopaedia_10_85902_1"] == sides["radiopaedia_10_85902_3"]


def test_split_is_deterministic_and_seeded(phantom_root):
    cases, _ = discover_sources(phantom_root, ["covid19_20", "mosmed", "ctseg"])
    a = loso_split(cases, ["covid19_20", "mosmed", "ctseg"], "ctseg", 0.3, seed=0)
    b = loso_split(cases, ["covid19_20", "mosmed", "ctseg"], "ctseg", 0.3, seed=0)
    assert [c.key for c in a.val] == [c.key for c in b.val]
    vals = {tuple(sorted(c.key for c in loso_split(cases, ["covid19_20", "mosmed", "ctseg"], "ctseg", 0.3, s).val))
            for s in range(6)}
    assert len(vals) > 1


def test_leakage_assertions():
    a, b = _c("s1", "a", "p1"), _c("s1", "b", "p1")
    with pytest.raises(LeakageError, match="patient s1/p1 is in both train and val"):
        assert_no_leakage(Split((a,), (b,), (), ("s1",), ("s2",)))
    with pytest.raises(LeakageError, match="held-out source cases in train"):
        assert_no_leakage(Split((_c("s2", "z"),), (), (_c("s2", "y"),), ("s1",), ("s2",)))
    with pytest.raises(LeakageError, match="held-out source"):
        check_batch_sources(["s1", "s2"], ["s2"])
    check_batch_sources(["s1", "s1"], ["s2"])


def test_holdout_must_be_a_source():
    with pytest.raises(ValueError, match="not among the sources"):
        loso_split([_c("s1", "a")], ["s1"], "s9", 0.2, 0)
