"""Downstream evaluation statistics (numpy + scipy only): ROC/AUC with DeLong CIs and test, threshold
metrics, bone-age error summaries, Bland-Altman and the paired t-test.

Conventions (the paper's Tables 2 and 3):
- Fracture scores are probabilities of the positive class; a case is called positive when
  ``score >= threshold``. AUC counts a tied positive/negative pair as one half (the Mann-Whitney
  statistic), which equals the trapezoidal area under the empirical ROC curve.
- DeLong's variance uses the structural components of DeLong, DeLong & Clarke-Pearson (1988), computed
  in O(N log N) by midranks as in Sun & Xu (2014), "Fast implementation of DeLong's algorithm for
  comparing the areas under correlated ROC curves", IEEE Signal Process. Lett. 21(11).
- Bone-age errors are ``prediction - target`` in months; MAE's SD is the sample SD (ddof=1) of the
  absolute errors, as "MAE ± SD" is reported in the bone-age literature.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

CI_METHODS = ("delong", "bootstrap")


class StatsError(ValueError):
    pass


@dataclass(frozen=True)
class RocCurve:
    """Empirical ROC: one point per distinct threshold, from (0, 0) (threshold +inf) to (1, 1)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


@dataclass(frozen=True)
class DeLongTest:
    auc_a: float
    auc_b: float
    difference: float  # auc_a - auc_b
    se_difference: float
    z: float
    p_value: float  # two-sided


@dataclass(frozen=True)
class PairedTTest:
    mean_difference: float  # mean(a - b)
    ci_low: float
    ci_high: float
    t: float
    df: int
    p_value: float  # two-sided


def _binary_inputs(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = np.asarray(scores, dtype=float)
    if y.ndim != 1 or s.shape != y.shape:
        raise StatsError(f"targets and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise StatsError(
            f"binary targets must be 0 or 1, found {sorted(set(np.unique(y).tolist()) - {0, 1})}"
        )
    if not np.isfinite(s).all():
        raise StatsError("scores contain NaN or infinite values")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise StatsError(
            f"AUC needs both classes: {int(y.sum())} positive and {int((~y).sum())} negative cases given"
        )
    return y, s


def roc_curve(y_true, scores) -> RocCurve:
    y, s = _binary_inputs(y_true, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # the last index of each run of equal scores: ties move the curve diagonally in one step
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = (last_of_run + 1) - tp
    return RocCurve(
        fpr=np.r_[0.0, fp / (~y).sum()],
        tpr=np.r_[0.0, tp / y.sum()],
        thresholds=np.r_[np.inf, s_sorted[last_of_run]],
    )


def _delong_components(y: np.ndarray, score_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUCs (k,) and structural components V10 (k, m) over positives, V01 (k, n) over negatives.

    V10[i] = P(score of positive i > a random negative) (ties 1/2); V01[j] likewise for negative j.
    Midranks give them without the O(m·n) pair table (Sun & Xu 2014, eqs. 7–10).
    """
    positives, negatives = score_matrix[:, y], score_matrix[:, ~y]
    m, n = positives.shape[1], negatives.shape[1]
    rank_pos = sps.rankdata(positives, axis=1)
    rank_neg = sps.rankdata(negatives, axis=1)
    rank_all = sps.rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    aucs = (rank_all[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (rank_all[:, :m] - rank_pos) / n
    v01 = 1.0 - (rank_all[:, m:] - rank_neg) / m
    return aucs, v10, v01


def _delong_covariance(y: np.ndarray, score_matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    aucs, v10, v01 = _delong_components(y, score_matrix)
    m, n = v10.shape[1], v01.shape[1]
    if m < 2 or n < 2:
        raise StatsError(f"DeLong's variance needs at least 2 positive and 2 negative cases, got {m} and {n}")
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, cov


def auc(y_true, scores) -> float:
    y, s = _binary_inputs(y_true, scores)
    return float(_delong_components(y, s[None, :])[0][0])


def delong_variance(y_true, scores) -> tuple[float, float]:
    """(AUC, DeLong's variance of the AUC)."""
    y, s = _binary_inputs(y_true, scores)
    aucs, cov = _delong_covariance(y, s[None, :])
    return float(aucs[0]), float(cov[0, 0])


def auc_ci(
    y_true,
    scores,
    level: float = 0.95,
    method: str = "delong",
    n_bootstrap: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(AUC, low, high). DeLong: AUC ± z·SE clipped to [0, 1] (as pROC). Bootstrap: percentile
    interval of stratified resamples (positives and negatives resampled separately, so each
    replicate keeps both classes), reproducible through ``seed``."""
    if not 0 < level < 1:
        raise StatsError(f"level must be between 0 and 1 (e.g. 0.95), got {level!r}")
    y, s = _binary_inputs(y_true, scores)
    if method == "delong":
        value, variance = delong_variance(y, s)
        half = sps.norm.ppf(0.5 + level / 2) * np.sqrt(variance)
        return value, float(max(0.0, value - half)), float(min(1.0, value + half))
    if method == "bootstrap":
        if n_bootstrap < 100:
            raise StatsError(f"n_bootstrap must be at least 100 for a percentile interval, got {n_bootstrap}")
        rng = np.random.default_rng(seed)
        pos, neg = s[y], s[~y]
        resampled = np.concatenate(
            [
                rng.choice(pos, size=(n_bootstrap, len(pos))),
                rng.choice(neg, size=(n_bootstrap, len(neg))),
            ],
            axis=1,
        )
        labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
        replicates = _delong_components(labels, resampled)[0]
        low, high = np.quantile(replicates, [0.5 - level / 2, 0.5 + level / 2])
        return float(auc(y, s)), float(low), float(high)
    raise StatsError(f"unknown CI method {method!r}; choose one of {CI_METHODS}")


def delong_test(y_true, scores_a, scores_b) -> DeLongTest:
    """DeLong's two-sided test of AUC(a) == AUC(b) for two models scored on the same cases."""
    y, a = _binary_inputs(y_true, scores_a)
    _, b = _binary_inputs(y_true, scores_b)
    aucs, cov = _delong_covariance(y, np.vstack([a, b]))
    variance = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    difference = float(aucs[0] - aucs[1])
    if variance <= 0:
        # identical (or rank-identical) scores: no evidence of a difference
        return DeLongTest(float(aucs[0]), float(aucs[1]), difference, 0.0, 0.0, 1.0)
    se = float(np.sqrt(variance))
    z = difference / se
    return DeLongTest(float(aucs[0]), float(aucs[1]), difference, se, z, float(2 * sps.norm.sf(abs(z))))


def youden_threshold(y_true, scores) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (the first, i.e. highest, on ties)."""
    curve = roc_curve(y_true, scores)
    best = int(np.argmax(curve.tpr[1:] - curve.fpr[1:])) + 1  # skip the +inf point
    return float(curve.thresholds[best])


def _ratio(num: int, den: int) -> float:
    return float(num / den) if den else float("nan")


def binary_metrics(y_true, scores, threshold: float | str = 0.5) -> dict:
    """F1, accuracy, sensitivity, specificity, PPV, NPV at ``threshold`` (a number or "youden").

    A ratio with an empty denominator (e.g. PPV when nothing is called positive) is NaN, not 0."""
    y, s = _binary_inputs(y_true, scores)
    if threshold == "youden":
        threshold = youden_threshold(y, s)
    elif isinstance(threshold, str):
        raise StatsError(f"threshold must be a number or 'youden', got {threshold!r}")
    called = s >= threshold
    tp, fp = int((called & y).sum()), int((called & ~y).sum())
    fn, tn = int((~called & y).sum()), int((~called & ~y).sum())
    return {
        "threshold": float(threshold),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, len(y)),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _regression_inputs(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    if t.ndim != 1 or p.shape != t.shape or len(t) < 2:
        raise StatsError(
            f"targets and predictions must be 1-D of equal length ≥ 2, got {t.shape} and {p.shape}"
        )
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise StatsError("targets or predictions contain NaN or infinite values")
    return t, p


def regression_metrics(y_true, y_pred) -> dict:
    """MAE, SD of the absolute errors, MSE, RMSE, R² (1 - SS_res/SS_tot) and the mean signed error."""
    t, p = _regression_inputs(y_true, y_pred)
    error = p - t
    absolute = np.abs(error)
    ss_tot = float(((t - t.mean()) ** 2).sum())
    mse = float((error**2).mean())
    return {
        "n": len(t),
        "mae": float(absolute.mean()),
        "mae_sd": float(absolute.std(ddof=1)),
        "mse": mse,
        "rmse": float(np.sqrt(mse)),
        "r2": float(1 - (error**2).sum() / ss_tot) if ss_tot > 0 else float("nan"),
        "mean_error": float(error.mean()),
    }


def error_by_age_group(y_true_months, y_pred_months, bin_edges_years=(0, 2, 6, 10, 14, 18)) -> list[dict]:
    """MAE ± SD per true-age group; groups are [low, high) in years, the last one closed at its top."""
    t, p = _regression_inputs(y_true_months, y_pred_months)
    edges = np.asarray(bin_edges_years, dtype=float)
    if edges.ndim != 1 or len(edges) < 2 or not (np.diff(edges) > 0).all():
        raise StatsError(
            f"age bin edges must be at least two increasing numbers of years, got {bin_edges_years!r}"
        )
    years = t / 12.0
    groups = []
    for i, (low, high) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        last = i == len(edges) - 2
        inside = (years >= low) & ((years <= high) if last else (years < high))
        absolute = np.abs(p[inside] - t[inside])
        groups.append(
            {
                "group": f"{low:g}–{high:g} y",
                "low_years": float(low),
                "high_years": float(high),
                "n": int(inside.sum()),
                "mae": float(absolute.mean()) if len(absolute) else float("nan"),
                "mae_sd": float(absolute.std(ddof=1)) if len(absolute) > 1 else float("nan"),
            }
        )
    return groups


def bland_altman(y_true, y_pred, level: float = 0.95) -> dict:
    """Mean difference (prediction - target) and limits of agreement mean ± z·SD (z = 1.96 at 95%)."""
    t, p = _regression_inputs(y_true, y_pred)
    difference = p - t
    mean, sd = float(difference.mean()), float(difference.std(ddof=1))
    z = float(sps.norm.ppf(0.5 + level / 2))
    return {"mean_difference": mean, "sd_difference": sd, "loa_low": mean - z * sd, "loa_high": mean + z * sd}


def paired_t_test(a, b, level: float = 0.95) -> PairedTTest:
    """Two-sided paired t-test of mean(a - b) == 0 (scipy.stats.ttest_rel) with its t-based CI.

    For two bone-age models pass their absolute errors on the same cases."""
    x, y = _regression_inputs(a, b)
    difference = x - y
    result = sps.ttest_rel(x, y)
    df = len(difference) - 1
    mean = float(difference.mean())
    sd = float(difference.std(ddof=1))
    if sd == 0:
        return PairedTTest(mean, mean, mean, float("nan"), df, 1.0 if mean == 0 else 0.0)
    half = float(sps.t.ppf(0.5 + level / 2, df)) * sd / np.sqrt(len(difference))
    return PairedTTest(mean, mean - half, mean + half, float(result.statistic), df, float(result.pvalue))
