"""Time per step and peak memory of the CPU backend on a ~100M-parameter pair (README: "Train
your own pair on CPU").

Builds, in a temporary folder, a SmolLM-135M-shaped pair from config (`benchmarks/own_pair.py`:
49,152-token byte-level BPE vocabulary without a pad token, ChatML template; teacher 30 layers,
135M parameters; student 20 of them, ~100M), then runs the real entry point
(`python -m recipe.ta_opd.main`) on it with the overrides printed below and reports, from its
metrics.csv, the seconds per training step (rollout, teacher + scoring, update) and the peak RSS
of the run. Randomly initialized models never emit EOS, so every response runs to
``data.max_response_length``: a worst case for the token count.

    python benchmarks/bench_own_pair.py [--steps 2] [--prompts 2] [--n 4] [--max-response 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--prompts", type=int, default=2, help="data.train_batch_size")
    p.add_argument("--n", type=int, default=4, help="actor_rollout_ref.rollout.n")
    p.add_argument("--max-response", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", default=None, help="build the pair here and keep it (default: a temporary folder)")
    a = p.parse_args()

    from benchmarks.own_pair import SMOL_ARCH, build_pair

    tmp = Path(a.keep or tempfile.mkdtemp(prefix="ta_opd_bench_own_"))
    t0 = time.time()
    if not (tmp / "student" / "config.json").exists():
        build_pair(tmp, vocab_size=49152, arch=SMOL_ARCH, teacher_layers=30, student_layers=20, n_train=64, n_val=8,
                   max_len=2048)
    build_s = time.time() - t0
    from transformers import AutoConfig

    params = {}
    for name in ("teacher", "student"):
        c = AutoConfig.from_pretrained(tmp / name)
        h, f, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
        kv = c.num_key_value_heads * (h // c.num_attention_heads)
        params[name] = V * h + L * (2 * h * h + 2 * h * kv + 3 * h * f + 2 * h) + h  # tied embeddings
    overrides = [
        f"actor_rollout_ref.model.path={tmp / 'student'}", f"ta_opd.teacher_model_path={tmp / 'teacher'}",
        f"data.train_files={tmp / 'data' / 'train.parquet'}", f"data.val_files={tmp / 'data' / 'val.parquet'}",
        f"data.train_batch_size={a.prompts}", f"actor_rollout_ref.rollout.n={a.n}",
        f"data.max_response_length={a.max_response}", "actor_rollout_ref.actor.optim.lr=1e-6",
        f"trainer.total_training_steps={a.steps}", "trainer.test_freq=0", "trainer.save_freq=0",
        "ta_opd.cpu.eval_size=4", "ta_opd.cpu.heldout_kl_prompts=4", "ta_opd.cpu.eval_batch_size=4",
        f"ta_opd.cpu.num_threads={a.threads}", f"trainer.default_local_dir={tmp / 'run'}", "trainer.logger=[]",
        "trainer.resume_mode=disable",  # with --keep, a finished run there would be left as is, not measured again
    ]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    t1 = time.time()
    res = subprocess.run([sys.executable, "-m", "recipe.ta_opd.main", *overrides], cwd=tmp, env=env,
                         capture_output=True, text=True)
    wall = time.time() - t1
    if res.returncode:
        sys.exit(res.stderr[-3000:])
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    rss_gb = usage.ru_maxrss / 2**20  # KiB -> GiB (Linux)
    cpu_s = usage.ru_utime + usage.ru_stime  # CPU time of the run: less sensitive to other load than wall time
    rows = [r for r in csv.DictReader(open(tmp / "run" / "metrics.csv")) if r.get("ta_opd/timing/rollout_s")]
    import torch

    print(f"torch {torch.__version__}, threads {a.threads}, teacher {params['teacher'] / 1e6:.0f}M / student "
          f"{params['student'] / 1e6:.0f}M parameters, V=49152, {a.prompts} prompts x {a.n} samples, "
          f"{a.max_response} response tokens (pair built in {build_s:.0f} s)")
    print("overrides: " + " ".join(o for o in overrides if "path=" not in o and "files=" not in o and "dir=" not in o))
    for r in rows:
        parts = {p: float(r[f"ta_opd/timing/{p}_s"]) for p in ("rollout", "teacher_and_scoring", "update")}
        print(f"step {r['step']}: " + "  ".join(f"{k} {v:.1f} s" for k, v in parts.items())
              + f"  total {sum(parts.values()):.1f} s  CPU {float(r['ta_opd/timing/step_cpu_s']):.1f} s"
              + f"  (response tokens {float(r['ta_opd/valid_count']):.0f})")
    print(f"run wall {wall:.0f} s, CPU {cpu_s:.0f} s (incl. loading, the evaluations before and after), "
          f"peak RSS {rss_gb:.2f} GB")


if __name__ == "__main__":
    main()
