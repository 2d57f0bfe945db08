import math
import warnings

import numpy as np
import pytest
from scipy import stats

from evaluation.agreement import CLINICAL_BINS, agreement, bin_counts


def test_bin_edges_right_closed_first_bin_includes_zero():
    assert CLINICAL_BINS == (0.0, 1.0, 25.0, 50.0, 75.0, 100.0)
    # 0 and 1 -> 0-1 %; 1.0001 and 25 -> 1-25 %; 100 -> 75-100 %.
    assert bin_counts([0, 1, 1.0001, 25, 100], CLINICAL_BINS).tolist() == [2, 2, 0, 0, 1]
    assert bin_counts([25.0001, 50, 50.5, 75, 75.5], CLINICAL_BINS).tolist() == [0, 0, 2, 2, 1]
    assert bin_counts([], CLINICAL_BINS).tolist() == [0, 0, 0, 0, 0]


@pytest.mark.parametrize("bad", [[-0.01], [100.01], [float("nan")]])
def test_bin_counts_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        bin_counts(bad, CLINICAL_BINS)


def test_bin_counts_rejects_unsorted_bins():
    with pytest.raises(ValueError):
        bin_counts([1.0], (0.0, 5.0, 5.0, 10.0))


def test_perfect_agreement():
    ref = [0.5, 3.0, 10.0, 30.0, 60.0, 90.0]
    a = agreement(ref, ref)
    assert a["n"] == 6
    assert a["pearson_r"] == pytest.approx(1.0)
    assert a["kendall_tau"] == pytest.approx(1.0)
    assert a["slope"] == pytest.approx(1.0)
    assert a["intercept"] == pytest.approx(0.0, abs=1e-9)
    assert a["r2"] == pytest.approx(1.0)
    assert a["ba_mean"] == 0.0 and a["ba_sd"] == 0.0 and a["mae"] == 0.0
    # Identical distributions over the bins: no difference at all.
    assert a["chi2"] == pytest.approx(0.0) and a["chi2_p"] == pytest.approx(1.0)


def test_linear_transform_hand_values():
    ref = np.array([0.0, 1.0, 2.0, 5.0, 10.0, 20.0])
    pred = 2 * ref + 1  # [1, 3, 5, 11, 21, 41]: ref = (pred - 1) / 2 = -0.5 + 0.5 * pred exactly
    a = agreement(ref, pred)
    assert a["slope"] == pytest.approx(0.5)
    assert a["intercept"] == pytest.approx(-0.5)
    assert a["r2"] == pytest.approx(1.0)
    assert a["fit_mse"] == pytest.approx(0.0, abs=1e-12)
    # d = pred - ref = ref + 1 = [1, 2, 3, 6, 11, 21]: mean 44 / 6, all positive so MAE = mean.
    assert a["ba_mean"] == pytest.approx(44 / 6)
    assert a["mae"] == pytest.approx(44 / 6)
    dev = np.array([1, 2, 3, 6, 11, 21]) - 44 / 6
    sd = math.sqrt(float((dev**2).sum()) / 5)
    assert a["ba_sd"] == pytest.approx(sd)
    assert a["ba_low"] == pytest.approx(44 / 6 - 1.96 * sd)
    assert a["ba_high"] == pytest.approx(44 / 6 + 1.96 * sd)
    assert a["pearson_r"] == pytest.approx(1.0) and a["kendall_tau"] == pytest.approx(1.0)


def test_correlations_and_ci_match_manual_formulas():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 80, size=30)
    pred = np.clip(0.9 * ref + rng.normal(0, 5, size=30), 0, 100)
    a = agreement(ref, pred)
    assert a["pearson_r"] == pytest.approx(stats.pearsonr(ref, pred)[0])
    assert a["pearson_p"] == pytest.approx(stats.pearsonr(ref, pred)[1])
    assert a["kendall_tau"] == pytest.approx(stats.kendalltau(ref, pred)[0])
    assert a["kendall_p"] == pytest.approx(stats.kendalltau(ref, pred)[1])
    # Ordinary least squares of ref on pred, written out.
    n = ref.size
    sxx = float(((pred - pred.mean()) ** 2).sum())
    b1 = float(((pred - pred.mean()) * (ref - ref.mean())).sum()) / sxx
    b0 = ref.mean() - b1 * pred.mean()
    resid = ref - (b0 + b1 * pred)
    s2 = float((resid**2).sum()) / (n - 2)
    se_b1 = math.sqrt(s2 / sxx)
    se_b0 = math.sqrt(s2 * (1 / n + pred.mean() ** 2 / sxx))
    t = stats.t.ppf(0.975, n - 2)
    assert a["slope"] == pytest.approx(b1)
    assert a["intercept"] == pytest.approx(b0)
    assert a["slope_ci_low"] == pytest.approx(b1 - t * se_b1)
    assert a["slope_ci_high"] == pytest.approx(b1 + t * se_b1)
    assert a["intercept_ci_low"] == pytest.approx(b0 - t * se_b0)
    assert a["intercept_ci_high"] == pytest.approx(b0 + t * se_b0)
    assert a["r2"] == pytest.approx(1 - float((resid**2).sum()) / float(((ref - ref.mean()) ** 2).sum()))
    assert a["fit_mse"] == pytest.approx(float((resid**2).mean()))
    assert a["mae"] == pytest.approx(float(np.abs(pred - ref).mean()))


def test_chi2_percent_table_hand_counted():
    ref = [0.0, 0.5, 1.0, 10.0, 30.0, 80.0]  # bins: 0-1: 3, 1-25: 1, 25-50: 1, 50-75: 0, 75-100: 1
    pred = [0.2, 2.0, 3.0, 20.0, 40.0, 60.0]  # bins: 0-1: 1, 1-25: 3, 25-50: 1, 50-75: 1, 75-100: 0
    expected = stats.chi2_contingency(np.array([[3, 1, 1, 0, 1], [1, 3, 1, 1, 0]]))
    a = agreement(ref, pred)
    assert a["chi2"] == pytest.approx(expected.statistic)
    assert a["chi2_p"] == pytest.approx(expected.pvalue)
    assert a["chi2_dof"] == 4


def test_chi2_drops_columns_empty_in_both():
    ref = [0.5, 0.7, 5.0, 80.0]  # 0-1: 2, 1-25: 1, 75-100: 1
    pred = [0.1, 3.0, 4.0, 90.0]  # 0-1: 1, 1-25: 2, 75-100: 1; 25-50 and 50-75 empty in both -> dropped
    expected = stats.chi2_contingency(np.array([[2, 1, 1], [1, 2, 1]]))
    a = agreement(ref, pred)
    assert a["chi2_dof"] == 2
    assert a["chi2"] == pytest.approx(expected.statistic)
    assert a["chi2_p"] == pytest.approx(expected.pvalue)


def test_chi2_score_per_integer_value():
    ref = [0, 3, 3, 7, 20]
    pred = [0, 3, 4, 7, 19]
    # Values present in either: 0, 3, 4, 7, 19, 20.
    expected = stats.chi2_contingency(np.array([[1, 2, 0, 1, 0, 1], [1, 1, 1, 1, 1, 0]]))
    a = agreement(ref, pred, kind="score")
    assert a["chi2_dof"] == 5
    assert a["chi2"] == pytest.approx(expected.statistic)
    assert a["chi2_p"] == pytest.approx(expected.pvalue)
    # The same numbers as percentages would all share few clinical bins, giving a different test.
    assert agreement(ref, pred)["chi2_dof"] == 1


@pytest.mark.parametrize("bad", [[0, 1, 2.5], [0, 1, 21], [-1, 0, 1]])
def test_score_kind_rejects_non_scores(bad):
    with pytest.raises(ValueError):
        agreement(bad, [0, 1, 2], kind="score")


def test_constant_and_small_inputs_give_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = agreement([5.0, 5.0, 5.0, 5.0], [1.0, 2.0, 3.0, 4.0])
        assert math.isnan(a["pearson_r"]) and math.isnan(a["kendall_tau"]) and math.isnan(a["r2"])
        assert a["slope"] == pytest.approx(0.0) and a["intercept"] == pytest.approx(5.0)
        assert a["ba_mean"] == pytest.approx(-2.5)
        b = agreement([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0])
        assert math.isnan(b["pearson_r"]) and math.isnan(b["slope"]) and math.isnan(b["slope_ci_low"])
        assert b["mae"] == pytest.approx(2.5)
        c = agreement([1.0, 2.0], [1.5, 2.5])
        assert math.isnan(c["pearson_r"]) and math.isnan(c["slope"])
        assert c["ba_mean"] == pytest.approx(0.5) and c["ba_sd"] == pytest.approx(0.0)
        d = agreement([], [])
        assert d["n"] == 0 and math.isnan(d["chi2"]) and math.isnan(d["ba_mean"])


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="length"):
        agreement([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        agreement([1.0, float("nan"), 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        agreement([1.0, 2.0, 3.0], [1.0, 2.0, float("nan")])
    with pytest.raises(ValueError, match="kind"):
        agreement([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], kind="ordinal")
    with pytest.raises(ValueError):
        agreement([1.0, 2.0, 101.0], [1.0, 2.0, 3.0])
