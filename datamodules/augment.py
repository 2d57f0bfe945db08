"""Training-patch augmentation: applied to cropped patch batches, on whatever device the batch is on.

Augmenting after the crop costs a patch's voxels, not a volume's; and because the ops are plain batched
torch ops, the same code runs in a loader worker (`augment.where: loader`, CPU) or after the batch has
been moved to the accelerator (`augment.where: device`: `lightning_modules.segmentation.SegmentationModule.on_after_batch_transfer`,
so the GPU does the work and the CPU loader only crops). Why our own instead of MONAI's / TorchIO's random
transforms: those randomize once per call on ONE sample (no batch axis), so a batch would need a Python
loop of per-sample transforms and device round trips for their NumPy-drawn parameters; these draw
every sample's parameters at once from a torch generator on the CPU (reproducible under
`seed_everything`, whatever the device) and apply them batched.

Ops (each a registered function `(image, label, params, gen) -> (image, label)`, image (B, 1, *S) float,
label (B, 1, *S) integer):
- `flip`: mirror each sample along each of `axes` with probability `p`. Mirroring the R-L axis (0)
  swaps the meaning of left and right lung, so those two label classes are swapped with it (a model
  must not learn that a left lung may lie on the right).
- `intensity`: image * (1 + U(-scale, scale)) + U(-shift, shift), per sample (normalized units).
- `noise`: additive Gaussian noise, std drawn per sample from U(0, std).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from datamodules.label_policy import CLASS_INDEX

AUGMENTS: dict[str, Callable] = {}
LR_SWAP = (CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"])


def register(name: str):
    def deco(fn):
        if name in AUGMENTS:
            raise ValueError(f"augmentation {name!r} registered twice")
        AUGMENTS[name] = fn
        return fn
    return deco


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) CPU draws -> (B, 1, 1, ...) on `like`'s device, for broadcasting over a sample."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


@register("flip")
def flip(image, label, params, gen):
    """Mirror along each axis with probability p; mirroring R-L swaps the left and right lung labels."""
    p, axes = float(params.get("p", 0.5)), [int(a) for a in params.get("axes", (0, 1, 2))]
    spatial = image.dim() - 2
    for ax in axes:
        if not 0 <= ax < spatial:
            raise ValueError(f"augment.flip.axes: axis {ax} does not exist in a {spatial}D patch")
    draw = torch.rand(image.shape[0], len(axes), generator=gen) < p
    image, label = image.clone(), label.clone()
    for b in range(image.shape[0]):
        hits = [ax for ax, hit in zip(axes, draw[b].tolist()) if hit]
        if not hits:
            continue
        dims = [ax + 1 for ax in hits]  # image[b] is (channel, *spatial)
        image[b] = torch.flip(image[b], dims)
        label[b] = torch.flip(label[b], dims)
        if 0 in hits:  # R-L mirrored: the left lung now lies on the right
            left, right = label[b] == LR_SWAP[0], label[b] == LR_SWAP[1]
            label[b][left], label[b][right] = LR_SWAP[1], LR_SWAP[0]
    return image, label


@register("intensity")
def intensity(image, label, params, gen):
    """Per-patch intensity scale 1 +- scale and shift +- shift (normalized units)."""
    scale, shift = float(params.get("scale", 0.1)), float(params.get("shift", 0.1))
    n = image.shape[0]
    a = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * scale
    b = (torch.rand(n, generator=gen) * 2 - 1) * shift
    return image * _per_sample(a, image) + _per_sample(b, image), label


@register("noise")
def noise(image, label, params, gen):
    """Gaussian noise with a per-patch standard deviation drawn from [0, std]."""
    std = float(params.get("std", 0.0))
    if std <= 0:
        return image, label
    sigma = torch.rand(image.shape[0], generator=gen) * std
    # the noise itself is drawn on the batch's device (a patch's worth of random numbers); its seed
    # comes from the CPU generator, so runs stay reproducible
    dev_gen = torch.Generator(device=image.device)
    dev_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    eps = torch.randn(image.shape, generator=dev_gen, device=image.device, dtype=image.dtype)
    return image + eps * _per_sample(sigma, image), label


class Augmenter:
    """The configured chain (`augment.ops`: op name -> params, applied in that order)."""

    def __init__(self, ops: Mapping[str, Mapping[str, Any]] | None):
        self.ops = []
        for name, params in (ops or {}).items():
            if name not in AUGMENTS:
                raise ValueError(f"unknown augmentation {name!r}; registered: {sorted(AUGMENTS)}")
            self.ops.append((name, dict(params or {})))

    def __bool__(self) -> bool:
        return bool(self.ops)

    def __call__(self, image: torch.Tensor, label: torch.Tensor, gen: torch.Generator | None = None):
        gen = gen if gen is not None else torch.default_generator
        for name, params in self.ops:
            image, label = AUGMENTS[name](image, label, params, gen)
        return image, label
