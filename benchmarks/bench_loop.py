"""Benchmark: what a training step costs besides the network (`loop_overhead_ms_per_step` and its parts).

A real training epoch: the phantom suite through `MultiSourceDataModule` (LOSO, held-out mosmed), the real
`SegmentationModule` (partial-label dice_ce loss, ERM hooks, leakage guard, logging) and the trainer the
train stage builds (`experiments.stages.train.make_trainer`, CSV logger), at the issue's shape: batch 8,
128 x 128 x 32 patches, 2 loader workers. Only the network is swapped, for a 1x1x1 convolution with the
right number of output classes (`pointwise_network`), so what is left is the loop.

Numbers, all in ms per training step, means over the steady state of the measured (last) epoch: its steps
after the first (the first epoch warms the workers up; an epoch's first step waits for the workers to cut
its first patches, reported apart as `epoch_start_ms`):
- `step_ms`: wall time of those steps / their number;
- `compute_ms`: the per-voxel arithmetic, timed inside the loop: the network's forward, the loss's forward
  and the backward pass of both (on a CPU the loss on 8 x 8 x 128 x 128 x 32 logits dominates it; on a GPU
  it is a few kernels);
- `loop_overhead_ms_per_step` = step_ms - compute_ms: everything else a step costs (what the issue tracks);
- `breakdown`: where step_ms goes, from Lightning's SimpleProfiler and timers around the module's parts:
  loader_wait (next() on the loader), transfer (batch to the device), method_hooks (on_after_batch_transfer:
  augmentation on the device and the method's transform), forward (network), loss (its forward), logging
  (recording the step's values, and `self.log` at the steps Lightning writes: `train_logging.TrainLog`),
  step_other (the rest of training_step: leakage guard, non-finite note, and on a CPU releasing the logits),
  backward, optimizer (AdamW step, zero_grad), lightning (the rest: loops, hooks, callbacks, logger).

`gpu` (`run_gpu`, only where CUDA is present): the network alone (unet, dynunet, segresnet, fp32 and bf16)
and a real epoch with the default unet, in patches/s, their ratio, the GPU's busy share during the epoch and
sliding-window inference of one volume. Without CUDA the results say `"gpu": null`.
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn as nn

PARTS = ("loader_wait", "transfer", "method_hooks", "forward", "loss", "logging", "step_other", "backward",
         "optimizer", "lightning")
# the per-voxel arithmetic of the network and the loss: what the loop overhead excludes
COMPUTE = ("forward", "loss", "backward")
QUICK_STEPS, FULL_STEPS = 6, 30


class Pointwise(nn.Module):
    """A 1x1x1 convolution from one input channel, written as a broadcast (x * w + b): the same function,
    without the convolution's im2col path, so its forward costs one pass over the output."""

    def __init__(self, n_classes: int, spatial_dims: int = 3):
        super().__init__()
        shape = (1, n_classes) + (1,) * spatial_dims
        self.weight = nn.Parameter(torch.randn(shape) * 0.1)
        self.bias = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def pointwise_network(n_classes: int, spatial_dims: int = 3):
    """A `Network` whose forward costs almost nothing: a 1x1x1 convolution, 1 channel -> n_classes."""
    from lightning_modules.networks import Network

    return Network(Pointwise(n_classes, spatial_dims), spatial_dims, name="pointwise")


def loop_config(workdir: Path, overrides: list[str] = ()):
    """base.yaml at the issue's shape (batch 8, 128x128x32, 2 workers), phantom data under `workdir`."""
    from experiments.config import load_config

    return load_config(["phantom.size=tiny", "data.batch_size=8", "data.patch_size=[128,128,32]",
                        "data.num_workers=2", "data.cache_workers=1", "data.holdout=mosmed",
                        f"paths.cache={Path(workdir) / 'loop-cache'}", "paths.data_root=null", *overrides])


class _Timer:
    """Wall time of calls to a callable, summed per name into `totals` (seconds)."""

    def __init__(self, totals: dict, name: str, fn, sync=None):
        self.totals, self.name, self.fn, self.sync = totals, name, fn, sync

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.sync:
            self.sync()
        self.totals[self.name] += time.perf_counter() - t
        return out


class _EpochWindow(pl.Callback):
    """The measured window: from the end of the measured epoch's first step to the end of its last, i.e. the
    steady state (the first step also waits for the workers to start the epoch's patches: `epoch_start_s`).
    Records wall time, steps, and how much the profiler's and timers' totals grew meanwhile."""

    def __init__(self, profiler, timers: dict, epoch: int, sync=None):
        self.profiler, self.timers, self.epoch, self.sync = profiler, timers, epoch, sync
        self.start: dict = {}
        self.epoch_t0 = 0.0
        self.result: dict | None = None

    def _snapshot(self, trainer) -> dict:
        if self.sync:
            self.sync()
        return {"t": time.perf_counter(), "batch": trainer.fit_loop.epoch_loop.batch_progress.total.completed,
                "prof": {k: sum(v) for k, v in self.profiler.recorded_durations.items()}, "timers": dict(self.timers)}

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            self.epoch_t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        # snapshots at the window's two ends only: the measurement adds nothing to the steps between
        if trainer.current_epoch != self.epoch or 0 < batch_idx < trainer.num_training_batches - 1:
            return
        now = self._snapshot(trainer)
        if batch_idx == 0:
            self.start = now
            return
        if not self.start:
            return
        self.result = {"wall_s": now["t"] - self.start["t"], "steps": now["batch"] - self.start["batch"],
                       "epoch_start_s": self.start["t"] - self.epoch_t0,
                       "prof": {k: v - self.start["prof"].get(k, 0.0) for k, v in now["prof"].items()},
                       "timers": {k: v - self.start["timers"].get(k, 0.0) for k, v in now["timers"].items()}}


def _profiled(prof: dict, kind: str, hook: str) -> float:
    """Seconds the profiler recorded for `hook` of `kind` ([Strategy], [LightningModule], ...)."""
    return sum(v for k, v in prof.items() if k.startswith(kind) and k.endswith(f".{hook}"))


def breakdown(window: dict) -> dict:
    """ms per step of each part (PARTS) from the measured epoch's profiler totals and timers."""
    p, t, n = window["prof"], window["timers"], max(window["steps"], 1)
    lm = "[LightningModule]"
    parts = {
        "loader_wait": _profiled(p, "[_TrainingEpochLoop]", "train_dataloader_next"),
        "transfer": _profiled(p, lm, "transfer_batch_to_device") + _profiled(p, lm, "on_before_batch_transfer"),
        "method_hooks": _profiled(p, lm, "on_after_batch_transfer"),
        "forward": t.get("forward", 0.0),
        "loss": t.get("loss", 0.0),
        "logging": t.get("log_add", 0.0) + t.get("log_flush", 0.0),
        "backward": _profiled(p, "[Strategy]", "backward"),
    }
    # the rest of training_step: the leakage guard, the non-finite note, head weights, and (on a CPU) releasing
    # the network's logits when its locals go (`logits_free_ms` measures that alone)
    step = _profiled(p, "[Strategy]", "training_step")
    parts["step_other"] = max(step - parts["forward"] - parts["loss"] - t.get("log_add", 0.0), 0.0)
    # optimizer_step runs the closure (training_step, zero_grad, backward) inside it: the optimizer's own
    # part (AdamW, zero_grad, gradient clipping hook) is what is left of it
    parts["optimizer"] = max(_profiled(p, lm, "optimizer_step") - step - parts["backward"], 0.0)
    parts["lightning"] = max(window["wall_s"] - sum(parts.values()), 0.0)
    return {k: round(1000 * parts[k] / n, 3) for k in PARTS}


def _alone_ms(fn, repeats: int, sync=None) -> float:
    fn()  # warm-up: allocator, kernels
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def network_alone_ms(net: nn.Module, shape, n_classes: int, device, repeats: int, dtype=None) -> float:
    """One training step of `net` alone: forward, a sum as the loss, backward, AdamW."""
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(shape, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            y = net(x)
        y.float().mean().backward()
        opt.step()

    return _alone_ms(step, repeats, sync)


def _instrument(module, timers: dict, sync=None) -> None:
    """Timers around the module's network forward, loss and logging (attributes of this instance only):
    `log_add` (recording a step's values, inside training_step) and `log_flush` (handing them to Lightning's
    self.log at the steps it writes, in on_train_batch_end)."""
    net_forward = module.net.heads
    module.net.heads = _Timer(timers, "forward", net_forward, sync)
    loss_fwd = module.loss_fn.forward
    module.loss_fn.forward = _Timer(timers, "loss", loss_fwd, sync)
    module.train_log.add = _Timer(timers, "log_add", module.train_log.add)
    module.train_log.flush = _Timer(timers, "log_flush", module.train_log.flush)


def run_epoch(cfg, workdir: Path, steps: int, network: str | None = None, epochs: int = 2, sync=None) -> dict:
    """Train `epochs` epochs of `steps` steps with `cfg`; measure the last. network None: `pointwise_network`."""
    from datamodules.label_policy import CLASSES
    from experiments.build import build_datamodule, build_module, resolve_data_root
    from experiments.stages.train import make_trainer

    cfg.data.samples_per_epoch = steps * cfg.data.batch_size
    cfg.trainer.max_epochs = epochs
    data_root, _ = resolve_data_root(cfg)
    dm = build_datamodule(cfg, data_root, holdout=cfg.data.holdout)
    dm.prepare_data()
    module = build_module(cfg, dm.split.held_out, train_sources=dm.split.train_sources)
    if network is None:
        module.net = pointwise_network(len(CLASSES), cfg.model.spatial_dims)
    timers: dict = defaultdict(float)
    _instrument(module, timers, sync)
    profiler = pl.profilers.SimpleProfiler()
    window = _EpochWindow(profiler, timers, epochs - 1, sync)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        loggers = [pl.loggers.CSVLogger(tmp, name="csv", version="")]
        trainer = make_trainer(cfg, Path(tmp), loggers, [window], has_val=False, profiler=profiler)
        with _quiet():
            trainer.fit(module, datamodule=dm)
    annotated = torch.stack([torch.tensor(c.meta["annotated"], dtype=torch.bool) for c in dm.cached["train"]])
    return {"window": window.result, "module": module, "annotated": annotated}


@contextlib.contextmanager
def _quiet():
    import logging
    import warnings

    lg = logging.getLogger("pytorch_lightning")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(level)


def configure_backends(cfg) -> None:
    from experiments.build import configure_backends as configure

    configure(cfg)


def free_ms(shape, repeats: int) -> float:
    """Median ms to release a float32 tensor of `shape` whose pages were written, measured alone.

    Why it is reported: on a CPU, freeing the step's logits (8 x 8 x 128 x 128 x 32 floats, 134 MB) hands the
    pages back to the OS (glibc's malloc maps blocks that large on their own), ~12 ms a step on this machine's
    2 cores. It falls in `step_other` (when training_step's locals go) and scales with the output, not with
    the loop; a GPU's caching allocator keeps the block instead. Not subtracted: it is a cost a CPU run pays."""
    times = []
    for _ in range(repeats):
        x = torch.empty(shape)
        x.fill_(1.0)
        t = time.perf_counter()
        del x
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def run(workdir: Path, quick: bool = False, overrides: list[str] = (), steps: int | None = None) -> dict:
    """`loop_overhead_ms_per_step` and its breakdown on this machine's CPU (see the module docstring)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = loop_config(workdir, ["trainer.accelerator=cpu", *overrides])
    configure_backends(cfg)
    steps = steps or (QUICK_STEPS if quick else FULL_STEPS)
    out = run_epoch(cfg, workdir, steps)
    w = out["window"]
    parts = breakdown(w)
    step_ms = 1000 * w["wall_s"] / max(w["steps"], 1)
    compute_ms = sum(parts[k] for k in COMPUTE)
    from datamodules.label_policy import CLASSES
    logits_shape = (int(cfg.data.batch_size), len(CLASSES), *(int(p) for p in cfg.data.patch_size))
    return {"loop_overhead_ms_per_step": round(step_ms - compute_ms, 3), "step_ms": round(step_ms, 3),
            "logits_free_ms": round(free_ms(logits_shape, 3 if quick else 9), 3),
            "compute_ms": round(compute_ms, 3), "epoch_start_ms": round(1000 * w["epoch_start_s"], 3), "breakdown": parts, "steps": w["steps"],
            "batch_size": int(cfg.data.batch_size), "patch_size": [int(p) for p in cfg.data.patch_size],
            "num_workers": int(cfg.data.num_workers), "loss": cfg.loss.name, "threads": torch.get_num_threads(),
            "device": "cpu"}


# ------------------------------------------------------------------------------------------------ GPU section

GPU_NETWORKS = ("unet", "dynunet", "segresnet")


class _BusySampler:
    """The GPU's busy share (%) sampled every `period` s in a thread: torch.cuda.utilization (NVML) when it
    answers, else nvidia-smi; an empty list where neither does."""

    def __init__(self, period: float = 0.2):
        self.period, self.samples = period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def sample() -> float | None:
        if not torch.cuda.is_available():
            return None
        try:
            return float(torch.cuda.utilization())
        except Exception:  # no NVML binding (pynvml / amdsmi): ask the driver's tool
            import subprocess
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      f"--id={torch.cuda.current_device()}"], capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip().splitlines()[0])
            except Exception:
                return None

    def _loop(self):
        while not self._stop.is_set():
            v = self.sample()
            if v is None:
                return
            self.samples.append(v)
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        return {"median": statistics.median(self.samples), "mean": statistics.fmean(self.samples),
                "samples": len(self.samples)}


def _network(cfg, name: str):
    from datamodules.label_policy import CLASSES
    from experiments.config import selected_args
    from lightning_modules.networks import build_network

    return build_network(name, 3, 1, len(CLASSES), patch_size=tuple(cfg.data.patch_size),
                         spacing=tuple(cfg.data.target_spacing), **selected_args(cfg, "networks", name))


def run_gpu(workdir: Path, quick: bool = False, overrides: list[str] = (), device: str = "cuda",
            networks: tuple[str, ...] = GPU_NETWORKS, steps: int | None = None) -> dict | None:
    """The GPU section of `make bench`; None where CUDA is absent. At the issue's shape (batch 8, 128x128x32):
    `gpu_step_patches_per_s` (network alone: forward, backward, AdamW on random tensors; fp32 and bf16
    autocast) for unet, dynunet and segresnet; `gpu_loop_patches_per_s`, a real epoch of the default unet
    (the same datamodule, module and trainer as the CPU loop bench, precision bf16-mixed, 8 workers or the
    machine's cores), with the GPU's busy share sampled during it; `gpu_loop_efficiency` = loop / network
    alone at the same precision (target >= 0.9); `gpu_sliding_window_s`: one volume's sliding-window
    inference on the GPU. `device` cpu runs the same code on the CPU (tests check it there)."""
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        return None
    import os

    from datamodules.label_policy import CLASSES

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workers = min(8, os.cpu_count() or 1)
    cfg = loop_config(workdir, [f"trainer.accelerator={'gpu' if cuda else 'cpu'}", "trainer.precision=bf16-mixed",
                                f"data.num_workers={workers}", *overrides])
    configure_backends(cfg)
    b, patch = int(cfg.data.batch_size), tuple(int(p) for p in cfg.data.patch_size)
    shape, n = (b, 1, *patch), len(CLASSES)
    reps = 10 if quick else 30
    step: dict = {}
    for name in networks:
        step[name] = {}
        for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            ms = network_alone_ms(_network(cfg, name), shape, n, device, reps, dtype)
            step[name][prec] = round(1000 * b / ms, 1)
    if cuda:
        torch.cuda.synchronize()
    steps = steps or (30 if quick else 100)
    with _BusySampler() as busy:
        out = run_epoch(cfg, workdir, steps, network=cfg.model.name, sync=None)
    w = out["window"]
    loop = b * w["steps"] / w["wall_s"]
    from benchmarks import bench_sliding

    sw = bench_sliding.run(workdir, quick=True, device=device)
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "gpu_step_patches_per_s": step,
            "gpu_loop_patches_per_s": round(loop, 1), "gpu_epoch_start_s": round(w["epoch_start_s"], 3),
            "gpu_loop_efficiency": round(loop / step[cfg.model.name]["bf16"], 3),
            "gpu_busy_percent": busy.summary(), "gpu_loop_breakdown_ms": breakdown(w),
            "gpu_sliding_window_s": sw["sliding_window_s"], "sliding_volume": sw["volume"],
            "batch_size": b, "patch_size": list(patch), "num_workers": workers, "precision": "bf16-mixed",
            "network": cfg.model.name, "steps": w["steps"]}
