"""Partial-label losses: a class a source does not annotate is unknown there, never background.

Marginal formulation (Shi et al., MedIA 2021, "Marginal loss and exclusion loss for partially
supervised multi-organ segmentation"): for a sample whose source annotates only some classes, the
probabilities of background and every unannotated class are summed into one merged "not annotated
as anything" class, and the loss is computed on that reduced distribution. A MosMed voxel labelled 0
is thus explained by "background or lung", and no gradient pushes lung probability down there.
MONAI's DiceCELoss has no notion of per-sample annotated classes, hence our own.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from datamodules.label_policy import IGNORE
from datamodules.registry import Registry

LOSSES = Registry("loss")
register_loss = LOSSES.register


def build_loss(name: str, **kwargs) -> nn.Module:
    return LOSSES.lookup(name)(**kwargs)


def merged_log_probs(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with channel 0 replaced by log(sum of p over background + unannotated classes).

    logits: [B, C, *spatial]; annotated: [B, C] bool (channel 0 = background, always True).
    Channels of unannotated classes are left as they are; targets never point at them.
    """
    logp = torch.log_softmax(logits.float(), dim=1)
    merge = ~annotated.clone()
    merge[:, 0] = True
    shape = (merge.shape[0], merge.shape[1]) + (1,) * (logits.dim() - 2)
    masked = logp.masked_fill(~merge.view(shape), float("-inf"))
    merged_bg = torch.logsumexp(masked, dim=1, keepdim=True)
    return torch.cat([merged_bg, logp[:, 1:]], dim=1)


@register_loss("dice_ce")
class PartialDiceCELoss(nn.Module):
    """`ce_weight * CE + dice_weight * (1 - soft Dice)` on the marginalized distribution.

    Dice is a batch Dice per foreground class, over the samples that annotate the class (nnU-Net's
    batch Dice: stable when a patch holds no lesion), averaged over classes annotated by any sample.
    """

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5):
        super().__init__()
        self.ce_weight, self.dice_weight, self.smooth = ce_weight, dice_weight, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        if target.dim() == logits.dim():
            target = target[:, 0]
        target = target.long()
        # IGNORE voxels (policy "ignore") take part in neither term: zero weight in CE, out of the Dice sums.
        valid = target != IGNORE
        target = target.masked_fill(~valid, 0)
        bad = ~torch.gather(annotated, 1, target.flatten(1)).all(dim=1)
        if bad.any():
            raise ValueError("target holds a class the sample's source does not annotate")
        logq = merged_log_probs(logits, annotated)
        w_vox = valid.float()
        ce = -(torch.gather(logq, 1, target[:, None])[:, 0] * w_vox).sum() / w_vox.sum().clamp(min=1.0)
        q = logq.exp() * w_vox[:, None]
        onehot = torch.zeros_like(q).scatter_(1, target[:, None], 1.0) * w_vox[:, None]
        dims = tuple(range(2, logits.dim()))
        inter = (q * onehot).sum(dims)            # [B, C]
        denom = (q + onehot).sum(dims)
        use = annotated.clone()
        use[:, 0] = False
        w = use.float()
        dice_c = (2 * (inter * w).sum(0) + self.smooth) / ((denom * w).sum(0) + self.smooth)  # [C]
        classes = use.any(0)
        dice = dice_c[classes].mean() if classes.any() else logits.new_tensor(1.0)
        return self.ce_weight * ce + self.dice_weight * (1.0 - dice)
