import numpy as np
import pytest
import torch

from datamodules.datamodule import MultiSourceDataModule
from datamodules.harmonize import HarmonizerConfig
from lightning_modules.segmentation import SegmentationModule, aggregate, case_metrics

SOURCES3 = ["covid19_20", "mosmed", "ctseg"]


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
        assert ann == ([True, True, True, True] if src == "ctseg" else [True, False, False, True])
    # fg_fraction=1: every patch is centred on a lesion voxel, so every patch holds lesion.
    assert all((batch["label"][i] == 3).any() for i in range(4))
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["source"] == ["mosmed"] and test_batch["image"].shape[0] == 1
    assert {c.meta["source"] for c in dm.cached["test"]} == {"mosmed"}


def test_a_few_steps_lower_the_loss(dm):
    torch.manual_seed(0)
    module = SegmentationModule(
        network={"name": "unet", "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1},
        loss={"name": "dice_ce"}, optim={"lr": 3e-3, "weight_decay": 0.0},
        inference={"roi_size": [32, 32, 16], "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"},
        test_sources=["mosmed"])
    batch = next(iter(dm.train_dataloader()))
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = module.loss_fn(module(batch["image"]), batch["label"], batch["annotated"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_case_metrics_and_aggregate_hand_values():
    ref = np.zeros((4, 4, 2), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, :2, 0] = 3    # 2 lesion voxels
    pred[0, 1:3, 0] = 3  # 2 predicted, 1 overlapping -> Dice 0.5
    ref[2:, :, :] = 1
    pred[2:, :, :] = 1
    row = case_metrics(pred, ref, [True, False, False, True], spacing=(2.0, 2.0, 5.0))
    assert row["dice"] == pytest.approx(0.5)
    assert row["ref_ml"] == pytest.approx(2 * 20 / 1000)
    assert "dice_lung" not in row  # lungs unannotated: never scored
    full = case_metrics(pred, ref, [True] * 4, spacing=(1, 1, 1))
    assert full["dice_lung_left"] == 1.0 and full["dice_lung_right"] == 1.0  # both empty/equal
    agg = aggregate([{"source": "a", "dice": 0.2}, {"source": "a", "dice": 0.4}, {"source": "b", "dice": 0.9}], "test")
    assert agg["test/a/dice"] == pytest.approx(0.3) and agg["test/b/dice"] == pytest.approx(0.9)
    assert agg["test/mean/dice"] == pytest.approx(0.6)  # sources weigh equally


def test_prepare_and_setup_touch_each_case_once(dm):
    n = len(dm.split.train) + len(dm.split.val) + len(dm.split.test)
    assert dm.cache.hits + dm.cache.misses == n
    dm.prepare_data()  # Lightning calls both again in fit, validate and test
    dm.setup("test")
    assert dm.cache.hits + dm.cache.misses == n
