"""Agreement between reference (ground-truth) and predicted severity measures over a set of cases.

Follows the "Statistical Analysis" of Chaganti et al. 2020 (Radiol Artif Intell):

* chi-squared contingency test between the reference and predicted distributions: for percentages (PO,
  PHO; here also WAL) over the clinically relevant bins 0-1, 1-25, 25-50, 50-75, 75-100 % (Bernheim et al.),
  for scores (LSS, LHOS) over each integer value 0..20;
* Pearson's r and Kendall's tau (scipy.stats);
* linear regression ``ref = b0 + b1 * pred`` (ground truth regressed on predicted, as in the paper) with
  95 % confidence intervals for b0 and b1, R^2 and the mean squared residual;

plus Bland-Altman statistics of ``d = pred - ref`` and the mean absolute error. Units are those of the
inputs (percentage points for PO / PHO / WAL, score points for LSS / LHOS).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats

# Clinically relevant percentage bins (Chaganti / Bernheim): 0-1, 1-25, 25-50, 50-75, 75-100 %.
CLINICAL_BINS = (0.0, 1.0, 25.0, 50.0, 75.0, 100.0)
# LSS and LHOS are sums of five lobe scores 0..4.
MAX_SCORE = 20

_NAN = float("nan")
_KEYS = (
    "pearson_r", "pearson_p", "kendall_tau", "kendall_p", "chi2", "chi2_p", "chi2_dof",
    "slope", "slope_ci_low", "slope_ci_high", "intercept", "intercept_ci_low", "intercept_ci_high", "r2",
    "fit_mse", "ba_mean", "ba_sd", "ba_low", "ba_high", "mae",
)  # fmt: skip


def bin_counts(values: Sequence[float] | np.ndarray, bins: Sequence[float] = CLINICAL_BINS) -> np.ndarray:
    """Number of values per bin, ``len(bins) - 1`` integers.

    Bins are right-closed, ``(bins[i], bins[i + 1]]``, except the first, which is closed on both sides
    ``[bins[0], bins[1]]``: with CLINICAL_BINS, 0 and 1 fall in 0-1 %, 1.0001 and 25 in 1-25 %, 100 in 75-100 %.
    Right-closed so that a case exactly on a boundary goes to the lower category, as in :func:`lobe_score`.
    Raises ValueError for values outside ``[bins[0], bins[-1]]`` (e.g. a percentage < 0 or > 100), NaN, or
    bins that are not strictly increasing.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    b = np.asarray(bins, dtype=np.float64)
    if b.ndim != 1 or b.size < 2 or not np.all(np.diff(b) > 0):
        raise ValueError(f"bins must be a strictly increasing sequence of >= 2 edges, got {bins}")
    bad = ~((v >= b[0]) & (v <= b[-1]))  # NaN compares False, so it is flagged too
    if bad.any():
        raise ValueError(f"values must lie in [{b[0]}, {b[-1]}], got {v[bad][:5].tolist()}")
    # side="left": index i with b[i-1] < v <= b[i], i.e. right-closed; v == b[0] gives 0, folded into bin 0.
    idx = np.maximum(np.searchsorted(b, v, side="left") - 1, 0)
    return np.bincount(idx, minlength=b.size - 1)


def _score_counts(values: np.ndarray) -> np.ndarray:
    """Frequency of each integer score 0..MAX_SCORE."""
    if not np.all((values >= 0) & (values <= MAX_SCORE) & (values == np.round(values))):
        raise ValueError(f"scores must be integers in 0..{MAX_SCORE}, got {np.unique(values)[:10].tolist()}")
    return np.bincount(values.astype(np.int64), minlength=MAX_SCORE + 1)


def _chi2(ref_counts: np.ndarray, pred_counts: np.ndarray) -> tuple[float, float, float]:
    """Chi-squared contingency test on the 2 x K table [ref; pred], dropping categories empty in both rows.

    Empty-in-both columns carry no information and would give zero expected frequencies (undefined test).
    scipy's defaults are kept: Yates' continuity correction when dof == 1; a single remaining column
    (both distributions in one and the same category) gives chi2 = 0, p = 1, dof = 0.
    """
    table = np.vstack([ref_counts, pred_counts])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] == 0:
        return _NAN, _NAN, _NAN
    res = stats.chi2_contingency(table)
    return float(res.statistic), float(res.pvalue), float(res.dof)


def agreement(ref: Sequence[float] | np.ndarray, pred: Sequence[float] | np.ndarray, kind: str = "percent") -> dict:
    """Agreement statistics between reference and predicted values of one severity measure.

    Args:
        ref: reference (ground-truth) values, one per case.
        pred: predicted values for the same cases, same order. Drop cases where either is undefined (e.g. no
            lung) before calling: NaN is rejected rather than silently skipped.
        kind: "percent" (PO, PHO, WAL: values in [0, 100], chi-squared over CLINICAL_BINS) or "score" (LSS,
            LHOS: integers 0..20, chi-squared over each integer value).

    Returns:
        dict of floats: ``n``; ``pearson_r``, ``pearson_p``; ``kendall_tau``, ``kendall_p`` (tau-b);
        ``chi2``, ``chi2_p``, ``chi2_dof``; for ``ref = intercept + slope * pred``: ``slope``,
        ``slope_ci_low``, ``slope_ci_high``, ``intercept``, ``intercept_ci_low``, ``intercept_ci_high`` (95 %,
        t distribution with n - 2 dof), ``r2``, ``fit_mse`` (mean squared residual, divisor n); Bland-Altman
        on ``d = pred - ref``: ``ba_mean``, ``ba_sd`` (ddof=1), ``ba_low``, ``ba_high`` (mean -/+ 1.96 sd);
        ``mae``. Undefined statistics are NaN (never an exception): correlations and the fit need n >= 3
        and non-constant inputs (``r2`` and the CIs also need non-constant ``ref``), ``ba_sd`` needs n >= 2,
        everything is NaN for n = 0.

    Raises:
        ValueError: different lengths, NaN/inf, unknown ``kind``, or values outside the range of ``kind``.
    """
    r = np.asarray(ref, dtype=np.float64).ravel()
    p = np.asarray(pred, dtype=np.float64).ravel()
    if r.shape != p.shape:
        raise ValueError(f"ref and pred must have the same length, got {r.size} and {p.size}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(p))):
        raise ValueError("ref and pred must not contain NaN or inf: drop undefined cases before calling")
    if kind == "percent":
        ref_counts, pred_counts = bin_counts(r, CLINICAL_BINS), bin_counts(p, CLINICAL_BINS)
    elif kind == "score":
        ref_counts, pred_counts = _score_counts(r), _score_counts(p)
    else:
        raise ValueError(f"kind must be 'percent' or 'score', got {kind!r}")

    n = r.size
    out: dict = {"n": n, **dict.fromkeys(_KEYS, _NAN)}
    if n == 0:
        return out
    out["chi2"], out["chi2_p"], out["chi2_dof"] = _chi2(ref_counts, pred_counts)

    d = p - r
    out["mae"] = float(np.mean(np.abs(d)))
    out["ba_mean"] = float(np.mean(d))
    if n >= 2:
        sd = float(np.std(d, ddof=1))
        out["ba_sd"], out["ba_low"], out["ba_high"] = sd, out["ba_mean"] - 1.96 * sd, out["ba_mean"] + 1.96 * sd

    # Decide "undefined" ourselves instead of letting scipy warn on constant input or n < 3
    # (n = 2 gives r = +-1 trivially and zero residual degrees of freedom).
    if n < 3 or np.ptp(p) == 0:
        return out
    ref_varies = np.ptp(r) > 0
    if ref_varies:
        pr = stats.pearsonr(r, p)
        kt = stats.kendalltau(r, p)
        out["pearson_r"], out["pearson_p"] = float(pr.statistic), float(pr.pvalue)
        out["kendall_tau"], out["kendall_p"] = float(kt.statistic), float(kt.pvalue)

    # The paper regresses the ground truth on the prediction: x = pred, y = ref.
    fit = stats.linregress(p, r)
    out["slope"], out["intercept"] = float(fit.slope), float(fit.intercept)
    out["fit_mse"] = float(np.mean((r - (fit.intercept + fit.slope * p)) ** 2))
    if ref_varies:
        t = float(stats.t.ppf(0.975, n - 2))
        out["slope_ci_low"] = float(fit.slope - t * fit.stderr)
        out["slope_ci_high"] = float(fit.slope + t * fit.stderr)
        out["intercept_ci_low"] = float(fit.intercept - t * fit.intercept_stderr)
        out["intercept_ci_high"] = float(fit.intercept + t * fit.intercept_stderr)
        out["r2"] = float(fit.rvalue**2)
    return out
