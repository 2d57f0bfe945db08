import math

import numpy as np
import pytest
import torch

from lightning_modules.losses import PartialDiceCELoss, merged_log_probs


def test_merged_probability_hand_value():
    # One voxel, logits give p = softmax([0, ln2, ln3, ln4]) = [1, 2, 3, 4] / 10.
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))[None, :, None]
    ann = torch.tensor([[True, False, False, True]])  # lesion-only source
    q = merged_log_probs(logits, ann).exp()[0, :, 0]
    assert q[0].item() == pytest.approx(0.6)  # background + both lungs: (1 + 2 + 3) / 10
    assert q[3].item() == pytest.approx(0.4)
    full = merged_log_probs(logits, torch.ones(1, 4, dtype=torch.bool)).exp()[0, :, 0]
    assert full[0].item() == pytest.approx(0.1)


def test_ce_part_hand_value_and_no_penalty_on_unannotated_lung():
    loss = PartialDiceCELoss(ce_weight=1.0, dice_weight=0.0)
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0]))[None, :, None]
    target = torch.tensor([[0]])
    lesion_only = torch.tensor([[True, False, False, True]])
    assert loss(logits, target, lesion_only).item() == pytest.approx(-math.log(0.6))
    assert loss(logits, target, torch.ones(1, 4, dtype=torch.bool)).item() == pytest.approx(-math.log(0.1))
    # Moving probability from background to lung costs nothing where lungs are unannotated ...
    x = torch.zeros(1, 4, 1, requires_grad=True)
    loss(x, target, lesion_only).backward()
    g = x.grad[0, :, 0]
    assert g[0].item() == pytest.approx(g[1].item()) == pytest.approx(g[2].item())
    # ... but is pushed down where they are annotated.
    x2 = torch.zeros(1, 4, 1, requires_grad=True)
    loss(x2, target, torch.ones(1, 4, dtype=torch.bool)).backward()
    assert x2.grad[0, 1, 0].item() > 0 > x2.grad[0, 0, 0].item()


def test_dice_part_hand_value_ignores_unannotated_classes():
    loss = PartialDiceCELoss(ce_weight=0.0, dice_weight=1.0, smooth=0.0)
    # Two voxels: perfectly confident lesion on voxel 0, background on voxel 1.
    big = 50.0
    logits = torch.tensor([[[-big, big], [-big, -big], [-big, -big], [big, -big]]])  # [1, 4, 2]
    target = torch.tensor([[3, 0]])
    ann = torch.tensor([[True, False, False, True]])
    assert loss(logits, target, ann).item() == pytest.approx(0.0, abs=1e-6)
    # Half-right lesion prediction: p(lesion) = 0.5 on both voxels -> dice = 2*0.5/(1+1) = 0.5.
    logits2 = torch.zeros(1, 4, 2)
    logits2[0, 3] = math.log(3.0)  # softmax over [1,1,1,3] -> lesion 0.5
    assert loss(logits2, target, ann).item() == pytest.approx(0.5, abs=1e-6)


def test_target_in_unannotated_class_is_an_error():
    loss = PartialDiceCELoss()
    with pytest.raises(ValueError, match="does not annotate"):
        loss(torch.zeros(1, 4, 2), torch.tensor([[1, 0]]), torch.tensor([[True, False, False, True]]))


def test_ignored_voxels_take_no_part_in_the_loss():
    import torch

    from datamodules.label_policy import IGNORE, LabelPolicy
    from lightning_modules.losses import PartialDiceCELoss

    policy = LabelPolicy("t/tumour_ignored", {0: "background", 1: "lesion", 2: "ignore"}, ("lesion",))
    raw = np.array([[[0, 1, 2, 2]]])
    assert policy.remap(raw).tolist() == [[[0, 3, IGNORE, IGNORE]]]
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 2, 2, 1)
    target = torch.tensor([[[[0], [3]], [[IGNORE], [IGNORE]]]])
    annotated = torch.tensor([[True, False, False, True]])
    loss = PartialDiceCELoss()
    base = loss(logits, target, annotated)
    changed = logits.clone()
    changed[:, :, 1] = torch.randn(1, 4, 2, 1) * 10  # anything at the ignored voxels
    assert torch.allclose(loss(changed, target, annotated), base)
    # and it equals the loss on the two valid voxels alone
    alone = loss(logits[:, :, :1], target[:, :1], annotated)
    assert torch.allclose(alone, base, atol=1e-6)


def test_untyped_lesions_merge_ggo_and_consolidation_into_lesion_not_background():
    """Both views: a lesion-only source may be explained by GGO/consolidation, never by background."""
    from datamodules.label_policy import CLASS_INDEX, CLASSES
    from datamodules.sources import SOURCES

    n = len(CLASSES)
    ggo, cons, les = CLASS_INDEX["ggo"], CLASS_INDEX["consolidation"], CLASS_INDEX["lesion"]
    merged_view = torch.tensor(SOURCES["mosmed"].POLICIES["lesion"].annotated_vector())[None]
    split_view = torch.tensor(SOURCES["medseg"].POLICIES["ggo_consolidation"].annotated_vector())[None]
    assert split_view[0, les] and split_view[0, ggo] and not merged_view[0, ggo]  # lesion implied by its children

    def ce(logit_class, target_class, annotated):
        logits = torch.full((1, n, 1), -20.0)
        logits[0, logit_class, 0] = 20.0
        return PartialDiceCELoss(dice_weight=0.0)(logits, torch.tensor([[target_class]]), annotated).item()

    assert ce(ggo, les, merged_view) < 1e-6        # lesion voxel, mass on GGO: fine in the merged view
    assert ce(cons, les, merged_view) < 1e-6
    assert ce(ggo, 0, merged_view) > 30            # background voxel, mass on GGO: wrong, not merged into bg
    assert ce(CLASS_INDEX["lung_left"], 0, merged_view) < 1e-6  # unannotated lungs still merge into background
    assert ce(les, ggo, split_view) > 30           # typed source: untyped lesion is not GGO
    assert ce(ggo, ggo, split_view) < 1e-6
