"""Diagnostic report: CSV tables, a markdown summary and PNG figures (paper Fig. 2, 3A, 3B, 4D)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ta_opd.tools.diagnose.analysis import features


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)


def plane(df: pd.DataFrame, k: int, path: Path) -> None:
    """Entropy–divergence plane coloured by D^L and D^I (Fig. 2)."""
    plt = _plt()
    f = features(df, k)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, col, title in ((axes[0], "DL", "learnable D^L"), (axes[1], "DI", "incompatible D^I")):
        sc = ax.scatter(f["Hn"], f["Dn"], c=f[col], s=4, cmap="viridis", vmin=0, vmax=1)
        ax.set_xlabel("normalized student entropy H̃")
        ax.set_title(f"{title} (K={k})")
        fig.colorbar(sc, ax=ax)
    axes[0].set_ylabel("normalized disagreement D̃")
    _save(fig, path)


def coefficients(reg: pd.DataFrame, path: Path) -> None:
    """Standardized coefficients of D^L and D^I with prompt-clustered intervals, per K (Fig. 3A)."""
    plt = _plt()
    d = reg[(reg.spec == "decomposed") & reg.predictor.isin(["DL", "DI"])]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for j, (name, g) in enumerate(d.groupby("predictor")):
        x = [i + (j - 0.5) * 0.25 for i in range(len(g))]
        ax.errorbar(x, g.coef, yerr=[g.coef - g.ci_low, g.ci_high - g.coef], fmt="o", capsize=3, label=name)
        ax.set_xticks(range(len(g)), [f"K={k}" for k in g.K])
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("standardized coefficient on gain")
    ax.legend()
    _save(fig, path)


def q3_bars(q3: pd.DataFrame, path: Path) -> None:
    """Gain gaps inside Q3 with intervals (Fig. 3B)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r.contrast}\nK={r.K}" for r in q3.itertuples()]
    ax.bar(range(len(q3)), q3.gain_gap, yerr=[q3.gain_gap - q3.ci_low, q3.ci_high - q3.gain_gap], capsize=3)
    ax.set_xticks(range(len(q3)), labels, fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("gain gap (high - low tertile)")
    _save(fig, path)


def bucket_lines(b: pd.DataFrame, path: Path) -> None:
    """Mean gain against quantile buckets of C, D, D^I (Fig. 4D)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, g in b.groupby("feature"):
        ax.plot(g.bucket, g.mean_gain, marker="o", label=name)
    ax.set_xlabel("bucket (quantiles of the feature)")
    ax.set_ylabel("mean gain")
    ax.legend()
    _save(fig, path)


def markdown(reg: pd.DataFrame, q3: pd.DataFrame, sel: pd.DataFrame, n_pos: int, n_prompts: int) -> str:
    lines = [f"# Fixed-context diagnostic\n\n{n_pos} positions from {n_prompts} prompts; features at θ0; "
             "gain G = KL(p_T‖p_θ0) − KL(p_T‖p_θτ); 95 % prompt-clustered bootstrap intervals.\n",
             "## D^L vs D^I (decomposed regression)\n", "| K | D^L | D^I | D^L − D^I | ΔR² vs base |", "|---|---|---|---|---|"]
    d = reg[reg.spec == "decomposed"]
    for k, g in d.groupby("K"):
        c = {r.predictor: r for r in g.itertuples()}
        fmt = lambda r: f"{r.coef:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}]"  # noqa: E731
        lines.append(f"| {k} | {fmt(c['DL'])} | {fmt(c['DI'])} | {fmt(c['DL-DI'])} | {c['DL'].delta_r2:+.2e} |")
    lines += ["\n## Inside Q3\n", "| K | contrast | gain gap | 95 % CI |", "|---|---|---|---|"]
    lines += [f"| {r.K} | {r.contrast} | {r.gain_gap:+.4f} | [{r.ci_low:+.4f}, {r.ci_high:+.4f}] |" for r in q3.itertuples()]
    lines += ["\n## Fixed-context selector check (exact top-N)\n",
              "| selector | budget | kept | mean gain of kept | Σ gain kept / positions |", "|---|---|---|---|---|"]
    lines += [f"| {r.selector} | {r.budget} | {r.kept} | {r.mean_gain_kept:+.4f} | {r.gain_sum_per_position:+.5f} |"
              for r in sel.itertuples()]
    return "\n".join(lines) + "\n"
