"""Diagnostic statistics: OLS agrees with lstsq; the clustered bootstrap recovers a planted effect."""

import numpy as np
import pytest

from ta_opd.tools.diagnose.regression import cluster_bootstrap, cluster_bootstrap_mean_diff, ols, standardize, winsorize


def _data(n_prompts=60, per=20, seed=0, beta=(0.3, -0.2, 0.0), cluster_sd=0.5, x_cluster_sd=0.0):
    rng = np.random.default_rng(seed)
    clusters = np.repeat(np.arange(n_prompts), per)
    X = rng.normal(size=(n_prompts * per, len(beta))) + rng.normal(size=(n_prompts, len(beta)))[clusters] * x_cluster_sd
    u = rng.normal(size=n_prompts)[clusters] * cluster_sd  # prompt-level noise: errors correlated within a prompt
    y = 1.0 + X @ np.array(beta) + u + rng.normal(size=len(clusters)) * 0.5
    return y, X, clusters


def test_ols_matches_lstsq():
    y, X, _ = _data()
    names = ("a", "b", "c")
    fit = ols(y, X, names)
    Z = (X - X.mean(0)) / X.std(0)
    want, *_ = np.linalg.lstsq(np.hstack([np.ones((len(y), 1)), Z]), y, rcond=None)
    np.testing.assert_allclose(fit.coef, want[1:], rtol=1e-10, atol=1e-12)
    assert fit.intercept == pytest.approx(want[0])
    resid = y - np.hstack([np.ones((len(y), 1)), Z]) @ want
    assert fit.r2 == pytest.approx(1 - resid @ resid / ((y - y.mean()) @ (y - y.mean())))


def test_bootstrap_recovers_sign_and_covers_truth():
    names = ("a", "b", "c")
    covered, signs = 0, 0
    trials = 40
    for seed in range(trials):
        y, X, cl = _data(seed=seed)
        bf = cluster_bootstrap(y, X, names, cl, n_boot=200, seed=seed)
        lo, hi = bf.interval()
        true_std = np.array([0.3, -0.2, 0.0]) * X.std(0)  # the standardized coefficient
        covered += int(lo[0] <= true_std[0] <= hi[0])
        signs += int(lo[0] > 0 and hi[1] < 0)
    assert signs >= trials - 2  # the planted +/- effects are recovered
    assert 0.85 * trials <= covered  # roughly nominal 95 % coverage


def test_clusters_not_tokens_are_resampled():
    # Predictors and errors both correlated within a prompt: token-level resampling would give
    # too-narrow intervals; the clustered interval must be wider than a token-level one.
    y, X, cl = _data(cluster_sd=2.0, x_cluster_sd=1.0, seed=3)
    names = ("a", "b", "c")
    clustered = cluster_bootstrap(y, X, names, cl, n_boot=300, seed=0)
    token = cluster_bootstrap(y, X, names, np.arange(len(y)), n_boot=300, seed=0)
    w_c = np.subtract(*clustered.interval()[::-1])
    w_t = np.subtract(*token.interval()[::-1])
    assert clustered.n_clusters == 60 and token.n_clusters == len(y)
    assert w_c[0] > 1.3 * w_t[0]


def test_mean_diff_and_errors():
    rng = np.random.default_rng(0)
    cl = np.repeat(np.arange(30), 10)
    a = rng.random(300) < 0.5
    v = np.where(a, 1.0, 0.0) + rng.normal(size=300) * 0.1
    point, lo, hi = cluster_bootstrap_mean_diff(v, a, ~a, cl, n_boot=200)
    assert point == pytest.approx(1.0, abs=0.05) and lo < point < hi
    with pytest.raises(ValueError, match="'b' is constant"):
        standardize(np.c_[rng.normal(size=5), np.ones(5)], ("a", "b"))
    with pytest.raises(ValueError, match="at least 2 prompts"):
        cluster_bootstrap(v, rng.normal(size=(300, 1)), ("a",), np.zeros(300))
    assert winsorize(np.arange(101.0), 0.1).max() == pytest.approx(90.0)
