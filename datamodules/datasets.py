"""Torch datasets over cached cases: random 3D patches for training, whole volumes for evaluation.

Patches are cut from memory-mapped arrays, so a patch reads only its own bytes (never a whole volume),
and loader workers share the page cache instead of holding copies.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.cache import CachedCase
from datamodules.label_policy import OPACITY


def crop_with_pad(arr: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """arr[start:start+size] with out-of-volume parts filled by pad_value (volumes smaller than a patch)."""
    if all(s >= 0 and s + n <= dim for s, n, dim in zip(start, size, arr.shape)):
        # inside the volume: one copy straight from the (memory-mapped) array, no fill pass
        return np.array(arr[tuple(slice(s, s + n) for s, n in zip(start, size))])
    out = np.full(tuple(size), pad_value, dtype=arr.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, arr.shape):
        a, b = max(s, 0), min(s + n, dim)
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = arr[tuple(src)]
    return out


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
                 length: int, fg_fraction: float = 0.5, sampling: str = "uniform", pad_value: float = 0.0):
        if not cases:
            raise ValueError("PatchDataset needs at least one training case")
        if sampling not in ("uniform", "source_balanced"):
            raise ValueError(f"data.sampling must be uniform or source_balanced, got {sampling!r}")
        self.cases = list(cases)
        self.source_ids = source_ids
        self.patch_size = tuple(int(p) for p in patch_size)
        self.length = int(length)
        self.fg_fraction = float(fg_fraction)
        self.sampling = sampling
        self.pad_value = pad_value
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
        return {**self.__dict__, "_maps": {}}

    def _pick_case(self, rng: np.random.Generator) -> int:
        if self.sampling == "source_balanced":
            group = self._by_source[rng.integers(len(self._by_source))]
            return group[rng.integers(len(group))]
        return int(rng.integers(len(self.cases)))

    def __getitem__(self, index: int) -> dict:
        # torch's generator is seeded per worker by Lightning's seed_everything(workers=True). Under DDP
        # every rank has the same seed; the index (DistributedSampler gives each rank its own) makes the
        # ranks draw different patches, so N ranks see N times the patches, not N copies of one.
        rng = np.random.default_rng([int(torch.randint(0, 2**62, (1,)).item()), int(index)])
        ci = self._pick_case(rng)
        case, lesion = self.cases[ci], self._lesion[ci]  # lesion: typed (GGO, consolidation) or untyped opacity
        if ci not in self._maps:
            self._maps[ci] = (case.image(), case.label())
        image, label = self._maps[ci]
        if len(lesion) and rng.random() < self.fg_fraction:
            center = lesion[rng.integers(len(lesion)), 1:]
        else:
            center = [rng.integers(d) for d in image.shape]
        start = patch_start(center, self.patch_size, image.shape)
        img = crop_with_pad(image, start, self.patch_size, self.pad_value)
        lab = crop_with_pad(label, start, self.patch_size, 0)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(img))[None],
            # uint8, not int64: 8x less to copy and to send from loader workers; the module widens it
            "label": torch.from_numpy(lab)[None],
            "annotated": torch.tensor(case.meta["annotated"], dtype=torch.bool),
            "source_id": self.source_ids[case.meta["source"]],
            "source": case.meta["source"],
            "case": case.meta["case"],
            "meta_path": str(case.path),  # the cache entry: evaluation in original geometry reads its meta
        }


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
