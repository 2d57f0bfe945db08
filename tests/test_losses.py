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
    loss = PartialDiceCELoss(**base_args("losses", "dice_ce", ce_weight=1.0, dice_weight=0.0))
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
    loss = PartialDiceCELoss(**base_args("losses", "dice_ce", ce_weight=0.0, dice_weight=1.0, smooth=0.0))
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
    loss = PartialDiceCELoss(**base_args("losses", "dice_ce"))
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
    loss = PartialDiceCELoss(**base_args("losses", "dice_ce"))
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
        return PartialDiceCELoss(**base_args("losses", "dice_ce", dice_weight=0.0))(logits, torch.tensor([[target_class]]), annotated).item()

    assert ce(ggo, les, merged_view) < 1e-6        # lesion voxel, mass on GGO: fine in the merged view
    assert ce(cons, les, merged_view) < 1e-6
    assert ce(ggo, 0, merged_view) > 30            # background voxel, mass on GGO: wrong, not merged into bg
    assert ce(CLASS_INDEX["lung_left"], 0, merged_view) < 1e-6  # unannotated lungs still merge into background
    assert ce(les, ggo, split_view) > 30           # typed source: untyped lesion is not GGO
    assert ce(ggo, ggo, split_view) < 1e-6


# ---- weighted_ce, lung_jaccard, soft_kl, focal ------------------------------------------------------
# Hand values use 4 channels (background, lung_left, lung_right, lesion) and logits log([1, 2, 3, 4]) at
# every voxel, i.e. p = [0.1, 0.2, 0.3, 0.4]; target [[0, 3], [1, IGNORE]] on a 2x2 slice.

from datamodules.label_policy import IGNORE as IGN  # noqa: E402
from lightning_modules.losses import (  # noqa: E402
    LOSSES,
    FocalLoss,
    LungJaccardLoss,
    SoftKLLoss,
    WeightedCELoss,
    build_loss,
    class_frequencies,
    inverse_frequency_weights,
)
from tests.args import base_args  # noqa: E402

FULL = torch.tensor([[True, True, True, True]])
LESION_ONLY = torch.tensor([[True, False, False, True]])
FREQ = torch.tensor([0.5, 0.2, 0.2, 0.1])


def _p1234(*spatial):
    return torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])).reshape(1, 4, *[1] * len(spatial)).expand(1, 4, *spatial).clone()


def _target(rows):
    return torch.tensor([rows])


def _with_freq(loss):
    if loss.needs_frequencies:
        loss.set_class_frequencies(FREQ)
    return loss


def test_class_frequencies_count_over_annotating_cases_and_parents_hold_children():
    counts = torch.tensor([[90.0, 0, 0, 10], [50, 20, 20, 10]])
    ann = torch.tensor([[True, False, False, True], [True, True, True, True]])
    f = class_frequencies(counts, ann)
    assert f.tolist() == pytest.approx([140 / 200, 20 / 100, 20 / 100, 20 / 200])
    typed = torch.zeros(1, 8)
    typed[0, 0], typed[0, 6], typed[0, 7] = 90, 6, 4  # ggo 6, consolidation 4, no untyped lesion
    ann8 = torch.tensor([[True, False, False, True, False, False, True, True]])
    f8 = class_frequencies(typed, ann8)
    assert f8[3].item() == pytest.approx(0.10) and f8[6].item() == pytest.approx(0.06)
    assert torch.isnan(f8[1])  # never annotated


def test_inverse_frequency_weights_hand_value():
    # 1/f = [2, 5, 5, 10], mean 5.5; a class never seen (0 or NaN) takes the largest weight
    assert inverse_frequency_weights(FREQ).tolist() == pytest.approx([2 / 5.5, 5 / 5.5, 5 / 5.5, 10 / 5.5])
    w = inverse_frequency_weights(torch.tensor([0.8, 0.2, 0.0, float("nan")]))
    assert w.tolist() == pytest.approx([1.25 / 3.125, 5 / 3.125, 5 / 3.125, 5 / 3.125])


@pytest.mark.parametrize("cls, name", [(WeightedCELoss, "weighted_ce"), (SoftKLLoss, "soft_kl")])
def test_frequency_losses_without_frequencies_say_what_to_call(cls, name):
    loss = cls(**base_args("losses", name, **({"frequencies": "volume"} if name == "weighted_ce" else {})))
    assert loss.needs_frequencies
    with pytest.raises(RuntimeError, match=r"set_class_frequencies"):
        loss(_p1234(2, 2), _target([[0, 3], [1, IGN]]), FULL)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        loss.set_class_frequencies([1.5, 0.1, 0.1, 0.1])


def test_frequencies_are_not_saved_in_checkpoints():
    loss = _with_freq(WeightedCELoss(**base_args("losses", "weighted_ce", frequencies="volume")))
    assert "class_freq" not in loss.state_dict()
    assert not WeightedCELoss(**base_args("losses", "weighted_ce", weights=[1, 1, 1, 1])).needs_frequencies and not SoftKLLoss(**base_args("losses", "soft_kl", weighted=False)).needs_frequencies


def test_weighted_ce_hand_value():
    loss = _with_freq(WeightedCELoss(**base_args("losses", "weighted_ce", frequencies="volume")))
    w0, w1, w3 = 2 / 5.5, 5 / 5.5, 10 / 5.5  # scale cancels in the weighted mean; written for clarity
    expect = (w0 * math.log(10) + w3 * math.log(2.5) + w1 * math.log(5)) / (w0 + w3 + w1)
    assert loss(_p1234(2, 2), _target([[0, 3], [1, IGN]]), FULL).item() == pytest.approx(expect, rel=1e-5)
    # lesion-only: background voxels score the merged q = 0.1 + 0.2 + 0.3, weighted as background
    expect = (2 * w0 * -math.log(0.6) + w3 * -math.log(0.4)) / (2 * w0 + w3)
    assert loss(_p1234(2, 2), _target([[0, 3], [0, IGN]]), LESION_ONLY).item() == pytest.approx(expect, rel=1e-5)
    explicit = WeightedCELoss(**base_args("losses", "weighted_ce", weights=[1.0, 1.0, 1.0, 3.0]))
    expect = (math.log(10) + 3 * math.log(2.5) + math.log(5)) / 5
    assert explicit(_p1234(2, 2), _target([[0, 3], [1, IGN]]), FULL).item() == pytest.approx(expect, rel=1e-5)


def test_lung_jaccard_hand_value():
    loss = LungJaccardLoss(**base_args("losses", "lung_jaccard", smooth=0.0))
    # lung sample: region = lung voxel (p 0.4, y 0) + lesion voxel (p 0.4, y 1): 1 - 0.4 / (0.8 + 1 - 0.4)
    assert loss(_p1234(2, 2), _target([[0, 1], [3, IGN]]), FULL).item() == pytest.approx(1 - 0.4 / 1.4)
    # lesion-only sample: no lung mask, all 3 valid voxels count: 1 - 0.4 / (1.2 + 1 - 0.4)
    assert loss(_p1234(2, 2), _target([[0, 0], [3, IGN]]), LESION_ONLY).item() == pytest.approx(1 - 0.4 / 1.8)
    assert LungJaccardLoss(**base_args("losses", "lung_jaccard", smooth=1.0))(_p1234(2, 2), _target([[0, 1], [3, IGN]]), FULL).item() == pytest.approx(
        1 - 1.4 / 2.4)
    # typed source (8 channels, uniform p = 1/8): opacity = lesion + GGO + consolidation = 3/8
    ann = torch.tensor([[True, True, True, True, False, False, True, True]])
    val = LungJaccardLoss(**base_args("losses", "lung_jaccard", smooth=0.0))(torch.zeros(1, 8, 1, 2), _target([[6, 7]]), ann).item()
    assert val == pytest.approx(1 - 0.75 / (0.75 + 2 - 0.75))


def test_lung_jaccard_ignores_lesion_predicted_outside_the_lung_only_where_lungs_are_known():
    loss = LungJaccardLoss(**base_args("losses", "lung_jaccard"))
    logits = _p1234(2, 2)
    outside = logits.clone()
    outside[0, 3, 0, 0] = 5.0  # strong lesion at the background voxel, outside the lung
    t_lung, t_les = _target([[0, 1], [3, IGN]]), _target([[0, 0], [3, IGN]])
    assert loss(outside, t_lung, FULL).item() == pytest.approx(loss(logits, t_lung, FULL).item())
    assert loss(outside, t_les, LESION_ONLY).item() > loss(logits, t_les, LESION_ONLY).item() + 0.05
    # a sample that does not annotate lesion takes no part
    lungs_only = torch.tensor([[True, True, True, False]])
    assert loss(logits, _target([[0, 1], [1, IGN]]), lungs_only).item() == 0.0


def test_soft_kl_hard_limit_is_weighted_ce_with_complement_weights():
    loss = _with_freq(SoftKLLoss(**base_args("losses", "soft_kl", sigma=0.0)))
    # w = 1 - f = [0.5, 0.8, 0.8, 0.9]; KL to a one-hot = -log q_t; mean over the 3 valid voxels
    expect = (0.5 * math.log(10) + 0.9 * math.log(2.5) + 0.8 * math.log(5)) / 3
    assert loss(_p1234(2, 2), _target([[0, 3], [1, IGN]]), FULL).item() == pytest.approx(expect, rel=1e-5)
    expect = (2 * 0.5 * -math.log(0.6) + 0.9 * -math.log(0.4)) / 3  # merged background weighs as background
    assert loss(_p1234(2, 2), _target([[0, 3], [0, IGN]]), LESION_ONLY).item() == pytest.approx(expect, rel=1e-5)


def test_soft_kl_blurred_boundary_hand_value_and_ignore_does_not_leak():
    # 2 channels (background, lung_left), a boundary between 2 voxels; sigma 1, truncate 1: kernel
    # [e^-1/2, 1, e^-1/2]; normalized over valid voxels each voxel keeps a = 1 / (1 + e^-1/2) of its class.
    a = 1 / (1 + math.exp(-0.5))
    kl = a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5)  # prediction q = [0.5, 0.5]
    loss = SoftKLLoss(**base_args("losses", "soft_kl", sigma=[0.0, 1.0], truncate=1.0, weighted=False))
    ann = torch.tensor([[True, True]])
    assert loss(torch.zeros(1, 2, 1, 2), _target([[0, 1]]), ann).item() == pytest.approx(kl, rel=1e-5)
    assert loss(torch.zeros(1, 2, 1, 3), _target([[0, 1, IGN]]), ann).item() == pytest.approx(kl, rel=1e-5)
    y, _, _ = loss.soft_target(torch.zeros(1, 2, 1, 2), _target([[0, 1]]), ann)
    assert y[0, :, 0, 0].tolist() == pytest.approx([a, 1 - a])


def test_soft_kl_takes_probabilistic_labels_as_they_are():
    loss = SoftKLLoss(**base_args("losses", "soft_kl", weighted=False))
    y = torch.tensor([0.7, 0.3])[None, :, None].expand(1, 2, 2).clone()
    y[0, :, 1] = 0.0  # unlabelled voxel
    expect = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert loss(torch.zeros(1, 2, 2), y, torch.tensor([[True, True]])).item() == pytest.approx(expect, rel=1e-5)
    with pytest.raises(ValueError, match="does not annotate"):
        loss(torch.zeros(1, 2, 2), y, torch.tensor([[True, False]]))


def test_focal_hand_value():
    t = _target([[0, 3], [1, IGN]])
    expect = (0.81 * math.log(10) + 0.36 * math.log(2.5) + 0.64 * math.log(5)) / 3  # (1 - q)^2 * -log q
    assert FocalLoss(**base_args("losses", "focal"))(_p1234(2, 2), t, FULL).item() == pytest.approx(expect, rel=1e-5)
    expect = (1 * 0.81 * math.log(10) + 4 * 0.36 * math.log(2.5) + 2 * 0.64 * math.log(5)) / 3
    assert FocalLoss(**base_args("losses", "focal", alpha=[1, 2, 3, 4]))(_p1234(2, 2), t, FULL).item() == pytest.approx(expect, rel=1e-5)
    expect = (2 * 0.16 * -math.log(0.6) + 0.36 * -math.log(0.4)) / 3
    assert FocalLoss(**base_args("losses", "focal"))(_p1234(2, 2), _target([[0, 3], [0, IGN]]), LESION_ONLY).item() == pytest.approx(expect, rel=1e-5)
    assert FocalLoss(**base_args("losses", "focal", gamma=0.0))(_p1234(2, 2), t, FULL).item() == pytest.approx(
        PartialDiceCELoss(**base_args("losses", "dice_ce", dice_weight=0.0))(_p1234(2, 2), t, FULL).item(), rel=1e-6)


# ---- contract over the whole registry ---------------------------------------------------------------

ALL = sorted(LOSSES)


def _batch(spatial, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, *spatial, generator=g)
    target = torch.zeros(2, *spatial, dtype=torch.long)
    target[0].view(-1)[:3] = torch.tensor([1, 2, 3])  # sample 0 annotates everything
    target[1].view(-1)[1] = 3                          # sample 1 is lesion-only
    target[:, -1].view(2, -1)[:, -1] = IGN
    return logits, target, torch.tensor([[True, True, True, True], [True, False, False, True]])


def test_registry_holds_the_losses_with_one_line_descriptions():
    assert {"dice_ce", "weighted_ce", "lung_jaccard", "soft_kl", "focal"} <= set(ALL)
    for name in ALL:
        doc = (LOSSES[name].__doc__ or "").strip().splitlines()
        assert doc and doc[0].strip(), name


@pytest.mark.parametrize("spatial", [(4, 5), (3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", ALL)
def test_every_loss_2d_3d_finite_gradients(name, spatial):
    loss = _with_freq(build_loss(name, **base_args("losses", name)))
    logits, target, ann = _batch(spatial)
    x = logits.clone().requires_grad_(True)
    val = loss(x, target, ann)
    val.backward()
    assert val.dim() == 0 and torch.isfinite(val) and torch.isfinite(x.grad).all()
    assert loss(logits, target[:, None], ann).item() == pytest.approx(val.item())  # [B, 1, *spatial] target


@pytest.mark.parametrize("name", ALL)
def test_every_loss_ignores_unannotated_classes_and_ignore_voxels(name):
    loss = _with_freq(build_loss(name, **base_args("losses", name)))
    logits, target, ann = _batch((4, 5))
    base = loss(logits, target, ann).item()
    # lesion-only sample 1: redistribute background + lungs, keeping their summed probability
    moved = logits.clone()
    mass = torch.logsumexp(logits[1, :3], 0)
    moved[1, :3] = mass + torch.log_softmax(torch.randn(3, 4, 5) * 3, 0)
    assert loss(moved, target, ann).item() == pytest.approx(base, rel=1e-5, abs=1e-6)
    # anything at the IGNORE voxels
    junk = logits.clone()
    junk[:, :, -1, -1] = torch.randn(2, 4) * 10
    assert loss(junk, target, ann).item() == pytest.approx(base, rel=1e-5, abs=1e-6)
    # a label of a class the source does not annotate is an error, as in dice_ce
    bad = target.clone()
    bad[1, 0, 0] = 1
    with pytest.raises(ValueError, match="does not annotate"):
        loss(logits, bad, ann)
