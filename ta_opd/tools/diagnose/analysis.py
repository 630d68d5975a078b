"""Statistics of the per-position table (paper Sections 3.3–3.4, Tables 2, 8, 9, Fig. 3–4).

All features are θ0's. The whole bank is one "batch" for the robust normalization, Q3 and the
budgeted selectors, exactly as a rollout batch is in training.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from ta_opd.budget import select_budget
from ta_opd.config import TAConfig
from ta_opd.tools.diagnose.regression import cluster_bootstrap, cluster_bootstrap_mean_diff, winsorize
from ta_opd.select import normalize_batch
from ta_opd.selectors import ScoreInputs, get_selector

SPECS = {  # regression specifications (Appendix F)
    "base": ("H", "D", "HxD", "position", "teacher_H"),
    "base+C": ("H", "D", "HxD", "position", "teacher_H", "C"),
    "decomposed": ("H", "DL", "DI", "position", "teacher_H"),
}
SELECTORS = ("teachability", "divergence", "entropy", "tip", "compatibility", "incompatible", "random",
             "q3_teachability")


def features(df: pd.DataFrame, k: int, cfg: TAConfig = TAConfig()) -> pd.DataFrame:
    """θ0 features at support size k, normalized over the whole bank (Eq. 11-12), plus Q3."""
    t = lambda c: torch.tensor(df[c].to_numpy(), dtype=torch.float32).unsqueeze(0)  # noqa: E731  (1, N)
    D, C, H = t(f"D_k{k}"), t(f"C_k{k}"), t("H")
    norm = normalize_batch(D, C, H, torch.ones_like(D, dtype=torch.bool), cfg)
    return pd.DataFrame({
        "H": df["H"].to_numpy(), "D": df[f"D_k{k}"].to_numpy(), "C": df[f"C_k{k}"].to_numpy(),
        "HxD": (norm.H * norm.D)[0].numpy(), "position": df["position_norm"].to_numpy(),
        "teacher_H": df["teacher_H"].to_numpy(), "DL": norm.DL[0].numpy(), "DI": norm.DI[0].numpy(),
        "Dn": norm.D[0].numpy(), "Cn": norm.C[0].numpy(), "Hn": norm.H[0].numpy(), "q3": norm.q3[0].numpy(),
    })


def regressions(df: pd.DataFrame, ks, *, outcome: str = "gain", n_boot: int = 1000, seed: int = 0,
                winsor: float | None = None) -> pd.DataFrame:
    y = df[outcome].to_numpy(dtype=np.float64)
    if winsor is not None:
        y = winsorize(y, winsor)
    clusters = df["prompt_id"].to_numpy()
    rows = []
    for k in ks:
        f = features(df, k)
        base_r2 = None
        for spec, names in SPECS.items():
            bf = cluster_bootstrap(y, f[list(names)].to_numpy(), names, clusters, n_boot=n_boot, seed=seed)
            lo, hi = bf.interval()
            base_r2 = bf.fit.r2 if spec == "base" else base_r2
            for i, name in enumerate(names):
                rows.append({"K": k, "spec": spec, "predictor": name, "coef": bf.fit.coef[i], "ci_low": lo[i],
                             "ci_high": hi[i], "r2": bf.fit.r2, "delta_r2": bf.fit.r2 - base_r2,
                             "n": bf.fit.n, "prompts": bf.n_clusters})
            if spec == "decomposed":  # the D^L - D^I gap with its own interval
                gap = bf.samples[:, names.index("DL")] - bf.samples[:, names.index("DI")]
                rows.append({"K": k, "spec": spec, "predictor": "DL-DI", "coef": bf.fit.coef[1] - bf.fit.coef[2],
                             "ci_low": np.quantile(gap, 0.025), "ci_high": np.quantile(gap, 0.975), "r2": bf.fit.r2,
                             "delta_r2": bf.fit.r2 - base_r2, "n": bf.fit.n, "prompts": bf.n_clusters})
    return pd.DataFrame(rows)


def _tertiles(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.quantile(x, [1 / 3, 2 / 3])
    return x >= hi, x <= lo


def q3_contrasts(df: pd.DataFrame, ks, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Inside Q3: gain of high vs low D^L, high vs low D^I, high vs low C (tertiles within Q3)."""
    rows = []
    for k in ks:
        f = features(df, k)
        q3 = f["q3"].to_numpy()
        if q3.sum() < 6:
            continue
        g, cl = df["gain"].to_numpy()[q3], df["prompt_id"].to_numpy()[q3]
        for name, col in (("high vs low D^L", "DL"), ("high vs low D^I", "DI"), ("high vs low C", "C")):
            hi, lo = _tertiles(f[col].to_numpy()[q3])
            point, a, b = cluster_bootstrap_mean_diff(g, hi, lo, cl, n_boot=n_boot, seed=seed)
            rows.append({"K": k, "contrast": name, "gain_gap": point, "ci_low": a, "ci_high": b,
                         "q3_positions": int(q3.sum()), "mean_gain_high": float(g[hi].mean()),
                         "mean_gain_low": float(g[lo].mean())})
    return pd.DataFrame(rows)


def buckets(df: pd.DataFrame, k: int, n_buckets: int = 10) -> pd.DataFrame:
    """Mean gain by quantile bucket of C, D and D^I (Fig. 4D)."""
    f = features(df, k)
    rows = []
    for col in ("C", "D", "DI"):
        x = f[col].to_numpy()
        ranks = pd.Series(x).rank(method="first").to_numpy()
        b = np.minimum((ranks - 1) * n_buckets // len(x), n_buckets - 1).astype(int)
        for i in range(n_buckets):
            m = b == i
            rows.append({"feature": col, "bucket": i, "mean_feature": float(x[m].mean()),
                         "mean_gain": float(df["gain"].to_numpy()[m].mean()), "positions": int(m.sum())})
    return pd.DataFrame(rows)


def selector_check(df: pd.DataFrame, k: int, budgets=(0.03, 0.05, 0.10), selectors=SELECTORS,
                   seed: int = 0) -> pd.DataFrame:
    """Keep exactly the top-N bank positions per selector and budget (Tables 2 and 8)."""
    f = features(df, k)
    g = df["gain"].to_numpy()
    n = len(g)
    t = lambda c: torch.tensor(f[c].to_numpy(), dtype=torch.float32).unsqueeze(0)  # noqa: E731
    valid = torch.ones(1, n, dtype=torch.bool)
    inputs = ScoreInputs(D=t("Dn"), C=t("Cn"), H=t("Hn"), valid=valid, seed=seed, step=0)
    rows = []
    for name in selectors:
        sel = get_selector(name)
        scores = sel.score(inputs)
        for rho in budgets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a Q3 shortfall is reported in the table
                res = select_budget(scores, valid, rho, candidates=t("q3").bool() if sel.q3 else None)
            kept = res.mask[0].numpy()
            rows.append({"selector": name, "budget": rho, "kept": int(kept.sum()), "keep_ratio": kept.mean(),
                         "mean_gain_kept": float(g[kept].mean()), "gain_sum_per_position": float(g[kept].sum() / n)})
    return pd.DataFrame(rows)
