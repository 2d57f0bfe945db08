"""Domain-generalization methods: the METHODS registry; each method overrides one or two hooks of `Method`.

`method.name` selects one and `methods.<name>` holds its arguments (YAML; `search` there is the sweep space,
never passed here), typed by the params dataclass each method registers. The hooks, in the order a run meets them:

- `data_overrides()`     datamodule arguments (source_balanced: sampling)
- `network_overrides()`  network arguments the method cannot do without (bn_adapt, tent: batch norm); every
                         other method trains the configured network (instance norm by default)
- `attach(module)`       adds submodules or forward hooks when the module is built, before the optimizer
- `transform_batch(...)` the training batch after its transfer to the device (bigaug, randconv)
- `begin_step(batch, module)` the training batch just before the network's forward pass: each sample's
                         source reaches the feature hooks here (mixstyle, dsu: cross-domain pairing)
- `extra_loss(...)`      a term added to the segmentation loss (dann; randconv's consistency), given the
                         main head's logits of the step
- `adapt(module, images)` test time: unlabelled test images only (bn_adapt, tent)

DomainBed has these as classification algorithms; MONAI and nnU-Net have none as selectable methods, so
they are ours, on MONAI transforms where those exist. Feature-level methods hook the encoder stages the
network zoo names (`Network.encoder_stages`), so they work with every network of the zoo.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from datamodules.choices import Choice
from datamodules.registry import Registry

METHODS = Registry("method")


def register_method(name: str, params: type) -> Callable:
    """Register a Method subclass under `name` with its params dataclass (its arguments, `methods.<name>`)."""
    def wrap(cls):
        cls.name = name
        return METHODS.register(name, params=params)(cls)

    return wrap

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def build_method(name: str, **params) -> Method:
    return METHODS.lookup(name)(**params)


class Method:
    """Empirical risk minimization: every hook does nothing (the base every method overrides)."""

    test_time = False  # True: `adapt` runs on the unlabelled test images before testing (needs gradients there)
    name = ""  # set by register_method

    def __init__(self, seed: int = 0, **params):
        # every argument of the registered params dataclass, checked (unknown, missing, mistyped: one line
        # naming methods.<name>.<key>); kept as a dict, the way the hooks read them
        checked = METHODS.make_params(self.name, params)
        self.params = {f.name: getattr(checked, f.name) for f in fields(checked)}
        self.seed = seed

    @classmethod
    def data_overrides(cls) -> dict:
        return {}

    @classmethod
    def network_overrides(cls) -> dict:
        return {}

    def attach(self, module) -> None:
        pass

    def transform_batch(self, batch: dict, module) -> dict:
        return batch

    def begin_step(self, batch: dict, module) -> None:
        pass

    def extra_loss(self, batch: dict, module, logits: torch.Tensor | None = None) -> torch.Tensor | None:
        return None

    def adapt(self, module, images: Iterable[torch.Tensor]) -> None:
        pass


# Each method's arguments; their values live in experiments/configs (`methods:`), never here.

@dataclass
class NoParams:
    pass


@dataclass
class BigAugParams:
    p: float
    blur_sigma: list[float]
    sharpen_alpha: list[float]
    noise_std: float
    gamma: list[float]
    contrast: float
    brightness: float
    thick_factor: list[int]
    rotate_deg: float
    scale: float
    elastic: bool
    elastic_sigma: list[float]
    elastic_magnitude: list[float]


class Pairing(Choice):
    """methods.mixstyle.pairing: whose statistics a sample's are mixed with. random: any other sample of the
    batch (never itself); crossdomain: a sample of another training source (MixStyle's `crossdomain`
    variant), random when the batch holds one source only."""
    random = "random"
    crossdomain = "crossdomain"


@dataclass
class RandConvParams:
    p: float
    kernel_sizes: list[int]
    mix: bool
    consistency: float  # weight of the KL consistency term between three views (0: off)


@dataclass
class StageHooksParams:
    p: float
    layers: int | None  # the first `layers` encoder stages; None: every one


@dataclass
class MixStyleParams(StageHooksParams):
    alpha: float
    pairing: Pairing


@dataclass
class DANNParams:
    weight: float
    hidden: int
    schedule: bool


@dataclass
class AdaptParams:
    crops_per_case: int


@dataclass
class TentParams(AdaptParams):
    lr: float
    steps: int


@register_method("erm", NoParams)
class ERM(Method):
    """Empirical risk minimization: pooled training sources, no domain-specific step (the baseline)."""


@register_method("source_balanced", NoParams)
class SourceBalanced(Method):
    """ERM on batches drawn from every training source equally often, whatever their sizes."""

    @classmethod
    def data_overrides(cls) -> dict:
        return {"sampling": "source_balanced"}


# ---------------------------------------------------------------- input-level: BigAug, RandConv

def _thick_slices(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Simulated thick-slice acquisition: average `factor` slices along z, then back to the grid (linear).
    MONAI's RandSimulateLowResolution zooms every axis alike; slice thickness is the shift CT sources show."""
    factor = min(int(factor), x.shape[-1])
    if factor < 2:
        return x
    low = F.avg_pool3d(x[None], kernel_size=(1, 1, factor), stride=(1, 1, factor), ceil_mode=True)
    return F.interpolate(low, size=x.shape[-3:], mode="trilinear", align_corners=False)[0]


@register_method("bigaug", BigAugParams)
class BigAug(Method):
    """BigAug (Zhang et al., TMI 2020): stacked image-quality, appearance and spatial transforms per patch."""

    def _transforms(self):
        from monai.transforms import (
            Compose,
            Rand3DElasticd,
            RandAdjustContrastd,
            RandAffined,
            RandGaussianNoised,
            RandGaussianSharpend,
            RandGaussianSmoothd,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        q, p = self.params, self.params["p"]
        rad = math.radians(q["rotate_deg"])
        img = ["image"]
        ops = [RandGaussianSmoothd(img, sigma_x=q["blur_sigma"], sigma_y=q["blur_sigma"], sigma_z=q["blur_sigma"], prob=p),
               RandGaussianSharpend(img, alpha=q["sharpen_alpha"], prob=p),
               RandGaussianNoised(img, std=q["noise_std"], prob=p),
               RandAdjustContrastd(img, gamma=q["gamma"], prob=p),
               RandScaleIntensityd(img, factors=q["contrast"], prob=p),
               RandShiftIntensityd(img, offsets=q["brightness"], prob=p),
               # label: nearest; the patch border is replicated, so no invented background enters the label
               RandAffined(["image", "label"], prob=p, rotate_range=(rad, rad, rad), scale_range=q["scale"],
                           mode=("bilinear", "nearest"), padding_mode="border")]
        if q["elastic"]:
            ops.append(Rand3DElasticd(["image", "label"], sigma_range=q["elastic_sigma"],
                                      magnitude_range=q["elastic_magnitude"], prob=p, mode=("bilinear", "nearest"),
                                      padding_mode="border"))
        compose = Compose(ops)
        compose.set_random_state(seed=self.seed)
        return compose

    def transform_batch(self, batch: dict, module) -> dict:
        if not hasattr(self, "_compose"):
            self._compose = self._transforms()
            self._rng = random.Random(self.seed)
        images, labels = [], []
        for x, y in zip(batch["image"], batch["label"]):
            out = self._compose({"image": x.float(), "label": y.float()})
            xi = torch.as_tensor(out["image"]).float()
            if self._rng.random() < self.params["p"]:
                xi = _thick_slices(xi, self._rng.randint(*self.params["thick_factor"]))
            images.append(xi)
            labels.append(torch.as_tensor(out["label"]).round().to(batch["label"].dtype))
        return dict(batch, image=torch.stack(images), label=torch.stack(labels))


def consistency_kl(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """RandConv's consistency term (Xu et al. 2021, their code's `-cl`): the mean over the m views of
    KL(p_i || p_mix), p_mix = clamp(mean_i p_i, 1e-7, 1) (a generalized Jensen-Shannon divergence, as in AugMix),
    p_i the softmax over channels of view i's logits [B, C, *spatial]. Summed over channels, averaged over
    samples and voxels (per voxel what their `batchmean` is per image)."""
    # p log p from log_softmax, not F.kl_div(log_mix, softmax(z)): once a view is confident, softmax underflows
    # to exactly 0 in float32, kl_div's gradient through its target is log(0) = -inf, and 0 x -inf made the
    # loss NaN (RandConv runs of the methods sweep died at step 148 and 219). The value is the same.
    log_probs = [torch.log_softmax(z.float(), 1) for z in logits]
    probs = [lp.exp() for lp in log_probs]
    log_mix = torch.clamp(sum(probs) / len(probs), 1e-7, 1.0).log()
    return sum((p * (lp - log_mix)).sum(1).mean() for p, lp in zip(probs, log_probs)) / len(probs)


@register_method("randconv", RandConvParams)
class RandConv(Method):
    """RandConv (Xu et al., ICLR 2021): the input through a freshly drawn random convolution, mixed with the
    original, and with `consistency` > 0 their consistency loss over three views (two more forward passes)."""

    _clean: torch.Tensor | None = None

    def random_view(self, x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
        """With probability p (else x itself), x through a freshly drawn random convolution, each sample back
        to its own intensity statistics, mixed with x by a uniform weight when `mix`."""
        if torch.rand(()) >= self.params["p"]:
            return x
        k = int(self.params["kernel_sizes"][torch.randint(len(self.params["kernel_sizes"]), ()).item()])
        # a 2D network sees slices: keep the filter in-plane so slices do not leak into one another
        shape = (k, k, 1) if spatial_dims == 2 else (k, k, k)
        c = x.shape[1]
        # He-style variance (RandConv's choice): the output keeps the input's scale on average
        w = torch.randn(c, c, *shape, device=x.device) / math.sqrt(c * math.prod(shape))
        y = F.conv3d(x, w, padding=tuple(s // 2 for s in shape))
        # back to each sample's intensity statistics, so the network sees the usual range
        dims = tuple(range(1, x.dim()))
        y = (y - y.mean(dims, keepdim=True)) / y.std(dims, keepdim=True).clamp_min(1e-6)
        y = y * x.std(dims, keepdim=True) + x.mean(dims, keepdim=True)
        if self.params["mix"]:
            a = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device)
            y = a * x + (1 - a) * y
        return y

    def transform_batch(self, batch: dict, module) -> dict:
        x = batch["image"].float()
        # the consistency views are drawn from the same (augmented) images as the first one
        self._clean = x if self.params["consistency"] > 0 else None
        y = self.random_view(x, module.hparams.spatial_dims)
        return batch if y is x else dict(batch, image=y)

    def extra_loss(self, batch: dict, module, logits: torch.Tensor | None = None) -> torch.Tensor | None:
        x, self._clean = self._clean, None
        if x is None or logits is None:
            return None
        # the segmentation loss saw view 1 (the batch); views 2 and 3 only enter this term, as in their code
        m = module.net.margin
        views = [logits]
        for _ in range(2):
            z = module.net.heads(self.random_view(x, module.hparams.spatial_dims))[0]
            views.append(z[..., m:-m] if m else z)
        return self.params["consistency"] * consistency_kl(views)


# ---------------------------------------------------------------- feature-level: MixStyle, DSU

def _stats(x: torch.Tensor, eps: float = 1e-6, detach: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    dims = tuple(range(2, x.dim()))
    mu = x.mean(dims, keepdim=True)
    sig = (x.var(dims, keepdim=True) + eps).sqrt()
    return (mu.detach(), sig.detach()) if detach else (mu, sig)


def pair_partners(domains: torch.Tensor, cross_domain: bool = False,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """[N] long: each sample's partner, drawn uniformly among the other samples, never itself (a random
    permutation of 2 samples is the identity half the time, and a sample mixed with itself is unchanged).
    cross_domain: among the samples of another source (domains: [N] source ids), as long as the batch holds
    two sources; with one source, any other sample."""
    n = domains.shape[0]
    if n < 2:
        raise ValueError(f"pairing needs at least two samples, got {n}")
    d = domains.cpu()
    if cross_domain and d.unique().numel() > 1:
        allowed = d[:, None] != d[None, :]
    else:
        allowed = ~torch.eye(n, dtype=torch.bool)
    scores = torch.rand(n, n, generator=generator).masked_fill(~allowed, -1.0)
    return scores.argmax(1).to(domains.device)


class _StageHooks(Method):
    """Perturbs the outputs of the first `layers` encoder stages (None: all) while training, with probability
    p at each stage independently. `begin_step` hands the hooks the source of every sample of the batch."""

    _domains: torch.Tensor | None = None

    def attach(self, module) -> None:
        stages = module.net.encoder_stages()
        n = self.params["layers"]
        n = len(stages) if n is None else int(n)
        if not 1 <= n <= len(stages):
            raise ValueError(f"methods.{self.name}.layers={n}, but the network has {len(stages)} encoder stages "
                             "(null: every one)")
        for stage in stages[:n]:
            stage.register_forward_hook(self._hook)

    def begin_step(self, batch: dict, module) -> None:
        names = list(batch["source"])
        index = {s: i for i, s in enumerate(dict.fromkeys(names))}
        self._domains = torch.tensor([index[s] for s in names])

    def domains_of(self, n: int) -> torch.Tensor:
        """[n] source ids of a feature batch: a 2D network's features are per slice, and every slice carries
        its patch's source (slices of one patch are contiguous, as in DANN). Unknown: one id for all."""
        d = self._domains
        if d is None or d.numel() == 0 or n % d.numel():
            return torch.zeros(n, dtype=torch.long)
        return d.repeat_interleave(n // d.numel())

    def _hook(self, _mod, _inp, out):
        if not torch.is_grad_enabled() or not _mod.training or out.shape[0] < 2:
            return None
        # A stage reduced to one voxel per channel (SwinUNETR's deepest stage on a 32-voxel patch) has no
        # spatial spread: its unbiased std is NaN (0/0), and a style made of one value is not a style. Left as is.
        if out[0, 0].numel() < 2:
            return None
        if torch.rand(()) >= self.params["p"]:
            return None
        return self.perturb(out, self.domains_of(out.shape[0]).to(out.device))

    def perturb(self, x: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


@register_method("mixstyle", MixStyleParams)
class MixStyle(_StageHooks):
    """MixStyle (Zhou et al., ICLR 2021): mixes per-channel feature statistics of two samples in the first encoder
    stages; the statistics are detached, as in their code. `pairing`: the partner is any other sample (random)
    or one of another source (crossdomain)."""

    def perturb(self, x: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        mu, sig = _stats(x)
        b = x.shape[0]
        lam = torch.distributions.Beta(self.params["alpha"], self.params["alpha"]).sample((b,)).to(x)
        lam = lam.view(b, *([1] * (x.dim() - 1)))
        if domains is None:
            domains = torch.zeros(b, dtype=torch.long, device=x.device)
        partner = pair_partners(domains, cross_domain=self.params["pairing"] == Pairing.crossdomain)
        mix_mu = lam * mu + (1 - lam) * mu[partner]
        mix_sig = lam * sig + (1 - lam) * sig[partner]
        return (x - mu) / sig * mix_sig + mix_mu


@register_method("dsu", StageHooksParams)
class DSU(_StageHooks):
    """DSU (Li et al., ICLR 2022): feature statistics resampled from Gaussians whose spread is their variance over
    the batch. As their `DistributionUncertainty`: statistics not detached (gradients flow through mean, std and
    their batch spread), unbiased variances, eps 1e-6, one coin per insertion point; inserted after every encoder
    stage by default (layers: null), as they insert it after the stem and after each ResNet stage."""

    def perturb(self, x: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
        mu, sig = _stats(x, detach=False)
        std_mu = (mu.var(0, keepdim=True) + 1e-6).sqrt()
        std_sig = (sig.var(0, keepdim=True) + 1e-6).sqrt()
        beta = mu + torch.randn_like(mu) * std_mu
        gamma = sig + torch.randn_like(sig) * std_sig
        return (x - mu) / sig * gamma + beta


# ---------------------------------------------------------------- DANN

class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """Identity forward, gradient times -lam backward (Ganin & Lempitsky's gradient reversal layer)."""
    return _GradReverse.apply(x, lam)


def dann_lambda(step: int, total: float) -> float:
    """Ganin et al.'s ramp lambda_p = 2 / (1 + exp(-10 p)) - 1, p = step / total in [0, 1] (training progress
    in iterations). An unknown or infinite length (no max_epochs/max_steps): 1."""
    if not total or math.isinf(total):
        return 1.0
    p = min(1.0, max(0.0, step / total))
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


@register_method("dann", DANNParams)
class DANN(Method):
    """DANN (Ganin et al., JMLR 2016): a source classifier on the deepest encoder features, trained through gradient
    reversal. The classifier learns from its cross-entropy at full rate from step 0; only the reversed gradient
    into the encoder is scaled, by weight * lambda_p (`dann_lambda` of the global step over the run's total
    optimizer steps; weight alone with schedule: false)."""

    def attach(self, module) -> None:
        sources = list(module.hparams.get("train_sources") or ())
        if len(sources) < 2:
            raise ValueError(f"dann needs at least two training sources to tell apart, got {sources}")
        self.index = {s: i for i, s in enumerate(sources)}
        stage = module.net.encoder_stages()[-1]
        stage.register_forward_hook(self._keep)
        self._features, self._probing = None, True
        # the classifier's width is the deepest stage's channel count: read it from one small forward pass
        size = [int(s) for s in module.hparams.inference["roi_size"]]
        was = module.net.training
        module.net.eval()
        with torch.no_grad():
            module.net(torch.zeros(1, 1, *size))
        module.net.train(was)
        feats, self._features, self._probing = self._features, None, False
        pool = nn.AdaptiveAvgPool2d(1) if feats.dim() == 4 else nn.AdaptiveAvgPool3d(1)
        # a submodule of the LightningModule: in its parameters (optimizer) and in its checkpoints
        module.domain_head = nn.Sequential(pool, nn.Flatten(), nn.Linear(feats.shape[1], self.params["hidden"]),
                                           nn.ReLU(), nn.Linear(self.params["hidden"], len(sources)))

    def _keep(self, _mod, _inp, out):
        if self._probing or torch.is_grad_enabled():  # evaluation passes keep nothing alive
            self._features = out

    def reversal(self, module) -> float:
        """The reversed gradient's scale at this step: weight * lambda_p."""
        lam = float(self.params["weight"])
        trainer = module._trainer
        if self.params["schedule"] and trainer is not None:
            lam *= dann_lambda(trainer.global_step, trainer.estimated_stepping_batches)
        return lam

    def extra_loss(self, batch: dict, module, logits: torch.Tensor | None = None) -> torch.Tensor | None:
        feats, self._features = self._features, None
        if feats is None:
            raise RuntimeError("dann: the deepest encoder stage produced no features in this step")
        target = torch.tensor([self.index[s] for s in batch["source"]], device=feats.device)
        # a 2D network's features are per slice: every slice carries its patch's source
        target = target.repeat_interleave(feats.shape[0] // target.shape[0])
        domain_logits = module.domain_head(grad_reverse(feats, self.reversal(module)))
        module.train_log.add("train/domain_acc", (domain_logits.argmax(1) == target).float().mean(), target.shape[0])
        return F.cross_entropy(domain_logits, target)


# ---------------------------------------------------------------- test time: BN-Adapt, Tent

def random_crops(images: Iterable[torch.Tensor], size: Sequence[int], per_image: int, seed: int):
    """`per_image` random crops of `size` (padded by replication where an image is smaller) of each
    (1, C, *spatial) image: test-time methods see patches like those the network trained on."""
    g = torch.Generator().manual_seed(seed)
    for img in images:
        pad = []
        for s, d in zip(reversed(size), reversed(img.shape[2:])):
            pad += [0, max(0, s - d)]
        if any(pad):
            img = F.pad(img, pad, mode="replicate")
        for _ in range(per_image):
            start = [int(torch.randint(d - s + 1, (), generator=g)) for s, d in zip(size, img.shape[2:])]
            sl = tuple(slice(a, a + s) for a, s in zip(start, size))
            yield img[(slice(None), slice(None), *sl)]


def norm_layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, _NORMS)]


def _running_stat_layers(net: nn.Module, who: str) -> list[nn.Module]:
    layers = [m for m in norm_layers(net) if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if not layers:
        raise ValueError(f"{who} re-estimates normalization statistics, but the network has no layer keeping "
                         "running statistics (instance norm has none): use a batch-norm network, e.g. "
                         "networks.<name>.norm=batch")
    return layers


def reestimate_statistics(net: nn.Module, crops: Iterable[torch.Tensor], who: str) -> int:
    """Running mean/var of every batch-norm layer recomputed from the crops alone (cumulative average);
    nothing else changes. Returns the number of crops seen."""
    layers = _running_stat_layers(net, who)
    saved = [m.momentum for m in layers]
    net.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every crop weighs the same
        m.train()
    n = 0
    with torch.no_grad():
        for crop in crops:
            net(crop)
            n += 1
    for m, mom in zip(layers, saved):
        m.momentum = mom
    net.eval()
    if n == 0:
        raise ValueError(f"{who}: no test image to adapt on")
    return n


class _TestTime(Method):
    test_time = True

    @classmethod
    def network_overrides(cls) -> dict:
        # they adapt batch-norm statistics (and affine parameters): the only methods that need batch norm
        return {"norm": "batch"}

    def _crops(self, module, images) -> list[torch.Tensor]:
        """One batch of `crops_per_case` random patches per test volume: batch statistics over several
        patches (a lone small patch can leave a 1-voxel bottleneck, which batch norm cannot normalize)."""
        size = [int(s) for s in module.hparams.inference["roi_size"]]
        k = int(self.params["crops_per_case"])
        crops = list(random_crops(images, size, k, self.seed))
        return [torch.cat(crops[i:i + k]).to(module.device) for i in range(0, len(crops), k)]


@register_method("bn_adapt", AdaptParams)
class BNAdapt(_TestTime):
    """AdaBN (Li et al., 2016): batch-norm statistics re-estimated on the held-out source's unlabelled test images."""

    def adapt(self, module, images: Iterable[torch.Tensor]) -> None:
        reestimate_statistics(module.net, self._crops(module, images), "bn_adapt")


@register_method("tent", TentParams)
class Tent(_TestTime):
    """Tent (Wang et al., ICLR 2021): normalization affine parameters tuned to minimize prediction entropy on unlabelled test images."""

    def adapt(self, module, images: Iterable[torch.Tensor]) -> None:
        net = module.net
        crops = self._crops(module, images)
        params = [p for m in norm_layers(net) for p in (m.weight, m.bias) if p is not None]
        if not params:
            raise ValueError("tent tunes the affine parameters of normalization layers, and the network has none "
                             "(instance norm without affine): use a batch-norm network, e.g. networks.<name>.norm=batch")
        frozen = {p: p.requires_grad for p in net.parameters()}
        for p in net.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.params["lr"])
        bn = [m for m in norm_layers(net) if isinstance(m, nn.modules.batchnorm._NormBase)]
        net.eval()
        for m in bn:  # Tent normalizes with the test batch's statistics while it adapts
            m.train()
        saved = [(m.momentum, m.track_running_stats) for m in bn]
        for m in bn:  # ...without touching the running statistics (re-estimated below for the test pass)
            m.track_running_stats = False
        with torch.enable_grad():
            for _ in range(int(self.params["steps"])):
                for crop in crops:
                    logits = net(crop)
                    p = torch.softmax(logits.float(), 1)
                    loss = -(p * torch.log_softmax(logits.float(), 1)).sum(1).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        for m, (mom, track) in zip(bn, saved):
            m.momentum, m.track_running_stats = mom, track
        for p, req in frozen.items():
            p.requires_grad_(req)
        # the test pass runs in eval mode: its statistics are those of the test images (as bn_adapt), so a
        # prediction does not depend on which sliding windows share a batch
        if any(m.track_running_stats for m in bn):
            reestimate_statistics(net, crops, "tent")
        net.eval()
