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

from datamodules.label_policy import BACKGROUND, CLASS_INDEX, CLASSES, IGNORE, ancestors
from datamodules.registry import Registry

LOSSES = Registry("loss")
register_loss = LOSSES.register


def build_loss(name: str, **kwargs) -> nn.Module:
    return LOSSES.lookup(name)(**kwargs)


def merge_destinations(annotated: torch.Tensor) -> torch.Tensor:
    """[B, C] long: the channel each class's probability is merged into, per sample.

    An annotated class keeps its own channel. An unannotated class goes to its nearest annotated
    ancestor (`PARENT`: GGO and consolidation into lesion, for sources that annotate lesions untyped),
    else to background (e.g. lungs in a lesion-only source).
    """
    b, c = annotated.shape
    dest = torch.arange(c, device=annotated.device).expand(b, c).clone()
    for k in range(c):  # the first c classes (tests and old checkpoints may have fewer channels)
        if k == BACKGROUND:
            continue
        to = torch.zeros(b, dtype=torch.long, device=annotated.device)
        for anc in reversed(ancestors(CLASSES[k])):  # farthest first, so the nearest annotated one wins
            idx = CLASS_INDEX[anc]
            if idx < c:
                to = torch.where(annotated[:, idx], torch.full_like(to, idx), to)
        dest[:, k] = torch.where(annotated[:, k], dest[:, k], to)
    return dest


def merged_log_probs(logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Log-probabilities on the sample's annotated classes, each channel summing the classes merged
    into it (`merge_destinations`): background + unannotated unrelated classes, lesion + untyped
    children. Channels of unannotated classes hold log(~0); targets and the Dice never use them.

    logits: [B, C, *spatial]; annotated: [B, C] bool (channel 0 = background, always True).
    """
    logp = torch.log_softmax(logits.float(), dim=1)
    dest = merge_destinations(annotated)
    if bool((dest == torch.arange(dest.shape[1], device=dest.device)).all()):
        return logp  # every class annotated in every sample: nothing to merge
    # One pass for all merges: q[b, k] = sum of p[b, c] over the classes c merged into k (a [C, C]
    # assignment per sample), instead of a masked logsumexp per channel (3x slower on 8 classes).
    # Probabilities underflow only below e^-87 in float32; the clamp caps such a voxel's CE at 69.
    assign = torch.nn.functional.one_hot(dest, logits.shape[1]).to(logp.dtype)  # [B, C, K]
    b, c = logp.shape[:2]
    q = torch.bmm(assign.transpose(1, 2), logp.exp().reshape(b, c, -1)).reshape(logp.shape)
    return torch.log(q.clamp_min(1e-30))


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
