"""NETWORKS contract: every registered network in every supported dimensionality, plus the pure pieces
(nnU-Net planning, 2.5D neighbour gathering, chunked slice-wise inference) against hand-written values."""
import pytest
import torch
import torch.nn as nn

from lightning_modules.networks import NETWORKS, Network, build_network, neighbour_index, plan_dynunet
from tests.args import base_args

SPACING = (1.5, 1.5, 5.0)  # thick slices: exercises the anisotropic plans
N_CLASSES = 8
# Tiny settings over base.yaml's (tests.args.base_args): each forward+backward on (2, 1, 32, 32, 16) well under 1 s.
TINY = {
    "unet": dict(channels=(8, 16, 32), strides=(2, 2), num_res_units=1),
    "basic_unet": dict(features=(4, 4, 8, 8, 16, 4)),
    "dynunet": dict(max_levels=3, base_filters=8, max_filters=32, deep_supervision=False),  # one head unless asked
    "anisotropic_unet": dict(levels=3, anisotropic_levels=1, base_filters=8, max_filters=32),
    "segresnet": dict(init_filters=8, blocks_down=(1, 1, 1), blocks_up=(1, 1)),
    "attention_unet": dict(channels=(8, 16, 32), strides=(2, 2)),
    "unetr": dict(feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4),
    # batch norm: a 32-voxel input leaves a 1-voxel bottleneck, which instance norm refuses in training
    "swinunetr": dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), norm="batch"),
}
TINY_PATCH = {"swinunetr": (32, 32, 32)}  # SwinUNETR needs multiples of 32 on every axis
CASES = [(name, d) for name in sorted(NETWORKS) for d in NETWORKS[name].dims]


def tiny(name: str, dims: int, **extra) -> tuple[Network, tuple[int, int, int]]:
    patch = TINY_PATCH.get(name, (32, 32, 16))
    return build_network(name, dims, 1, N_CLASSES, patch, SPACING, **base_args("networks", name, **{**TINY[name], **extra})), patch


# ------------------------------------------------------------------------------------------ plan_dynunet

def test_plan_thick_slices_goes_in_plane_until_spacing_catches_up():
    # spacing per level: (0.7, 0.7, 5) -> (1.4, 1.4, 5) -> (2.8, 2.8, 5): z within 2x only from the 3rd block
    kernels, strides = plan_dynunet((128, 128, 32), (0.7, 0.7, 5.0))
    assert kernels == [(3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)]
    assert strides == [(1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)]  # bottleneck 4x4x4


def test_plan_isotropic_halves_every_axis_until_min_size():
    kernels, strides = plan_dynunet((64, 64, 64), (1.0, 1.0, 1.0), max_levels=5, min_size=4)
    assert kernels == [(3, 3, 3)] * 5
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2)]  # 64 -> 4; 4 -> 2 is too small
    # per-axis stop: z 48 -> 24 -> 12 -> 6 cannot go to 3 while x and y still can
    kernels, strides = plan_dynunet((96, 64, 48), (1.0, 1.0, 1.0))
    assert kernels == [(3, 3, 3)] * 5
    assert strides == [(1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 1)]


def test_plan_caps_levels_and_works_in_2d():
    assert plan_dynunet((128, 128, 128), (1.0, 1.0, 1.0), max_levels=2)[1] == [(1, 1, 1), (2, 2, 2), (2, 2, 2)]
    kernels, strides = plan_dynunet((256, 256), (0.7, 0.7))
    assert kernels == [(3, 3)] * 6 and strides == [(1, 1)] + [(2, 2)] * 5


def test_plan_very_thick_slices_keep_kernel_one_where_z_is_still_coarse():
    # spacing: (0.5,.5,5) (1,1,5) (2,2,5) (4,4,5) (8,8,10) then x,y stop at 4 voxels and only z halves
    # to (8,8,20): 20 > 2 * 8, so the bottleneck gets a 1 along z again
    kernels, strides = plan_dynunet((64, 64, 16), (0.5, 0.5, 5.0))
    assert kernels == [(3, 3, 1), (3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3), (3, 3, 1)]
    assert strides == [(1, 1, 1), (2, 2, 1), (2, 2, 1), (2, 2, 1), (2, 2, 2), (1, 1, 2)]


def test_anisotropic_unet_uses_the_plan_of_thick_slices():
    net = build_network("anisotropic_unet", 3, 1, N_CLASSES, (128, 128, 32), (0.7, 0.7, 5.0),
                        **base_args("networks", "anisotropic_unet", base_filters=4, max_filters=8))
    assert (list(net.net.kernel_size), list(net.net.strides)) == plan_dynunet((128, 128, 32), (0.7, 0.7, 5.0))
    assert net.divisor == (32, 32, 8) and net.stage_names[0] == "input_block"


# ------------------------------------------------------------------------------------------- contract

def test_every_network_has_tiny_settings_and_a_description():
    assert set(TINY) == set(NETWORKS)
    for name, builder in NETWORKS.items():
        assert set(builder.dims) <= {2, 3} and builder.dims, name
        assert 10 < len(builder.__doc__.strip().splitlines()[0]) <= 110, name


@pytest.mark.parametrize("name,dims", CASES)
def test_network_contract(name, dims):
    torch.manual_seed(0)
    net, patch = tiny(name, dims)
    assert len(net.divisor) == 3 and all(p % d == 0 for p, d in zip(patch, net.divisor))
    assert dims == 3 or net.divisor[2] == 1
    seen = {}

    def record(stage_name):  # returns None: a hook's return value would replace the stage output
        def hook(module, inputs, output):
            seen.setdefault(stage_name, output)
        return hook

    for stage_name, module in zip(net.stage_names, net.encoder_stages()):
        module.register_forward_hook(record(stage_name))
    x = torch.randn(2, 1, *patch)
    y = net(x)
    assert y.shape == (2, N_CLASSES, *patch)
    y.square().mean().backward()
    # every trainable parameter is used: DDP without find_unused_parameters needs that
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    assert list(seen) == net.stage_names and len(seen) >= 3  # all ran, in the listed (shallow -> deep) order
    batch = 2 if dims == 3 else 2 * patch[2]  # a 2D net sees every slice of both patches
    sizes = []
    for o in seen.values():
        assert isinstance(o, torch.Tensor) and o.dim() == dims + 2 and o.shape[0] == batch
        sizes.append(o.shape[2:].numel())
    assert sizes == sorted(sizes, reverse=True)  # resolution never grows with depth
    assert net.heads(x)[0].shape == y.shape and net.margin == 0
    # DG methods replace stage outputs through forward hooks: that must reach the logits
    net.eval()
    with torch.no_grad():
        base = net(x)
        for module in (net.encoder_stages()[0], net.encoder_stages()[-1]):
            handle = module.register_forward_hook(lambda m, i, o: torch.ones_like(o))
            assert not torch.allclose(net(x), base)
            handle.remove()


def test_stage_names_of_nested_monai_structures():
    assert tiny("unet", 3)[0].stage_names == ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule"]
    assert tiny("attention_unet", 3)[0].stage_names == ["model.0", "model.1.submodule.0",
                                                        "model.1.submodule.1.submodule"]
    assert tiny("dynunet", 3)[0].stage_names == ["input_block", "downsamples.0", "downsamples.1", "bottleneck"]


# ------------------------------------------------------------------------------------------------ 2.5D

def test_context_slices_are_neighbours_in_order_with_edge_replication():
    assert neighbour_index(4, 1).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]]
    b, c, depth, k = 2, 2, 5, 2
    # voxel value encodes (batch, channel, x, y, slice) so any mix-up shows
    x = torch.zeros(b, c, 3, 4, depth)
    for i in range(b):
        for ch in range(c):
            x[i, ch] = (1000 * i + 100 * ch + 10 * torch.arange(3)[:, None, None] + torch.arange(4)[None, :, None]
                        + 0.01 * torch.arange(depth)[None, None, :])
    net = Network(nn.Identity(), 2, context=k)  # the "2D net" returns its (2k+1)*C input channels
    y = net(x)
    assert y.shape == (b, (2 * k + 1) * c, 3, 4, depth) and net.margin == k
    # channel j*C + ch of slice z holds channel ch of slice z-k+j; by hand for the first and last slice
    src = {0: [0, 0, 0, 1, 2], 4: [2, 3, 4, 4, 4], 2: [0, 1, 2, 3, 4]}
    for z, slices in src.items():
        for j, s in enumerate(slices):
            for ch in range(c):
                assert torch.equal(y[:, j * c + ch, :, :, z], x[:, ch, :, :, s]), (z, j, ch)


def test_context_slices_widen_the_first_conv_only():
    net = build_network("unet", 2, 1, N_CLASSES, (32, 32, 16), SPACING, context_slices=2, **base_args("networks", "unet", **TINY["unet"]))
    first = next(m for m in net.net.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 5 and net.margin == 2 and net.context == 2
    assert net(torch.randn(1, 1, 32, 32, 6)).shape == (1, N_CLASSES, 32, 32, 6)


# ------------------------------------------------------------------------------------------- chunking

def test_chunked_eval_equals_one_pass():
    torch.manual_seed(0)
    net = build_network("unet", 2, 1, N_CLASSES, (32, 32, 16), SPACING, context_slices=1, **base_args("networks", "unet", **TINY["unet"]))
    calls = []
    net.net.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[0]))
    x = torch.randn(2, 1, 32, 32, 7)
    net.eval()
    with torch.no_grad():
        net.chunk_slices = 10_000
        whole = net(x)
        net.chunk_slices = 6  # 3 slices of each of the 2 volumes per pass: 3 + 3 + 1 slices
        chunked = net(x)
    assert calls == [14, 6, 6, 2]
    assert torch.allclose(whole, chunked, atol=1e-5)
    calls.clear()
    net(x)  # grad enabled: one pass (chunks would not bound a graph's memory anyway)
    net.train()
    with torch.no_grad():
        net(x)
    assert calls == [14, 14]


# -------------------------------------------------------------------------------------- deep supervision

@pytest.mark.parametrize("dims", [2, 3])
def test_dynunet_deep_supervision_heads(dims):
    torch.manual_seed(0)
    net, patch = tiny("dynunet", dims, deep_supervision=True, deep_supr_num=2)
    x = torch.randn(2, 1, *patch)
    heads = net.heads(x)
    assert len(heads) == 3 and all(h.shape == (2, N_CLASSES, *patch) for h in heads)
    main = net(x)
    assert main.shape == (2, N_CLASSES, *patch) and torch.allclose(main, heads[0], atol=1e-5)
    sum(h.mean() for h in heads).backward()
    net.eval()
    assert [h.shape for h in net.heads(x)] == [(2, N_CLASSES, *patch)]  # MONAI returns the main head only


# ----------------------------------------------------------------------------------------------- errors

def test_clear_errors():
    with pytest.raises(KeyError, match=r"unknown network 'nope'; registered: \[.*'unet'"):
        build_network("nope", 3, 1, N_CLASSES, (32, 32, 16), SPACING)
    with pytest.raises(ValueError, match=r"'anisotropic_unet' supports spatial_dims \(3,\), got 2"):
        build_network("anisotropic_unet", 2, 1, N_CLASSES, (32, 32, 16), SPACING)
    with pytest.raises(ValueError, match="context_slices=1 .* needs spatial_dims=2"):
        build_network("unet", 3, 1, N_CLASSES, (32, 32, 16), SPACING, context_slices=1)
    with pytest.raises(ValueError, match=r"multiple of \(4, 4, 4\).*next valid: \(32, 32, 20\)"):
        build_network("unet", 3, 1, N_CLASSES, (30, 32, 18), SPACING, **base_args("networks", "unet", **TINY["unet"]))
    with pytest.raises(ValueError, match="need 3 values"):
        build_network("unet", 3, 1, N_CLASSES, (32, 32), SPACING[:2], **base_args("networks", "unet"))
    with pytest.raises(ValueError, match="2D network"):
        Network(nn.Identity(), 3, context=1)
    net, _ = tiny("unet", 2)
    with pytest.raises(ValueError, match=r"expects \(B, C, X, Y, Z\)"):
        net(torch.zeros(1, 1, 32, 32))
    net, _ = tiny("unetr", 3)
    with pytest.raises(ValueError, match=r"accepts only inputs of size \(32, 32, 16\)"):
        net(torch.zeros(1, 1, 32, 32, 32))
    assert tiny("unetr", 2)[0].fixed_size == (32, 32, None)  # a 2D UNETR takes any number of slices
