"""Run outputs: metrics CSV, accuracy/KL plot, summary.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _series(rows: list[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def plot(path: Path, rows: list[dict], title: str) -> None:
    """Left: held-out task accuracy (absent when no data source is scorable). Right: the held-out
    teacher–student KL (full vocabulary, and its sampled-token estimate) at each evaluation with its
    95 % bootstrap interval over prompts (vertical bars), and the training rollouts' sampled-token KL
    per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    acc = _series(rows, "val/student_accuracy")
    if acc:
        a1.plot(*zip(*acc), marker="o")
    else:
        a1.text(0.5, 0.5, "no scorer for these data sources", ha="center", va="center", transform=a1.transAxes)
    a1.set_xlabel("step")
    a1.set_ylabel("validation greedy accuracy")
    a1.set_ylim(0, 1)
    a1.grid(alpha=0.3)
    for key, label, style in (("ta_opd/kl/sampled_mean", "training rollouts, KL(p_θ||p_T) sampled-token est.", "-"),
                              ("ta_opd/heldout/kl", "held-out KL(p_T||p_θ), full vocabulary", "o-"),
                              ("ta_opd/heldout/kl_sampled", "held-out KL(p_θ||p_T), sampled-token estimate", "s--")):
        series = _series(rows, key)
        if series:
            line, = a2.plot(*zip(*series), style, label=label, markersize=4)
            band = [(r["step"], r[f"{key}_lo"], r[f"{key}_hi"]) for r in rows if r.get(f"{key}_lo") is not None]
            if band:  # the 95 % bootstrap interval over held-out prompts (cpu/evaluate.py)
                x, lo, hi = zip(*band)
                a2.vlines(x, lo, hi, colors=line.get_color(), alpha=0.6)
    a2.set_xlabel("step")
    a2.set_ylabel("teacher–student KL (nats/token)")
    a2.legend(fontsize=7)
    a2.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(path: Path, summary: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
