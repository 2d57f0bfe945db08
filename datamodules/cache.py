"""Atomic on-disk cache of harmonized cases.

One folder per case and key: `image.npy` (float32), `label.npy` (uint8, labelled cases only),
`fg.npy` (int32 rows `class, x, y, z`: a seeded subsample of foreground voxels for patch sampling)
and `meta.json`. Arrays are plain `.npy`, so loaders memory-map them and read only the patch they
need. The key hashes the input files (resolved path, size, mtime) with everything that changes the
output (harmonizer and alignment config, decoding, declared image flips, label policy, CACHE_VERSION),
so a changed config or a replaced file never reuses stale arrays. A folder is written under a
temporary name and renamed into place: a crash leaves no half-written entry.

What a disk can still do to a finished entry is caught at lookup (`entry_problem`): a missing or
unreadable meta.json, an array whose .npy header or file size disagrees with the shape and dtype
meta.json records, and (entries built since checksums exist) an array whose CRC-32 differs from the
one recorded at build time; older entries without checksums have their label's voxel counts compared
with meta["voxels"] instead. A damaged entry is reported, naming the file, and rebuilt. A build holds
the entry's folder lock (`datamodules.locking`): a second process asking for the same entry waits and
then reuses it, and `.tmp-*` folders whose entry nobody is building (a killed build) are removed.
"""
from __future__ import annotations

import hashlib
import json
import math
import mmap
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
from datamodules.locking import folder_lock, remove_stale_tmp

try:  # ISA-L's CRC-32 is the same function as zlib's, several times faster (about 25 GB/s against 4)
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a declared dependency
    _crc32 = zlib.crc32

CACHE_VERSION = 7  # 2: fg subsample seeded by case identity; 3: meta records the 8-bit window; 4/5: 6/8 classes;
# 6: resampled from the stored array (an axis whose size does not change keeps its spacing); 7: image-only
# flips decided by the measured alignment (meta `alignment`), ablation switches in the harmonizer config
FG_SAMPLES_PER_CLASS = 4096
ARRAYS = ("image.npy", "label.npy", "fg.npy")
# How often a build waiting for another process's build of the same entry looks again (seconds).
WAIT_POLL_S = 0.2


class CacheError(RuntimeError):
    """A cache entry found damaged after its lookup (the next run's lookup rebuilds it)."""


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes (memory-mapped: no copy of the array)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return 0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _crc32(m) & 0xFFFFFFFF


def expected_arrays(meta: dict) -> dict[str, tuple[tuple[int, ...] | None, np.dtype]]:
    """File name -> (shape or None for `fg.npy`'s row count, dtype) of the arrays an entry must hold:
    a labelled entry (one with meta["voxels"]) has `label.npy`."""
    shape = tuple(int(n) for n in meta["shape"])
    out = {"image.npy": (shape, np.dtype(np.float32)), "fg.npy": (None, np.dtype(np.int32))}
    if "voxels" in meta:
        out["label.npy"] = (shape, np.dtype(np.uint8))
    return out


def npy_problem(path: Path, shape: tuple[int, ...] | None, dtype: np.dtype) -> str | None:
    """Why `path` is not a complete .npy of this shape and dtype (`shape` None: rows of 4), read from its
    header and its size alone; None when it is."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)(f)
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return f"{path}: missing"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"{path}: not a readable .npy file ({exc})"
    got_shape, _, got_dtype = header
    if got_dtype != dtype or (shape is not None and tuple(got_shape) != shape) \
            or (shape is None and (len(got_shape) != 2 or got_shape[1] != 4)):
        return f"{path}: holds {got_dtype} {tuple(got_shape)}, meta.json records {dtype} {shape or '(n, 4)'}"
    want = offset + math.prod(got_shape) * got_dtype.itemsize
    if size != want:
        return f"{path}: {size} bytes where its header needs {want} (truncated or damaged)"
    return None


def label_counts_problem(path: Path, meta: dict, label: np.ndarray) -> str | None:
    """Why the label's voxel counts differ from those recorded at build time (meta["voxels"]), or None."""
    counts = np.bincount(np.asarray(label).reshape(-1), minlength=IGNORE + 1)
    recorded = meta["voxels"]
    names = [*meta["classes"], "ignore"]
    got = [*counts[: len(meta["classes"])].tolist(), int(counts[IGNORE])]
    diff = [f"{n}: {g} here, {recorded.get(n)} recorded" for n, g in zip(names, got) if recorded.get(n, 0) != g]
    return f"{path}: voxel counts differ from those recorded at build time ({'; '.join(diff[:3])})" if diff else None


def entry_problem(path: Path) -> tuple[str | None, dict | None]:
    """(why the finished entry folder `path` cannot be used, naming the file, or None; its meta)."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return f"{path}: no meta.json (an incomplete entry)", None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        arrays = expected_arrays(meta)
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
        return f"{meta_path}: unreadable ({type(exc).__name__}: {exc})", None
    for name, (shape, dtype) in arrays.items():
        problem = npy_problem(path / name, shape, dtype)
        if problem:
            return problem, meta
    crcs = meta.get("crc32")
    if isinstance(crcs, dict):
        for name in arrays:
            if crcs.get(name) != file_crc32(path / name):
                return f"{path / name}: CRC-32 differs from the one recorded at build time (damaged on disk)", meta
    elif "label.npy" in arrays:  # an entry built before checksums: its label's recorded voxel counts
        problem = label_counts_problem(path / "label.npy", meta, np.load(path / "label.npy", mmap_mode="r"))
        if problem:
            return problem, meta
    return None, meta


def tmp_owner(tmp: Path) -> Path:
    """The entry folder a `.tmp-<entry>-<hex>` folder was being built into."""
    return tmp.parent / tmp.name.removeprefix(".tmp-").rsplit("-", 1)[0]


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
        if "voxels" in c.meta:  # read in full here anyway: damage since the lookup shows as other counts
            problem = label_counts_problem(c.path / "label.npy", c.meta, label)
            if problem:
                raise CacheError(f"{problem}: the cache entry {c.path} was damaged after it was checked; "
                                 "rerun to rebuild it")
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
    cache = CaseCache(root)
    result = _build_or_error(cache, case, policy, cfg)
    return result if isinstance(result, Exception) else (result.path, result.meta, cache.built)


class CaseCache:
    """`hits`/`misses`: lookups that found a usable entry / did not; `built`: entries this cache (and its
    builder processes) harmonized; `repaired`: one message per damaged entry found (and rebuilt)."""

    def __init__(self, root: str | Path, say=print):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.built = 0
        self.repaired: list[str] = []
        self.say = say
        self._cleaned: set[Path] = set()

    def lookup(self, case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig) -> CachedCase | None:
        """The finished, intact entry, or None (nothing is built). A damaged entry is reported (naming the
        file) and None returned: `build` replaces it."""
        final = self.entry_dir(case, cache_key(case, policy, cfg))
        self.remove_stale(final.parent)
        if not final.exists():
            return None
        problem, meta = entry_problem(final)
        if problem is None:
            return CachedCase(final, meta)
        message = f"damaged cache entry: {problem}; rebuilding it"
        self.repaired.append(message)
        if self.say is not None:
            self.say(f"[cache] {message}")
        return None

    def remove_stale(self, parent: Path) -> None:
        """Remove the `.tmp-*` folders of killed builds in `parent` (once per folder and CaseCache)."""
        if parent in self._cleaned:
            return
        self._cleaned.add(parent)
        removed = remove_stale_tmp(parent, tmp_owner)
        if removed and self.say is not None:
            self.say(f"[cache] removed {len(removed)} unfinished build(s) left by killed processes in {parent}")

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
                    if not isinstance(result, Exception):
                        path, meta, built = result
                        self.built += built
                        result = CachedCase(path, meta)
                    out[futures[fut]] = result
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
        """Harmonize the case and write its entry atomically, holding the entry's lock: a process that
        finds the lock held waits, then reuses what the holder built. A damaged entry in the way is
        removed (`lookup` reported it)."""
        key = cache_key(case, policy, cfg)
        final = self.entry_dir(case, key)
        with folder_lock(final, "cache entry", wait=True, poll_s=WAIT_POLL_S, say=self.say):
            if final.exists():
                problem, meta = entry_problem(final)
                if problem is None:  # built (or repaired) by the process we waited for
                    return CachedCase(final, meta)
                shutil.rmtree(final)
            entry = self._write(case, policy, cfg, key, final)
            self.built += 1
            return entry

    def _write(self, case: Case, policy: LabelPolicy | None, cfg: HarmonizerConfig, key: str,
               final: Path) -> CachedCase:
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
            # checksums of the files as written (still in the page cache: ~1 ms per 10 MB), verified at lookup
            meta["crc32"] = {name: file_crc32(tmp / name) for name in ARRAYS if (tmp / name).exists()}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            try:
                os.rename(tmp, final)
            except OSError:
                if not meta_path.exists():  # not a concurrent writer's finished entry: a real failure
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return CachedCase(final, meta)
