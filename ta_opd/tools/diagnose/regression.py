"""Standardized OLS with prompt-clustered bootstrap intervals (paper Appendix F).

Predictors are z-scored within the diagnostic dataset (the outcome, the gain G, stays in its own
units, so a coefficient is "gain per standard deviation of the predictor"); an intercept is
always fitted. Intervals resample PROMPTS (clusters) with replacement, never single tokens,
because gains are correlated within a rollout. The bootstrap works on per-cluster sufficient
statistics (X'X, X'y, y'y, n), so 1,000 refits cost O(clusters · p²) each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OLSFit:
    names: tuple[str, ...]  # predictor names (intercept excluded)
    coef: np.ndarray  # (p,) standardized coefficients
    intercept: float
    r2: float
    n: int


@dataclass(frozen=True)
class BootstrapFit:
    fit: OLSFit
    samples: np.ndarray  # (n_boot, p) coefficients refitted on resampled clusters
    r2_samples: np.ndarray  # (n_boot,)
    n_clusters: int

    def interval(self, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        a = (1 - level) / 2
        return np.quantile(self.samples, a, axis=0), np.quantile(self.samples, 1 - a, axis=0)


def standardize(X: np.ndarray, names: tuple[str, ...]) -> np.ndarray:
    """Column z-scores; a constant column is an error naming it (its coefficient is undefined)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(names):
        raise ValueError(f"design has shape {X.shape}, expected (n, {len(names)}) for predictors {names}")
    if not np.isfinite(X).all():
        bad = names[int(np.where(~np.isfinite(X).all(0))[0][0])]
        raise ValueError(f"predictor {bad!r} has non-finite values")
    sd = X.std(axis=0)
    if (sd == 0).any():
        raise ValueError(f"predictor {names[int(np.argmin(sd))]!r} is constant; it cannot be standardized")
    return (X - X.mean(axis=0)) / sd


def winsorize(y: np.ndarray, q: float) -> np.ndarray:
    """Clip y to its [q, 1 - q] quantiles (an option for heavy-tailed gains)."""
    if not 0 <= q < 0.5:
        raise ValueError(f"winsorize quantile {q} must be in [0, 0.5)")
    lo, hi = np.quantile(y, [q, 1 - q])
    return np.clip(y, lo, hi)


def _design(Z: np.ndarray) -> np.ndarray:
    return np.hstack([np.ones((Z.shape[0], 1)), Z])


def _solve(xtx: np.ndarray, xty: np.ndarray, yty: float, ysum: float, n: float) -> tuple[np.ndarray, float]:
    beta = np.linalg.solve(xtx, xty)
    sse = yty - 2 * beta @ xty + beta @ xtx @ beta
    sst = yty - ysum**2 / n
    return beta, (1 - sse / sst) if sst > 0 else float("nan")


def ols(y: np.ndarray, X: np.ndarray, names: tuple[str, ...]) -> OLSFit:
    """OLS of y on standardized X (plus intercept)."""
    y = np.asarray(y, dtype=np.float64)
    D = _design(standardize(X, names))
    beta, r2 = _solve(D.T @ D, D.T @ y, float(y @ y), float(y.sum()), len(y))
    return OLSFit(tuple(names), beta[1:], float(beta[0]), float(r2), len(y))


def cluster_bootstrap(y: np.ndarray, X: np.ndarray, names: tuple[str, ...], clusters: np.ndarray, *,
                      n_boot: int = 1000, seed: int = 0) -> BootstrapFit:
    """OLS plus ``n_boot`` refits on clusters resampled with replacement (seeded).

    Predictors are standardized once on the full data, so every refit reports coefficients on
    the same scale."""
    y = np.asarray(y, dtype=np.float64)
    D = _design(standardize(X, names))
    _, cid = np.unique(np.asarray(clusters), return_inverse=True)
    g = cid.max() + 1
    if g < 2:
        raise ValueError("the clustered bootstrap needs at least 2 prompts (clusters)")
    p1 = D.shape[1]
    xtx = np.zeros((g, p1, p1))
    np.add.at(xtx, cid, D[:, :, None] * D[:, None, :])
    xty = np.zeros((g, p1))
    np.add.at(xty, cid, D * y[:, None])
    yty = np.bincount(cid, weights=y * y, minlength=g)
    ysum = np.bincount(cid, weights=y, minlength=g)
    cnt = np.bincount(cid, minlength=g).astype(np.float64)
    fit = ols(y, X, names)
    rng = np.random.default_rng(seed)
    samples = np.empty((n_boot, p1 - 1))
    r2s = np.empty(n_boot)
    for b in range(n_boot):
        w = np.bincount(rng.integers(0, g, g), minlength=g).astype(np.float64)  # cluster multiplicities
        beta, r2 = _solve(np.tensordot(w, xtx, 1), w @ xty, float(w @ yty), float(w @ ysum), float(w @ cnt))
        samples[b], r2s[b] = beta[1:], r2
    return BootstrapFit(fit, samples, r2s, g)


def cluster_bootstrap_mean_diff(values: np.ndarray, group_a: np.ndarray, group_b: np.ndarray, clusters: np.ndarray,
                                *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """mean(values[a]) - mean(values[b]) with a prompt-clustered bootstrap 95 % interval."""
    v = np.asarray(values, dtype=np.float64)
    _, cid = np.unique(np.asarray(clusters), return_inverse=True)
    g = cid.max() + 1
    sums = [np.bincount(cid, weights=v * m, minlength=g) for m in (group_a, group_b)]
    cnts = [np.bincount(cid, weights=m.astype(np.float64), minlength=g) for m in (group_a, group_b)]
    if cnts[0].sum() == 0 or cnts[1].sum() == 0:
        raise ValueError("both groups need at least one position")
    point = sums[0].sum() / cnts[0].sum() - sums[1].sum() / cnts[1].sum()
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, g, g), minlength=g)
        ca, cb = w @ cnts[0], w @ cnts[1]
        if ca > 0 and cb > 0:
            diffs.append((w @ sums[0]) / ca - (w @ sums[1]) / cb)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return float(point), float(lo), float(hi)
