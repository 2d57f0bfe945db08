"""Pure summary statistics for reports: means over seeds, bootstrap CIs over cases, Bland-Altman.

No I/O and no plotting. Undefined values (NaN, inf, None) are never averaged in: every function drops
them, and `summarize` says how many it dropped, so a report can print the count next to the mean.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

_MAX_DRAWS = 4_000_000  # resampled indices held in memory at once


def finite(values: Iterable) -> tuple[np.ndarray, int]:
    """The finite values as float64, and how many were undefined (None, NaN or +-inf)."""
    vals = np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    ok = np.isfinite(vals)
    return vals[ok], int((~ok).sum())


def mean_std(values: Iterable) -> tuple[float, float]:
    """(mean, sample std with ddof=1) of the finite values; std is NaN for n < 2, both NaN for n = 0."""
    a, _ = finite(values)
    mean = float(a.mean()) if a.size else math.nan
    return mean, float(a.std(ddof=1)) if a.size > 1 else math.nan


def summarize(values: Iterable) -> dict:
    """mean, std (ddof=1), median, n (finite values) and n_undefined (values left out)."""
    a, undefined = finite(values)
    mean, std = mean_std(a)
    return {"mean": mean, "std": std, "median": float(np.median(a)) if a.size else math.nan,
            "n": int(a.size), "n_undefined": undefined}


def bootstrap_ci_strata(strata: Sequence[Iterable], weights: Sequence[float] | None = None, n_boot: int = 2000,
                        alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of a weighted mean of stratum means, resampling within each stratum.

    `sum_i w_i * mean(stratum_i)` with equal weights by default: the mean over test sources where each
    source weighs the same, however many cases it has (the convention of `test/mean/<metric>`). Undefined
    values are dropped; an emptied stratum is dropped and the remaining weights renormalized. Returns
    (NaN, NaN) when nothing is left. Seeded: the same inputs and seed give the same interval.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    arrays = [finite(s)[0] for s in strata]
    w = np.ones(len(arrays)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arrays),):
        raise ValueError(f"{len(arrays)} strata but {w.size} weights")
    keep = [i for i, a in enumerate(arrays) if a.size]
    if not keep:
        return math.nan, math.nan
    w = w[keep] / w[keep].sum()
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for wi, i in zip(w, keep):
        a = arrays[i]
        step = max(1, _MAX_DRAWS // a.size)  # bounds memory for large case counts
        for start in range(0, n_boot, step):
            stop = min(n_boot, start + step)
            boot[start:stop] += wi * a[rng.integers(0, a.size, size=(stop - start, a.size))].mean(axis=1)
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    # Every resampled mean lies between the smallest and the largest possible one; clipping only removes
    # rounding (a constant sample then gives exactly that constant).
    lo_bound = sum(wi * arrays[i].min() for wi, i in zip(w, keep))
    hi_bound = sum(wi * arrays[i].max() for wi, i in zip(w, keep))
    return float(np.clip(low, lo_bound, hi_bound)), float(np.clip(high, lo_bound, hi_bound))


def bootstrap_ci(values: Iterable, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of the mean over cases: (low, high), seeded.

    Undefined values are dropped first; (NaN, NaN) when none is left, (x, x) for a single value.
    """
    return bootstrap_ci_strata([values], n_boot=n_boot, alpha=alpha, seed=seed)


def bland_altman(ref: Iterable, pred: Iterable) -> dict:
    """Bland-Altman statistics of d = pred - ref over the pairs where both are defined.

    bias (mean of d), sd (ddof=1), loa_low/loa_high (bias -/+ 1.96 sd), n pairs used, n_undefined
    pairs left out. sd and the limits are NaN for n < 2.
    """
    r = np.asarray([math.nan if v is None else float(v) for v in ref], dtype=np.float64)
    p = np.asarray([math.nan if v is None else float(v) for v in pred], dtype=np.float64)
    if r.shape != p.shape:
        raise ValueError(f"ref and pred must have the same length, got {r.size} and {p.size}")
    ok = np.isfinite(r) & np.isfinite(p)
    bias, sd = mean_std(p[ok] - r[ok])
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd,
            "n": int(ok.sum()), "n_undefined": int((~ok).sum())}


def mean_se(values: Iterable) -> tuple[float, float, int]:
    """(mean, standard error, n) of the finite values: SE = sample std (ddof=1) / sqrt(n), NaN for n < 2.
    DomainBed's tables print the same (their std uses ddof=0, a little smaller for few trials)."""
    a, _ = finite(values)
    mean, std = mean_std(a)
    return mean, (std / math.sqrt(a.size) if a.size > 1 else math.nan), int(a.size)


def wilcoxon_p(diffs: Iterable) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (scipy.stats.wilcoxon: exact for small
    samples without ties, else the normal approximation). Zero differences are dropped (Wilcoxon's own
    convention); NaN when no non-zero difference is left (no evidence either way, and nothing to rank)."""
    from scipy.stats import wilcoxon

    d, _ = finite(diffs)
    d = d[d != 0]
    if d.size == 0:
        return math.nan
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_difference(strata: Sequence[tuple[Iterable, Iterable]], n_boot: int = 2000, alpha: float = 0.05,
                      seed: int = 0) -> dict:
    """Paired comparison of `a` against `b` over the same cases, in one or more strata (held-out sources).

    Each stratum is (a, b), equally long, pair i being one case; a pair with an undefined value is left out.
    `mean_diff` is the mean over strata of each stratum's mean difference a - b (every source weighs the same,
    as `test/mean/<metric>`); `ci_low`/`ci_high` its percentile bootstrap interval resampling cases within each
    stratum (`n_boot` resamples, seeded); `p` the Wilcoxon signed-rank p-value over all pairs pooled; `n` the
    pairs used and `n_undefined` the pairs left out."""
    diffs, undefined = [], 0
    for a, b in strata:
        x = np.asarray([math.nan if v is None else float(v) for v in a], dtype=np.float64)
        y = np.asarray([math.nan if v is None else float(v) for v in b], dtype=np.float64)
        if x.shape != y.shape:
            raise ValueError(f"paired values must have the same length, got {x.size} and {y.size}")
        ok = np.isfinite(x) & np.isfinite(y)
        undefined += int((~ok).sum())
        diffs.append(x[ok] - y[ok])
    kept = [d for d in diffs if d.size]
    mean = float(np.mean([d.mean() for d in kept])) if kept else math.nan
    low, high = bootstrap_ci_strata(kept, n_boot=n_boot, alpha=alpha, seed=seed) if kept else (math.nan, math.nan)
    pooled = np.concatenate(kept) if kept else np.zeros(0)
    return {"mean_diff": mean, "ci_low": low, "ci_high": high, "p": wilcoxon_p(pooled),
            "n": int(pooled.size), "n_undefined": undefined, "n_boot": n_boot}
