"""TA-OPD on the real-LM pair (docs/real_lm.md): the seeded comparison and the fixed-context diagnostic.

    python launch/real_lm.py compare  [--seeds 0 1 2] [--jobs 2] [--steps 12] [--lr 4e-6] [--out runs/real_lm]
    python launch/real_lm.py diagnose [--out runs/real_lm]     # after compare: θτ = full OPD, seed 0

Both reuse existing commands. ``compare`` is launch/toy_sweep.py's sweep (``toy_sweep.main`` with
:data:`GRID` and the real pair's cache key): one ``python -m recipe.ta_opd.main`` per (setting,
seed) on the pair of ``python -m ta_opd.tools.real_pair.build`` (built first if absent), finished
runs reused, table.md / table.csv / results.json with mean ± std over seeds; then
:func:`curves` averages the runs' metrics.csv into curves.csv / curves.png (held-out KL and
accuracy against step). ``diagnose`` is ``python -m ta_opd.tools.diagnose`` with θ0 = the
published student, θτ = the full-OPD seed-0 run's last checkpoint, the teacher, and a bank
sampled from θ0 itself (``--prompts``: the initial student's own rollouts of training prompts),
K 8/16/32, budgets 5 %/10 %.

Learning rate (``--lr``, default 4e-6): the paper trains 1.7B–4B students (hidden width 2,048–2,560)
with AdamW at 1e-6. Adam's stable step size scales about as 1/width (μP), and SmolLM2-135M's width
is 576, so the paper's rate transfers to 1e-6 × 2,048/576 ≈ 3.6e-6 … 1e-6 × 2,560/576 ≈ 4.4e-6:
4e-6. It is not tuned here; the toy needed 1e-4, and a rate at which the held-out KL does not move
within ``--steps`` says the budget is too small, not that the selectors tie.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
sys.path.insert(0, str(ROOT))

import toy_sweep  # noqa: E402  (launch/ is a folder of scripts, not a package)

# (selector, budget, loss): full OPD, teachability at the paper's 5 % and 10 %, the budget-matched controls
GRID = [("full", 0.10, "pg_opd"), ("teachability", 0.05, "pg_opd"), ("teachability", 0.10, "pg_opd"),
        ("random", 0.10, "pg_opd"), ("entropy", 0.10, "pg_opd")]
# held-out KL and accuracy at each evaluation; the training batch's sampled KL at every step (new prompts each step)
CURVE_KEYS = ("ta_opd/heldout/kl", "val/student_accuracy", "ta_opd/kl/sampled_mean")


def pair_overrides(pair, steps: int, lr: float, prompts: int, samples: int, eval_size: int, kl_prompts: int) -> list[str]:
    """The recipe's overrides for the pair: its folders and data (accuracy on the held-out test
    problems), response length = the build's evaluation length, a checkpoint at the last step, and
    no gradient checkpointing (a 135M student's activations for 8 short rollouts are a few hundred
    MB; recomputing them would cost a third forward per update)."""
    if steps < 2:
        raise SystemExit(f"[real_lm] error: --steps={steps} is not allowed; it must be >= 2 (an evaluation mid-way)")
    length = pair.manifest["eval"]["student_greedy"]["max_new_tokens"]
    return [f"actor_rollout_ref.model.path={pair.student}", f"ta_opd.teacher_model_path={pair.teacher}",
            f"data.train_files={pair.train_file}", f"data.val_files={pair.test_file}",
            f"data.train_batch_size={prompts}", f"actor_rollout_ref.rollout.n={samples}",
            f"data.max_response_length={length}", f"actor_rollout_ref.actor.optim.lr={lr}",
            f"trainer.total_training_steps={steps}", f"trainer.test_freq={max(1, steps // 2)}",
            f"trainer.save_freq={steps}", f"ta_opd.cpu.eval_size={eval_size}",
            f"ta_opd.cpu.heldout_kl_prompts={kl_prompts}", "ta_opd.cpu.eval_batch_size=50",
            "actor_rollout_ref.model.enable_gradient_checkpointing=false"]


def sweep_argv(out: Path, jobs: int, seeds: list[int], overrides: list[str]) -> list[str]:
    """toy_sweep's command line: ``--seeds`` takes one or more values, so it goes first (after it
    the overrides would be read as seeds)."""
    return ["--seeds", *map(str, seeds), "--out", str(out), "--jobs", str(jobs), *overrides]


def curves(out: Path, grid: list[tuple], seeds: list[int]) -> list[dict]:
    """Mean ± std over seeds of each CURVE_KEYS metric per step and setting, from the runs'
    metrics.csv; written to out/curves.csv and out/curves.png."""
    rows = []
    for selector, budget, loss in grid:
        per_step = defaultdict(lambda: defaultdict(list))
        for seed in seeds:
            f = out / toy_sweep.run_name(selector, budget, loss, seed) / "metrics.csv"
            for r in csv.DictReader(f.open()) if f.exists() else []:
                for k in CURVE_KEYS:
                    if r.get(k):
                        per_step[int(float(r["step"]))][k].append(float(r[k]))
        for step in sorted(per_step):
            for k, xs in per_step[step].items():
                rows.append({"selector": selector, "budget": budget, "step": step, "metric": k, "seeds": len(xs),
                             "mean": statistics.mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0})
    if rows:
        with open(out / "curves.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        _plot(out / "curves.png", rows)
    return rows


def comparison(out: Path, grid: list[tuple], seeds: list[int]) -> list[dict]:
    """The comparison table from the runs' summary.json, mean ± std over seeds: held-out KL before /
    after / change on each seed's fixed samples, the change minus full OPD's change and minus random
    selection's at the same ρ, ON THE SAME SEED (same initial student samples, same first rollouts:
    paired contrasts), test accuracy before / after, kept ratio, wall time. Written to
    out/comparison.md and out/comparison.csv."""
    runs = {}
    for selector, budget, loss in grid:
        for seed in seeds:
            f = out / toy_sweep.run_name(selector, budget, loss, seed) / "summary.json"
            if f.exists():
                runs[selector, budget, loss, seed] = json.loads(f.read_text())
    full = {seed: s for (sel, _, _, seed), s in runs.items() if sel == "full"}
    rand = {(b, seed): s for (sel, b, _, seed), s in runs.items() if sel == "random"}
    def _ms(xs):  # mean ± std in nats / as a share, toy_sweep's format
        return toy_sweep._fmt(xs, 1.0, 3)

    rows = []
    for selector, budget, loss in grid:
        rs = {seed: runs[selector, budget, loss, seed] for seed in seeds if (selector, budget, loss, seed) in runs}
        if not rs:
            continue
        vs_full = [s["heldout_kl_change"] - full[seed]["heldout_kl_change"] for seed, s in rs.items() if seed in full]
        vs_rand = [s["heldout_kl_change"] - rand[budget, seed]["heldout_kl_change"] for seed, s in rs.items()
                   if (budget, seed) in rand]
        rows.append({
            "setting": "full OPD" if selector == "full" else f"{selector} {budget:.0%}", "seeds": len(rs),
            "heldout_kl_before": _ms([s["heldout_kl_before"] for s in rs.values()]),
            "heldout_kl_after": _ms([s["heldout_kl_after"] for s in rs.values()]),
            "heldout_kl_change": _ms([s["heldout_kl_change"] for s in rs.values()]),
            "change_minus_full": "–" if selector == "full" else _ms(vs_full),
            "change_minus_random": "–" if selector in ("full", "random") else _ms(vs_rand),
            "accuracy_before": _ms([s["student_accuracy_before"] for s in rs.values()]),
            "accuracy_after": _ms([s["student_accuracy_after"] for s in rs.values()]),
            "kept_ratio": f"{statistics.mean(s['kept_ratio'] for s in rs.values()):.3f}",
            "wall_s": f"{statistics.mean(s['wall_seconds'] for s in rs.values()):.0f}"})
    if rows:
        with open(out / "comparison.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        head = ["setting", "seeds", "held-out KL before", "held-out KL after", "change", "change − full OPD's",
                "change − random's (same ρ)", "test accuracy before", "test accuracy after", "kept ratio", "wall s / run"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
        (out / "comparison.md").write_text("\n".join(lines) + "\n")
    return rows


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(5 * len(CURVE_KEYS), 4))
    for ax, key in zip(axes, CURVE_KEYS):
        for name in dict.fromkeys((r["selector"], r["budget"]) for r in rows):
            rs = [r for r in rows if (r["selector"], r["budget"]) == name and r["metric"] == key]
            if not rs:
                continue
            x, m, s = [r["step"] for r in rs], [r["mean"] for r in rs], [r["std"] for r in rs]
            label = "full OPD" if name[0] == "full" else f"{name[0]} {name[1]:.0%}"
            ax.errorbar(x, m, yerr=s, label=label, capsize=3, marker="o")
        ax.set_xlabel("step")
        ax.set_title(key)
    axes[0].legend()
    fig.suptitle("real-LM pair (SmolLM2-135M-Instruct), mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def diagnose(out: Path, pair, steps: int, n_prompts: int, per_prompt: int) -> int:
    """``python -m ta_opd.tools.diagnose`` on a bank sampled from θ0 (the initial student)."""
    ckpt = out / toy_sweep.run_name("full", 0.10, "pg_opd", 0) / "checkpoints" / f"global_step_{steps}" / "actor"
    if not ckpt.is_dir():
        raise SystemExit(f"[real_lm] error: {ckpt} does not exist; run `python launch/real_lm.py compare --steps {steps}` "
                         "first (θτ is its full-OPD seed-0 run)")
    import pandas as pd

    # the diagnostic samples --max-responses prompts' worth of rows, then scores --max-responses
    # responses: hand it exactly the bank's prompts so every sampled response is scored
    prompts = out / "diagnose_prompts.parquet"
    out.mkdir(parents=True, exist_ok=True)
    pd.read_parquet(pair.train_file).head(n_prompts).to_parquet(prompts)
    length = pair.manifest["eval"]["student_greedy"]["max_new_tokens"]
    cmd = [sys.executable, "-m", "ta_opd.tools.diagnose", "--theta0", str(pair.student), "--theta-tau", str(ckpt),
           "--teacher", str(pair.teacher), "--prompts", str(prompts), "--responses-per-prompt", str(per_prompt),
           "--max-responses", str(n_prompts * per_prompt), "--max-tokens", str(length), "--ks", "8", "16", "32",
           "--budgets", "0.05", "0.10", "--out", str(out / "diagnose")]
    print("[real_lm] " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["compare", "diagnose"])
    p.add_argument("--out", default="runs/real_lm")
    p.add_argument("--cache-dir", default=None, help="the real pair's cache (python -m ta_opd.tools.real_pair.build)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=4e-6)
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (data.train_batch_size)")
    p.add_argument("--samples", type=int, default=4, help="samples per prompt (actor_rollout_ref.rollout.n)")
    p.add_argument("--eval-size", type=int, default=64, help="held-out test problems per evaluation")
    p.add_argument("--kl-prompts", type=int, default=64,
                   help="fixed prompts of the held-out KL (the recipe warns below 64)")
    p.add_argument("--bank-prompts", type=int, default=64, help="diagnose: training prompts in the bank")
    p.add_argument("--bank-per-prompt", type=int, default=4, help="diagnose: θ0 samples per prompt")
    p.add_argument("overrides", nargs="*", help="more hydra overrides for every run")
    a = p.parse_args(argv)
    from ta_opd.tools.real_pair.build import build_cached

    pair = build_cached(a.cache_dir)
    out = Path(a.out).resolve()
    if a.what == "diagnose":
        return diagnose(out, pair, a.steps, a.bank_prompts, a.bank_per_prompt)
    over = pair_overrides(pair, a.steps, a.lr, a.prompts, a.samples, a.eval_size, a.kl_prompts) + a.overrides
    toy_sweep.main(sweep_argv(out, a.jobs, a.seeds, over), grid=GRID, pair_key=pair.root.name, first_alone=False)
    curves(out, GRID, a.seeds)
    if comparison(out, GRID, a.seeds):
        print((out / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
