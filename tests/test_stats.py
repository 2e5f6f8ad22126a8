"""pedx_ray.stats against hand-computed values and independent (brute-force / scipy) computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from pedx_ray import stats


def brute_force_components(y, scores):
    """DeLong et al. (1988) structural components straight from the definition, O(m·n)."""
    y = np.asarray(y, bool)
    pos, neg = scores[y], scores[~y]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    return psi.mean(), psi.mean(axis=1), psi.mean(axis=0)


def brute_force_covariance(y, score_rows):
    parts = [brute_force_components(y, s) for s in score_rows]
    v10 = np.array([p[1] for p in parts])
    v01 = np.array([p[2] for p in parts])
    return np.array([p[0] for p in parts]), np.cov(v10) / v10.shape[1] + np.cov(v01) / v01.shape[1]


@pytest.fixture
def tied_scores():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 80)
    a = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes ties within and across classes
    b = np.round(0.6 * a + rng.normal(y * 0.5, 0.8), 1)
    return y, a, b


def test_roc_curve_hand_example():
    curve = stats.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(curve.fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(curve.tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(curve.thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    assert stats.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auc_is_mann_whitney_u_and_trapezoid_area_with_ties(tied_scores):
    y, a, _ = tied_scores
    u = sps.mannwhitneyu(a[y == 1], a[y == 0]).statistic
    expected = u / ((y == 1).sum() * (y == 0).sum())
    assert stats.auc(y, a) == pytest.approx(expected, abs=1e-12)
    curve = stats.roc_curve(y, a)
    assert np.trapezoid(curve.tpr, curve.fpr) == pytest.approx(expected, abs=1e-12)


def test_hanley_mcneil_1982_worked_example():
    # Hanley & McNeil (1982) Table 1: 5-point ratings of 58 normal and 51 abnormal CT images; A = 0.893.
    negatives = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2])
    positives = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    y = np.r_[np.ones(51), np.zeros(58)]
    value, variance = stats.delong_variance(y, np.r_[positives, negatives])
    assert round(value, 3) == 0.893
    # Their SE 0.032 uses the exponential approximation for Q1, Q2, not DeLong's: different estimator.
    assert np.sqrt(variance) == pytest.approx(0.0307, abs=5e-5)


def test_delong_variance_matches_brute_force(tied_scores):
    y, a, _ = tied_scores
    value, variance = stats.delong_variance(y, a)
    expected_auc, expected_cov = brute_force_covariance(y, [a])
    assert value == pytest.approx(expected_auc[0], abs=1e-12)
    assert variance == pytest.approx(float(expected_cov), rel=1e-10)


def test_delong_test_matches_brute_force(tied_scores):
    y, a, b = tied_scores
    result = stats.delong_test(y, a, b)
    aucs, cov = brute_force_covariance(y, [a, b])
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    z = (aucs[0] - aucs[1]) / se
    assert result.auc_a == pytest.approx(aucs[0]) and result.auc_b == pytest.approx(aucs[1])
    assert result.se_difference == pytest.approx(se, rel=1e-10)
    assert result.z == pytest.approx(z, rel=1e-10)
    assert result.p_value == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-10)


def test_delong_test_detects_a_better_model_and_not_a_copy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    good = rng.normal(y * 2.0, 1.0)
    poor = rng.normal(y * 0.3, 1.0)
    assert stats.delong_test(y, good, poor).p_value < 1e-6
    same = stats.delong_test(y, good, good * 3 + 1)  # rank-identical scores
    assert same.difference == 0 and same.p_value == 1.0


def test_auc_ci_delong_and_bootstrap(tied_scores):
    y, a, _ = tied_scores
    value, variance = stats.delong_variance(y, a)
    _, low, high = stats.auc_ci(y, a)
    assert low == pytest.approx(value - 1.959964 * np.sqrt(variance), abs=1e-6)
    assert high == pytest.approx(value + 1.959964 * np.sqrt(variance), abs=1e-6)
    boot = stats.auc_ci(y, a, method="bootstrap", n_bootstrap=1000, seed=3)
    assert boot == stats.auc_ci(y, a, method="bootstrap", n_bootstrap=1000, seed=3)
    assert boot[1] < value < boot[2]
    assert boot[1] == pytest.approx(low, abs=0.03) and boot[2] == pytest.approx(high, abs=0.03)
    assert stats.auc_ci([0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 4, 5])[2] == 1.0  # clipped at 1


def test_auc_needs_both_classes_and_binary_targets():
    with pytest.raises(stats.StatsError, match="both classes"):
        stats.auc([1, 1, 1], [0.2, 0.4, 0.9])
    with pytest.raises(stats.StatsError, match="0 or 1"):
        stats.auc([0, 2, 1], [0.2, 0.4, 0.9])


def test_binary_metrics_hand_example():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.5, 0.2, 0.7, 0.3, 0.1, 0.1, 0.0, 0.4]
    m = stats.binary_metrics(y, s)  # called positive: score >= 0.5 → TP 3, FN 1, FP 1, TN 5
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 5)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["ppv"] == pytest.approx(3 / 4)
    assert m["npv"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(8 / 10)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
    assert np.isnan(stats.binary_metrics(y, s, threshold=0.95)["ppv"])  # nothing called positive


def test_youden_threshold():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    s = [0.9, 0.8, 0.5, 0.2, 0.7, 0.3, 0.1, 0.1, 0.0, 0.4]
    # J at 0.5 is 3/4 + 5/6 - 1 = 0.583, the maximum over all cut-offs
    assert stats.youden_threshold(y, s) == 0.5
    assert stats.binary_metrics(y, s, "youden")["threshold"] == 0.5


def test_regression_metrics_hand_example():
    m = stats.regression_metrics([10, 20, 30, 40], [12, 18, 33, 40])  # errors 2, -2, 3, 0
    assert m["mae"] == pytest.approx(1.75)
    assert m["mae_sd"] == pytest.approx(np.sqrt(4.75 / 3))
    assert m["mse"] == pytest.approx(4.25)
    assert m["rmse"] == pytest.approx(np.sqrt(4.25))
    assert m["r2"] == pytest.approx(1 - 17 / 500)
    assert m["mean_error"] == pytest.approx(0.75)


def test_error_by_age_group_uses_true_age_in_years():
    true_months = [12, 23, 24, 60, 72, 216]  # 1, 1.9, 2, 5, 6, 18 years
    predicted = [13, 25, 20, 60, 78, 210]
    groups = stats.error_by_age_group(true_months, predicted, (0, 2, 6, 18))
    assert [g["n"] for g in groups] == [2, 2, 2]  # 18 y falls in the last, closed group
    assert groups[0]["mae"] == pytest.approx(1.5) and groups[1]["mae"] == pytest.approx(2.0)
    assert groups[2]["mae"] == pytest.approx(6.0) and groups[2]["mae_sd"] == pytest.approx(0.0)
    with pytest.raises(stats.StatsError, match="increasing"):
        stats.error_by_age_group(true_months, predicted, (0, 6, 2))


def test_bland_altman_hand_example():
    ba = stats.bland_altman([10, 20, 30, 40], [12, 18, 33, 40])
    sd = np.sqrt(14.75 / 3)
    assert ba["mean_difference"] == pytest.approx(0.75)
    assert ba["sd_difference"] == pytest.approx(sd)
    assert ba["loa_low"] == pytest.approx(0.75 - 1.959964 * sd, rel=1e-6)
    assert ba["loa_high"] == pytest.approx(0.75 + 1.959964 * sd, rel=1e-6)


def test_paired_t_test_hand_example():
    result = stats.paired_t_test([3, 5, 2, 6, 4], [1, 4, 2, 3, 2])  # d = 2, 1, 0, 3, 2
    se = np.sqrt(1.3 / 5)  # sample variance of d is 5.2 / 4
    assert result.mean_difference == pytest.approx(1.6)
    assert result.t == pytest.approx(1.6 / se)
    assert result.df == 4
    assert result.p_value == pytest.approx(2 * sps.t.sf(1.6 / se, 4))
    assert result.p_value == pytest.approx(0.0349, abs=1e-4)
    assert result.ci_low == pytest.approx(1.6 - 2.776445 * se, rel=1e-6)
    assert result.ci_high == pytest.approx(1.6 + 2.776445 * se, rel=1e-6)
