"""NETWORKS registry: builders taking `spatial_dims`, channel counts, the training patch size and its spacing,
plus their own arguments, typed by the params dataclass each registers (`networks.<name>` in the config).

A builder returns a `Built` (the module, its encoder stages shallow -> deep, the input-size divisor);
`build_network` wraps it in `Network`, the one interface the rest of the project sees: a (B, C, X, Y, Z)
tensor in, logits of the same spatial shape out, for 3D networks and for 2D ones run slice by slice
(optionally 2.5D, with neighbouring slices as channels). Z, the slice axis, is always last.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn

from datamodules.registry import Registry

NETWORKS = Registry("network")


def register_network(name: str, params: type, dims: Sequence[int] = (2, 3)) -> Callable:
    """Register a builder under `name` with its params dataclass, recording which `spatial_dims` it
    supports as `builder.dims`. The builder's first docstring line is its one-line description
    (`python -m experiments.list`)."""
    def wrap(fn):
        fn.dims = tuple(dims)
        return NETWORKS.register(name, params=params)(fn)

    return wrap


def _given(**kwargs) -> dict:
    """The optional arguments that were set: None leaves the library's own default in place."""
    return {k: v for k, v in kwargs.items() if v is not None}


@dataclass
class Built:
    net: nn.Module
    stages: list[str]  # dotted names for net.get_submodule, shallow -> deep; each outputs (B, C, *spatial)
    divisor: tuple[int, ...]  # per spatial axis: input sizes must be multiples of these
    fixed_size: tuple[int, ...] | None = None  # the only input size accepted (UNETR's position embedding)


def stride_divisor(strides: Sequence[int | Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    """Per-axis product of the strides (an int applies to every axis): skip connections line up only
    if the input size is a multiple of it."""
    d = [1] * spatial_dims
    for s in strides:
        per_axis = [s] * spatial_dims if isinstance(s, int) else list(s)
        d = [a * int(b) for a, b in zip(d, per_axis)]
    return tuple(d)


def plan_dynunet(patch_size: Sequence[int], spacing: Sequence[float], max_levels: int = 5,
                 min_size: int = 4) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """nnU-Net's kernel/stride plan: per-block (kernels, strides), input block first (stride 1),
    bottleneck last, as `monai.networks.nets.DynUNet` takes them.

    At each level an axis is halved only if its spacing is <= 2x the finest current spacing and it stays
    an even size >= `min_size`; an axis coarser than 2x the finest gets kernel 1, so thick slices
    (0.7, 0.7, 5.0) start with in-plane (3, 3, 1) blocks and (2, 2, 1) strides until the in-plane
    spacing has caught up with z. Spacing doubles on halved axes. Each block's kernel follows the rule at
    that block's own resolution (nnU-Net hard-codes 3s for the bottleneck; the two differ only when the
    bottleneck is still more than 2x anisotropic, where a 3 along z would mix unrelated slices).
    """
    if len(patch_size) != len(spacing):
        raise ValueError(f"patch_size {tuple(patch_size)} and spacing {tuple(spacing)} differ in length")
    size, sp = [int(s) for s in patch_size], [float(s) for s in spacing]

    def kernel(sp: list[float]) -> tuple[int, ...]:
        return tuple(3 if s <= 2 * min(sp) else 1 for s in sp)

    kernels, strides = [kernel(sp)], [(1,) * len(sp)]
    while len(strides) <= max_levels:
        stride = tuple(2 if s <= 2 * min(sp) and n % 2 == 0 and n // 2 >= min_size else 1
                       for s, n in zip(sp, size))
        if all(s == 1 for s in stride):
            break
        size = [n // s for n, s in zip(size, stride)]
        sp = [x * s for x, s in zip(sp, stride)]
        strides.append(stride)
        kernels.append(kernel(sp))
    return kernels, strides


# ---------------------------------------------------------------------------------------------- builders
# Each builder's arguments are its params dataclass's fields; their values live in experiments/configs
# (`networks:`), never here. A field defaulting to None is optional: None means the library's default (or,
# for `filters`, base_filters doubled per level up to max_filters). `norm`: a name or [name, {arguments}].

@dataclass
class UNetParams:
    channels: list[int]
    strides: list[Any]     # per level: an int, or one per axis
    num_res_units: int
    norm: Any
    dropout: float


@dataclass
class BasicUNetParams:
    features: list[int]
    norm: Any
    dropout: float
    upsample: str


@dataclass
class DynUNetParams:
    max_levels: int
    min_size: int
    base_filters: int
    max_filters: int
    norm: Any
    res_block: bool
    deep_supervision: bool
    deep_supr_num: int
    filters: list[int] | None = None
    dropout: float | None = None


@dataclass
class AnisotropicUNetParams:
    levels: int
    anisotropic_levels: int
    base_filters: int
    max_filters: int
    norm: Any
    res_block: bool
    deep_supervision: bool
    deep_supr_num: int | None = None
    filters: list[int] | None = None
    dropout: float | None = None


@dataclass
class SegResNetParams:
    init_filters: int
    blocks_down: list[int]
    blocks_up: list[int]
    norm: Any
    dropout_prob: float | None
    upsample_mode: str


@dataclass
class AttentionUNetParams:
    channels: list[int]
    strides: list[Any]
    dropout: float


@dataclass
class UNETRParams:
    feature_size: int
    hidden_size: int
    mlp_dim: int
    num_heads: int
    norm: Any
    dropout: float
    res_block: bool | None = None


@dataclass
class SwinUNETRParams:
    feature_size: int
    depths: list[int]
    num_heads: list[int]
    window_size: int
    norm: Any
    dropout_path_rate: float
    use_checkpoint: bool
    drop_rate: float | None = None
    attn_drop_rate: float | None = None
    use_v2: bool | None = None


@register_network("unet", UNetParams)
def unet(spatial_dims: int, in_channels: int, out_channels: int, patch_size: tuple[int, ...],
         spacing: tuple[float, ...], *, channels: Sequence[int], strides: Sequence[int], num_res_units: int,
         norm: str | Sequence, dropout: float) -> Built:
    """MONAI residual UNet (Kerfoot et al.): strided-conv encoder, one residual block per level."""
    from monai.networks.nets import UNet

    if len(strides) != len(channels) - 1:
        raise ValueError(f"unet: need len(strides) == len(channels) - 1, got {list(channels)} and {list(strides)}")
    net = UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
               channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units, norm=norm,
               dropout=dropout)
    # Nested Sequential(down, SkipConnection(Sequential(down, ...)), up): the i-th down layer sits i
    # `.1.submodule` hops in, the bottom layer one hop further.
    n = len(channels)
    stages = ["model" + ".1.submodule" * i + ".0" for i in range(n - 1)] + ["model" + ".1.submodule" * (n - 1)]
    return Built(net, stages, stride_divisor(strides, spatial_dims))


@register_network("basic_unet", BasicUNetParams)
def basic_unet(spatial_dims: int, in_channels: int, out_channels: int, patch_size: tuple[int, ...],
               spacing: tuple[float, ...], *, features: Sequence[int], norm: str | Sequence, dropout: float,
               upsample: str) -> Built:
    """MONAI BasicUNet (Falk et al.): two convs per level, four max-pool levels, no residuals."""
    from monai.networks.nets import BasicUNet

    if len(features) != 6:  # MONAI would silently repeat a shorter list
        raise ValueError(f"basic_unet: features needs 6 ints (5 encoder levels + last decoder), got {list(features)}")
    net = BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                    features=tuple(features), norm=norm, dropout=dropout, upsample=upsample)
    return Built(net, ["conv_0", "down_1", "down_2", "down_3", "down_4"], (16,) * spatial_dims)


def _dynunet(spatial_dims: int, in_channels: int, out_channels: int, kernels: list, strides: list,
             filters: Sequence[int] | None, base_filters: int, max_filters: int, **kwargs) -> Built:
    from monai.networks.nets import DynUNet

    if len(strides) < 3:  # DynUNet needs an input block, >= 1 downsample block and a bottleneck
        raise ValueError(f"DynUNet needs >= 2 downsampling levels, the plan has {len(strides) - 1}: "
                         f"strides {strides}; enlarge the patch or lower min_size")
    if filters is None:
        filters = [min(base_filters * 2 ** i, max_filters) for i in range(len(strides))]
    elif len(filters) < len(strides):
        raise ValueError(f"need {len(strides)} filters (one per block), got {list(filters)}")
    net = DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                  kernel_size=kernels, strides=strides, upsample_kernel_size=strides[1:],
                  filters=list(filters)[:len(strides)], **kwargs)
    stages = ["input_block"] + [f"downsamples.{i}" for i in range(len(strides) - 2)] + ["bottleneck"]
    return Built(net, stages, stride_divisor(strides, spatial_dims))


@register_network("dynunet", DynUNetParams)
def dynunet(spatial_dims: int, in_channels: int, out_channels: int, patch_size: tuple[int, ...],
            spacing: tuple[float, ...], *, max_levels: int, min_size: int, base_filters: int, max_filters: int,
            norm: str | Sequence, res_block: bool, deep_supervision: bool, deep_supr_num: int,
            filters: Sequence[int] | None, dropout: float | None) -> Built:
    """MONAI DynUNet, nnU-Net style: kernels and strides planned from patch size and spacing."""
    kernels, strides = plan_dynunet(patch_size, spacing, max_levels=max_levels, min_size=min_size)
    return _dynunet(spatial_dims, in_channels, out_channels, kernels, strides, filters, base_filters,
                    max_filters, norm_name=norm, res_block=res_block, deep_supervision=deep_supervision,
                    deep_supr_num=deep_supr_num, **_given(dropout=dropout))


@register_network("anisotropic_unet", AnisotropicUNetParams, dims=(3,))
def anisotropic_unet(spatial_dims: int, in_channels: int, out_channels: int, patch_size: tuple[int, ...],
                     spacing: tuple[float, ...], *, levels: int, anisotropic_levels: int, base_filters: int,
                     max_filters: int, norm: str | Sequence, res_block: bool, deep_supervision: bool,
                     deep_supr_num: int | None, filters: Sequence[int] | None, dropout: float | None) -> Built:
    """Thick-slice 3D UNet (seed 001): (3,3,1) kernels and in-plane downsampling first, then isotropic.

    Seed 001 (Chaganti et al.): 1x3x3 input conv, batch norm + LeakyReLU, five DenseNet blocks, the first
    two downsampled by 1x2x2, the last three by 2x2x2, transposed-conv upsampling with the same strides.
    Here, on MONAI DynUNet with that FIXED plan (unlike `dynunet`, it ignores the spacing): plain two-conv
    blocks (residual with res_block) instead of DenseNet blocks, and the first conv of each block strides
    instead of a separate 2x2 conv. Blocks before the `anisotropic_levels`-th downsampling use (3,3,1)
    kernels, later ones (3,3,3); for (0.7, 0.7, 5.0) mm that is exactly `plan_dynunet`'s plan.
    """
    if not 0 <= anisotropic_levels <= levels:
        raise ValueError(f"anisotropic_unet: need 0 <= anisotropic_levels <= levels, got {anisotropic_levels} "
                         f"and {levels}")
    kernels = [(3, 3, 1)] * anisotropic_levels + [(3, 3, 3)] * (levels - anisotropic_levels + 1)
    strides = [(1, 1, 1)] + [(2, 2, 1)] * anisotropic_levels + [(2, 2, 2)] * (levels - anisotropic_levels)
    return _dynunet(spatial_dims, in_channels, out_channels, kernels, strides, filters, base_filters,
                    max_filters, norm_name=norm, act_name=("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
                    res_block=res_block, deep_supervision=deep_supervision,
                    **_given(deep_supr_num=deep_supr_num, dropout=dropout))


@register_network("segresnet", SegResNetParams)
def segresnet(spatial_dims: int, in_channels: int, out_channels: int, patch_size: tuple[int, ...],
              spacing: tuple[float, ...], *, init_filters: int, blocks_down: Sequence[int], blocks_up: Sequence[int],
              norm: str | Sequence, dropout_prob: float | None, upsample_mode: str) -> Built:
    """MONAI SegResNet (Myronenko): residual encoder, light additive decoder, group norm."""
    from monai.networks.nets import SegResNet

    if len(blocks_up) != len(blocks_down) - 1:  # MONAI would decode to a coarser resolution without error
        raise ValueError(f"segresnet: need len(blocks_up) == len(blocks_down) - 1, got {list(blocks_down)}, "
                         f"{list(blocks_up)}")
    net = SegResNet(spatial_dims=spatial_dims, init_filters=init_filters, in_channels=in_channels,
                    out_channels=out_channels, dropout_prob=dropout_prob, norm=norm, blocks_down=tuple(blocks_down),
                    blocks_up=tuple(blocks_up), upsample_mode=upsample_mode)
    return Built(net, [f"down_layers.{i}" for i in range(len(blocks_down))],
                 (2 ** (len(blocks_down) - 1),) * spatial_dims)


@register_network("attention_unet", AttentionUNetParams)
def attention_unet(spatial_dims: int, in_channels: int, out_channels: int, patch_size: tuple[int, ...],
                   spacing: tuple[float, ...], *, channels: Sequence[int], strides: Sequence[int],
                   dropout: float) -> Built:
    """MONAI Attention UNet (Oktay et al.): additive attention gates on the skips; batch norm only."""
    from monai.networks.nets import AttentionUnet

    if len(strides) != len(channels) - 1:
        raise ValueError(f"attention_unet: need len(strides) == len(channels) - 1, got {list(channels)}, "
                         f"{list(strides)}")
    net = AttentionUnet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                        channels=tuple(channels), strides=tuple(strides), dropout=dropout)
    # model = Sequential(head, AttentionLayer, 1x1 conv); each AttentionLayer's submodule is
    # Sequential(strided ConvBlock, next AttentionLayer), the bottom one's is the ConvBlock itself.
    n = len(channels)
    stages = ["model.0"] + ["model.1" + ".submodule.1" * i + ".submodule.0" for i in range(n - 2)]
    return Built(net, stages + ["model.1" + ".submodule.1" * (n - 2) + ".submodule"],
                 stride_divisor(strides, spatial_dims))


@register_network("unetr", UNETRParams)
def unetr(spatial_dims: int, in_channels: int, out_channels: int, patch_size: tuple[int, ...],
          spacing: tuple[float, ...], *, feature_size: int, hidden_size: int, mlp_dim: int, num_heads: int,
          norm: str | Sequence, dropout: float, res_block: bool | None) -> Built:
    """MONAI UNETR (Hatamizadeh et al.): 12-layer ViT on 16-voxel tokens, conv decoder; fixed input size."""
    from monai.networks.nets import UNETR

    # MONAI fixes num_layers at 12 (it reads hidden states 3, 6, 9), so only the width can shrink.
    net = UNETR(in_channels=in_channels, out_channels=out_channels, img_size=tuple(patch_size),
                feature_size=feature_size, hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads,
                norm_name=norm, dropout_rate=dropout, spatial_dims=spatial_dims, **_given(res_block=res_block))
    # MONAI's transformer blocks build a cross-attention LayerNorm even without cross-attention; frozen,
    # these never-used parameters no longer trip DDP's unused-parameter check.
    for block in net.vit.blocks:
        if not block.with_cross_attention:
            block.norm_cross_attn.requires_grad_(False)
    # The ViT's own outputs are token sequences, not feature maps, so the stages are the conv encoders:
    # encoder1 reads the raw input (it feeds only the top skip), encoders 2-4 reshape hidden states 3/6/9.
    return Built(net, ["encoder1", "encoder2", "encoder3", "encoder4"], (16,) * spatial_dims,
                 fixed_size=tuple(int(p) for p in patch_size))


@register_network("swinunetr", SwinUNETRParams)
def swinunetr(spatial_dims: int, in_channels: int, out_channels: int, patch_size: tuple[int, ...],
              spacing: tuple[float, ...], *, feature_size: int, depths: Sequence[int], num_heads: Sequence[int],
              window_size: int, norm: str | Sequence, dropout_path_rate: float, use_checkpoint: bool,
              drop_rate: float | None, attn_drop_rate: float | None, use_v2: bool | None) -> Built:
    """MONAI SwinUNETR (Hatamizadeh et al.): shifted-window transformer encoder, conv decoder."""
    from monai.networks.nets import SwinUNETR

    # This MONAI takes no img_size (windows adapt); inputs must be multiples of 2**5 (2-voxel tokens,
    # four patch mergings). The bottleneck has size/32 voxels per axis: with instance norm it needs > 1
    # voxel in total while training.
    net = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                    depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size, norm_name=norm,
                    dropout_path_rate=dropout_path_rate, use_checkpoint=use_checkpoint, spatial_dims=spatial_dims,
                    **_given(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, use_v2=use_v2))
    stages = ["swinViT.patch_embed"] + [f"swinViT.layers{i}.0" for i in range(1, 5)]
    return Built(net, stages, (32,) * spatial_dims)


# ------------------------------------------------------------------------------------------------ wrapper

def _split_heads(y: torch.Tensor, spatial_dims: int) -> list[torch.Tensor]:
    """MONAI stacks deep-supervision outputs on dim 1 (DynUNet in training mode): one extra dimension
    means (N, heads, C, *spatial), main output first."""
    return list(y.unbind(1)) if y.dim() == spatial_dims + 3 else [y]


def neighbour_index(depth: int, context: int, device: torch.device | None = None) -> torch.Tensor:
    """(depth, 2k+1) slice indices z-k..z+k for every z, clamped at the ends (edge replication)."""
    offsets = torch.arange(-context, context + 1, device=device)
    return (torch.arange(depth, device=device)[:, None] + offsets[None, :]).clamp(0, depth - 1)


class Network(nn.Module):
    """One interface for every registered network: (B, in_channels, X, Y, Z) -> logits (B, C, X, Y, Z).

    A 2D network runs on every axial slice (2D and 3D models share patches, sliding-window inference and
    3D evaluation). With `context` k (2.5D) slice z is fed slices z-k..z+k as channels, ordered
    [slice z-k: channels 0..C-1, slice z-k+1: ..., slice z+k: ...]; slices past the tensor's z ends are
    replicated edge slices, so the `margin` k outermost slices of a training patch lack true neighbours.
    In eval mode without grad the slices go through in chunks of about `chunk_slices` (at least one slice
    per volume each pass), so whole volumes fit; the results equal one pass.
    """

    def __init__(self, net: nn.Module, spatial_dims: int, stage_names: Sequence[str] = (),
                 divisor: Sequence[int] | None = None, context: int = 0, fixed_size: Sequence[int] | None = None,
                 chunk_slices: int = 64, name: str = ""):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if context < 0 or (context and spatial_dims != 2):
            raise ValueError(f"context_slices (2.5D) needs a 2D network and k >= 0, got k={context} with "
                             f"spatial_dims={spatial_dims}")
        self.net, self.spatial_dims, self.context, self.chunk_slices = net, spatial_dims, int(context), chunk_slices
        self.name = name
        self.stage_names = list(stage_names)
        for s in self.stage_names:  # a wrong name in a builder should fail here, not in a DG hook later
            net.get_submodule(s)
        pad = (1,) * (3 - spatial_dims)
        self.divisor = tuple(int(d) for d in (divisor or (1,) * spatial_dims)) + pad
        # None on an axis: any size (2D nets see every slice, whatever the depth)
        self.fixed_size = None if fixed_size is None else tuple(int(f) for f in fixed_size) + (None,) * len(pad)

    @property
    def margin(self) -> int:
        return self.context

    def encoder_stages(self) -> list[nn.Module]:
        return [self.net.get_submodule(s) for s in self.stage_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(x)[0]

    def heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Main logits first, then deep-supervision heads (DynUNet, training mode only), each full size."""
        if x.dim() != 5:
            raise ValueError(f"{self.name or 'network'} expects (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        if self.fixed_size and any(f is not None and f != n for f, n in zip(self.fixed_size, x.shape[2:])):
            raise ValueError(f"{self.name} accepts only inputs of size {self.fixed_size} (None = any), got "
                             f"{tuple(x.shape[2:])}; use sliding-window inference with roi = patch size")
        if self.spatial_dims == 3:
            return _split_heads(self.net(x), 3)
        return self._slicewise(x)

    def _slicewise(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, depth = x.shape[0], x.shape[-1]
        nb = neighbour_index(depth, self.context, x.device)
        xs = x.permute(0, 4, 1, 2, 3)  # (B, Z, C, X, Y)
        chunked = not self.training and not torch.is_grad_enabled()
        step = max(1, self.chunk_slices // b) if chunked else depth
        parts = []
        for z0 in range(0, depth, step):  # one pass unless chunked
            idx = nb[z0:z0 + step]
            s = xs[:, idx]  # (B, n, 2k+1, C, X, Y): gathering per chunk bounds the 2k+1 copies too
            heads = _split_heads(self.net(s.reshape(b * len(idx), -1, *s.shape[-2:])), 2)
            parts.append([h.reshape(b, len(idx), *h.shape[1:]) for h in heads])
        return [torch.cat(hs, dim=1).permute(0, 2, 3, 4, 1) for hs in zip(*parts)]


def build_network(name: str, spatial_dims: int, in_channels: int, out_channels: int, patch_size: Sequence[int],
                  spacing: Sequence[float], context_slices: int = 0, **kwargs) -> Network:
    """The registered network `name` as a `Network`. patch_size / spacing: (x, y, z), or (x, y) for 2D
    (a 2D network is built for the in-plane part of a 3D patch). kwargs: the network's arguments
    (`networks.<name>`), every field of its params dataclass without a default."""
    builder = NETWORKS.lookup(name)
    if spatial_dims not in builder.dims:
        raise ValueError(f"network {name!r} supports spatial_dims {builder.dims}, got {spatial_dims}")
    if context_slices and spatial_dims != 2:
        raise ValueError(f"context_slices={context_slices} (2.5D) needs spatial_dims=2, network {name!r} is "
                         f"{spatial_dims}D")
    if context_slices < 0:
        raise ValueError(f"context_slices must be >= 0, got {context_slices}")
    patch, sp = tuple(int(p) for p in patch_size), tuple(float(s) for s in spacing)
    if spatial_dims == 2:  # a 3D patch's in-plane part
        patch, sp = patch[:2] if len(patch) == 3 else patch, sp[:2] if len(sp) == 3 else sp
    if len(patch) != spatial_dims or len(sp) != spatial_dims:
        raise ValueError(f"{name}: patch_size {patch} and spacing {sp} need {spatial_dims} values")
    params = NETWORKS.make_params(name, kwargs)
    built = builder(spatial_dims, in_channels * (2 * context_slices + 1), out_channels, patch, sp,
                    **{f.name: getattr(params, f.name) for f in fields(params)})
    if any(p % d for p, d in zip(patch, built.divisor)):
        raise ValueError(f"{name}: patch_size {patch} must be a multiple of {built.divisor} per axis "
                         f"(next valid: {tuple(math.ceil(p / d) * d for p, d in zip(patch, built.divisor))})")
    return Network(built.net, spatial_dims, built.stages, built.divisor, context=context_slices,
                   fixed_size=built.fixed_size, name=name)
