"""Atomic on-disk cache of harmonized cases.

One folder per case and key: `image.npy` (float32), `label.npy` (uint8, labelled cases only),
`fg.npy` (int32 rows `class, x, y, z`: a seeded subsample of foreground voxels for patch sampling)
and `meta.json`. Arrays are plain `.npy`, so loaders memory-map them and read only the patch they
need. The key hashes the input files (resolved path, size, mtime) with everything that changes the
output (harmonizer and alignment config, decoding, declared image flips, label policy, CACHE_VERSION),
so a changed config or a replaced file never reuses stale arrays. A folder is written under a
temporary name and renamed into place: a crash leaves no half-written entry.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.cases import Case
from datamodules.harmonize import HarmonizerConfig, harmonize_case
from datamodules.label_policy import BACKGROUND, IGNORE, LabelPolicy

CACHE_VERSION = 7  # 2: fg subsample seeded by case identity; 3: meta records the 8-bit window; 4/5: 6/8 classes;
# 6: resampled from the stored array (an axis whose size does not change keeps its spacing); 7: image-only
# flips decided by the measured alignment (meta `alignment`), ablation switches in the harmonizer config
FG_SAMPLES_PER_CLASS = 4096


def file_fingerprint(path: Path) -> list:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def cache_key(case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig) -> str:
    payload = {
        "version": CACHE_VERSION,
        "image": file_fingerprint(case.image),
        "label": file_fingerprint(case.label) if case.label else None,
        "encoding": case.encoding, "window": case.window, "image_flips": list(case.image_flips),
        "policy": [policy.name, sorted(policy.code_map.items()), list(policy.annotated)] if policy else None,
        "harmonizer": cfg.as_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class CachedCase:
    """A cache entry; arrays are opened memory-mapped on demand."""

    path: Path
    meta: dict[str, Any]

    def image(self, mmap: bool = True) -> np.ndarray:
        return np.load(self.path / "image.npy", mmap_mode="r" if mmap else None)

    def label(self, mmap: bool = True) -> np.ndarray | None:
        p = self.path / "label.npy"
        return np.load(p, mmap_mode="r" if mmap else None) if p.exists() else None

    def foreground(self) -> np.ndarray:
        return np.load(self.path / "fg.npy")

    @property
    def key(self) -> str:
        return f"{self.meta['source']}/{self.meta['case']}"


def class_counts(cases: list[CachedCase], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per case: voxel count of each class (IGNORE left out) [N, C] and which classes its source annotates
    [N, C]: what frequency-weighted losses (seed 004, seed 000) turn into training-set class frequencies."""
    counts = np.zeros((len(cases), n_classes), np.int64)
    annotated = np.zeros((len(cases), n_classes), bool)
    for i, c in enumerate(cases):
        label = c.label()
        if label is None:
            continue
        hist = np.bincount(np.asarray(label).reshape(-1), minlength=256)
        counts[i] = hist[:n_classes]
        flags = list(c.meta["annotated"])[:n_classes]
        annotated[i, : len(flags)] = flags
    return counts, annotated


def sample_foreground(label: np.ndarray, seed: int, per_class: int = FG_SAMPLES_PER_CLASS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = []
    for cls in np.unique(label):
        if cls in (BACKGROUND, IGNORE):
            continue
        coords = np.argwhere(label == cls)
        if len(coords) > per_class:
            coords = coords[rng.choice(len(coords), per_class, replace=False)]
        rows.append(np.concatenate([np.full((len(coords), 1), cls), coords], axis=1))
    return np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)


def _build_or_error(cache: CaseCache, case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig):
    """Build one entry; a per-case error comes back as the exception (the caller re-raises or records it)."""
    try:
        return cache.build(case, policy, cfg)
    except Exception as exc:
        return exc


def _build_in_worker(root: str, case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig):
    """Pool worker: one case per core, so torch's intra-op threads would only oversubscribe."""
    import torch

    torch.set_num_threads(1)
    result = _build_or_error(CaseCache(root), case, policy, cfg)
    return result if isinstance(result, Exception) else (result.path, result.meta)


class CaseCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def lookup(self, case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig) -> CachedCase | None:
        """The finished entry, or None (nothing is built)."""
        final = self.entry_dir(case, cache_key(case, policy, cfg))
        meta_path = final / "meta.json"
        return CachedCase(final, json.loads(meta_path.read_text())) if meta_path.exists() else None

    def get_many(self, items: list[tuple[Case, LabelPolicy | None]], cfg: HarmonizerConfig, workers: int = 1,
                 progress: bool = True) -> list[CachedCase | Exception]:
        """Entries of many cases, in order; missing ones built by `workers` processes (spawned: torch is
        not fork-safe) with a progress bar. A case that fails yields its exception in its place."""
        out: list[CachedCase | Exception | None] = [self.lookup(c, p, cfg) for c, p in items]
        todo = [i for i, e in enumerate(out) if e is None]
        self.hits += len(items) - len(todo)
        self.misses += len(todo)
        if not todo:
            return out
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="harmonizing", unit="case", disable=not progress, mininterval=2.0)
        if workers <= 1 or len(todo) == 1:
            for i in todo:
                out[i] = _build_or_error(self, items[i][0], items[i][1], cfg)
                bar.update()
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(min(workers, len(todo)), mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_build_in_worker, str(self.root), items[i][0], items[i][1], cfg): i
                           for i in todo}
                for fut in as_completed(futures):
                    result = fut.result()
                    out[futures[fut]] = result if isinstance(result, Exception) else CachedCase(*result)
                    bar.update()
        bar.close()
        return out

    def entry_dir(self, case: Case, key: str) -> Path:
        return self.root / case.source / f"{case.case_id}-{key[:16]}"

    def get(self, case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig) -> CachedCase:
        found = self.lookup(case, policy, cfg)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        return self.build(case, policy, cfg)

    def build(self, case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig) -> CachedCase:
        """Harmonize the case and write its entry atomically (no lookup, no counting)."""
        key = cache_key(case, policy, cfg)
        final = self.entry_dir(case, key)
        meta_path = final / "meta.json"
        result = harmonize_case(case, policy, cfg)
        meta = dict(result.meta, key=key, image_file=str(case.image), label_file=str(case.label) if case.label else None)
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            np.save(tmp / "image.npy", result.image)
            if result.label is not None:
                np.save(tmp / "label.npy", result.label)
                # Seeded by case identity, not by the key: the key hashes paths and mtimes, and where a
                # dataset is stored must not change which patches a run trains on.
                fg = sample_foreground(result.label, seed=zlib.crc32(case.key.encode()))
                counts = np.bincount(result.label.ravel(), minlength=IGNORE + 1)
                meta["voxels"] = {c: int(n) for c, n in zip(meta["classes"], counts)}
                meta["voxels"]["ignore"] = int(counts[IGNORE])
            else:
                fg = np.zeros((0, 4), np.int32)
            np.save(tmp / "fg.npy", fg)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                os.rename(tmp, final)
            except OSError:
                if not meta_path.exists():  # not a concurrent writer's finished entry: a real failure
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return CachedCase(final, meta)
