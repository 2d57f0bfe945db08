"""Issue 17, fidelity of the DG methods to their papers and reference code, each against a hand-computed
value or a copy of the reference's forward: pairing never a sample with itself (and across sources when
asked), DSU's gradients through its statistics and its insertion points, RandConv's consistency KL, DANN's
domain head from step 0 and its per-iteration reversal scale, weighted_ce's patch-level frequencies, and the
seed presets' paper settings."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from datamodules.cases import Case
from datamodules.label_policy import IGNORE
from datamodules.splits import transfer_split
from experiments.config import load_config
from lightning_modules.losses import WeightedCELoss, patch_class_frequencies
from lightning_modules.methods import DSU, consistency_kl, dann_lambda, pair_partners
from tests.args import base_args
from tests.test_methods import tiny_module

# ---------------------------------------------------------------- MixStyle pairing


def test_random_pairing_never_pairs_a_sample_with_itself():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 8):
        for _ in range(200):
            partner = pair_partners(torch.zeros(n, dtype=torch.long), generator=g)
            assert (partner != torch.arange(n)).all()
    # two samples: always swapped (randperm(2) was the identity half the time)
    assert pair_partners(torch.zeros(2, dtype=torch.long)).tolist() == [1, 0]
    with pytest.raises(ValueError, match="at least two samples"):
        pair_partners(torch.zeros(1, dtype=torch.long))


def test_crossdomain_pairing_picks_another_source_when_there_is_one():
    g = torch.Generator().manual_seed(1)
    domains = torch.tensor([0, 0, 0, 1, 2, 2])
    seen = set()
    for _ in range(300):
        partner = pair_partners(domains, cross_domain=True, generator=g)
        assert (domains[partner] != domains).all()
        seen |= set(zip(range(6), partner.tolist()))
    assert {(0, 3), (0, 4), (0, 5), (3, 0), (3, 4)} <= seen  # every other-source sample is a candidate
    # one source only: random pairing, still never the sample itself
    same = pair_partners(torch.zeros(4, dtype=torch.long), cross_domain=True, generator=g)
    assert (same != torch.arange(4)).all()


def _styled(means):
    """[N, 2, 4, 4, 2] features whose per-channel mean is means[i] and std 1 for every sample."""
    torch.manual_seed(0)
    f = torch.randn(len(means), 2, 4, 4, 2)
    f = (f - f.mean((2, 3, 4), keepdim=True)) / f.std((2, 3, 4), keepdim=True)
    return f + torch.tensor(means, dtype=torch.float32).view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("pairing", ["random", "crossdomain"])
def test_mixstyle_hook_mixes_with_another_sample_and_across_sources(pairing):
    # alpha huge: lambda = 0.5 +- 0.002, so a mixed mean names the partner: (m_i + m_partner) / 2
    module = tiny_module("mixstyle", p=1.0, layers=1, alpha=1e6, pairing=pairing)
    module.train()
    method, stage = module.method, module.net.encoder_stages()[0]
    method.begin_step({"source": ["covid19_20", "covid19_20", "ctseg", "ctseg"]}, module)
    means = [0.0, 1.0, 10.0, 11.0]
    feats = _styled(means)
    for _ in range(30):
        out = method._hook(stage, None, feats).mean((2, 3, 4))[:, 0]
        partner_mean = 2 * out - torch.tensor(means)
        for i, m in enumerate(partner_mean.tolist()):
            assert min(abs(m - x) for j, x in enumerate(means) if j != i) < 0.4, "paired with itself"
            if pairing == "crossdomain":
                other = means[2:] if i < 2 else means[:2]
                assert min(abs(m - x) for x in other) < 0.4, f"sample {i} paired within its source"


def test_training_step_hands_each_samples_source_to_the_feature_hooks():
    module = tiny_module("mixstyle", p=1.0, layers=1, pairing="crossdomain")
    module.log = lambda *a, **k: None
    batch = {"image": torch.rand(3, 1, 16, 16, 8), "label": torch.zeros(3, 1, 16, 16, 8, dtype=torch.uint8),
             "annotated": torch.tensor([[True, False, False, True, False, False, False, False]] * 3),
             "source": ["ctseg", "covid19_20", "ctseg"]}
    module.training_loss(batch)
    assert module.method.domains_of(3).tolist() == [0, 1, 0]
    assert module.method.domains_of(6).tolist() == [0, 0, 1, 1, 0, 0]  # 2D: slices carry their patch's source

# ---------------------------------------------------------------- DSU


def reference_dsu(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """DistributionUncertainty.forward of github.com/lixiaotong97/DSU (dsu.py), written for any number of
    spatial dims: (B, C) statistics, never detached."""
    b, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))
    mean = x.mean(dim=dims)
    std = (x.var(dim=dims) + eps).sqrt()
    sqrtvar_mu = (mean.var(dim=0, keepdim=True) + eps).sqrt().repeat(b, 1)
    sqrtvar_std = (std.var(dim=0, keepdim=True) + eps).sqrt().repeat(b, 1)
    beta = mean + torch.randn_like(sqrtvar_mu) * sqrtvar_mu
    gamma = std + torch.randn_like(sqrtvar_std) * sqrtvar_std
    shape = (b, c) + (1,) * len(dims)
    return (x - mean.reshape(shape)) / std.reshape(shape) * gamma.reshape(shape) + beta.reshape(shape)


def test_dsu_matches_the_reference_forward_and_its_gradients():
    dsu = DSU(**base_args("methods", "dsu", p=1.0))
    x0 = torch.randn(4, 3, 5, 4, 3) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1, 1) + 1.0
    w = torch.randn_like(x0)  # a loss that weighs every output differently
    grads, outs = [], []
    for fn in (dsu.perturb, reference_dsu):
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(7)
        y = fn(x)
        (y * w).sum().backward()
        outs.append(y.detach())
        grads.append(x.grad)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-4)  # detached statistics give another gradient


def test_dsu_is_inserted_after_every_encoder_stage_by_default():
    module = tiny_module("dsu")
    stages = module.net.encoder_stages()
    assert len(stages) == 3 and all(len(s._forward_hooks) == 1 for s in stages)
    assert all(len(s._forward_hooks) == 0 for s in tiny_module("dsu", layers=1).net.encoder_stages()[1:])
    with pytest.raises(ValueError, match=r"methods\.dsu\.layers=4, but the network has 3 encoder stages"):
        tiny_module("dsu", layers=4)

def test_a_stage_of_one_voxel_per_channel_is_left_unperturbed():
    """SwinUNETR's deepest stage on a 32-voxel patch is 1x1x1: its std over one voxel is 0/0 (NaN); the hook
    leaves it as is instead of spreading NaN through the loss. Two voxels are perturbed."""
    dsu = DSU(**base_args("methods", "dsu", p=1.0))
    one = torch.randn(2, 4, 1, 1, 1)
    assert torch.isnan(one.var((2, 3, 4))).all()  # what the statistics would be
    with torch.enable_grad():
        module = torch.nn.Identity().train()
        assert dsu._hook(module, None, one) is None
        two = torch.randn(2, 4, 2, 1, 1)
        out = dsu._hook(module, None, two)
    assert out is not None and torch.isfinite(out).all() and not torch.equal(out, two)


# ---------------------------------------------------------------- RandConv consistency


def test_consistency_kl_hand_value():
    # one voxel, two classes: p1 = (1/2, 1/2), p2 = (3/4, 1/4), mixture (5/8, 3/8)
    z1 = torch.zeros(1, 2, 1, 1, 1)
    z2 = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1, 1)
    kl1 = 0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    kl2 = 0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)
    assert consistency_kl([z1, z2]).item() == pytest.approx((kl1 + kl2) / 2, rel=1e-5)
    assert consistency_kl([z2, z2, z2]).item() == pytest.approx(0.0, abs=1e-6)


def test_consistency_kl_has_finite_gradients_when_a_view_is_certain():
    """Logits 200 apart: softmax is exactly 0 for one class in float32. Through F.kl_div's target that gave
    NaN gradients (two RandConv runs of the methods sweep died of it); KL(p || mix) stays as before."""
    z = [torch.tensor([[[0.0], [200.0]]]), torch.tensor([[[200.0], [0.0]]]), torch.tensor([[[1.0], [0.0]]])]
    z = [t.requires_grad_(True) for t in z]
    loss = consistency_kl(z)
    loss.backward()
    assert all(torch.isfinite(t.grad).all() for t in z)
    # by hand: p1 = (0, 1), p2 = (1, 0), p3 = (e/(1+e), 1/(1+e)); mix = mean; KL(p||mix) summed over classes
    e = torch.e
    p3 = torch.tensor([e / (1 + e), 1 / (1 + e)], dtype=torch.float64)
    mix = (torch.tensor([0.0, 1.0], dtype=torch.float64) + torch.tensor([1.0, 0.0], dtype=torch.float64) + p3) / 3
    kl = (-torch.log(mix[1]) - torch.log(mix[0]) + (p3 * (p3.log() - mix.log())).sum()) / 3
    assert abs(loss.item() - kl.item()) < 1e-6


def test_randconv_consistency_is_on_by_default_and_is_the_weighted_kl_of_three_views():
    assert base_args("methods", "randconv")["consistency"] == 10.0  # their RC_mix setting
    module = tiny_module("randconv", p=1.0)
    module.log = lambda *a, **k: None
    rc = module.method
    x = torch.rand(2, 1, 16, 16, 8)
    shifts = iter([0.1, 0.2, 0.3])
    rc.random_view = lambda img, dims: img + next(shifts)  # three known views of the same images
    batch = rc.transform_batch({"image": x, "label": torch.zeros(2, 1, 16, 16, 8, dtype=torch.uint8),
                                "source": ["ctseg", "ctseg"]}, module)
    assert torch.allclose(batch["image"], x + 0.1)
    logits = module.net(batch["image"])
    extra = rc.extra_loss(batch, module, logits)
    expect = 10.0 * consistency_kl([logits, module.net(x + 0.2), module.net(x + 0.3)])
    assert extra.item() > 0 and extra.item() == pytest.approx(expect.item(), rel=1e-5)
    assert rc.extra_loss(batch, module, logits) is None  # the views are used once
    off = tiny_module("randconv", p=1.0, consistency=0.0).method
    off.transform_batch({"image": x}, module)
    assert off.extra_loss(batch, module, logits) is None

# ---------------------------------------------------------------- DANN


def test_dann_lambda_per_iteration_hand_values():
    assert dann_lambda(0, 100) == 0.0
    assert dann_lambda(25, 100) == pytest.approx(2 / (1 + math.exp(-2.5)) - 1) == pytest.approx(0.84828364)
    assert dann_lambda(100, 100) == pytest.approx(2 / (1 + math.exp(-10)) - 1)
    assert dann_lambda(7, float("inf")) == 1.0


@pytest.mark.parametrize("step, lam", [(0, 0.0), (25, 0.8482836399575131)])
def test_dann_head_learns_from_step_0_and_the_reversed_gradient_follows_lambda_p(step, lam):
    module = tiny_module("dann", weight=0.5, schedule=True)
    module.log = lambda *a, **k: None
    method = module.method
    module._trainer = SimpleNamespace(global_step=step, estimated_stepping_batches=100)
    feats = torch.randn(2, 8, 4, 4, 2, requires_grad=True)
    method._features = feats
    batch = {"source": ["covid19_20", "ctseg"]}
    module.domain_head.zero_grad()
    loss = method.extra_loss(batch, module)
    loss.backward()
    head_grad = module.domain_head[-1].weight.grad.clone()
    # the domain classifier's own gradient: its plain cross-entropy, at full rate whatever the step
    module.domain_head.zero_grad()
    plain = feats.detach().clone().requires_grad_(True)
    F.cross_entropy(module.domain_head(plain), torch.tensor([0, 1])).backward()
    assert head_grad.abs().sum() > 0 and torch.allclose(head_grad, module.domain_head[-1].weight.grad)
    # into the encoder: reversed, scaled by weight * lambda_p
    assert torch.allclose(feats.grad, -0.5 * lam * plain.grad, atol=1e-7)

# ---------------------------------------------------------------- weighted_ce


def test_patch_class_frequencies_known_batch():
    # sample A, lesion-only source: 3 background, 1 lesion; sample B annotates lungs: lung_l x2, lung_r, lesion
    target = torch.tensor([[0, 0, 0, 3], [1, 1, 2, 3]])
    valid = torch.ones_like(target, dtype=torch.bool)
    ann = torch.zeros(2, 8, dtype=torch.bool)
    ann[:, [0, 3]] = True
    ann[1, [1, 2]] = True
    f = patch_class_frequencies(target, valid, ann)
    assert f[[0, 1, 2, 3]].tolist() == pytest.approx([3 / 8, 2 / 4, 1 / 4, 2 / 8])
    assert torch.isnan(f[[4, 5, 6, 7]]).all()  # annotated by no patch of the batch


def test_weighted_ce_patch_frequencies_hand_value():
    loss = WeightedCELoss(**base_args("losses", "weighted_ce"))
    assert base_args("losses", "weighted_ce")["frequencies"] == "patch" and not loss.needs_frequencies
    # one lesion-only patch: 3 background voxels, 1 lesion, 1 IGNORE; freq (3/4, 1/4) -> weights (0.5, 1.5)
    target = torch.tensor([[0, 0, 0, 3, IGNORE]]).view(1, 5, 1, 1)
    ann = torch.tensor([[True, False, False, True, False, False, False, False]])
    logits = torch.zeros(1, 8, 5, 1, 1)  # uniform 1/8: merged background 5/8, lesion (+ GGO, consolidation) 3/8
    expect = (3 * 0.5 * -math.log(5 / 8) + 1.5 * -math.log(3 / 8)) / (3 * 0.5 + 1.5)
    assert loss(logits, target, ann).item() == pytest.approx(expect, rel=1e-5)
    assert expect == pytest.approx(0.7254164411287309)
    volume = WeightedCELoss(**base_args("losses", "weighted_ce", frequencies="volume"))
    assert volume.needs_frequencies  # whole-volume frequencies: set at fit start, still available

# ---------------------------------------------------------------- seed presets


def test_seed001_preset_has_the_papers_window_and_spacing():
    d = load_config(["preset=seed001"]).data
    assert list(d.window) == [-1350.0, 150.0]  # width 1500, level -600
    assert list(d.target_spacing) == [1.0, 1.0, 3.0]
    assert d.val_fraction == 0.1


def _case(src, cid):
    from pathlib import Path
    return Case(src, cid, cid, image=Path(f"/x/{cid}"), label=Path(f"/x/{cid}_m"))


def test_seed004_preset_tests_the_ten_coronacases_only():
    d = load_config(["preset=seed004"]).data
    assert list(d.window) == [-1000.0, 300.0] and dict(d.test_cases) == {"ctseg": ["coronacases_*"]}
    ctseg = [f"coronacases_{i:03d}" for i in range(1, 11)] + [f"radiopaedia_{i}_8{i}_0" for i in range(10)]
    cases = ([_case("ctseg", c) for c in ctseg] + [_case("mosmed", f"study_{i}") for i in range(3)]
             + [_case("covid19_20", f"v{i}") for i in range(5)])
    split = transfer_split(cases, ["covid19_20"], ["mosmed", "ctseg"], 0.2, 0,
                           test_cases={k: list(v) for k, v in d.test_cases.items()})
    tested = sorted(c.case_id for c in split.test if c.source == "ctseg")
    assert tested == ctseg[:10] and sum(c.source == "mosmed" for c in split.test) == 3
    with pytest.raises(ValueError, match=r"data\.test_cases names source\(s\) \['nsclc'\]"):
        transfer_split(cases, ["covid19_20"], ["ctseg"], 0.2, 0, test_cases={"nsclc": ["*"]})
    with pytest.raises(ValueError, match=r"data\.test_cases\.ctseg: no test case of ctseg matches"):
        transfer_split(cases, ["covid19_20"], ["ctseg"], 0.2, 0, test_cases={"ctseg": ["nope_*"]})

# ---------------------------------------------------------------- methods comparison batch sizes


def test_methods_preset_states_a_meaningful_batch_and_keeps_instance_norm():
    from experiments.build import build_module

    cfg = load_config(["experiment=methods"])
    assert cfg.data.batch_size >= 8 and cfg.methods.mixstyle.pairing == "crossdomain"
    assert cfg.networks.unet.norm == "instance"
    norms = {}
    for name in ("erm", "mixstyle", "dsu", "bn_adapt", "tent"):
        c = load_config(["experiment=methods", f"method.name={name}"])
        module = build_module(c, ["mosmed"], train_sources=["covid19_20", "ctseg"])
        norms[name] = {type(m).__name__ for m in module.net.modules() if "Norm" in type(m).__name__}
    # only the test-time methods, which adapt batch-norm statistics, switch the network to batch norm
    assert norms["erm"] == norms["mixstyle"] == norms["dsu"] == {"InstanceNorm3d"}
    assert norms["bn_adapt"] == norms["tent"] == {"BatchNorm3d"}
