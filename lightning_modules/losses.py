"""Partial-label losses: a class a source does not annotate is unknown there, never background.

Marginal formulation (Shi et al., MedIA 2021, "Marginal loss and exclusion loss for partially
supervised multi-organ segmentation"): for a sample whose source annotates only some classes, the
probabilities of background and every unannotated class are summed into one merged "not annotated
as anything" class, and the loss is computed on that reduced distribution. A MosMed voxel labelled 0
is thus explained by "background or lung", and no gradient pushes lung probability down there.
An unannotated class nested inside an annotated one (an opacity inside the lungs of a lung-only
source, `label_policy.CONTAINERS`) is merged into its container where the label says container, not
into background: a COVID-19-CT-Seg Lung_Mask voxel is "lung or lesion", so lesion is never pushed down
inside the lungs. MONAI's DiceCELoss has no notion of per-sample annotated classes, hence our own.

Every loss here reads the network only through `merged_log_probs`, and the target only through
`prepare_target` (IGNORE voxels out, unannotated target classes an error), or, for dice_ce (the default),
through `target_onehot`, its equivalent for labels that stay uint8 (no int64 copy per step). Per-class weights are
indexed by the *target* class, which is always annotated: a merged channel (background + lungs of a
lesion-only source) is weighted as the annotated class it stands for (background).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.choices import Choice
from datamodules.label_policy import (
    BACKGROUND,
    CLASS_INDEX,
    CLASSES,
    CONTAINERS,
    IGNORE,
    LESION,
    OPACITY,
    PARENT,
    ancestors,
)
from datamodules.registry import Registry

LOSSES = Registry("loss", group="losses")
register_loss = LOSSES.register
LUNGS = (CLASS_INDEX["lung_left"], CLASS_INDEX["lung_right"])


def build_loss(name: str, **kwargs) -> nn.Module:
    """The registered loss `name`; kwargs: its arguments (`losses.<name>`), checked against its params
    dataclass (every field without a default is required: the values live in the config)."""
    params = LOSSES.make_params(name, kwargs)
    return LOSSES.lookup(name)(**{f.name: getattr(params, f.name) for f in fields(params)})


# Each loss's arguments; their values live in experiments/configs (`losses:`), never here.

@dataclass
class DiceCEParams:
    ce_weight: float
    dice_weight: float
    smooth: float


class Frequencies(Choice):
    """losses.weighted_ce.frequencies: where the inverse-frequency weights' class frequencies come from.
    patch: the training batch's own patches (what the loss sees, after lesion-centred sampling);
    volume: the training cases' whole volumes (set once at fit start)."""
    patch = "patch"
    volume = "volume"


@dataclass
class WeightedCEParams:
    weights: list[float] | None  # None: inverse class frequencies (`frequencies`), else one weight per channel
    frequencies: Frequencies


@dataclass
class LungJaccardParams:
    smooth: float
    ce_weight: float


@dataclass
class SoftKLParams:
    sigma: Any        # voxels: one value, or one per axis
    truncate: float
    weighted: bool


@dataclass
class FocalParams:
    gamma: float
    alpha: list[float] | None


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


def nested_moves(annotated: torch.Tensor) -> torch.Tensor:
    """[B, C, C] bool: moves[b, u, k] when, in sample b, class u is unannotated and `merge_destinations`
    sends it to background (no annotated ancestor), but it lies inside annotated class k (`CONTAINERS`:
    an opacity inside a lung of a lung-only source). At voxels labelled k, u's probability is k's."""
    b, c = annotated.shape
    moves = torch.zeros(b, c, c, dtype=torch.bool, device=annotated.device)
    dest = merge_destinations(annotated)
    for name, containers in CONTAINERS.items():
        u = CLASS_INDEX[name]
        if u >= c:
            continue
        for k in (CLASS_INDEX[n] for n in containers if CLASS_INDEX[n] < c):
            moves[:, u, k] = (dest[:, u] == BACKGROUND) & annotated[:, k]
    return moves


def host_decides(t: torch.Tensor) -> bool:
    """Whether the loss may branch on a tensor's values in Python. Reading a value (`bool(...)`, `.tolist()`,
    boolean indexing) waits for every kernel queued before it: free on a CPU, a stall of the whole pipeline
    on a GPU, where the loss computes both branches and selects with `torch.where` instead (the same values)."""
    return t.device.type == "cpu"


def _container_classes(c: int) -> list[int]:
    """Every class an unannotated nested class may be moved into (`CONTAINERS`), ascending: the classes
    `nested_moves` can name, known without looking at a batch."""
    return sorted({CLASS_INDEX[n] for name, cs in CONTAINERS.items() if CLASS_INDEX[name] < c
                   for n in cs if CLASS_INDEX[n] < c})


def merged_log_probs(logits: torch.Tensor, annotated: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities on the sample's annotated classes, each channel summing the classes merged
    into it (`merge_destinations`): background + unannotated unrelated classes, lesion + untyped
    children. Channels of unannotated classes hold log(~0); targets and the Dice never use them.

    With the (prepared) `target`, an unannotated class nested in an annotated one (`nested_moves`) is
    merged, at the voxels labelled with its container, into that container instead of background: in a
    lung-only source a lesion voxel is lung, so lung + lesion is what the label says there.

    logits: [B, C, *spatial]; annotated: [B, C] bool (channel 0 = background, always True);
    target: [B, *spatial] integer codes (any integer dtype; IGNORE voxels move nothing) or None.
    """
    logp = torch.log_softmax(logits.float(), dim=1)
    dest = merge_destinations(annotated)
    on_host = host_decides(logp)
    nothing = (dest == torch.arange(dest.shape[1], device=dest.device)).all()
    if on_host and bool(nothing):
        return logp  # every class annotated in every sample: nothing to merge
    # One pass for all merges: q[b, k] = sum of p[b, c] over the classes c merged into k (a [C, C]
    # assignment per sample), instead of a masked logsumexp per channel (3x slower on 8 classes).
    # Probabilities underflow only below e^-87 in float32; the clamp caps such a voxel's CE at 69.
    assign = torch.nn.functional.one_hot(dest, logits.shape[1]).to(logp.dtype)  # [B, C, K]
    b, c = logp.shape[:2]
    p = logp.exp().reshape(b, c, -1)
    q = torch.bmm(assign.transpose(1, 2), p)
    if target is not None:
        moves = nested_moves(annotated)
        # on a GPU every possible container is visited; one no sample moves into adds exact zeros
        if not on_host or bool(moves.any()):
            t = target.reshape(b, -1)
            shift = torch.zeros_like(q)
            ks = torch.nonzero(moves.any(0).any(0)).flatten().tolist() if on_host else _container_classes(c)
            for k in ks:
                moved = (p * moves[:, :, k, None]).sum(1) * (t == k)  # [B, N]
                shift[:, k] += moved
                shift[:, BACKGROUND] -= moved
            q = q + shift
    merged = torch.log(q.reshape(logp.shape).clamp_min(1e-30))
    return merged if on_host else torch.where(nothing, logp, merged)


def _target_codes(target: torch.Tensor, logits: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """target [B, *spatial] (a [B, 1, *spatial] label loses its channel), its shape checked against the logits'."""
    if target.dim() == logits.dim():
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:] or annotated.shape != logits.shape[:2]:
        raise ValueError(f"shapes do not match: logits {tuple(logits.shape)}, target {tuple(target.shape)}, "
                         f"annotated {tuple(annotated.shape)}")
    return target


def prepare_target(target: torch.Tensor, logits: torch.Tensor, annotated: torch.Tensor):
    """(target [B, *spatial] long with IGNORE set to background, valid [B, *spatial] bool).

    Raises if a valid voxel holds a class its sample's source does not annotate: such a label would be
    scored against a merged channel that also holds other classes, silently.
    """
    target = _target_codes(target, logits, annotated)
    target = target.long()
    valid = target != IGNORE
    target = target.masked_fill(~valid, BACKGROUND)
    if not torch.gather(annotated, 1, target.flatten(1)).all():
        raise ValueError("target holds a class the sample's source does not annotate")
    return target, valid


def target_onehot(target: torch.Tensor, logits: torch.Tensor, annotated: torch.Tensor):
    """(target [B, *spatial] in its own dtype, onehot [B, C, *spatial] bool, valid [B, *spatial] bool) of an
    integer label of any integer dtype.

    Why not `prepare_target`: its gather/scatter need int64 indices, and widening the uint8 patches to int64
    (8 bytes a voxel, ~34 MB per step at batch 8 x 128 x 128 x 32) was most of a training step's overhead
    besides the arithmetic (docs/gpu.md). A comparison with the class indices builds the same one-hot from
    uint8 directly; an IGNORE voxel matches no class, so its row is all False. The same errors as
    `prepare_target`, plus a clear one for a code that is no class and not IGNORE (gather's out-of-range).
    Both checks share one host read (one device sync on a GPU; in training, dice_ce defers it there instead:
    `PartialDiceCELoss.defer_label_check`).
    """
    target, onehot, valid, bad = onehot_parts(target, logits, annotated)
    bad_code, bad_class = bad.tolist()
    if bad_code:
        no_class = valid & ~onehot.any(1)
        codes = sorted(set(target[no_class].unique().tolist()))
        raise ValueError(f"target holds code(s) {codes}: no class of the {logits.shape[1]} channels, and not "
                         f"IGNORE ({IGNORE})")
    if bad_class:
        raise ValueError("target holds a class the sample's source does not annotate")
    return target, onehot, valid


def onehot_parts(target: torch.Tensor, logits: torch.Tensor, annotated: torch.Tensor):
    """`target_onehot`'s arrays without its check: (target, onehot, valid, bad), bad = [a valid voxel holds a
    code that is no class, a voxel holds a class its sample's source does not annotate] (bool [2], on the
    labels' device, not read)."""
    target = _target_codes(target, logits, annotated)
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class codes, got {target.dtype}")
    c = logits.shape[1]
    spatial = (1,) * (target.dim() - 1)
    classes = torch.arange(c, device=target.device, dtype=target.dtype).reshape(1, c, *spatial)
    onehot = target[:, None] == classes
    valid = target != IGNORE
    no_class = valid & ~onehot.any(1)
    unannotated = onehot & ~annotated.reshape(annotated.shape + spatial)
    return target, onehot, valid, torch.stack([no_class.any(), unannotated.any()])


class BadTrainingLabel(ValueError):
    """A training label held a code that is no class, or a class its source does not annotate."""


def group_probability(logq: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """[B, *spatial]: merged probability of a class group (channels beyond C skipped). Summing merged
    channels is exact: a class merged into a group member is counted once, through that member."""
    idx = [k for k in classes if k < logq.shape[1]]
    return logq[:, idx].exp().sum(1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def class_frequencies(counts: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """[C] float: fraction of voxels of class c among the voxels of the cases that annotate c.

    counts: [N, C] voxel counts per case (IGNORE excluded); annotated: [N, C] bool. A parent counts its
    children's voxels (lesion = lesion + GGO + consolidation), since in a typed source every opacity is a
    lesion. NaN where no case annotates c. This is what `set_class_frequencies` expects.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).clone()
    annotated = torch.as_tensor(annotated, dtype=torch.bool)
    totals = counts.sum(1, keepdim=True)  # before parents absorb children, or those voxels count twice
    for child, parent in PARENT.items():
        ci, pi = CLASS_INDEX[child], CLASS_INDEX[parent]
        if max(ci, pi) < counts.shape[1]:
            counts[:, pi] += counts[:, ci]
    a = annotated.to(counts.dtype)
    return ((counts * a).sum(0) / (a * totals).sum(0)).float()


def patch_class_frequencies(target: torch.Tensor, valid: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """[C] float: `class_frequencies` of a batch of patches, each patch a case: its valid voxels of each class.
    target [B, *spatial] long (prepared), valid [B, *spatial] bool, annotated [B, C] bool."""
    c = annotated.shape[1]
    onehot = F.one_hot(target.flatten(1), c) * valid.flatten(1)[..., None]  # [B, N, C]
    return class_frequencies(onehot.sum(1), annotated).to(target.device)


class FrequencyWeighted(nn.Module):
    """Base of losses weighted by training-set class frequencies (`set_class_frequencies`)."""

    needs_frequencies = True

    def __init__(self):
        super().__init__()
        # Not persistent: frequencies come from the training set at fit time (set again on resume), and a
        # checkpoint must load into a fresh module built from its hyperparameters, which has none.
        self.register_buffer("class_freq", None, persistent=False)

    def set_class_frequencies(self, freq: torch.Tensor) -> None:
        freq = torch.as_tensor(freq, dtype=torch.float32).flatten()
        known = freq[~torch.isnan(freq)]
        if not bool(((known >= 0) & (known <= 1)).all()):
            raise ValueError(f"class frequencies must lie in [0, 1] (NaN = never annotated), got {freq.tolist()}")
        self.class_freq = freq

    def frequencies(self, n_classes: int, device: torch.device) -> torch.Tensor:
        if self.class_freq is None:
            raise RuntimeError(f"{type(self).__name__} needs the training set's class frequencies: call "
                               "loss.set_class_frequencies(freq) (e.g. losses.class_frequencies(counts, "
                               "annotated)) before training")
        if self.class_freq.numel() < n_classes:
            raise ValueError(f"{self.class_freq.numel()} class frequencies for {n_classes} channels")
        return self.class_freq[:n_classes].to(device)


def inverse_frequency_weights(freq: torch.Tensor) -> torch.Tensor:
    """w_c = 1 / f_c scaled to mean 1 over the classes seen in training (f_c > 0). A class never seen
    (0 or NaN) can only be a target at validation; it gets the largest weight, the rarest class's."""
    seen = freq > 0
    if not seen.any():
        raise ValueError("no class has a positive training frequency")
    w = torch.zeros_like(freq)
    w[seen] = 1.0 / freq[seen]
    w = w / w[seen].mean()
    w[~seen] = w[seen].max()
    return w


@register_loss("dice_ce", params=DiceCEParams)
class PartialDiceCELoss(nn.Module):
    """`ce_weight * CE + dice_weight * (1 - soft Dice)` on the marginalized distribution.

    Dice is a batch Dice per foreground class, over the samples that annotate the class (nnU-Net's
    batch Dice: stable when a patch holds no lesion), averaged over classes annotated by any sample.
    """

    needs_frequencies = False

    def __init__(self, ce_weight: float, dice_weight: float, smooth: float):
        super().__init__()
        self.ce_weight, self.dice_weight, self.smooth = ce_weight, dice_weight, smooth
        # Set by the training module: on a GPU the label check's result is kept on the device (OR-ed over the
        # steps) and read by `check_deferred_labels` before each validation and checkpoint, instead of a host
        # read (a sync that stalls the step) in every call. Off: every call checks at once, as standalone use
        # expects. On a CPU every call checks at once either way (a host read costs nothing there).
        self.defer_label_check = False
        self._label_flags: torch.Tensor | None = None

    def check_deferred_labels(self) -> None:
        """Raise BadTrainingLabel if a deferred check found a bad label since the last call (one host read)."""
        if self._label_flags is None:
            return
        flags, self._label_flags = self._label_flags, None
        bad_code, bad_class = flags.tolist()
        where = ("in a training batch on the device, where codes are not read in every step (a host sync); "
                 "the same data on a CPU names them")
        if bad_code:
            raise BadTrainingLabel(f"target held a code that is no class and not IGNORE ({IGNORE}), {where}")
        if bad_class:
            raise BadTrainingLabel(f"target held a class the sample's source does not annotate, {where}")

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        # IGNORE voxels (policy "ignore") take part in neither term: zero weight in CE, out of the Dice sums.
        # The label keeps its dtype (uint8 patches): see target_onehot.
        if self.defer_label_check and not host_decides(logits):
            target, hot, valid, bad = onehot_parts(target, logits, annotated)
            self._label_flags = bad if self._label_flags is None else self._label_flags | bad
        else:
            target, hot, valid = target_onehot(target, logits, annotated)
        logq = merged_log_probs(logits, annotated, target)  # IGNORE matches no container: nothing moved there
        # -log q of the target class: the one-hot selects it (where, not a product: a -inf elsewhere stays out)
        ce = masked_mean(-torch.where(hot, logq, 0.0).sum(1), valid)
        q = logq.exp() * valid[:, None]
        onehot = hot.to(q.dtype)  # zero at IGNORE voxels already
        dims = tuple(range(2, logits.dim()))
        inter = (q * onehot).sum(dims)            # [B, C]
        denom = (q + onehot).sum(dims)
        use = annotated.clone()
        use[:, 0] = False
        w = use.float()
        dice_c = (2 * (inter * w).sum(0) + self.smooth) / ((denom * w).sum(0) + self.smooth)  # [C]
        classes = use.any(0)
        if host_decides(dice_c):
            dice = dice_c[classes].mean() if classes.any() else logits.new_tensor(1.0)
        else:  # the same mean without reading `classes` on the host (see host_decides)
            n = classes.sum()
            dice = torch.where(n > 0, (dice_c * classes).sum() / n.clamp(min=1), 1.0)  # a scalar: no copy to the device
        return self.ce_weight * ce + self.dice_weight * (1.0 - dice)


@register_loss("weighted_ce", params=WeightedCEParams)
class WeightedCELoss(FrequencyWeighted):
    """Class-weighted CE on the marginalized distribution (Lizzi et al.), inverse-frequency weights by default.

    L = sum_v w[t_v] * -log q[t_v] / sum_v w[t_v] over valid voxels (torch's weighted-CE reduction, so
    the scale of w cancels). The seed names "a weighted cross-entropy" without its weights; we take
    `inverse_frequency_weights`, unless `weights` (one per channel) is given. Their frequencies:
    - patch (default): of the batch's own patches (`patch_class_frequencies`). Patches are drawn lesion-centred
      (data.fg_fraction), so whole-volume frequencies would correct an imbalance the sampler already
      corrected, twice. With inverse batch frequencies every class present in the batch weighs the same in
      total: L is the mean over those classes of their mean voxel CE.
    - volume: of the training cases' whole volumes (`set_class_frequencies`, at fit start).
    """

    def __init__(self, weights: Sequence[float] | None, frequencies: str):
        super().__init__()
        self.weights = None if weights is None else torch.tensor([float(w) for w in weights])
        self.mode = Frequencies(frequencies)
        # only whole-volume frequencies come from the training set; explicit weights use none
        self.needs_frequencies = weights is None and self.mode == Frequencies.volume

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        target, valid = prepare_target(target, logits, annotated)
        c = logits.shape[1]
        logq = merged_log_probs(logits, annotated, target)
        nll = -torch.gather(logq, 1, target[:, None])[:, 0]
        if self.weights is not None:
            if self.weights.numel() != c:
                raise ValueError(f"weighted_ce: {self.weights.numel()} weights for {c} channels")
            w = self.weights.to(logits.device)
        elif self.mode == Frequencies.patch:
            if not valid.any():  # nothing labelled in the batch: no term, but keep the graph (DDP)
                return 0.0 * nll.sum()
            w = inverse_frequency_weights(patch_class_frequencies(target, valid, annotated))
        else:
            w = inverse_frequency_weights(self.frequencies(c, logits.device))
        w_vox = w[target] * valid
        return (w_vox * nll).sum() / w_vox.sum().clamp_min(1e-12)


@register_loss("lung_jaccard", params=LungJaccardParams)
class LungJaccardLoss(nn.Module):
    """Soft Jaccard of the opacity (lesion + GGO + consolidation) inside the lung mask (Chaganti et al.).

    L = 1 - (p.y + s) / (sum p + sum y - p.y + s), one batch-wide Jaccard, p = merged opacity
    probability, y = target in {lesion, GGO, consolidation}. Region: valid voxels of samples that annotate
    lesion, restricted to the reference lung + opacity voxels when the source annotates both lungs; a
    source without lungs has no lung mask, so all its valid voxels count. On its own this trains only
    opacity vs rest (as in the seed, whose network had 2 outputs); `ce_weight` > 0 adds the marginal CE
    so that lungs and typed opacities are learned too.
    """

    needs_frequencies = False

    def __init__(self, smooth: float, ce_weight: float):
        super().__init__()
        self.smooth, self.ce_weight = smooth, ce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        target, valid = prepare_target(target, logits, annotated)
        c = logits.shape[1]
        logq = merged_log_probs(logits, annotated, target)
        opacity = [k for k in OPACITY if k < c]
        lungs = [k for k in LUNGS if k < c]
        p = group_probability(logq, opacity)
        y = torch.isin(target, torch.tensor(opacity, device=target.device))
        in_lung = torch.isin(target, torch.tensor(lungs + opacity, device=target.device))
        bshape = (-1,) + (1,) * (target.dim() - 1)
        has_lungs = (annotated[:, lungs].all(1) if len(lungs) == 2 else torch.zeros_like(annotated[:, 0]))
        region = valid & annotated[:, LESION].reshape(bshape) & (in_lung | ~has_lungs.reshape(bshape))
        m, yf = region.float(), y.float()
        inter = (p * yf * m).sum()
        union = (p * m).sum() + (yf * m).sum() - inter
        if region.any():
            jaccard = 1.0 - (inter + self.smooth) / (union + self.smooth)
        else:  # no sample annotates lesion: nothing to learn, but keep the graph for DDP
            jaccard = 0.0 * p.sum()
        if self.ce_weight:
            jaccard = jaccard + self.ce_weight * masked_mean(-torch.gather(logq, 1, target[:, None])[:, 0], valid)
        return jaccard


def gaussian_smooth(x: torch.Tensor, sigma: float | Sequence[float], truncate: float = 3.0) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, *spatial] (1 to 3 spatial dims), per channel, zero padded.
    sigma in voxels, one for all dims or one per dim; 0 leaves that dim alone.

    Not MONAI's GaussianFilter: it returns NaN for a zero sigma (a dim left alone), and its truncated
    sampled kernel does not sum to one (0.9997 at sigma 1), so a blurred one-hot label would lose mass."""
    nd = x.dim() - 2
    sig = [float(sigma)] * nd if isinstance(sigma, (int, float)) else [float(s) for s in sigma]
    if len(sig) != nd:
        raise ValueError(f"sigma {sigma} for {nd} spatial dims")
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    c = x.shape[1]
    for d, s in enumerate(sig):
        if s <= 0:
            continue
        r = max(1, math.ceil(truncate * s))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / s) ** 2)
        shape = [1, 1] + [1] * nd
        shape[2 + d] = 2 * r + 1
        kernel = (k / k.sum()).reshape(shape).repeat(c, *[1] * (nd + 1))
        pad = [0] * nd
        pad[d] = r
        x = conv(x, kernel, padding=tuple(pad), groups=c)
    return x


@register_loss("soft_kl", params=SoftKLParams)
class SoftKLLoss(FrequencyWeighted):
    """Class-weighted KL(soft target || prediction) on the marginalized distribution (Lensink et al.).

    L = sum_v sum_k w_k y_k (log y_k - log q_k) / #valid, w_k = 1 - f_k (`set_class_frequencies`; NaN,
    a class never annotated, weighs 1; a merged channel weighs as its annotated class). A hard target
    becomes soft by a Gaussian blur (sigma voxels) of its one-hot, normalized over valid voxels so IGNORE
    neither leaks in nor dilutes: interiors stay hard, boundaries become mixtures, the seed's
    location-dependent, spatially correlated noise.
    sigma = 0 gives hard labels (weighted CE). A float target [B, C, *spatial] is taken as the
    probabilistic label itself (not blurred); voxels whose probabilities sum to 0 are unlabelled.
    """

    def __init__(self, sigma: float | Sequence[float], truncate: float, weighted: bool):
        super().__init__()
        self.sigma, self.truncate, self.weighted = sigma, truncate, weighted
        self.needs_frequencies = weighted

    def soft_target(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor):
        """(y [B, C, *spatial] on annotated channels only, valid [B, *spatial], the hard target [B, *spatial]
        or None for a probabilistic target)."""
        if target.is_floating_point() and target.shape == logits.shape and logits.shape[1] > 1:
            y = target.float()
            if bool((y < 0).any()):
                raise ValueError("soft_kl: negative target probabilities")
            bshape = annotated.shape + (1,) * (y.dim() - 2)
            if bool((y * ~annotated.reshape(bshape) > 1e-6).any()):
                raise ValueError("target holds a class the sample's source does not annotate")
            return y, y.sum(1) > 0, None
        target, valid = prepare_target(target, logits, annotated)
        v = valid.float()[:, None]
        onehot = torch.zeros_like(logits, dtype=torch.float32).scatter_(1, target[:, None], 1.0) * v
        num, den = gaussian_smooth(onehot, self.sigma, self.truncate), gaussian_smooth(v, self.sigma, self.truncate)
        return num / den.clamp_min(1e-12) * v, valid, target

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        y, valid, hard = self.soft_target(logits, target, annotated)
        logq = merged_log_probs(logits, annotated, hard)
        kl = torch.xlogy(y, y) - y * logq  # [B, C, *spatial]; 0 log 0 = 0 on channels without mass
        if self.weighted:
            w = 1.0 - torch.nan_to_num(self.frequencies(logits.shape[1], logits.device), nan=0.0)
            kl = kl * w.reshape((1, -1) + (1,) * (kl.dim() - 2))
        return masked_mean(kl.sum(1), valid)


@register_loss("focal", params=FocalParams)
class FocalLoss(nn.Module):
    """Focal loss (Lin et al.) on the marginalized distribution: -alpha[t] (1 - q_t)^gamma log q_t.

    Mean over valid voxels. `alpha` (one per channel, None = 1) is indexed by the target class, so a
    merged channel takes its annotated class's alpha; gamma = 0 with no alpha is the marginal CE.
    """

    needs_frequencies = False

    def __init__(self, gamma: float, alpha: Sequence[float] | None):
        super().__init__()
        self.gamma = gamma
        self.alpha = None if alpha is None else torch.tensor([float(a) for a in alpha])

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        target, valid = prepare_target(target, logits, annotated)
        logq_t = torch.gather(merged_log_probs(logits, annotated, target), 1, target[:, None])[:, 0]
        # (1 - q)^gamma through -expm1(log q): exact near q = 1, where the focal term matters most
        loss = -logq_t * (-torch.expm1(logq_t)).clamp_min(0.0) ** self.gamma
        if self.alpha is not None:
            if self.alpha.numel() != logits.shape[1]:
                raise ValueError(f"focal: {self.alpha.numel()} alpha values for {logits.shape[1]} channels")
            loss = loss * self.alpha.to(logits.device)[target]
        return masked_mean(loss, valid)
