"""Labels are decided by class group (opacity split across its types is still an opacity), and an
opacity unannotated inside a lung-only source's lungs is merged into that lung, not into background."""
import math

import numpy as np
import pytest
import torch

from datamodules.label_policy import CLASS_INDEX, CLASSES, labels_from_probs
from datamodules.sources import SOURCES
from tests.args import base_args

N = len(CLASSES)
BG, LL, LR = 0, CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"]
LES, GGO, CONS = CLASS_INDEX["lesion"], CLASS_INDEX["ggo"], CLASS_INDEX["consolidation"]


def probs(*pairs, shape=(1,)):
    p = torch.zeros(N, *shape)
    for c, v in pairs:
        p[c] = v
    return p


@pytest.mark.parametrize("pairs,expected", [
    (((BG, 0.40), (LES, 0.30), (GGO, 0.30)), LES),            # opacity 0.6 beats background 0.4
    (((BG, 0.40), (GGO, 0.35), (CONS, 0.25)), GGO),            # ... and the type is the group's top
    (((BG, 0.40), (LL, 0.35), (LR, 0.25)), LL),                # lungs 0.6: the more probable side
    (((BG, 0.50), (LES, 0.25), (CONS, 0.25)), BG),             # a tie goes to the earlier group
    (((BG, 0.25), (LL, 0.375), (LES, 0.25), (GGO, 0.125)), LL),  # lungs 0.375 = opacity 0.375: earlier group
    (((BG, 0.20), (LL, 0.30), (LES, 0.25), (GGO, 0.25)), LES),  # opacity 0.5 beats lungs 0.3
])
def test_group_decision_hand_values(pairs, expected):
    assert labels_from_probs(probs(*pairs)).tolist() == [expected]
    # a plain argmax would have said otherwise wherever the group splits its mass
    if expected in (LES, GGO) and max(v for _, v in pairs) == dict(pairs).get(BG):
        assert probs(*pairs).argmax(0).item() == BG


def test_restore_to_original_decides_by_group_after_resampling():
    """(bg 0.4, lesion 0.3, GGO 0.3) in a block, resampled back 2x finer: the block is opacity."""
    from datamodules.harmonize import restore_to_original

    p = probs((BG, 1.0), shape=(4, 4, 4))
    p[BG, 1:3, 1:3, 1:3] = 0.4
    p[LES, 1:3, 1:3, 1:3] = 0.3
    p[GGO, 1:3, 1:3, 1:3] = 0.3
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    meta = {"original": {"shape": [8, 8, 8], "affine": affine.tolist()}, "canonical_affine": affine.tolist(),
            "spacing": [2.0, 2.0, 2.0]}
    out = restore_to_original(p, meta)
    assert out.shape == (8, 8, 8)
    assert set(np.unique(out[3:5, 3:5, 3:5])) == {LES}  # the block's centre, far from the resampled edge
    assert out[0, 0, 0] == BG and out[7, 7, 7] == BG


def test_validation_scores_the_group_decision(tmp_path):
    """The module's harmonized-grid scoring takes the group decision: Dice 1, not 0, for a split opacity."""
    from lightning_modules.segmentation import SegmentationModule

    ev = {"space": "harmonized", "val_surface": False, "save_predictions": False,
          "classes": {"lesion": {"values": [3, 6, 7], "tolerance_mm": 3.0}}}
    module = SegmentationModule(network={"name": "unet", **base_args("networks", "unet", channels=[4, 8], strides=[2], num_res_units=0)},
                                loss={"name": "dice_ce", **base_args("losses", "dice_ce")}, optim={"lr": 1e-3, "weight_decay": 0.0},
                                inference={"roi_size": [8, 8, 8], "sw_batch_size": 1, "overlap": 0.0,
                                           "mode": "constant"}, evaluation=ev)
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.uint8)
    label[0, 0, 2:6, 2:6, 2:6] = LES
    logits = torch.log(probs((BG, 1.0), shape=(8, 8, 8)).clamp_min(1e-6))[None]
    split = torch.log(torch.tensor([0.4, 1e-6, 1e-6, 0.3, 1e-6, 1e-6, 0.3, 1e-6]))
    logits[0, :, 2:6, 2:6, 2:6] = split[:, None, None, None]
    module.predict_volume = lambda image: logits
    annotated = torch.tensor(SOURCES["mosmed"].POLICIES["lesion"].annotated_vector())[None]
    batch = {"image": torch.zeros(1, 1, 8, 8, 8), "label": label, "annotated": annotated, "case": ["c"],
             "source": ["mosmed"], "spacing": torch.tensor([[1.0, 1.0, 1.0]]), "meta_path": [str(tmp_path)]}
    module._eval_step(batch, "val")
    (row,) = module.scored_rows("val")
    assert row["class"] == "lesion" and row["dice"] == 1.0


# ------------------------------------------------------------------------------ nested partial labels
def lung_only():
    return torch.tensor(SOURCES["ctseg"].POLICIES["lung"].annotated_vector())[None]


def one_voxel(mass_on: int, big: float = 20.0) -> torch.Tensor:
    logits = torch.full((1, N, 1), -big)
    logits[0, mass_on, 0] = big
    return logits


@pytest.mark.parametrize("name", ["dice_ce", "weighted_ce", "focal"])
def test_lesion_inside_a_lung_only_mask_is_not_pushed_to_background(name):
    """COVID-19-CT-Seg Lung_Mask (lungs include the lesions, lesion unannotated): a voxel labelled left lung
    may hold a lesion. Mass on lesion there costs what mass on the left lung costs (today's code merged it
    into background and charged it ~40)."""
    from lightning_modules.losses import build_loss

    kwargs = {"weights": [1.0] * N} if name == "weighted_ce" else ({"dice_weight": 0.0} if name == "dice_ce" else {})
    loss = build_loss(name, **base_args("losses", name, **kwargs))
    ann = lung_only()
    assert not ann[0, LES] and ann[0, LL]
    on_lung = loss(one_voxel(LL), torch.tensor([[LL]]), ann).item()
    on_lesion = loss(one_voxel(LES), torch.tensor([[LL]]), ann).item()
    assert on_lung < 1e-6 and on_lesion == pytest.approx(on_lung, abs=1e-6)
    assert loss(one_voxel(GGO), torch.tensor([[LR]]), ann).item() < 1e-6  # typed opacities likewise
    assert loss(one_voxel(LR), torch.tensor([[LL]]), ann).item() > 10     # the other lung is still wrong
    assert loss(one_voxel(BG), torch.tensor([[LL]]), ann).item() > 10     # and so is background


def test_nested_merge_hand_value_and_gradient():
    """p = [0.1, 0.2, 0.3, 0.4] on (background, left lung, right lung, lesion) at a left-lung voxel of a
    lung-only source: the left lung's merged probability is 0.2 + 0.4 (the lesion inside it), background
    keeps 0.1, and the lesion logit is pushed *up* with the lung, not down."""
    from lightning_modules.losses import PartialDiceCELoss, merged_log_probs

    logits = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))[None, :, None]
    ann = torch.tensor([[True, True, True, False]])
    q = merged_log_probs(logits, ann, torch.tensor([[LL]])).exp()[0, :, 0]
    assert q[BG].item() == pytest.approx(0.1) and q[LL].item() == pytest.approx(0.6)
    assert q[LR].item() == pytest.approx(0.3)
    # without the target (no voxel labels known) the lesion stays merged into background, as before
    assert merged_log_probs(logits, ann).exp()[0, BG, 0].item() == pytest.approx(0.5)
    x = logits.clone().requires_grad_(True)
    loss = PartialDiceCELoss(**base_args("losses", "dice_ce", dice_weight=0.0))(x, torch.tensor([[LL]]), ann)
    assert loss.item() == pytest.approx(-math.log(0.6))
    loss.backward()
    assert x.grad[0, 3, 0].item() < 0 and x.grad[0, LL, 0].item() < 0 < x.grad[0, BG, 0].item()
