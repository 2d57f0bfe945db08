"""Torch datasets over cached cases: random 3D patches for training, whole volumes for evaluation.

Patches are cut from memory-mapped arrays, so a patch reads only its own bytes (never a whole volume),
and loader workers share the page cache instead of holding copies.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from math import prod

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate, get_worker_info

from datamodules.augment import Augmenter
from datamodules.cache import CachedCase
from datamodules.choices import SAMPLING
from datamodules.label_policy import OPACITY


def crop_with_pad(arr: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """arr[start:start+size] with out-of-volume parts filled by pad_value (volumes smaller than a patch)."""
    out = np.empty(tuple(size), dtype=arr.dtype)
    crop_into(out, arr, start, pad_value)
    return out


def crop_into(out: np.ndarray, arr: np.ndarray, start: Sequence[int], pad_value: float) -> None:
    """Write arr[start:start+out.shape] into `out` (a batch slot), out-of-volume parts set to pad_value:
    the one copy a patch costs, from the memory map straight into the buffer the training step reads."""
    size = out.shape
    if all(s >= 0 and s + n <= dim for s, n, dim in zip(start, size, arr.shape)):
        np.copyto(out, arr[tuple(slice(s, s + n) for s, n in zip(start, size))])
        return
    out.fill(pad_value)
    src, dst = [], []
    for s, n, dim in zip(start, size, arr.shape):
        a, b = max(s, 0), min(s + n, dim)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = arr[tuple(src)]


def shared_empty(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized tensor; in a loader worker its storage is shared memory from the start, so
    handing the batch to the training process moves no bytes (torch would otherwise copy a private
    tensor into shared memory when sending it). The same allocation torch's `default_collate` makes
    for its stacked output."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(prod(shape), device="cpu")
    return proto.new(storage).resize_(*shape)


class PatchBatch(dict):
    """A batch `PatchDataset.__getitems__` already assembled (`collate_patches` passes it through)."""


def collate_patches(batch):
    """DataLoader `collate_fn` for `PatchDataset`: a `PatchBatch` is final, per-sample dicts are stacked."""
    return dict(batch) if isinstance(batch, PatchBatch) else default_collate(batch)


def patch_start(center: Sequence[int], size: Sequence[int], shape: Sequence[int]) -> list[int]:
    """Start corner of a patch around `center`, shifted inside the volume where the volume allows."""
    start = []
    for c, n, dim in zip(center, size, shape):
        s = int(c) - n // 2
        s = min(max(s, 0), max(dim - n, 0)) if dim >= n else (dim - n) // 2
        start.append(s)
    return start


class PatchDataset(Dataset):
    """`length` random patches per epoch; with probability `fg_fraction` centred on a lesion voxel.

    sampling: `uniform` picks a case uniformly; `source_balanced` picks a source first (DG sources
    differ in size by 10x in the real data).
    """

    def __init__(self, cases: Sequence[CachedCase], source_ids: dict[str, int], patch_size: Sequence[int],
                 length: int, fg_fraction: float = 0.5, sampling: str = "uniform", pad_value: float = 0.0,
                 augment: Augmenter | None = None, loader_buffers: int = 5):
        if not cases:
            raise ValueError("PatchDataset needs at least one training case")
        if sampling not in SAMPLING:
            raise ValueError(f"data.sampling must be one of {list(SAMPLING)}, got {sampling!r}")
        self.cases = list(cases)
        self.source_ids = source_ids
        self.patch_size = tuple(int(p) for p in patch_size)
        self.length = int(length)
        self.fg_fraction = float(fg_fraction)
        self.sampling = sampling
        self.pad_value = pad_value
        self.augment = augment if augment else None  # augment.where: loader -- applied after the crop
        # Batches a loader worker cycles through (see `_batch_buffers`); 0: fresh shared memory per batch
        self.loader_buffers = int(loader_buffers)
        self._pools: dict[int, list[dict[str, torch.Tensor]]] = {}
        self._pool_next: dict[int, int] = {}
        self._fg = [c.foreground() for c in self.cases]
        # lesion rows of each foreground sample, computed once instead of per patch
        self._lesion = [fg[np.isin(fg[:, 0], OPACITY)] for fg in self._fg]
        # memory maps opened lazily, once per process (each loader worker opens its own: the pages are
        # shared through the page cache, and no array is pickled to the workers)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        by_source: dict[str, list[int]] = {}
        for i, c in enumerate(self.cases):
            by_source.setdefault(c.meta["source"], []).append(i)
        self._by_source = list(by_source.values())

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        # a pickled memmap would carry its whole array to a spawned worker: send paths, reopen there
        return {**self.__dict__, "_maps": {}, "_pools": {}, "_pool_next": {}}

    def _pick_case(self, rng: np.random.Generator) -> int:
        if self.sampling == "source_balanced":
            group = self._by_source[rng.integers(len(self._by_source))]
            return group[rng.integers(len(group))]
        return int(rng.integers(len(self.cases)))

    @staticmethod
    def _rng(index, stream: int = 0) -> np.random.Generator:
        """The generator of sample `index`: an `EpochSampler` index `(seed, epoch, i)` alone decides it (what
        a training run draws); a plain integer index is combined with a draw from torch's generator, which
        Lightning's seed_everything(workers=True) seeds per worker. `stream` 1: the sample's augmentation."""
        if isinstance(index, tuple):
            return np.random.default_rng([*(int(x) for x in index), stream])
        return np.random.default_rng([int(torch.randint(0, 2**62, (1,)).item()), int(index)])

    def _draw(self, index) -> tuple[int, list[int]]:
        """(case index, patch start) of sample `index`.

        Under DDP every rank has the same seed; the index (DistributedSampler gives each rank its own) makes the
        ranks draw different patches, so N ranks see N times the patches, not N copies of one."""
        rng = self._rng(index)
        ci = self._pick_case(rng)
        lesion = self._lesion[ci]  # typed (GGO, consolidation) or untyped opacity voxels
        shape = self._arrays(ci)[0].shape
        if len(lesion) and rng.random() < self.fg_fraction:
            center = lesion[rng.integers(len(lesion)), 1:]
        else:
            center = [rng.integers(d) for d in shape]
        return ci, patch_start(center, self.patch_size, shape)

    def _arrays(self, ci: int) -> tuple[np.ndarray, np.ndarray]:
        if ci not in self._maps:
            self._maps[ci] = (self.cases[ci].image(), self.cases[ci].label())
        return self._maps[ci]

    def _info(self, ci: int) -> tuple:
        meta = self.cases[ci].meta
        return meta["annotated"], self.source_ids[meta["source"]], meta["source"], meta["case"], str(self.cases[ci].path)

    def __getitem__(self, index) -> dict:
        ci, start = self._draw(index)
        image, label = self._arrays(ci)
        annotated, source_id, source, case, path = self._info(ci)
        img = torch.from_numpy(crop_with_pad(image, start, self.patch_size, self.pad_value))[None]
        # uint8, not int64: 8x less to copy and to send from loader workers; the module widens it
        lab = torch.from_numpy(crop_with_pad(label, start, self.patch_size, 0))[None]
        if self.augment:
            img, lab = self._augmented(img[None], lab[None], index)
            img, lab = img[0], lab[0]
        return {
            "image": img,
            "label": lab,
            "annotated": torch.tensor(annotated, dtype=torch.bool),
            "source_id": source_id,
            "source": source,
            "case": case,
            "meta_path": path,  # the cache entry: evaluation in original geometry reads its meta
        }

    def _augmented(self, image: torch.Tensor, label: torch.Tensor, index) -> tuple[torch.Tensor, torch.Tensor]:
        # a generator of its own: the same patches get the same augmentation in a rerun (or a resumed run),
        # whatever else draws from the global generator. Seeded by the sample index (EpochSampler) or from
        # the worker-seeded torch stream.
        seed = int(self._rng(index, 1).integers(2**62)) if isinstance(index, tuple) else \
            int(torch.randint(0, 2**62, (1,)).item())
        gen = torch.Generator().manual_seed(seed)
        return self.augment(image, label, gen)

    def __getitems__(self, indices: Sequence[int]) -> PatchBatch:
        """A whole batch, the same samples as `[self[i] for i in indices]` collated, but every patch is
        cropped straight into the batch tensor (in shared memory inside a loader worker): one copy per
        patch instead of crop + stack + a copy into shared memory."""
        draws = [self._draw(i) for i in indices]
        n = len(draws)
        buf = self._batch_buffers(n)
        image, label = buf["image"], buf["label"]
        image_np, label_np = image.numpy(), label.numpy()
        infos = []
        for b, (ci, start) in enumerate(draws):
            img, lab = self._arrays(ci)
            crop_into(image_np[b, 0], img, start, self.pad_value)
            crop_into(label_np[b, 0], lab, start, 0)
            infos.append(self._info(ci))
        buf["annotated"].copy_(torch.tensor([i[0] for i in infos], dtype=torch.bool))
        buf["source_id"].copy_(torch.tensor([i[1] for i in infos], dtype=torch.int64))
        if self.augment:  # back into the same buffers: what is sent stays in shared memory
            aug_image, aug_label = self._augmented(image, label, indices[0])
            image.copy_(aug_image)
            label.copy_(aug_label)
        return PatchBatch(buf, source=[i[2] for i in infos], case=[i[3] for i in infos],
                          meta_path=[i[4] for i in infos])

    def _batch_buffers(self, n: int) -> dict[str, torch.Tensor]:
        """The tensors batch n's samples are written into.

        In a loader worker, creating a fresh shared-memory segment per batch (what `default_collate`
        does) costs more than cropping it: ~5 ms to create and ~5 ms of page faults to first fill a
        7 MB segment, against <1 ms to crop two 96^3 patches into memory already mapped. So each worker
        cycles through `loader_buffers` segments made once; the training process maps each once too
        (torch caches a received storage by its shared-memory file while it is alive). A batch is
        therefore rewritten `loader_buffers` batches of that worker later. With one worker (the worst
        case) the batches alive are: the tasks outstanding (prefetch_factor, 2), Lightning's one-batch
        look-ahead and the step in progress -- 4; `patch_loader` sets prefetch_factor + 3, one spare (a
        test holds three batches while drawing more and checks their content; it fails with one buffer
        less). Code that keeps batches longer must clone them. Outside a worker (no workers), every
        batch is fresh memory.
        """
        shapes = {"image": ((n, 1, *self.patch_size), torch.float32), "label": ((n, 1, *self.patch_size), torch.uint8),
                  "annotated": ((n, len(self.cases[0].meta["annotated"])), torch.bool),
                  "source_id": ((n,), torch.int64)}
        if get_worker_info() is None or self.loader_buffers <= 0:
            return {k: shared_empty(shape, dtype) for k, (shape, dtype) in shapes.items()}
        if torch.multiprocessing.get_sharing_strategy() != "file_system":
            # In this worker process only (the sender decides how a tensor travels; the training process
            # rebuilds whatever arrives): torch's default passes every tensor's file descriptor through a
            # socket round trip per batch, which measured slower than the crop itself; by file name, the
            # training process finds a buffer it already maps in torch's storage cache.
            torch.multiprocessing.set_sharing_strategy("file_system")
        pool = self._pools.setdefault(n, [])
        count = self._pool_next.get(n, 0)
        slot = count % self.loader_buffers  # this worker's batch j (of this size) goes to slot j mod K
        self._pool_next[n] = count + 1
        if slot == len(pool):
            pool.append({k: shared_empty(shape, dtype) for k, (shape, dtype) in shapes.items()})
        return pool[slot]


class PatchLoader(DataLoader):
    """A DataLoader that keeps the training process's mappings of the workers' batch buffers alive.

    torch caches a received shared-memory storage by name only while some tensor still uses it; once
    the training step drops a batch, the next batch in the same buffer is opened and mapped again, and
    its pages faulted in again (measured: ~25 % of the throughput with 2 workers). Holding the last
    `num_workers x loader_buffers` batches' tensors costs no memory (the pages exist in the worker
    anyway) and turns every later receive into a cache hit. The held tensors are never read: their
    buffers are rewritten by the workers as usual. They are held across epochs too: persistent workers keep
    their buffers, and a hold that ended with the epoch had the first `num_workers x loader_buffers` batches
    of every epoch mapped again (~0.5 ms more per step there, measured in the loop bench).
    """

    def __iter__(self):
        if self.num_workers == 0 or not isinstance(self.dataset, PatchDataset):
            yield from super().__iter__()
            return
        maxlen = self.num_workers * max(self.dataset.loader_buffers, 1)
        held = getattr(self, "_held", None)
        if held is None or held.maxlen != maxlen:
            held = self._held = deque(maxlen=maxlen)
        for batch in super().__iter__():
            held.append(tuple(v for v in batch.values() if isinstance(v, torch.Tensor)))
            yield batch


class EpochSampler(Sampler):
    """Training sample indices `(seed, epoch, i)`, i < length: patch i of epoch e is a function of the run's
    seed, e and i alone. Not of the loader workers' random streams, which persistent workers carry from epoch
    to epoch and a resumed run starts afresh: with this sampler a run resumed after epoch k draws the
    patches the uninterrupted run drew, with any number of workers. Lightning calls `set_epoch` before
    every epoch (through DistributedSamplerWrapper under DDP, which deals each rank its own `i`s); the
    first iterator of a fit is built before that call, so the datamodule passes the epoch it serves."""

    def __init__(self, length: int, seed: int, epoch: int = 0):
        self.length, self.seed, self.epoch = int(length), int(seed), int(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        return iter([(self.seed, self.epoch, i) for i in range(self.length)])

    def __len__(self) -> int:
        return self.length


def patch_loader(dataset: PatchDataset, batch_size: int, num_workers: int = 0, **kwargs) -> DataLoader:
    """The training loader over a `PatchDataset` (the datamodule and `make bench` use this one): batches
    assembled by `__getitems__` in per-worker buffers (`_batch_buffers`), workers kept between epochs."""
    if num_workers > 0:
        # the outstanding tasks + Lightning's look-ahead + the step in progress + one spare
        dataset.loader_buffers = int(kwargs.get("prefetch_factor") or 2) + 3
    return PatchLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                       persistent_workers=num_workers > 0, collate_fn=collate_patches, **kwargs)


class VolumeDataset(Dataset):
    """Whole harmonized volumes (batch size 1) for sliding-window validation and test."""

    def __init__(self, cases: Sequence[CachedCase], source_ids: dict[str, int]):
        self.cases = list(cases)
        self.source_ids = source_ids

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        return {
            "image": torch.from_numpy(np.array(case.image()))[None],
            "label": torch.from_numpy(np.array(case.label()).astype(np.int64))[None],
            "annotated": torch.tensor(case.meta["annotated"], dtype=torch.bool),
            "spacing": torch.tensor(case.meta["spacing"], dtype=torch.float64),
            "source_id": self.source_ids[case.meta["source"]],
            "source": case.meta["source"],
            "case": case.meta["case"],
            "meta_path": str(case.path),  # the cache entry: evaluation in original geometry reads its meta
        }
