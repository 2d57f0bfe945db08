"""NETWORKS registry: builders taking `spatial_dims`, channel counts and their own keyword arguments."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn

from datamodules.registry import Registry

NETWORKS = Registry("network")
register_network = NETWORKS.register


def build_network(name: str, spatial_dims: int, in_channels: int, out_channels: int, **kwargs) -> nn.Module:
    return NETWORKS.lookup(name)(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                                 **kwargs)


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
