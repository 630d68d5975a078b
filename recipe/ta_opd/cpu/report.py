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


def plot(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    acc = [(r["step"], r["val/student_accuracy"]) for r in rows if "val/student_accuracy" in r]
    if acc:
        a1.plot(*zip(*acc), marker="o")
    a1.set_xlabel("step")
    a1.set_ylabel("validation greedy accuracy")
    a1.set_ylim(0, 1)
    a1.grid(alpha=0.3)
    kl = [(r["step"], r["ta_opd/kl/sampled_mean"]) for r in rows if "ta_opd/kl/sampled_mean" in r]
    if kl:
        a2.plot(*zip(*kl))
    a2.set_xlabel("step")
    a2.set_ylabel("KL, sampled-token estimate")
    a2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(path: Path, summary: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
