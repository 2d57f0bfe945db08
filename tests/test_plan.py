"""The plan stage's record (experiments.plan): the split and settings a run decided, as a checked file."""
import copy
import json

import numpy as np
import pytest

from datamodules.datamodule import MultiSourceDataModule
from datamodules.harmonize import HarmonizerConfig
from datamodules.label_policy import CLASSES
from experiments.plan import PlanError, build_plan, case_from_record, plan_hash, read_plan, val_patients, write_plan

SOURCES = ["covid19_20", "ctseg", "mosmed"]


@pytest.fixture(scope="module")
def dm(phantom_root, tmp_path_factory):
    dm = MultiSourceDataModule(phantom_root, tmp_path_factory.mktemp("h"), SOURCES, holdout="mosmed",
                               harmonizer=HarmonizerConfig(target_spacing=(6.0, 6.0, 8.0)), patch_size=(32, 32, 16),
                               batch_size=2, samples_per_epoch=2, val_fraction=0.3)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def make(dm, **changes):
    args = dict(kind="loso", name="mosmed-test", seed=0, sources=SOURCES, split_args={"holdout": "mosmed"},
                split=dm.split, cached=dm.cached, duplicates=[g.keys for g in dm.duplicates], skipped=dm.skipped,
                data_root="/data", harmonizer=dm.harmonizer.as_dict(), patch={"patch_size": [32, 32, 16]},
                network={"name": "unet"}, evaluation={"space": "original"})
    args.update(changes)
    return build_plan(**args)


def test_plan_lists_every_case_of_the_split_once_with_its_files(dm):
    plan = make(dm)
    for role in ("train", "val", "test"):
        assert plan["roles"][role] == [c.key for c in getattr(dm.split, role)]
    assert plan["held_out"] == ["mosmed"] and plan["train_sources"] == ["covid19_20", "ctseg"]
    assert all(k.startswith("mosmed/") for k in plan["roles"]["test"])
    for c in dm.split.train + dm.split.val + dm.split.test:
        rec = plan["cases"][c.key]
        assert rec["image"] == str(c.image) and rec["patient_id"] == c.patient_id
        assert case_from_record(rec) == c  # a record gives back the case (Case equality ignores meta)
    # every training patient's cases are all in train: no patient on two sides
    roles = {k: r for r, keys in plan["roles"].items() for k in keys}
    for patient, keys in plan["patients"].items():
        assert len({roles[k] for k in keys}) == 1, patient
    assert val_patients(plan) == sorted({f"{c.source}/{c.patient_id}" for c in dm.split.val})


def test_annotated_classes_and_measured_flips_come_from_the_cache(dm):
    plan = make(dm)
    cases = plan["cases"]
    # COVID-19-20 masks lesions only; COVID-19-CT-Seg's lung+infection masks annotate both lungs too
    assert all(rec["annotated"] == ["background", "lesion"] for k, rec in cases.items() if k.startswith("covid19_20/"))
    assert any({"lung_left", "lung_right", "lesion"} <= set(rec["annotated"])
               for k, rec in cases.items() if k.startswith("ctseg/"))
    entries = {e.key: e for role in ("train", "val", "test") for e in dm.cached[role]}
    for key, rec in cases.items():
        assert rec["image_flips"] == list(entries[key].meta["image_flips"])
        assert rec["cache"] == str(entries[key].path)


def test_class_frequencies_equal_those_counted_from_the_cached_labels(dm):
    """The plan counts from the voxel numbers each cache entry recorded; the loss counts the labels."""
    import torch

    from lightning_modules.losses import class_frequencies

    plan = make(dm)
    counts, annotated = dm.class_counts(len(CLASSES))
    expected = class_frequencies(torch.as_tensor(counts), torch.as_tensor(annotated)).tolist()
    for name, value in zip(CLASSES, expected):
        got = plan["class_frequencies"][name]
        if np.isnan(value):
            assert got is None, name
        else:
            assert got == pytest.approx(value, rel=1e-6), name
    assert 0 < plan["class_frequencies"]["lesion"] < 0.5


def test_hash_follows_what_the_run_computes(dm):
    plan = make(dm)
    assert plan_hash(plan) == plan_hash(make(dm, name="other", data_root="/elsewhere"))
    moved = copy.deepcopy(plan)
    key = moved["roles"]["val"].pop()
    moved["roles"]["train"].append(key)
    assert plan_hash(moved) != plan_hash(plan)
    assert plan_hash(make(dm, patch={"patch_size": [64, 64, 16]})) != plan_hash(plan)


def test_written_plan_reads_back_and_bad_plans_name_file_and_key(dm, tmp_path):
    plan = make(dm)
    path = write_plan(tmp_path, plan)
    assert read_plan(tmp_path) == json.loads(path.read_text(encoding="utf-8"))
    bad = copy.deepcopy(plan)
    bad["roles"]["test"].append(bad["roles"]["train"][0])
    (tmp_path / "twice.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(PlanError, match=r"twice\.json.*in roles\.train and roles\.test"):
        read_plan(tmp_path / "twice.json")
    bad = copy.deepcopy(plan)
    bad["roles"]["val"].append("mosmed/nope")
    (tmp_path / "ghost.json").write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(PlanError, match=r"ghost\.json: roles\.val lists 'mosmed/nope'"):
        read_plan(tmp_path / "ghost.json")
    (tmp_path / "cut.json").write_text(path.read_text(encoding="utf-8")[:100], encoding="utf-8")
    with pytest.raises(PlanError, match=r"cut\.json: not valid JSON"):
        read_plan(tmp_path / "cut.json")
    with pytest.raises(PlanError, match=r"no plan file"):
        read_plan(tmp_path / "none")
