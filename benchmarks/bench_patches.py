"""Benchmark: training-patch throughput and loader memory of our sampler vs MONAI and TorchIO.

Usage::

    python -m benchmarks.bench_patches [--quick] [--workdir DIR] [--out FILE.json] [--repeats N]

What is measured
    How many training samples per second reach the training loop (``next(iter(loader))``), batch size 2,
    half of the samples centred on a lesion voxel, for two sample kinds:

      patches  96^3 voxel patches of the harmonized volume (clamped to the volume where it is smaller;
               ``patch_size`` in the result is the size actually used)
      slices   whole in-plane slices, depth 1: patch (X, Y, 1) of the harmonized volume (2D training)

    each with ``num_workers`` 0 and 2, and the peak memory of the loader (the benchmark process plus all
    its worker processes). The issue's targets (reported, never asserted): ``patches_vs_monai >= 4`` and
    ``patches_vs_torchio >= 15`` (ours / theirs with 2 workers), and loader PSS with 2 workers at most
    1.5x that with 0 workers.

Data (identical for every library)
    One synthetic 512x512x300 int16 CT (``benchmarks.synthetic``; ``--quick``: 512x512x120) at
    0.7x0.7x1.0 mm, harmonized ONCE by our ``CaseCache`` to 1.5 mm isotropic (window -1000..300 HU,
    min-max to [0, 1]; labels 0 background, 1 lung, 3 lesion). K identical-content cases (4; quick 2)
    so that loaders sample across several volumes; every case is its own file copy (own inode, own page
    cache pages), so no loader profits from K names pointing at one file. Each library gets the
    harmonized arrays in the form its documentation recommends:

      ours     ``PatchDataset`` over the K cache entries (memory-mapped ``image.npy``/``label.npy``,
               foreground centres from the precomputed ``fg.npy``), ``torch.utils.data.DataLoader``
               (batch 2, ``persistent_workers`` when workers > 0) -- what ``datamodules`` trains with.
      monai    Best configuration for random crops, per MONAI's docs: the arrays (channel first) IN
               MEMORY in a ``CacheDataset`` whose deterministic transforms are cached once:
               ``FgBgToIndicesd`` on the lesion mask (the docstring of ``RandCropByPosNegLabeld``:
               "a typical usage is to call FgBgToIndicesd transform first and cache the results", i.e.
               cached foreground indices) and ``EnsureTyped`` to tensors; then per sample only
               ``RandCropByPosNegLabeld(pos=1, neg=1, num_samples=1, fg_indices_key, bg_indices_key)``.
               ``copy_cache=False`` (the docs: safe when the random transforms do not modify the cached
               content, "for better performance"; the default True deep-copies the whole cached volume
               for every sample) and ``set_track_meta(False)`` after caching (MONAI's fast-training
               tutorial: plain tensors, no metadata collation). ``monai.data.DataLoader`` (seeds the
               random transforms per worker) with a with-replacement ``RandomSampler``, so that epochs of
               K items do not drain and restart the worker pipeline every K samples.
      torchio  The documented patch pipeline: ``SubjectsDataset`` of ``Subject(image=ScalarImage,
               label=LabelMap)`` read from UNCOMPRESSED ``.nii`` files (TorchIO loads subjects from
               files; uncompressed is its fastest file form), ``Queue(max_length=16,
               samples_per_volume=8, sampler=LabelSampler(size, 'label', {0: 0.5, 3: 0.5}),
               num_workers=w)`` and ``SubjectsLoader(queue, batch_size=2, num_workers=0)`` (the docs:
               "this must be 0"; the queue's own ``num_workers`` load the volumes).

    "Foreground-centred": ours centres 50 % of the samples on a lesion voxel of ``fg.npy``, the rest
    uniformly in the volume; MONAI's ``pos=1, neg=1`` centres half on lesion and half on non-lesion
    voxels; TorchIO's label probabilities do the same (lung voxels, label 1, get probability 0 there).
    ``lesion_fraction`` in each row (share of samples containing a lesion voxel) shows the three really
    sample alike. Caveat for TorchIO slices: ``LabelSampler`` only centres a patch where the whole patch
    fits, which for a full in-plane slice is the single central (x, y) column, so its slices contain
    lesion only where that column meets one (``lesion_fraction`` tells).

How
    * Every (library, kind, workers) runs in its own freshly SPAWNED process, one after the other: no
      import, page, allocator or worker state leaks from one configuration into the next, and the
      memory figures belong to that configuration alone. The libraries are imported there, then a
      baseline memory sample is taken (``baseline_pss_mb``: interpreter plus libraries, no data).
    * Warm-up: the loader is built and a few batches are drawn untimed (worker start-up, TorchIO's
      first queue fills, page faults of memory-mapped files). Then batches are drawn and timed with
      ``time.perf_counter`` until at least ``min_patches`` samples and ``min_s`` seconds have passed
      (or ``max_s``): full 200 samples and 10 s, quick 40 samples and 1 s. Throughput = samples / seconds,
      samples = batch size x batches. Each batch is only checked (lesion present, every voxel read in NumPy:
      `lesion_count`), as a training step would read it. Loader workers use the platform's default start method (fork on Linux), as in
      training, not the benchmark's spawn. The benchmark process runs torch with ONE intra-op thread
      (``TORCH_THREADS``; workers always do): with one per core, a parallel op waits at an OpenMP
      barrier for every core, and on a small shared machine one busy core turns each ``torch.stack``
      into a scheduler tick, which measured the machine, not the loader.
    * Memory: a background thread samples every ~20 ms the PSS of the process and of all its
      descendants (``/proc/<pid>/smaps_rollup``) and keeps the peak of the sum. PSS, not RSS: a page
      shared by n processes counts 1/n in each, so memory-mapped cache files and copy-on-write pages
      that workers share with their parent count once, as they cost once. The RSS sum (shared pages
      counted in every process) is reported too. Reading smaps_rollup is not free (the kernel walks
      every mapping: ~10 ms per process with torch loaded on a small VM), so the sampler runs during
      build and warm-up and during a MEMORY PHASE after the timed one (the same number of batches
      again, at most ``mem_max_s``), and is paused while timing. The peak therefore covers start-up,
      steady state and TorchIO's queue refills; the timings carry no sampling overhead.
    * Rounds: all configurations run once per round, rounds repeated (full 3, quick 2, ``--repeats``),
      and each configuration reports the MEDIAN throughput over rounds (``runs_per_s`` lists them) and
      the highest peak memory. Interleaving spreads the slow phases of a shared machine over all
      libraries instead of one; on the 2-core reference VM single runs of one configuration varied
      by up to ~10x (a DAMON ``pageout`` scheme evicts cold page cache there, CPU is shared), so read
      one-round figures, and ratios between them, with care.
    * A configuration that fails records ``{"error": ...}``; the others still run.

Not measured here: decoding NIfTI and resampling (that is the one-off harmonization, cached on disk;
``bench_harmonize`` measures it), GPU transfer, augmentation.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.synthetic import QUICK_SHAPE, SHAPE, SPACING, write_case
from experiments.tracking import write_json

DEFAULT_OUT = Path("benchmarks/results/patches.json")
PATCH = (96, 96, 96)
BATCH_SIZE = 2
WORKERS = (0, 2)
LIBRARIES = ("ours", "monai", "torchio")
KINDS = ("patches", "slices")
TARGET_SPACING = (1.5, 1.5, 1.5)
FG_FRACTION = 0.5
TORCHIO_QUEUE_LENGTH = 16
TORCHIO_SAMPLES_PER_VOLUME = 8
SAMPLE_INTERVAL_S = 0.02
# Per-mode effort: K cases, interleaved rounds over all configurations (median reported), warm-up batches, timed phase (>= min_patches and >= min_s, at most max_s),
# memory phase (as many batches as timed, at most mem_max_s). The warm-up is longer than the loaders'
# prefetch (2 workers x prefetch_factor 2 batches), so the timed phase does not start on batches that
# were produced while nobody was timing.
SETTINGS = {
    False: {"n_cases": 4, "repeats": 3, "warmup_batches": 8, "min_patches": 200, "min_s": 10.0, "max_s": 60.0,
            "mem_max_s": 10.0},
    True: {"n_cases": 2, "repeats": 2, "warmup_batches": 6, "min_patches": 40, "min_s": 1.0, "max_s": 8.0,
           "mem_max_s": 1.0},
}
# Intra-op threads of the benchmark process (workers use 1 anyway). With torch's default (one per core) every
# parallel op (the collate's torch.stack, TorchIO's map arithmetic) waits at an OpenMP barrier for a thread
# on each core: on a 2-core machine where anything else runs, one torch.stack then costs a whole scheduler
# tick (measured 15 ms instead of 0.8 ms for a 96x96x80 batch). In training the main process's cores belong
# to the model, so a single-threaded loader is also the representative case. Same for every library.
TORCH_THREADS = 1
# Functional check on a small custom volume (run(shape=...)): one short round.
SMALL_CHECK = {"repeats": 1, "warmup_batches": 3, "min_patches": 8, "min_s": 0.0, "mem_max_s": 0.3}
CHILD_TIMEOUT_S = 300.0  # beyond max_s: imports, building the loader, warm-up


# --------------------------------------------------------------------------------------------------
# Memory harness (Linux /proc). PSS, because workers share the memory-mapped cache pages and the
# copy-on-write pages of their parent: RSS would count those once per process.
# --------------------------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/<pid>/task/*/children, else by walking /proc for ppid)."""
    out, todo = [], [pid]
    use_children_file = Path(f"/proc/{pid}/task/{pid}/children").exists()
    parents: dict[int, list[int]] | None = None
    while todo:
        p = todo.pop()
        out.append(p)
        kids: list[int] = []
        if use_children_file:
            try:
                for task in os.listdir(f"/proc/{p}/task"):
                    with open(f"/proc/{p}/task/{task}/children", encoding="utf-8") as f:
                        kids.extend(int(k) for k in f.read().split())
            except OSError:  # the process or thread is gone
                pass
        else:
            if parents is None:
                parents = _ppid_map()
            kids = parents.get(p, [])
        todo.extend(kids)
    return out


def _ppid_map() -> dict[int, list[int]]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # comm may contain spaces: split after its ")"
        parents.setdefault(ppid, []).append(int(name))
    return parents


def pss_rss_kb(pid: int) -> tuple[int, int]:
    """(Pss, Rss) of one process in kB from /proc/<pid>/smaps_rollup; (0, 0) when it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def tree_memory_kb(pid: int) -> tuple[int, int]:
    """(PSS sum, RSS sum) in kB over pid and its descendants."""
    pss = rss = 0
    for p in descendants(pid):
        a, b = pss_rss_kb(p)
        pss += a
        rss += b
    return pss, rss


class PeakMemory(threading.Thread):
    """Samples tree_memory_kb(pid) every `interval` s in the background and keeps the peaks.

    `pause()` / `resume()` bracket the timed phase: reading smaps_rollup makes the kernel walk every
    mapping of the process (about 10 ms for a process with torch loaded on the 2-core reference VM,
    i.e. a good part of a core at 50 Hz with three processes), which would slow the loader under test.
    """

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL_S):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_pss_kb = self.peak_rss_kb = 0
        self.samples = 0
        self.sampling_s = 0.0  # time spent reading /proc: the harness's own cost
        self._stop_event = threading.Event()
        self._active = threading.Event()
        self._active.set()
        self._lock = threading.Lock()

    def sample(self) -> None:
        with self._lock:
            t0 = time.perf_counter()
            pss, rss = tree_memory_kb(self.pid)
            self.sampling_s += time.perf_counter() - t0
            self.samples += 1
            self.peak_pss_kb = max(self.peak_pss_kb, pss)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)

    def run(self) -> None:
        while not self._stop_event.is_set():
            if self._active.is_set():
                self.sample()
            self._stop_event.wait(self.interval)

    def pause(self) -> None:
        with self._lock:  # waits for a sample in progress
            self._active.clear()

    def resume(self) -> None:
        self._active.set()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.sample()  # one last sample: a very short run still gets a peak


# --------------------------------------------------------------------------------------------------
# Loaders. Each builder returns an endless iterator of (image batch, label batch) tensors; it is run
# inside the per-configuration child process, so the heavy imports happen there.
# --------------------------------------------------------------------------------------------------

def _endless(make_loader):
    """Iterate a loader epoch after epoch (TorchIO's queue has a fixed epoch length)."""
    loader = make_loader()
    while True:
        yield from loader


def _build_ours(spec: dict):
    import torch

    from datamodules.cache import CachedCase
    from datamodules.datasets import PatchDataset, patch_loader

    cases = [CachedCase(Path(d), json.loads((Path(d) / "meta.json").read_text(encoding="utf-8")))
             for d in spec["ours_dirs"]]
    ds = PatchDataset(cases, {cases[0].meta["source"]: 0}, spec["size"], length=10**7,
                      fg_fraction=FG_FRACTION, sampling="uniform")
    w = spec["workers"]
    loader = patch_loader(ds, BATCH_SIZE, w)
    torch.manual_seed(0)
    return ((b["image"], b["label"]) for b in _endless(lambda: loader))


def _build_monai(spec: dict):
    import torch
    from monai.data import CacheDataset, DataLoader, set_track_meta
    from monai.transforms import Compose, DeleteItemsd, EnsureTyped, FgBgToIndicesd, RandCropByPosNegLabeld
    from monai.utils import set_determinism

    set_determinism(seed=0)
    data = []
    for img_path, lab_path in spec["npy"]:
        image = np.load(img_path)[None]          # channel first, in memory
        label = np.load(lab_path)[None]
        data.append({"image": image, "label": label, "lesion": (label == spec["lesion"]).astype(np.uint8)})
    # ONE flat Compose: CacheDataset caches the leading non-random transforms of the top-level list, and a
    # nested Compose counts as random (Compose is Randomizable), which would cache nothing at all.
    transform = Compose([
        FgBgToIndicesd(keys="lesion"),           # -> lesion_fg_indices, lesion_bg_indices, cached once
        DeleteItemsd(keys="lesion"),
        EnsureTyped(keys=["image", "label"], data_type="tensor", track_meta=False),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=spec["size"],
                               pos=1, neg=1, num_samples=1, fg_indices_key="lesion_fg_indices",
                               bg_indices_key="lesion_bg_indices"),
    ])
    ds = CacheDataset(data, transform=transform, cache_rate=1.0, num_workers=1, progress=False,
                      copy_cache=False)
    if "lesion_fg_indices" not in ds._cache[0]:  # guard the benchmark's premise: indices are cached
        raise RuntimeError("MONAI CacheDataset did not cache the foreground indices")
    del data
    set_track_meta(False)
    w = spec["workers"]
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**7)
    loader = DataLoader(ds, batch_size=BATCH_SIZE, num_workers=w, sampler=sampler, persistent_workers=w > 0)
    return ((b["image"], b["label"]) for b in _endless(lambda: loader))


def _build_torchio(spec: dict):
    import torch
    import torchio as tio

    torch.manual_seed(0)
    subjects = [tio.Subject(image=tio.ScalarImage(img), label=tio.LabelMap(lab)) for img, lab in spec["nii"]]
    sampler = tio.LabelSampler(spec["size"], label_name="label",
                               label_probabilities={0: FG_FRACTION, spec["lesion"]: 1.0 - FG_FRACTION})
    queue = tio.Queue(tio.SubjectsDataset(subjects), max_length=TORCHIO_QUEUE_LENGTH,
                      samples_per_volume=TORCHIO_SAMPLES_PER_VOLUME, sampler=sampler,
                      num_workers=spec["workers"])
    loader_cls = getattr(tio, "SubjectsLoader", torch.utils.data.DataLoader)
    loader = loader_cls(queue, batch_size=BATCH_SIZE, num_workers=0)  # TorchIO: "this must be 0"
    return ((b["image"][tio.DATA], b["label"][tio.DATA]) for b in _endless(lambda: loader))


BUILDERS = {"ours": _build_ours, "monai": _build_monai, "torchio": _build_torchio}
IMPORTS = {"ours": ("torch", "datamodules.datasets"), "monai": ("torch", "monai.data", "monai.transforms"),
           "torchio": ("torch", "torchio")}


def lesion_count(label, lesion: int) -> int:
    """Samples of a label batch holding a lesion voxel: reads every voxel, as a training step would.
    In NumPy: torch's `(label == c).flatten(1).any(1)` takes ~5 ms for two 96^3 patches on one thread
    (measured), which would make the check, not the loader, the bottleneck of every library alike."""
    import numpy as np

    arr = label.numpy()
    return int(np.any(arr.reshape(arr.shape[0], -1) == lesion, axis=1).sum())


# --------------------------------------------------------------------------------------------------
# One configuration, in a fresh process.
# --------------------------------------------------------------------------------------------------

def measure(spec: dict) -> dict:
    """Build one loader, warm it up, time it; peak memory over build + warm-up + timing."""
    import importlib

    # The spawn context of run_in_fresh_process became this process's default start method; give the
    # loaders the platform default back (fork on Linux up to Python 3.13), as in a normal training run.
    mp.set_start_method(spec["start_method"], force=True)
    for mod in IMPORTS[spec["library"]]:
        importlib.import_module(mod)
    import torch

    torch.set_num_threads(TORCH_THREADS)
    baseline_pss, baseline_rss = tree_memory_kb(os.getpid())
    mem = PeakMemory(os.getpid())
    mem.start()
    lesion = spec["lesion"]
    try:
        # 1. build + warm-up, memory sampled
        t0 = time.perf_counter()
        batches = BUILDERS[spec["library"]](spec)
        first = next(batches)
        build_s = time.perf_counter() - t0
        for _ in range(spec["warmup_batches"] - 1):
            next(batches)
        warmup_s = time.perf_counter() - t0
        # 2. timed phase, memory sampler paused (its /proc reads cost CPU)
        mem.pause()
        n_patches = n_lesion = n_batches = 0
        t0 = time.perf_counter()
        while True:
            image, label = next(batches)
            n_batches += 1
            n_patches += int(image.shape[0])
            n_lesion += lesion_count(label, lesion)
            elapsed = time.perf_counter() - t0
            if (n_patches >= spec["min_patches"] and elapsed >= spec["min_s"]) or elapsed >= spec["max_s"]:
                break
        # 3. memory phase: the same workload again (as many batches, or mem_max_s) with the sampler on,
        #    so the peak covers steady state, queue refills and worker traffic, not just the start-up.
        mem.resume()
        t1 = time.perf_counter()
        mem_batches = 0
        while mem_batches < n_batches and time.perf_counter() - t1 < spec["mem_max_s"]:
            next(batches)
            mem_batches += 1
        mem_s = time.perf_counter() - t1
    finally:
        mem.stop()
    return {
        "patches_per_s": n_patches / elapsed, "patches": n_patches, "batches": n_batches, "seconds": elapsed,
        "build_s": build_s, "warmup_s": warmup_s, "memory_phase_batches": mem_batches, "memory_phase_s": mem_s,
        "batch_shape": list(first[0].shape),
        "image_dtype": str(first[0].dtype), "label_dtype": str(first[1].dtype),
        "lesion_fraction": n_lesion / n_patches,
        "peak_pss_mb": mem.peak_pss_kb / 1024, "peak_rss_mb": mem.peak_rss_kb / 1024,
        "baseline_pss_mb": baseline_pss / 1024, "baseline_rss_mb": baseline_rss / 1024,
        "memory_samples": mem.samples, "memory_sampling_s": mem.sampling_s,
        "start_method": mp.get_start_method(allow_none=True),
        "loadavg_1min_at_start": spec.get("loadavg"),
    }


def _child(conn, spec: dict) -> None:
    try:
        res = measure(spec)
    except BaseException as exc:  # report, never hang the parent
        res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
    conn.send(res)
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Do not wait for lingering loader threads/workers at interpreter exit: the measurement is done.
    os._exit(0)


def run_in_fresh_process(spec: dict, timeout_s: float = CHILD_TIMEOUT_S) -> dict:
    """measure(spec) in a freshly spawned interpreter; {"error": ...} if it fails, dies or hangs."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, spec))
    proc.start()
    send.close()
    try:
        if recv.poll(timeout_s):
            res = recv.recv()
        else:
            res = {"error": f"timed out after {timeout_s:.0f} s"}
    except EOFError:
        res = None
    proc.join(10)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if res is None:
        res = {"error": f"process died (exit code {proc.exitcode})"}
    return res


# --------------------------------------------------------------------------------------------------
# Data: one synthetic case, harmonized once, K file copies per library form.
# --------------------------------------------------------------------------------------------------

def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def prepare_data(workdir: Path, shape, n_cases: int) -> dict:
    from datamodules.cache import CaseCache
    from datamodules.cases import Case
    from datamodules.harmonize import HarmonizerConfig
    from datamodules.label_policy import LESION, LabelPolicy

    t0 = time.perf_counter()
    shape = tuple(int(s) for s in shape)
    ct, seg = write_case(workdir / "synthetic" / "x".join(map(str, shape)), shape=shape, spacing=SPACING)
    policy = LabelPolicy("bench_synthetic", {0: "background", 1: "lesion", 2: "lung_left"},
                         annotated=("lesion", "lung_left"), description="benchmarks.synthetic: 1 lesion, 2 lung")
    cfg = HarmonizerConfig(target_spacing=TARGET_SPACING, window=(-1000.0, 300.0), normalize="minmax")
    case = Case(source="bench", case_id="case0", patient_id="p0", image=ct, label=seg, policy=policy.name)
    entry = CaseCache(workdir / "cache").get(case, policy, cfg)
    key = entry.meta["key"][:16]
    ours_dirs, npy, nii = [], [], []
    copies = workdir / "copies" / key
    for k in range(n_cases):
        # Our cache form: entry k is a full copy of the folder (own files, own page-cache pages).
        d = entry.path if k == 0 else copies / f"case{k}"
        if k > 0 and not (d / "meta.json").exists():
            d.mkdir(parents=True, exist_ok=True)
            for name in ("image.npy", "label.npy", "fg.npy"):
                _atomic_copy(entry.path / name, d / name)
            meta = dict(entry.meta, case=f"case{k}", patient=f"p{k}")
            tmp = d / ".tmp-meta.json"
            tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
            os.replace(tmp, d / "meta.json")
        ours_dirs.append(str(d))
        npy.append((str(d / "image.npy"), str(d / "label.npy")))
        # TorchIO's form: uncompressed NIfTI files on the harmonized grid.
        img_nii, lab_nii = copies / f"case{k}_image.nii", copies / f"case{k}_label.nii"
        if not (img_nii.exists() and lab_nii.exists()):
            _write_nii(entry, img_nii, lab_nii)
        nii.append((str(img_nii), str(lab_nii)))
    # Freshly written files are still being written back to disk; the first loader would compete with
    # that I/O (measured: ~10x slower first configuration). Flush now, outside every measurement.
    if hasattr(os, "sync"):
        os.sync()
    return {"ours_dirs": ours_dirs, "npy": npy, "nii": nii, "lesion": LESION,
            "volume_shape": list(entry.meta["shape"]), "spacing": entry.meta["spacing"],
            "source_shape": list(shape), "prepare_s": time.perf_counter() - t0}


def _write_nii(entry, img_path: Path, lab_path: Path) -> None:
    import nibabel as nib

    img_path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.asarray(entry.meta["affine"], dtype=np.float64)
    for arr, path in ((np.asarray(entry.image(mmap=False), np.float32), img_path),
                      (np.asarray(entry.label(mmap=False), np.uint8), lab_path)):
        nimg = nib.Nifti1Image(arr, affine)
        nimg.set_qform(affine, code=1)
        nimg.set_sform(affine, code=1)
        tmp = path.with_name(f".tmp-{path.name}")
        nib.save(nimg, str(tmp))
        os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# The benchmark.
# --------------------------------------------------------------------------------------------------

def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ratio(a, b):
    return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 else None


def _log(msg: str) -> None:
    print(msg, flush=True)


def summarize(runs: list[dict]) -> dict:
    """One configuration's rounds -> median throughput, highest peaks (memory is the conservative max)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"], "runs": runs}
    rates = [r["patches_per_s"] for r in ok]
    return {
        "patches_per_s": statistics.median(rates), "runs_per_s": rates,
        "peak_pss_mb": max(r["peak_pss_mb"] for r in ok), "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
        "baseline_pss_mb": statistics.median(r["baseline_pss_mb"] for r in ok),
        "lesion_fraction": statistics.median(r["lesion_fraction"] for r in ok),
        "failed_runs": len(runs) - len(ok), "runs": runs,
    }


def run(workdir: Path, quick: bool = False, n_cases: int | None = None, shape=None, repeats: int | None = None,
        log=_log) -> dict:
    """Run every (kind, library, workers) configuration; returns the result dict (see module docstring).

    repeats: rounds over all configurations, interleaved (round 1 runs every configuration, then round
    2 ...), so that slow phases of a shared machine hit every library alike; throughput is the median
    over rounds. Default: SETTINGS for the mode, but 1 when `shape` is given (a functional check on a
    small custom volume, which also gets SMALL_CHECK's short timing).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    settings = dict(SETTINGS[bool(quick)])
    if n_cases is not None:
        settings["n_cases"] = int(n_cases)
    if shape is not None:
        settings.update(SMALL_CHECK)
    if repeats is not None:
        settings["repeats"] = int(repeats)
    src_shape = tuple(shape) if shape is not None else (QUICK_SHAPE if quick else SHAPE)
    data = prepare_data(workdir, src_shape, settings["n_cases"])
    vol = data["volume_shape"]
    patch = [min(p, v) for p, v in zip(PATCH, vol)]
    sizes = {"patches": patch, "slices": [vol[0], vol[1], 1]}
    # The platform's default start method (the first listed), which the loaders get in the children.
    start_method = mp.get_start_method(allow_none=True) or mp.get_all_start_methods()[0]
    log(f"bench_patches: volume {vol} at {TARGET_SPACING} mm (from {list(src_shape)}), {settings['n_cases']} cases, "
        f"patch {patch}{' (clamped to the volume)' if patch != list(PATCH) else ''}, slice {sizes['slices']}, "
        f"batch {BATCH_SIZE}, {settings['repeats']} round(s); data ready in {data['prepare_s']:.1f} s")
    result: dict = {
        "benchmark": "training-sample throughput and loader memory: ours vs MONAI vs TorchIO",
        "quick": bool(quick),
        "patch_size": patch, "patch_size_requested": list(PATCH), "patch_clamped": patch != list(PATCH),
        "slice_size": sizes["slices"], "n_cases": settings["n_cases"], "volume_shape": vol,
        "source_shape": data["source_shape"], "spacing_mm": data["spacing"], "batch_size": BATCH_SIZE,
        "fg_fraction": FG_FRACTION, "repeats": settings["repeats"], "settings": settings,
        "torchio_queue": {"max_length": TORCHIO_QUEUE_LENGTH, "samples_per_volume": TORCHIO_SAMPLES_PER_VOLUME},
        "patches_per_s": {}, "slices_per_s": {}, "peak_pss_mb": {}, "peak_rss_mb": {}, "configs": {},
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "cpus": os.cpu_count(), "loader_start_method": start_method,
                        "torch_threads_main_process": TORCH_THREADS},
        "versions": {"torch": _version("torch"), "monai": _version("monai"), "torchio": _version("torchio"),
                     "numpy": _version("numpy")},
    }
    configs = [(kind, lib, w) for kind in KINDS for lib in LIBRARIES for w in WORKERS]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    for rnd in range(settings["repeats"]):
        for kind, lib, w in configs:
            spec = {"library": lib, "kind": kind, "workers": w, "size": sizes[kind],
                    "lesion": data["lesion"], "ours_dirs": data["ours_dirs"], "npy": data["npy"],
                    "nii": data["nii"], "warmup_batches": settings["warmup_batches"],
                    "min_patches": settings["min_patches"], "min_s": settings["min_s"],
                    "max_s": settings["max_s"], "mem_max_s": settings["mem_max_s"],
                    "start_method": start_method, "loadavg": os.getloadavg()[0]}
            t0 = time.perf_counter()
            res = run_in_fresh_process(spec, CHILD_TIMEOUT_S + settings["max_s"])
            res["wall_s"] = time.perf_counter() - t0
            runs[(kind, lib, w)].append(res)
            head = f"  [{rnd + 1}/{settings['repeats']}] {kind:<7} {lib:<7} workers {w}:"
            if "error" in res:
                log(f"{head} ERROR {res['error']}")
                continue
            log(f"{head} {res['patches_per_s']:8.1f} /s  ({res['patches']} in {res['seconds']:.1f} s; peak PSS "
                f"{res['peak_pss_mb']:.0f} MB, RSS {res['peak_rss_mb']:.0f} MB; lesion {res['lesion_fraction']:.0%}; "
                f"process {res['wall_s']:.1f} s)")
    for (kind, lib, w), rs in runs.items():
        summary = summarize(rs)
        result["configs"].setdefault(kind, {}).setdefault(lib, {})[str(w)] = summary
        for key, field in ((f"{kind}_per_s", "patches_per_s"), ("peak_pss_mb", "peak_pss_mb"),
                           ("peak_rss_mb", "peak_rss_mb")):
            value = {"error": summary["error"]} if "error" in summary else summary[field]
            target = result[key] if key.endswith("_per_s") else result[key].setdefault(kind, {})
            target.setdefault(lib, {})[str(w)] = value

    def rate(kind, lib, w=2):
        return result[f"{kind}_per_s"].get(lib, {}).get(str(w))

    def pss(kind, lib, w):
        return result["peak_pss_mb"].get(kind, {}).get(lib, {}).get(str(w))

    def above_baseline(kind, lib, w):
        c = result["configs"].get(kind, {}).get(lib, {}).get(str(w), {})
        return c["peak_pss_mb"] - c["baseline_pss_mb"] if "peak_pss_mb" in c else None

    result["ratios"] = {
        "patches_vs_monai": _ratio(rate("patches", "ours"), rate("patches", "monai")),
        "patches_vs_torchio": _ratio(rate("patches", "ours"), rate("patches", "torchio")),
        "slices_vs_monai": _ratio(rate("slices", "ours"), rate("slices", "monai")),
        "slices_vs_torchio": _ratio(rate("slices", "ours"), rate("slices", "torchio")),
        "loader_pss_2_vs_0": _ratio(pss("patches", "ours", 2), pss("patches", "ours", 0)),
        # The same without the interpreter + libraries baseline, i.e. only what the loader adds.
        "loader_pss_above_baseline_2_vs_0": _ratio(above_baseline("patches", "ours", 2),
                                                   above_baseline("patches", "ours", 0)),
        "patches_vs_monai_0_workers": _ratio(rate("patches", "ours", 0), rate("patches", "monai", 0)),
        "patches_vs_torchio_0_workers": _ratio(rate("patches", "ours", 0), rate("patches", "torchio", 0)),
    }
    result["targets"] = {"patches_vs_monai": ">= 4", "patches_vs_torchio": ">= 15", "loader_pss_2_vs_0": "<= 1.5"}
    return result


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def _fmt(v, spec: str = "8.1f") -> str:
    if isinstance(v, (int, float)):
        return format(v, spec)
    return format("error" if isinstance(v, dict) else "-", ">" + spec.split(".")[0])


def _range(config: dict | None) -> str:
    rates = (config or {}).get("runs_per_s") or []
    return f"{min(rates):.0f}-{max(rates):.0f}" if len(rates) > 1 else ""


def format_table(result: dict) -> str:
    lines = [f"volume {result['volume_shape']} ({result['n_cases']} cases), batch {result['batch_size']}, "
             f"patch {result['patch_size']}, slice {result['slice_size']}; samples/s = median of "
             f"{result.get('repeats', 1)} round(s) (range over rounds), memory = highest peak, MB",
             f"{'kind':<8}{'library':<9}{'/s w=0':>9}{'(range)':>11}{'/s w=2':>9}{'(range)':>11}"
             f"{'PSS w=0':>9}{'PSS w=2':>9}{'RSS w=0':>9}{'RSS w=2':>9}"]
    for kind in KINDS:
        for lib in LIBRARIES:
            r = result[f"{kind}_per_s"].get(lib, {})
            p = result["peak_pss_mb"].get(kind, {}).get(lib, {})
            q = result["peak_rss_mb"].get(kind, {}).get(lib, {})
            c = result["configs"].get(kind, {}).get(lib, {})
            lines.append(f"{kind:<8}{lib:<9}{_fmt(r.get('0'), '9.1f')}{_range(c.get('0')):>11}"
                         f"{_fmt(r.get('2'), '9.1f')}{_range(c.get('2')):>11}"
                         f"{_fmt(p.get('0'), '9.0f')}{_fmt(p.get('2'), '9.0f')}"
                         f"{_fmt(q.get('0'), '9.0f')}{_fmt(q.get('2'), '9.0f')}")
    targets = result.get("targets", {})
    for name, v in result["ratios"].items():
        t = f"   (issue target {targets[name]})" if name in targets else ""
        lines.append(f"{name:<36}{_fmt(v, '7.2f')}{t}")
    for k, libs in result["configs"].items():
        for lib, ws in libs.items():
            for w, c in ws.items():
                if "error" in c:
                    lines.append(f"ERROR {k} {lib} workers {w}: {c['error']}")
                elif c.get("failed_runs"):
                    errs = {r["error"] for r in c["runs"] if "error" in r}
                    lines.append(f"{c['failed_runs']} failed round(s) {k} {lib} workers {w}: {'; '.join(errs)}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="512x512x120 source (patch depth clamps to 80), 2 cases, 2 rounds of >= 40 samples / 1 s")
    ap.add_argument("--repeats", type=int, default=None, help="rounds over all configurations (default: full 3, quick 2)")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the synthetic case, cache and copies go (reused; default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"result JSON (default {DEFAULT_OUT})")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="bench_patches_") as tmp:
            result = run(Path(tmp), quick=args.quick, repeats=args.repeats)
    else:
        result = run(args.workdir, quick=args.quick, repeats=args.repeats)
    result["total_s"] = time.perf_counter() - t0
    write_json(args.out, result)
    print()
    print(format_table(result))
    print(f"total {result['total_s']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
