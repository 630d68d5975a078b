"""The miniature of the paper's Table 3 on the CPU toy pair.

    python launch/toy_sweep.py [--seeds 0 1 2] [--jobs 2] [--out runs/toy_sweep] [hydra overrides ...]

Trains the toy pair once per (selector, budget, loss, seed) of ``GRID``: full OPD, the paper's
selectors at rho = 0.10, teachability and random at 0.05 (the paper's headline budget and its
budget-matched control), teachability at 0.30, and the top-K forward KL loss (K + 1 bins) with
full and teachability at 0.05. Each run is ``python -m recipe.ta_opd.main`` in its own process
(``--jobs`` at a time, one torch thread each unless OMP_NUM_THREADS says otherwise; the first
run goes alone, so a missing toy pair is built once). A run whose summary.json exists is not
retrained. Writes table.md / table.csv / results.json: greedy accuracy on the held-out test
problems before and after, on the validation problems at the first evaluation during training
(``trainer.test_freq``), held-out KL(p_T || p_theta) after, the kept ratio and the share of kept
tokens with a negative advantage (mean over steps), mean ± std over seeds. With
``trainer.logger=[console,wandb]`` among the overrides every run logs to W&B, named after its
folder, in one group: the ``--out`` folder's name (``ta_opd.wandb_group=<name>`` sets another).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (selector, budget, loss)
GRID = [("full", 0.10, "pg_opd"), ("teachability", 0.10, "pg_opd"), ("teachability_entropy", 0.10, "pg_opd"),
        ("entropy", 0.10, "pg_opd"), ("tip", 0.10, "pg_opd"), ("random", 0.10, "pg_opd"),
        ("teachability", 0.05, "pg_opd"), ("random", 0.05, "pg_opd"), ("teachability", 0.30, "pg_opd"),
        ("full", 0.10, "topk_forward_kl"), ("teachability", 0.05, "topk_forward_kl")]


def _fmt(xs: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not xs:
        return "–"
    m = statistics.mean(xs)
    s = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def run_name(selector: str, budget: float, loss: str, seed: int) -> str:
    return f"{selector}_rho{budget}_{loss}_seed{seed}"


def wandb_overrides(out: Path, name: str, overrides: list[str]) -> list[str]:
    """With W&B on (a ``trainer.logger`` override), each run is named after its folder (the loss
    included, unlike the recipe's default name) and the sweep's runs share one group, the ``--out``
    folder's name, unless the overrides set ``ta_opd.wandb_group``."""
    group = [] if any(o.lstrip("+").startswith("ta_opd.wandb_group=") for o in overrides) else \
        [f"ta_opd.wandb_group='{out.name}'"]
    return [f"trainer.experiment_name=toy_{name}", *group]


def _train(out: Path, selector: str, budget: float, loss: str, seed: int, overrides: list[str]) -> dict:
    run_dir = out / run_name(selector, budget, loss, seed)
    summary = run_dir / "summary.json"
    trained = not summary.exists()
    if trained:
        cmd = [sys.executable, "-m", "recipe.ta_opd.main", f"ta_opd.selector={selector}", f"ta_opd.budget={budget}",
               f"ta_opd.loss={loss}", f"ta_opd.seed={seed}", f"trainer.default_local_dir={run_dir}",
               "trainer.logger=[]", *wandb_overrides(out, run_dir.name, overrides), *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0 or not summary.exists():
            raise RuntimeError(f"run {run_dir.name} failed (exit code {code}); see {run_dir.parent / run_dir.name}.log")
    return {**json.loads(summary.read_text()), "loss": loss, "trained_now": trained, **_curve(run_dir / "metrics.csv")}


def _curve(metrics: Path) -> dict:
    """First evaluation during training (step, accuracy) and the mean share of kept tokens with a
    negative advantage, from the run's metrics.csv."""
    out: dict = {"early_step": None, "early_accuracy": None, "kept_neg_adv": None}
    if not metrics.exists():
        return out
    rows = list(csv.DictReader(metrics.open()))
    evals = [r for r in rows if r.get("val/student_accuracy") and int(float(r["step"])) > 0]
    if evals:
        out["early_step"], out["early_accuracy"] = int(float(evals[0]["step"])), float(evals[0]["val/student_accuracy"])
    neg = [float(r["ta_opd/kept/neg_adv_fraction"]) for r in rows if r.get("ta_opd/kept/neg_adv_fraction")]
    out["kept_neg_adv"] = statistics.mean(neg) if neg else None
    return out


def tabulate(results: list[dict], grid: list[tuple] = GRID) -> list[dict]:
    rows = []
    for selector, budget, loss in grid:
        rs = [r for r in results if (r["selector"], r["budget"], r["loss"]) == (selector, budget, loss)]
        if not rs:
            continue
        early = [r["early_accuracy"] for r in rs if r["early_accuracy"] is not None]
        neg = [r["kept_neg_adv"] for r in rs if r["kept_neg_adv"] is not None]
        rows.append({"selector": selector, "budget": "–" if selector == "full" else budget, "loss": loss,
                     "seeds": len(rs), "accuracy_before": _fmt([r["student_accuracy_before"] for r in rs]),
                     "early_step": rs[0]["early_step"], "accuracy_early": _fmt(early),
                     "accuracy_after": _fmt([r["student_accuracy_after"] for r in rs]),
                     "heldout_kl_after": _fmt([r["heldout_kl_after"] for r in rs], 1.0, 3),
                     "kept_ratio": f"{statistics.mean(r['kept_ratio'] for r in rs):.3f}",
                     "kept_neg_adv": _fmt(neg, 100.0, 0),
                     "mean_wall_s": f"{statistics.mean(r['wall_seconds'] for r in rs):.0f}"})
    return rows


def _claim(out: Path, overrides: list[str], pair_key: str | None = None) -> None:
    """Finished runs in ``out`` are reused, so ``out`` must hold runs of the same settings: the
    overrides and the default toy pair (its cache key) are recorded in ``out/sweep.json`` and a
    later sweep into the same folder with different ones is refused. ``pair_key``: another pair's
    key in place of the toy's (launch/real_lm.py)."""
    from ta_opd.tools.toy.build import ToySpec

    meta = {"overrides": list(overrides), "toy_key": ToySpec().key()} if pair_key is None else \
        {"overrides": list(overrides), "pair_key": pair_key}
    f = out / "sweep.json"
    if f.exists():
        old = json.loads(f.read_text())
        if old != meta:
            raise SystemExit(f"[toy_sweep] error: --out {out} holds runs made with {old}, not {meta}; finished runs "
                             "are reused, so use another --out (or delete that folder)")
        return
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(meta, indent=2))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (each its own process)")
    p.add_argument("--out", default="runs/toy_sweep")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error(f"--jobs={a.jobs} is not allowed; it must be >= 1")
    return a


def main(argv=None, grid: list[tuple] = GRID, pair_key: str | None = None, first_alone: bool = True) -> None:
    """The sweep over ``grid`` ((selector, budget, loss) rows); launch/real_lm.py passes its own grid and pair,
    built before the sweep, so its first run need not go alone (``first_alone=False``)."""
    a = parse(argv)
    out = Path(a.out).resolve()
    _claim(out, a.overrides, pair_key)
    todo = [(s, b, loss, seed) for s, b, loss in grid for seed in a.seeds]
    t0 = time.time()

    def one(item):
        r = _train(out, *item, a.overrides)
        print(f"[sweep] {run_name(*item)}: accuracy {r['student_accuracy_before']:.3f} -> "
              f"{r['student_accuracy_after']:.3f} ({time.time() - t0:.0f}s elapsed)", flush=True)
        return r

    results = [one(todo[0])] if first_alone else []  # alone: builds the toy pair once if it is missing
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        results += list(pool.map(one, todo[len(results):]))
    rows = tabulate(results, grid)  # out was created by _claim
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    steps = {r["early_step"] for r in rows}
    early = f"step {steps.pop()}" if len(steps) == 1 and None not in steps else "the first evaluation"
    lines = [f"| selector | ρ | loss | test accuracy before (%) | validation accuracy at {early} (%) | "
             "test accuracy after (%) | held-out KL after | "
             "kept ratio | kept with A < 0 (%) | seeds |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['selector']} | {r['budget']} | {r['loss']} | {r['accuracy_before']} | {r['accuracy_early']} | "
              f"{r['accuracy_after']} | {r['heldout_kl_after']} | {r['kept_ratio']} | {r['kept_neg_adv']} | "
              f"{r['seeds']} |" for r in rows]
    lines.append(f"\nTeacher accuracy {100 * results[0]['teacher_accuracy']:.1f} %; {results[0]['eval_problems']} "
                 f"held-out test problems; {len(results)} runs, of which {sum(r['trained_now'] for r in results)} "
                 f"trained by this invocation ({a.jobs} at a time, {time.time() - t0:.0f} s); mean wall time per run "
                 f"{statistics.mean(r['wall_seconds'] for r in results):.0f} s.")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
