"""Domain-generalization methods: the METHODS registry; each method overrides one or two hooks of `Method`.

`method.name` selects one and `methods.<name>` holds its arguments (YAML; `search` there is the sweep space,
never passed here), typed by the params dataclass each method registers. The hooks, in the order a run meets them:

- `data_overrides()`     datamodule arguments (source_balanced: sampling)
- `attach(module)`       adds submodules or forward hooks when the module is built, before the optimizer
- `transform_batch(...)` the training batch after its transfer to the device (bigaug, randconv)
- `extra_loss(...)`      a term added to the segmentation loss (dann)
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

    def attach(self, module) -> None:
        pass

    def transform_batch(self, batch: dict, module) -> dict:
        return batch

    def extra_loss(self, batch: dict, module) -> torch.Tensor | None:
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


@dataclass
class RandConvParams:
    p: float
    kernel_sizes: list[int]
    mix: bool


@dataclass
class StageHooksParams:
    p: float
    layers: int


@dataclass
class MixStyleParams(StageHooksParams):
    alpha: float


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


@register_method("randconv", RandConvParams)
class RandConv(Method):
    """RandConv (Xu et al., ICLR 2021): the input through a freshly drawn random convolution, mixed with the original."""

    def transform_batch(self, batch: dict, module) -> dict:
        if torch.rand(()) >= self.params["p"]:
            return batch
        x = batch["image"].float()
        k = int(self.params["kernel_sizes"][torch.randint(len(self.params["kernel_sizes"]), ()).item()])
        # a 2D network sees slices: keep the filter in-plane so slices do not leak into one another
        shape = (k, k, 1) if module.hparams.spatial_dims == 2 else (k, k, k)
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
        return dict(batch, image=y)


# ---------------------------------------------------------------- feature-level: MixStyle, DSU

def _stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    dims = tuple(range(2, x.dim()))
    mu = x.mean(dims, keepdim=True)
    sig = (x.var(dims, keepdim=True) + eps).sqrt()
    return mu.detach(), sig.detach()


class _StageHooks(Method):
    """Perturbs the outputs of the first `layers` encoder stages while training, with probability p."""

    def attach(self, module) -> None:
        stages = module.net.encoder_stages()
        n = int(self.params["layers"])
        if not 1 <= n <= len(stages):
            raise ValueError(f"{type(self).__name__}: layers={n}, but the network has {len(stages)} encoder stages")
        for stage in stages[:n]:
            stage.register_forward_hook(self._hook)

    def _hook(self, _mod, _inp, out):
        if not torch.is_grad_enabled() or not _mod.training or out.shape[0] < 2:
            return None
        if torch.rand(()) >= self.params["p"]:
            return None
        return self.perturb(out)

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_method("mixstyle", MixStyleParams)
class MixStyle(_StageHooks):
    """MixStyle (Zhou et al., ICLR 2021): mixes per-channel feature statistics of two samples in the first encoder stages."""

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        mu, sig = _stats(x)
        b = x.shape[0]
        lam = torch.distributions.Beta(self.params["alpha"], self.params["alpha"]).sample((b,)).to(x)
        lam = lam.view(b, *([1] * (x.dim() - 1)))
        perm = torch.randperm(b, device=x.device)
        mix_mu = lam * mu + (1 - lam) * mu[perm]
        mix_sig = lam * sig + (1 - lam) * sig[perm]
        return (x - mu) / sig * mix_sig + mix_mu


@register_method("dsu", StageHooksParams)
class DSU(_StageHooks):
    """DSU (Li et al., ICLR 2022): feature statistics resampled from Gaussians whose spread is their batch variance."""

    def perturb(self, x: torch.Tensor) -> torch.Tensor:
        mu, sig = _stats(x)
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


@register_method("dann", DANNParams)
class DANN(Method):
    """DANN (Ganin et al., JMLR 2016): a source classifier on the deepest encoder features, trained through gradient reversal."""

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

    def extra_loss(self, batch: dict, module) -> torch.Tensor | None:
        feats, self._features = self._features, None
        if feats is None:
            raise RuntimeError("dann: the deepest encoder stage produced no features in this step")
        lam = self.params["weight"]
        if self.params["schedule"] and module._trainer is not None and module.trainer.max_epochs:
            # DANN's ramp 2 / (1 + exp(-10 p)) - 1 over training progress p: the adversary starts gently
            p = module.trainer.current_epoch / max(1, module.trainer.max_epochs)
            lam *= 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0
        target = torch.tensor([self.index[s] for s in batch["source"]], device=feats.device)
        # a 2D network's features are per slice: every slice carries its patch's source
        target = target.repeat_interleave(feats.shape[0] // target.shape[0])
        logits = module.domain_head(grad_reverse(feats, 1.0))
        module.log("train/domain_acc", (logits.argmax(1) == target).float().mean(), on_step=False, on_epoch=True,
                   batch_size=target.shape[0])
        return lam * F.cross_entropy(logits, target)


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
