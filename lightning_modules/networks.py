"""NETWORKS registry: builders taking `spatial_dims`, channel counts and their own keyword arguments."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from datamodules.registry import Registry

NETWORKS = Registry("network")
register_network = NETWORKS.register


def build_network(name: str, spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> nn.Module:
    """The registered network; a 2D one is wrapped by `SliceWise` so it takes the same 3D patches and
    volumes as a 3D one (2D models train on slices of the same cache and are evaluated in 3D)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"model.spatial_dims must be 2 or 3, got {spatial_dims}")
    net = NETWORKS.lookup(name)(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                                **kwargs)
    return SliceWise(net) if spatial_dims == 2 else net


class SliceWise(nn.Module):
    """Runs a 2D network on every axial slice of a (B, C, X, Y, Z) tensor and restacks the output.

    Patches of depth d give d slices per patch; sliding-window inference over a volume therefore
    predicts slice by slice, so 2D and 3D models share the data pipeline and the 3D evaluation.
    (MONAI's sliding window does the same for 2D predictors only with a 2D roi; this keeps one path.)
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # already 2D (B, C, X, Y)
            return self.net(x)
        b, c, h, w, d = x.shape
        y = self.net(x.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w))
        return y.reshape(b, d, y.shape[1], h, w).permute(0, 2, 3, 4, 1)


@register_network("unet")
def monai_unet(spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int] = (16, 32, 64, 128),
               strides: Sequence[int] = (2, 2, 2), num_res_units: int = 2, norm: str = "instance",
               dropout: float = 0.0) -> nn.Module:
    """MONAI residual UNet (Kerfoot et al.); one class for 2D and 3D."""
    from monai.networks.nets import UNet

    if len(strides) != len(channels) - 1:
        raise ValueError(f"unet: need len(strides) == len(channels) - 1, got {list(channels)} and {list(strides)}")
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units, norm=norm,
                dropout=dropout)


def required_divisor(strides: Sequence[int]) -> int:
    """Patch sizes must be multiples of the product of strides so skip connections line up."""
    d = 1
    for s in strides:
        d *= int(s)
    return d
