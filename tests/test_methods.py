"""DG methods: each hook does what it says and nothing more (hand-checked statistics, only the right
parameters change, test-time methods never see labels), and their YAML arguments match the code."""
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from experiments.config import load_config
from lightning_modules.methods import (
    DANN,
    METHODS,
    MixStyle,
    RandConv,
    build_method,
    grad_reverse,
    random_crops,
    reestimate_statistics,
)
from lightning_modules.segmentation import SegmentationModule
from tests.args import base_args

EVALUATION = {"space": "harmonized", "val_surface": False, "save_predictions": False,
              "classes": {"lesion": {"values": [3], "tolerance_mm": 3.0}}}


def tiny_module(method: str = "erm", norm: str = "batch", spatial_dims: int = 3, **params) -> SegmentationModule:
    torch.manual_seed(0)
    return SegmentationModule(
        network={"name": "unet", **base_args("networks", "unet", channels=[4, 8, 8], strides=[2, 2], num_res_units=0, norm=norm)},
        loss={"name": "dice_ce", **base_args("losses", "dice_ce")}, optim={"lr": 1e-3, "weight_decay": 0.0},
        inference={"roi_size": [16, 16, 8], "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian"},
        evaluation=EVALUATION, spatial_dims=spatial_dims, method={"name": method, **base_args("methods", method, **params)},
        train_sources=["covid19_20", "ctseg"], test_sources=["mosmed"])


def test_yaml_arguments_are_the_methods_arguments():
    cfg = load_config([])
    assert set(cfg.methods) == set(METHODS), "every registered method has its YAML block and vice versa"
    for name, block in cfg.methods.items():
        args = {k for k in block if k != "search"}
        assert args == {f.name for f in fields(METHODS.params[name])}, name
        assert set(block.get("search") or {}) <= args, f"{name}: search over unknown arguments"
    with pytest.raises(ValueError, match=r"methods\.mixstyle\.alpah: method 'mixstyle' has no argument 'alpah'"):
        build_method("mixstyle", **base_args("methods", "mixstyle"), alpah=0.3)
    with pytest.raises(ValueError, match=r"methods\.mixstyle: missing argument\(s\) \['layers'\]"):
        build_method("mixstyle", p=0.5, alpha=0.1, pairing="random")


def test_reestimated_statistics_are_the_crops_mean_and_variance():
    """A lone BatchNorm sees the crops directly: its running mean/var must be the average of the per-crop
    mean and (unbiased) variance, hand-computed; no parameter changes."""
    bn = nn.BatchNorm3d(1)
    bn.running_mean.fill_(5.0)
    with torch.no_grad():
        bn.weight.fill_(2.0)
    crops = [torch.full((1, 1, 2, 2, 1), 1.0), torch.tensor([0.0, 2.0, 4.0, 6.0]).view(1, 1, 2, 2, 1)]
    n = reestimate_statistics(bn, crops, "test")
    assert n == 2 and not bn.training
    assert bn.running_mean.item() == pytest.approx((1.0 + 3.0) / 2)
    # unbiased variances: 0 and ((3^2 + 1 + 1 + 3^2) / 3) = 20/3
    assert bn.running_var.item() == pytest.approx((0.0 + 20.0 / 3.0) / 2)
    assert bn.weight.item() == 2.0 and bn.momentum == 0.1  # momentum restored


def test_bn_adapt_changes_only_normalization_statistics_and_never_reads_labels():
    module = tiny_module("bn_adapt")
    before = {k: v.clone() for k, v in module.state_dict().items()}

    class NoLabels(dict):
        def __getitem__(self, key):
            if key == "label":
                raise AssertionError("a test-time method read a held-out label")
            return super().__getitem__(key)

    batches = [NoLabels(image=torch.rand(1, 1, 20, 18, 10) * 3 + 1, label=None, source=["mosmed"]) for _ in range(2)]
    module._trainer = SimpleNamespace(datamodule=None, predict_dataloaders=[batches], is_global_zero=True)
    module.on_predict_start()
    module.adapt_to_source("mosmed")
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "bn_adapt changed nothing"
    assert all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed), changed
    assert not module.net.training
    module.on_predict_end()
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())  # the trained state again


def _volume(source: str, case: str, image: torch.Tensor) -> dict:
    """A test batch as the volume loader collates it: one harmonized volume with a lesion block."""
    label = torch.zeros(1, 1, *image.shape[2:], dtype=torch.long)
    label[..., 4:12, 4:12, 2:6] = 3
    return {"image": image, "label": label, "annotated": torch.tensor([[True, False, False, True] + [False] * 4]),
            "spacing": torch.tensor([[1.0, 1.0, 2.0]], dtype=torch.float64), "source": [source], "case": [case]}


@pytest.mark.parametrize("method, params", [("bn_adapt", {}), ("tent", {"lr": 0.05, "steps": 2})])
def test_each_test_source_is_adapted_alone_from_the_trained_state(method, params, capsys):
    """Source a scores the same whether or not source b (other intensities) is tested too, in any order of
    cases: each source is adapted on its own volumes, starting from the trained state (tent's tuned affine
    parameters of b must not carry over to a)."""
    g = torch.Generator().manual_seed(0)
    a = [_volume("a", f"a{i}", torch.rand(1, 1, 20, 18, 10, generator=g)) for i in range(2)]
    b = [_volume("b", f"b{i}", torch.rand(1, 1, 20, 18, 10, generator=g) * 4 + 2) for i in range(2)]

    def rows_of_a(batches):
        module = tiny_module(method, **params)
        trained = {k: v.clone() for k, v in module.state_dict().items()}
        module._trainer = SimpleNamespace(datamodule=None, predict_dataloaders=[batches], is_global_zero=True)
        module.eval()
        module.on_predict_start()
        out = []
        with torch.no_grad():  # as Lightning's predict loop (inference mode off for test-time methods)
            for i, batch in enumerate(batches):
                logits = module.predict_step(batch, i)
                if batch["source"][0] == "a":
                    out.append((batch["case"][0], logits))
        module.on_predict_end()
        restored = all(torch.equal(v, module.state_dict()[k]) for k, v in trained.items())
        return out, restored

    alone, restored = rows_of_a(a)
    said_alone = capsys.readouterr().out
    with_b, restored_too = rows_of_a([b[0], a[0], b[1], a[1]])
    assert len(alone) == 2 and [c for c, _ in with_b] == [c for c, _ in alone]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(alone, with_b))
    assert restored and restored_too  # the module leaves the test as it was trained
    assert f"[method {method}] adapted on 2 unlabelled test volume(s) of a" in said_alone
    assert "volume(s) of b" in capsys.readouterr().out


def test_bn_adapt_and_tent_refuse_networks_without_what_they_adapt():
    module = tiny_module("bn_adapt", norm="instance")
    with pytest.raises(ValueError, match="no layer keeping running statistics"):
        module.method.adapt(module, [torch.rand(1, 1, 16, 16, 8)])
    module = tiny_module("tent", norm="instance")
    with pytest.raises(ValueError, match="affine parameters"):
        module.method.adapt(module, [torch.rand(1, 1, 16, 16, 8)])


def test_tent_changes_only_norm_affine_parameters_and_statistics_and_lowers_entropy():
    module = tiny_module("tent", lr=0.05, steps=5)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    images = [torch.rand(1, 1, 16, 16, 8) for _ in range(2)]
    norm_params = {f"net.{n}" for n, m in module.net.named_modules() if isinstance(m, nn.BatchNorm3d)
                   for n in (f"{n}.weight", f"{n}.bias")}
    crops = list(random_crops(images, [16, 16, 8], 4, 0))

    def entropy():
        with torch.no_grad():
            p = torch.softmax(module.net(torch.cat(crops)), 1)
            return -(p * p.clamp_min(1e-12).log()).sum(1).mean().item()

    reestimate_statistics(module.net, crops, "test")  # same statistics as tent ends with: compare like with like
    h0 = entropy()
    module.method.adapt(module, images)
    after = module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    stats = {k for k in changed if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert changed - stats and (changed - stats) <= norm_params, changed - stats - norm_params
    assert all(p.requires_grad for p in module.net.parameters())  # frozen only while adapting
    assert entropy() < h0


def test_stage_hooks_perturb_only_in_training_and_mix_statistics():
    module = tiny_module("mixstyle", p=1.0, layers=1)
    stage = module.net.encoder_stages()[0]
    x = torch.rand(2, 1, 16, 16, 8)
    module.net.eval()
    with torch.no_grad():
        a, b = module.net(x), module.net(x)
    assert torch.equal(a, b)  # eval: no perturbation
    # MixStyle on a hand-made feature map: two samples with equal statistics are left as they are...
    ms = MixStyle(**base_args("methods", "mixstyle", p=1.0, alpha=0.1))
    f = torch.randn(1, 3, 4, 4, 2)
    same = torch.cat([f, f.flip(-1)])  # same per-channel mean/std, other layout
    assert torch.allclose(ms.perturb(same), same, atol=1e-5)
    # ...and otherwise each sample's channel means move to a convex combination of the two
    other = torch.cat([f, 3 * f + 5])
    out = ms.perturb(other)
    mu = other.mean((2, 3, 4))
    mo = out.mean((2, 3, 4))
    lo, hi = torch.minimum(mu[0], mu[1]), torch.maximum(mu[0], mu[1])
    assert ((mo >= lo - 1e-4) & (mo <= hi + 1e-4)).all()
    # hooked: a training forward with grad differs from eval
    module.net.train()
    hit = []
    stage.register_forward_hook(lambda m, i, o: hit.append(o.shape))
    module.net(x)
    assert hit


def test_randconv_keeps_each_samples_intensity_statistics():
    rc = RandConv(**base_args("methods", "randconv", p=1.0, kernel_sizes=[3], mix=False))
    x = torch.rand(2, 1, 12, 12, 6) * torch.tensor([1.0, 4.0]).view(2, 1, 1, 1, 1)
    module = SimpleNamespace(hparams=SimpleNamespace(spatial_dims=3))
    out = rc.transform_batch({"image": x, "label": torch.zeros_like(x)}, module)["image"]
    assert not torch.allclose(out, x)
    assert torch.allclose(out.mean((1, 2, 3, 4)), x.mean((1, 2, 3, 4)), atol=1e-5)
    assert torch.allclose(out.std((1, 2, 3, 4)), x.std((1, 2, 3, 4)), atol=1e-4)


def test_bigaug_moves_images_and_keeps_labels_in_their_values():
    m = build_method("bigaug", **base_args("methods", "bigaug", p=1.0), seed=3)
    label = torch.zeros(2, 1, 24, 24, 8, dtype=torch.uint8)
    label[:, :, 6:18, 6:18] = 3
    label[:, :, 8:10, 8:10, :2] = 254  # ignore
    image = torch.rand(2, 1, 24, 24, 8)
    out = m.transform_batch({"image": image, "label": label, "source": ["a", "b"]}, None)
    assert out["image"].shape == image.shape and out["label"].shape == label.shape
    assert out["label"].dtype == torch.uint8 and set(out["label"].unique().tolist()) <= {0, 3, 254}
    assert not torch.allclose(out["image"], image)
    assert out["source"] == ["a", "b"]


def test_gradient_reversal_and_dann_domain_head():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    grad_reverse(x, 0.5).sum().backward()
    assert x.grad.tolist() == [-0.5, -0.5]
    with pytest.raises(ValueError, match="at least two training sources"):
        SegmentationModule(network={"name": "unet", **base_args("networks", "unet", channels=[4, 8], strides=[2], num_res_units=0)},
                           loss={"name": "dice_ce", **base_args("losses", "dice_ce")}, optim={"lr": 1e-3, "weight_decay": 0.0},
                           inference={"roi_size": [16, 16, 8], "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian"},
                           evaluation=EVALUATION, method={"name": "dann", **base_args("methods", "dann")}, train_sources=["ctseg"])
    module = tiny_module("dann", weight=1.0, schedule=False)
    assert isinstance(module.method, DANN)
    head = module.domain_head
    assert head[-1].out_features == 2 and any(p is q for p in head.parameters() for q in module.parameters())
    batch = {"image": torch.rand(2, 1, 16, 16, 8), "label": torch.zeros(2, 1, 16, 16, 8, dtype=torch.uint8),
             "annotated": torch.tensor([[True, False, False, True, False, False, False, False]] * 2),
             "source": ["covid19_20", "ctseg"]}
    module.log = lambda *a, **k: None
    loss = module.training_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and head[-1].weight.grad.abs().sum() > 0


def test_source_balanced_changes_the_sampling_only():
    assert METHODS["source_balanced"].data_overrides() == {"sampling": "source_balanced"}
    assert METHODS["erm"].data_overrides() == {}


def test_thick_slices_average_neighbouring_slices_and_return_to_the_grid():
    from lightning_modules.methods import _thick_slices

    x = torch.tensor([0.0, 2.0, 4.0, 6.0]).view(1, 1, 1, 4).expand(1, 2, 2, 4).clone()
    # pairs averaged to (1, 5), then linear back onto 4 slices (half-voxel centres, edges clamped)
    assert _thick_slices(x, 2)[0, 0, 0].tolist() == pytest.approx([1.0, 2.0, 4.0, 5.0])
    assert torch.equal(_thick_slices(x[..., :1], 4), x[..., :1])  # one slice: nothing to thicken
