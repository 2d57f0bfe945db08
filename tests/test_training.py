import numpy as np
import pytest
import torch

from datamodules.datamodule import MultiSourceDataModule
from datamodules.harmonize import HarmonizerConfig
from evaluation.scoring import score_case
from lightning_modules.segmentation import SegmentationModule, aggregate, eval_classes
from tests.args import base_args

SOURCES3 = ["covid19_20", "mosmed", "ctseg"]
EVALUATION = {"space": "original", "val_surface": False, "save_predictions": False,
              "classes": {"lesion": {"values": [3], "tolerance_mm": 3.0}, "lung": {"values": [1, 2, 3], "tolerance_mm": 1.0}}}


@pytest.fixture(scope="module")
def dm(phantom_root, tmp_path_factory):
    torch.manual_seed(0)
    d = MultiSourceDataModule(phantom_root, tmp_path_factory.mktemp("h"), SOURCES3, holdout="mosmed",
                              harmonizer=HarmonizerConfig(target_spacing=(6.0, 6.0, 8.0)), patch_size=(32, 32, 16),
                              batch_size=4, samples_per_epoch=8, fg_fraction=1.0)
    d.prepare_data()
    d.setup("fit")
    return d


def test_batches_carry_sources_and_never_the_holdout(dm):
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 32, 32, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, 1, 32, 32, 16)
    assert set(batch["source"]) <= {"covid19_20", "ctseg"}
    for src, sid, ann in zip(batch["source"], batch["source_id"].tolist(), batch["annotated"].tolist()):
        assert SOURCES3[sid] == src
        assert ann == ([True, True, True, True, False, False, False, False] if src == "ctseg" else [True, False, False, True, False, False, False, False])
    # fg_fraction=1: every patch is centred on a lesion voxel, so every patch holds lesion.
    assert all((batch["label"][i] == 3).any() for i in range(4))
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["source"] == ["mosmed"] and test_batch["image"].shape[0] == 1
    assert {c.meta["source"] for c in dm.cached["test"]} == {"mosmed"}


def test_a_few_steps_lower_the_loss(dm):
    torch.manual_seed(0)
    module = SegmentationModule(
        network={"name": "unet", **base_args("networks", "unet", channels=[8, 16, 32], strides=[2, 2], num_res_units=1)},
        loss={"name": "dice_ce", **base_args("losses", "dice_ce")}, optim={"lr": 3e-3, "weight_decay": 0.0},
        inference={"roi_size": [32, 32, 16], "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"},
        evaluation=EVALUATION, test_sources=["mosmed"])
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = module.loss_fn(module(batch["image"]), batch["label"].long(), batch["annotated"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_eval_classes_follow_what_the_source_annotates_and_aggregate_by_source():
    ref = np.zeros((4, 4, 2), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, :2, 0] = 3    # 2 lesion voxels
    pred[0, 1:3, 0] = 3  # 2 predicted, 1 overlapping -> Dice 0.5
    ref[2:, :, :] = 1
    pred[2:, :, :] = 1
    mosmed_like = eval_classes(EVALUATION, [True, False, False, True, False, False, False, False])
    assert [c.name for c in mosmed_like] == ["lesion"]  # lungs unannotated: never scored
    rows = score_case(pred, ref, (2.0, 2.0, 5.0), mosmed_like)
    assert rows[0]["dice"] == pytest.approx(0.5) and rows[0]["ref_ml"] == pytest.approx(2 * 20 / 1000)
    full = eval_classes(EVALUATION, [True] * 4 + [False] * 4)
    lung = score_case(pred, ref, (1, 1, 1), full)[1]
    # lung = values 1+2+3: ref 16 + 2 voxels, pred 16 + 2, overlap 16 + 1 -> Dice 34/36
    assert lung["class"] == "lung" and lung["dice"] == pytest.approx(34 / 36)
    rows = [{"source": "a", "case": "1", "class": "lesion", "dice": 0.2},
            {"source": "a", "case": "2", "class": "lesion", "dice": 0.4},
            {"source": "b", "case": "3", "class": "lesion", "dice": 0.9},
            {"source": "b", "case": "3", "class": "lung", "dice": 0.5}]
    agg = aggregate([dict(r, **{m: float("nan") for m in ("iou", "nsd", "hd95", "asd", "rv", "ref_ml", "pred_ml")})
                     for r in rows], "test")
    assert agg["test/a/dice"] == pytest.approx(0.3) and agg["test/b/dice"] == pytest.approx(0.9)
    assert agg["test/mean/dice"] == pytest.approx(0.6)  # sources weigh equally
    assert agg["test/b/dice_lung"] == 0.5 and agg["test/mean/dice_lung"] == 0.5 and "test/a/dice_lung" not in agg
    assert "test/a/hd95" not in agg  # undefined everywhere: no key rather than NaN
    assert agg["test/b/cases"] == 1.0


def test_a_total_miss_raises_the_mean_hd95_and_every_mean_is_counted():
    """Source a: one perfect case (HD95 0) and one total miss. The miss scores the grid diagonal, 10 x 20 x 5
    voxels of 1 x 0.5 x 2 mm -> sqrt(300) mm, so a's mean HD95 is sqrt(300) / 2, not the 0 of the hit alone
    (a NaN left out of the mean would have made the miss invisible). Source b: a false alarm on an empty
    reference, whose RV is undefined (left out of the mean, counted)."""
    classes = eval_classes(EVALUATION, [True, False, False, True])
    spacing, diagonal = (1.0, 0.5, 2.0), np.sqrt(300.0)
    ref = np.zeros((10, 20, 5), np.uint8)
    ref[2:5, 4:10, 1:3] = 3
    empty = np.zeros_like(ref)
    cases = [("a", "hit", ref, ref), ("a", "miss", empty, ref), ("b", "alarm", ref, empty)]
    rows = [dict(r, source=src, case=case) for src, case, pred, truth in cases
            for r in score_case(pred, truth, spacing, classes)]
    agg = aggregate(rows, "test")
    hit_only = aggregate(rows[:1], "test")
    assert hit_only["test/a/hd95"] == 0.0
    assert agg["test/a/hd95"] > hit_only["test/a/hd95"]
    assert agg["test/a/hd95"] == agg["test/a/asd"] == pytest.approx(diagonal / 2)
    assert [r["surface_worst_case"] for r in rows] == [False, True, True]
    assert agg["test/a/hd95/n"] == 2 and agg["test/a/hd95/n_undefined"] == 0
    assert agg["test/mean/hd95"] == pytest.approx((diagonal / 2 + diagonal) / 2)  # sources weigh equally
    assert agg["test/mean/hd95/n"] == 3 and agg["test/mean/hd95/n_undefined"] == 0
    # RV: a's hit 1 and miss 0; b's false alarm undefined, so b has no RV mean, but the mean over sources
    # counts it as left out
    assert agg["test/a/rv"] == 0.5 and "test/b/rv" not in agg and "test/b/rv/n_undefined" not in agg
    assert agg["test/mean/rv"] == 0.5 and agg["test/mean/rv/n"] == 2 and agg["test/mean/rv/n_undefined"] == 1
    assert agg["test/mean/selection_dice"] == agg["test/mean/dice"] == pytest.approx((0.5 + 0.0) / 2)
    assert "test/mean/selection_dice/n" not in agg  # a selection score, not a mean of its own


def test_lung_sides_are_scored_wherever_a_source_annotates_both_lungs():
    """base.yaml's classes: COVID-19-CT-Seg (either mask with lungs) and StructSeg get each lung besides whole
    lungs, with the lesions inside them; a lesion-only source gets neither."""
    from omegaconf import OmegaConf

    from datamodules.sources import SOURCES
    from experiments.config import load_config

    evaluation = OmegaConf.to_container(load_config([]).evaluation)

    def scored(source, policy):
        return {c.name: c.lesions_by_side for c in eval_classes(
            evaluation, SOURCES[source].POLICIES[policy].annotated_vector().tolist())}

    sides = {"lung": False, "lung_left": True, "lung_right": True}
    assert scored("ctseg", "lung_and_infection") == {"lesion": False, **sides}
    assert scored("ctseg", "lung") == scored("structseg", "oar") == sides
    assert scored("mosmed", "lesion") == {"lesion": False}


def test_prepare_and_setup_touch_each_case_once(dm):
    n = len(dm.split.train) + len(dm.split.val) + len(dm.split.test)
    assert dm.cache.hits + dm.cache.misses == n
    dm.prepare_data()  # Lightning calls both again in fit, validate and test
    dm.setup("test")
    assert dm.cache.hits + dm.cache.misses == n


def test_both_views_score_lesions_everywhere_and_types_where_annotated():
    from datamodules.sources import SOURCES

    evaluation = {"classes": {"lesion": {"values": [3, 6, 7], "tolerance_mm": 3.0},
                              "ggo": {"values": [6], "tolerance_mm": 3.0},
                              "lung": {"values": [1, 2, 3, 6, 7], "tolerance_mm": 1.0}}}
    merged = SOURCES["mosmed"].POLICIES["lesion"].annotated_vector().tolist()
    split = SOURCES["medseg"].POLICIES["ggo_consolidation"].annotated_vector().tolist()
    full = SOURCES["ctseg"].POLICIES["lung_and_infection"].annotated_vector().tolist()
    assert [c.name for c in eval_classes(evaluation, merged)] == ["lesion"]
    assert [c.name for c in eval_classes(evaluation, split)] == ["lesion", "ggo"]
    assert [c.name for c in eval_classes(evaluation, full)] == ["lesion", "lung"]
    raw = np.array([[[0, 1, 2, 3]]])
    assert SOURCES["medseg"].POLICIES["ggo_consolidation"].remap(raw).tolist() == [[[0, 6, 7, 254]]]
    assert SOURCES["medseg"].POLICIES["lesion"].remap(raw).tolist() == [[[0, 3, 3, 254]]]
