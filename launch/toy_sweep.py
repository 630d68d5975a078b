"""The miniature of the paper's Table 3 on the CPU toy pair.

    python launch/toy_sweep.py [--seeds 0 1 2] [--out runs/toy_sweep] [hydra overrides ...]

Trains the same toy pair with full, teachability, teachability_entropy, entropy, tip and random
at rho = 0.10, plus teachability at 0.05 and 0.30, for each seed (ta_opd.seed seeds rollouts,
data order and the random selector), then writes table.md and table.csv (held-out greedy
accuracy mean ± std over seeds, kept ratio). Runs are resumable: a finished run is not retrained.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipe" / "ta_opd" / "config"
GRID = [("full", 0.10), ("teachability", 0.10), ("teachability_entropy", 0.10), ("entropy", 0.10), ("tip", 0.10),
        ("random", 0.10), ("teachability", 0.05), ("teachability", 0.30)]


def _fmt(xs: list[float]) -> str:
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/toy_sweep")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    from recipe.ta_opd.main import run

    out = Path(a.out)
    results = []
    t0 = time.time()
    for selector, budget in GRID:
        for seed in a.seeds:
            run_dir = out / f"{selector}_rho{budget}_seed{seed}"
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
                cfg = compose("ta_opd_trainer", overrides=[
                    f"ta_opd.selector={selector}", f"ta_opd.budget={budget}", f"ta_opd.seed={seed}",
                    f"trainer.default_local_dir={run_dir}", "trainer.logger=[]", *a.overrides])
            s = run(cfg)
            results.append(s)
            print(f"[sweep] {selector} rho={budget} seed={seed}: accuracy {s['student_accuracy_before']:.3f} -> "
                  f"{s['student_accuracy_after']:.3f} ({time.time() - t0:.0f}s elapsed)", flush=True)
    rows = []
    for selector, budget in GRID:
        rs = [r for r in results if r["selector"] == selector and r["budget"] == budget]
        rows.append({"selector": selector, "budget": budget, "seeds": len(rs),
                     "accuracy_after": _fmt([r["student_accuracy_after"] for r in rs]),
                     "accuracy_before": _fmt([r["student_accuracy_before"] for r in rs]),
                     "kept_ratio": f"{statistics.mean(r['kept_ratio'] for r in rs):.3f}",
                     "teacher_accuracy": f"{100 * rs[0]['teacher_accuracy']:.1f}",
                     "mean_wall_s": f"{statistics.mean(r['wall_seconds'] for r in rs):.0f}"})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| selector | ρ | held-out accuracy after (%) | before (%) | kept ratio | seeds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['selector']} | {r['budget']} | {r['accuracy_after']} | {r['accuracy_before']} | "
              f"{r['kept_ratio']} | {r['seeds']} |" for r in rows]
    lines.append(f"\nTeacher accuracy {rows[0]['teacher_accuracy']} %; {results[0]['eval_problems']} held-out problems; "
                 f"total {time.time() - t0:.0f} s.")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
