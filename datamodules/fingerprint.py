"""Content fingerprints: find the same scan within and across sources, whatever its storage.

Public CT collections re-host each other's scans (MedSeg's 9 radiopaedia volumes are probably
COVID-19-CT-Seg's radiopaedia cases, reference/datasets.md s.4), re-encoded (8-bit windowed, other
dtype), reoriented, mirrored or resampled. A copy on both sides of a split is leakage, so `verify`
reports duplicates and the splits group them as one patient (`splits.merge_duplicate_patients`).

The fingerprint of a case is computed from the scan's content, not from the file bytes:
HU decode (`load_original`) -> RAS canonical -> clip to the 8-bit window [-1250, 250] HU (the
narrowest encoding a public copy uses, so an 8-bit copy and its HU original agree up to quantization,
2.9 HU) -> area-average onto a fixed coarse grid spanning the volume's own field of view (so voxel
size, matrix and slice thickness drop out) -> high-pass + z-score (see HIGHPASS_CELLS). Two
fingerprints match when their fields of view agree and the descriptors correlate at or above
`THRESHOLD` under one of the 8 mirrorings of the grid: a copy stored mirrored (as COVID-19-CT-Seg's
radiopaedia images are believed to be) is still the same scan, whatever anyone declares about its
flips. The grid spans the field of view symmetrically, so mirroring a descriptor is exactly the
descriptor of the mirrored volume.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.cases import Case
from datamodules.harmonize import load_original, to_canonical
from datamodules.io import spacing_of

# Bump when the descriptor changes: cached fingerprints of another version are ignored.
# 2: no declared flips undone (similarity is mirror-invariant instead).
VERSION = 2
# Intensity window every copy is compared in: the 8-bit export window of COVID-19-CT-Seg radiopaedia
# cases. Values outside it are lost in such a copy, so they must not count in the HU original either.
CLIP_HU = (-1250.0, 250.0)
# Coarse grid (R, A, S cells) over the field of view: 32x32 in-plane cells are ~1 cm on a 35 cm FOV,
# fine enough to place vessels, lesions and the heart, coarse enough that resampling and noise average
# out (a 512x512x300 scan contributes ~16x16x19 voxels per cell). 16 cells along z: thick-slice
# scans (MosMed: 33 slices of 8 mm) still fill them.
GRID = (32, 32, 16)
# Each cell is first sampled on a SUPERSAMPLE^3 sub-grid (trilinear, align_corners=False, so the outer
# corners of both FOVs coincide exactly), then averaged: cell boundaries sit at the same physical
# place in every copy, unlike adaptive pooling, whose integer bin edges move with the matrix size.
SUPERSAMPLE = 4
# High-pass: subtract the mean of each cell's 3x3x3 neighbourhood before z-scoring. Every chest is a
# body ellipse around two dark lungs: that shared low-frequency layout alone correlates distinct
# phantom patients at up to 0.98 (plain z-scored cells); what the high-pass keeps is patient-specific
# detail (vessels, lesions, heart, diaphragm and body edges, table), on which distinct patients
# decorrelate while a copy of the same scan still correlates near 1. Width 3 beat 5 and rank
# (Spearman) variants on the phantom suite (gap between duplicates and distinct patients 0.16 vs
# <= 0.08); a 48x48x24 grid gave the same gap but loses more when a copy is coarsely resampled.
HIGHPASS_CELLS = 3
# Duplicates keep their field of view (resampling and re-encoding do not crop): fingerprints whose
# physical extents differ by more than this fraction on any axis are never duplicates (similarity 0).
EXTENT_RTOL = 0.03
# Descriptor correlation at or above which two scans are one scan. Measured on the tiny phantom suite
# (22 cases of covid19_20, mosmed and ctseg; 231 distinct pairs, correlated WITHOUT the extent gate,
# i.e. as if every pair shared its field of view): distinct max 0.775, 99th percentile 0.730, mean
# 0.09. 8-bit windowed copies of each of the 22 cases, re-quantized after resampling: same grid
# >= 0.9999; 0.8x in-plane matrix >= 0.981 (mean 0.988); 1.3x in-plane and 2x slices >= 0.998;
# 0.6x in-plane and 0.5x slices (a 64-voxel phantom down to 38, near the 32-cell grid: harsher than
# any real 512-matrix copy) >= 0.931 (mean 0.951).
# 0.85 leaves 0.075 above the most similar distinct pair and 0.08 below the worst copy.
# tests/test_fingerprint.py re-measures and asserts these margins.
THRESHOLD = 0.85


@dataclass(frozen=True)
class Fingerprint:
    key: str                              # Case.key
    extent_mm: tuple[float, float, float]  # field of view of the RAS-canonical volume (R, A, S)
    descriptor: np.ndarray                 # float32, GRID-shaped, zero mean, unit variance


@dataclass(frozen=True)
class DuplicateGroup:
    """Case keys (sorted) found to be one scan, and the pairwise similarities that linked them."""

    keys: tuple[str, ...]
    pairs: tuple[tuple[str, str, float], ...]

    @property
    def min_similarity(self) -> float:
        return min(s for _, _, s in self.pairs)

    def describe(self) -> str:
        sims = ", ".join(f"{a} ~ {b}: {s:.3f}" for a, b, s in self.pairs)
        return f"duplicate scans {list(self.keys)} ({sims})"


def canonical_hu(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """HU on the RAS-canonical grid, as stored (no flips: `similarity` is mirror-invariant)."""
    # Image only: the mask is not part of the scan's identity and need not be read.
    hu, _, affine = load_original(replace(case, label=None, policy=None), None)
    hu, can_affine = to_canonical(hu, affine)
    return np.ascontiguousarray(hu), can_affine


def coarse_grid(hu: np.ndarray, grid: Sequence[int] = GRID, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Cell means of the (clipped) volume on `grid` cells spanning its whole field of view."""
    t = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    fine = tuple(int(g) * supersample for g in grid)
    # Anti-alias first: area-average axes much longer than the sub-grid down to 2x its size (bin edges
    # move by < 1/2 sub-grid cell, i.e. < 1/8 of a grid cell), then sample the sub-grid linearly.
    pre = tuple(min(n, 2 * f) for n, f in zip(t.shape[2:], fine))
    if pre != tuple(t.shape[2:]):
        t = F.adaptive_avg_pool3d(t, pre)
    t = F.interpolate(t, size=fine, mode="trilinear", align_corners=False)
    return F.avg_pool3d(t, supersample)[0, 0].numpy()


def _descriptor(cells: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(cells, dtype=np.float32))[None, None]
    k = HIGHPASS_CELLS  # odd: the padded box filter keeps the grid's shape
    low = F.avg_pool3d(F.pad(t, (k // 2,) * 6, mode="replicate"), k, stride=1)
    d = (t - low)[0, 0].numpy().astype(np.float64)
    d -= d.mean()
    sd = d.std()
    return (d / sd if sd > 0 else d).astype(np.float32)


def fingerprint_array(hu: np.ndarray, affine: np.ndarray, key: str = "") -> Fingerprint:
    """Fingerprint of a RAS-canonical HU volume with its affine."""
    extent = tuple(float(e) for e in np.asarray(hu.shape) * spacing_of(affine))
    cells = coarse_grid(np.clip(hu, *CLIP_HU))
    return Fingerprint(key, extent, _descriptor(cells))


def fingerprint(case: Case) -> Fingerprint:
    hu, affine = canonical_hu(case)
    return fingerprint_array(hu, affine, case.key)


def extents_match(a: Fingerprint, b: Fingerprint, rtol: float = EXTENT_RTOL) -> bool:
    ea, eb = np.asarray(a.extent_mm), np.asarray(b.extent_mm)
    return bool(np.all(np.abs(ea - eb) <= rtol * np.maximum(ea, eb)))


# The 8 mirrorings of a canonical grid (subsets of its axes), identity first.
MIRRORINGS = tuple(axes for r in range(4) for axes in itertools.combinations(range(3), r))


def similarity(a: Fingerprint, b: Fingerprint) -> float:
    """Pearson correlation of the descriptors under the best of the 8 mirrorings; 0 when the fields of
    view differ (not one scan)."""
    if not extents_match(a, b):
        return 0.0
    da = a.descriptor.astype(np.float64)
    db = b.descriptor.astype(np.float64)
    return max(float(np.mean(da * np.flip(db, axes))) for axes in MIRRORINGS)


# ------------------------------------------------------------------------------------------ cache
def _cache_name(case: Case) -> str:
    st = Path(case.image).stat()
    ident = json.dumps([VERSION, list(GRID), SUPERSAMPLE, HIGHPASS_CELLS, list(CLIP_HU),
                        str(Path(case.image).resolve()), st.st_size, st.st_mtime_ns, case.encoding,
                        list(case.window) if case.window else None])
    return hashlib.sha256(ident.encode()).hexdigest()[:24] + ".npz"


def cached_fingerprint(case: Case, cache_dir: str | Path | None = None) -> Fingerprint:
    """`fingerprint(case)`, stored under cache_dir keyed by the image's path, size and mtime (and the
    decoding and descriptor settings), so verify and the splits read each volume once."""
    if cache_dir is None:
        return fingerprint(case)
    cache_dir = Path(cache_dir)
    path = cache_dir / _cache_name(case)
    if path.is_file():
        try:
            with np.load(path) as z:
                return Fingerprint(case.key, tuple(float(e) for e in z["extent_mm"]), z["descriptor"])
        except (OSError, ValueError, KeyError):
            pass  # unreadable (e.g. truncated by a crash before the atomic rename existed): recompute
    fp = fingerprint(case)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, extent_mm=np.asarray(fp.extent_mm), descriptor=fp.descriptor)
    os.replace(tmp, path)
    return fp


# ------------------------------------------------------------------------------------- grouping
def similarity_matrix(fps: Sequence[Fingerprint], gate: bool = True) -> np.ndarray:
    """All pairwise `similarity` values at once (diagonal 1); `gate=False` correlates pairs whose fields
    of view differ too (for measuring how distinct scans correlate)."""
    n = len(fps)
    if n == 0:
        return np.zeros((0, 0))
    d = np.stack([f.descriptor.astype(np.float64) for f in fps])
    flat = d.reshape(n, -1)
    sim = np.max([flat @ np.flip(d, tuple(a + 1 for a in axes)).reshape(n, -1).T for axes in MIRRORINGS],
                 axis=0) / flat.shape[1]
    if not gate:
        return sim
    ext = np.asarray([f.extent_mm for f in fps], dtype=np.float64)
    diff = np.abs(ext[:, None, :] - ext[None, :, :])
    ok = np.all(diff <= EXTENT_RTOL * np.maximum(ext[:, None, :], ext[None, :, :]), axis=2)
    return np.where(ok, sim, 0.0)


def group_fingerprints(fps: Sequence[Fingerprint], threshold: float = THRESHOLD) -> list[DuplicateGroup]:
    """Transitive groups (union-find) of fingerprints whose similarity reaches `threshold`."""
    sim = similarity_matrix(fps)
    parent = list(range(len(fps)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    edges = []
    for i, j in zip(*np.nonzero(np.triu(sim >= threshold, k=1))):
        edges.append((int(i), int(j)))
        parent[root(int(i))] = root(int(j))
    members: dict[int, list[int]] = {}
    for i in range(len(fps)):
        members.setdefault(root(i), []).append(i)
    groups = []
    for idx in members.values():
        if len(idx) < 2:
            continue
        s = set(idx)
        pairs = tuple(sorted((*sorted((fps[i].key, fps[j].key)), round(float(sim[i, j]), 4))
                             for i, j in edges if i in s))
        groups.append(DuplicateGroup(tuple(sorted(fps[i].key for i in idx)), pairs))
    return sorted(groups, key=lambda g: g.keys)


def find_duplicates(cases: Iterable[Case], threshold: float = THRESHOLD,
                    cache_dir: str | Path | None = None) -> list[DuplicateGroup]:
    """Groups of cases (by `Case.key`) that hold the same scan, within or across sources."""
    cases = list(cases)
    keys = [c.key for c in cases]
    if len(keys) != len(set(keys)):
        raise ValueError(f"case keys repeat: {sorted({k for k in keys if keys.count(k) > 1})[:5]}")
    return group_fingerprints([cached_fingerprint(c, cache_dir) for c in cases], threshold)


__all__ = ["Fingerprint", "DuplicateGroup", "fingerprint", "fingerprint_array", "similarity",
           "similarity_matrix", "group_fingerprints", "find_duplicates", "cached_fingerprint", "THRESHOLD",
           "EXTENT_RTOL", "GRID", "CLIP_HU"]
