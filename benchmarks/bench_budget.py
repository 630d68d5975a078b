"""Does the supervision budget pay? Side by side in one run, one thread (not a test; issue 23).

(a) the teacher forward on real tokens vs padded rows (``measure_teacher`` from
    benchmarks/budget_teacher.py);
(b) the CPU update (``recipe.ta_opd.cpu.step.update``) at ρ 5 % and 10 % vs full OPD on the same
    batch: wall time and peak memory above the weights and the optimizer state, gradient
    checkpointing on (the paper's actor setting), a SmolLM2-135M-shaped student built from config;
    also the verl CPU ``fit()`` update (``measure_update_verl`` from benchmarks/budget_update_verl.py)
    when that file exists; plus the statistics pass's student sweep before / after item 2;
(c) a projection on paper for the paper's settings (``project``; assumptions in its docstring).

Memory of one update: each configuration runs in a fresh subprocess (glibc's mmap threshold fixed
at 64 KiB, see ``run_child``; the timed run is another, plain subprocess) that builds the model and
the AdamW state (one step on zero gradients allocates both moments; the gradients stay allocated,
as a previous step leaves them, so this is a steady-state step's baseline), reads its resident
set (VmRSS), resets the kernel's high-water mark (/proc/self/clear_refs) and runs ONE update;
the peak (VmHWM) minus that RSS is what the update adds on top of weights + optimizer state +
the resident gradients. Time: the plain child's CPU seconds for that update (one thread: what the
update costs; the machine is shared, so its wall seconds, printed beside, include waiting for a
core); the last line's update ratio is the CPU-seconds ratio. Configurations alternate over
``--repeats`` rounds; the median of each is reported.

Usage: python benchmarks/bench_budget.py [--layers 6] [--seqs 6] [--response 512] [--repeats 1] [--quick]
Last line: teacher_packed_vs_padded=<r> update_rho05_vs_full=<r> update_mem_rho05_vs_full=<r>
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_scoring import MEMORY_ENV, _median_time, _rss_kb, reset_peak  # noqa: E402

from recipe.ta_opd.cpu.step import ScoredBatch, update  # noqa: E402
from ta_opd import TAConfig  # noqa: E402
from ta_opd.rollout import Rollout, token_logp  # noqa: E402
from ta_opd.select import Selection  # noqa: E402
from ta_opd.stats import student_topk  # noqa: E402

# ------------------------------------------------------------------------------ (b) the update

# (name, ρ, kept_rows): full OPD keeps every valid position; "full_path" is the update before
# issue 23 (the (B, R, V) logits of every response position whatever is kept).
CONFIGS = (("full", 1.0, True), ("rho05", 0.05, True), ("rho10", 0.10, True), ("full_path", 1.0, False))


def student_config(layers: int):
    """SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json), built from config, never downloaded."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                       num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
                       pad_token_id=0, eos_token_id=0, bos_token_id=None)


def response_lengths(n: int, cap: int, seed: int) -> torch.Tensor:
    """(n,) long-tailed response lengths: log-normal with median cap/3 and σ 0.6, clipped to
    [16, cap] (right-skewed with a pile at the cap, as reasoning rollouts under a length cap are)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(cap / 3) + 0.6 * torch.randn(n, generator=g))
    return x.round().long().clamp(16, cap)


def make_batch(n_seq: int, prompt: int, cap: int, seed: int = 0) -> Rollout:
    """Left-padded prompts of prompt/2 .. prompt tokens + right-padded long-tailed responses."""
    g = torch.Generator().manual_seed(seed)
    r_len = response_lengths(n_seq, cap, seed)
    p_len = torch.randint(prompt // 2, prompt + 1, (n_seq,), generator=g)
    P, R = int(p_len.max()), int(r_len.max())
    ids = torch.randint(1, 49152, (n_seq, P + R), generator=g)
    att = torch.zeros(n_seq, P + R, dtype=torch.long)
    for b in range(n_seq):
        att[b, P - int(p_len[b]):P + int(r_len[b])] = 1
    ids = ids * att  # pad id 0
    return Rollout(input_ids=ids, attention_mask=att, prompt_len=P, responses=ids[:, P:],
                   response_mask=att[:, P:].bool())


def make_scored(ro: Rollout, rho: float, seed: int = 0) -> ScoredBatch:
    """⌈ρ·N⌉ kept positions drawn uniformly at random among the N valid ones (Eq. 13's count), and
    finite old / teacher log-probs. The pg_opd update reads only the mask and these two (B, R)
    fields, so the teacher outputs and statistics are not computed here (None)."""
    g = torch.Generator().manual_seed(seed)
    valid = ro.response_mask
    n_valid = int(valid.sum())
    flat = torch.zeros(n_valid, dtype=torch.bool)
    flat[torch.randperm(n_valid, generator=g)[:math.ceil(rho * n_valid)]] = True
    mask = torch.zeros_like(valid)
    mask[valid] = flat
    old = -torch.rand(valid.shape, generator=g) * 3
    teacher = -torch.rand(valid.shape, generator=g) * 3
    sel = Selection(mask=mask, scores=torch.zeros(valid.shape), normalized=None, metrics={})
    return ScoredBatch(old_logp=old, teacher=None, teacher_logp=teacher, stats=None, selection=sel)


def child(a) -> None:
    """One update of one configuration in this fresh process; prints a JSON line."""
    from transformers import LlamaForCausalLM

    name, rho, kept_rows = next(c for c in CONFIGS if c[0] == a.child)
    torch.manual_seed(0)
    model = LlamaForCausalLM(student_config(a.layers)).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.1)
    for p in model.parameters():  # allocate both AdamW moments: the baseline holds the optimizer state
        p.grad = torch.zeros_like(p)
    opt.step()  # the gradients stay allocated, as the trainer's previous step leaves them (update frees them
    # before its backward): the baseline is a steady-state step's, weights + AdamW state + gradients
    ro = make_batch(a.seqs, a.prompt, a.response, seed=0)
    scored = make_scored(ro, rho, seed=0)
    cfg = TAConfig(selector="random", budget=rho, loss="pg_opd")
    phase = {}

    def before_step(*_):  # the forward + backward's peak, then the optimizer step's own
        phase["fwd_bwd_kb"] = _rss_kb("VmHWM")
        reset_peak()

    opt.register_step_pre_hook(before_step)
    before = _rss_kb("VmRSS")
    reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    m = update(model, opt, ro, scored, cfg, grad_clip=1.0, temperature=1.0, kept_rows=kept_rows,
               gradient_checkpointing=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = _rss_kb("VmHWM")
    fb = phase["fwd_bwd_kb"]
    print("RESULT " + json.dumps({"name": name, "wall_s": wall, "cpu_s": cpu,
                                  "extra_gb": (max(peak, fb) - before) / 1024**2,
                                  "fwd_bwd_gb": (fb - before) / 1024**2, "opt_step_gb": (peak - before) / 1024**2,
                                  "kept": int(scored.selection.mask.sum()), "grad_norm": m["actor/grad_norm"]}))


def run_child(a, name: str, memory: bool) -> dict:
    """One configuration in a fresh process. ``memory``: with glibc's mmap threshold fixed at 64 KiB,
    so every tensor's pages go back to the kernel when freed and the resident set follows the live
    tensors (else glibc keeps freed blocks, and the peak varied by 0.3 GB from one run to the next);
    its timing is not used (the fresh pages cost faults), a second plain child is timed."""
    argv = [sys.executable, __file__, "--child", name, "--layers", str(a.layers), "--seqs", str(a.seqs),
            "--prompt", str(a.prompt), "--response", str(a.response)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if memory:
        env |= MEMORY_ENV
    res = subprocess.run(argv, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child {name} failed:\n{res.stderr[-3000:]}")
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def update_table(a) -> dict[str, dict]:
    ro = make_batch(a.seqs, a.prompt, a.response, seed=0)
    lens = ro.response_mask.sum(-1).tolist()
    print(f"\n(b) CPU update, SmolLM2-135M shape with {a.layers} of its 30 layers, gradient checkpointing on, "
          f"pg_opd, {a.seqs} sequences, prompts {a.prompt // 2}-{a.prompt} tokens, response lengths {lens} "
          f"(padded batch {tuple(ro.input_ids.shape)}, {int(ro.response_mask.sum())} response tokens)", flush=True)
    runs: dict[str, list[dict]] = {c[0]: [] for c in CONFIGS}
    for _ in range(a.repeats):
        for name, _, _ in CONFIGS:
            timed, mem = run_child(a, name, memory=False), run_child(a, name, memory=True)
            runs[name].append({**timed, **{k: mem[k] for k in ("extra_gb", "fwd_bwd_gb", "opt_step_gb")}})
    out = {}
    print("extra GB: peak above weights + AdamW state + gradients over the whole update; fwd+bwd GB: the same "
          "until the optimizer step; step GB: during the optimizer step (its peak reset before it)")
    print(f"{'config':>10} {'kept':>6} {'cpu s':>8} {'wall s':>8} {'extra GB':>9} {'fwd+bwd GB':>10} {'step GB':>8} "
          f"{'cpu/full':>9} {'wall/full':>9} {'mem/full':>9} {'fb/full':>8}")
    for name, _, _ in CONFIGS:
        out[name] = {k: statistics.median(r[k] for r in runs[name])
                     for k in ("cpu_s", "wall_s", "extra_gb", "fwd_bwd_gb", "opt_step_gb")}
        out[name]["kept"] = runs[name][0]["kept"]
    f = out["full"]
    for name, _, _ in CONFIGS:
        o = out[name]
        print(f"{name:>10} {o['kept']:>6} {o['cpu_s']:>8.2f} {o['wall_s']:>8.2f} {o['extra_gb']:>9.3f} "
              f"{o['fwd_bwd_gb']:>10.3f} {o['opt_step_gb']:>8.3f} {o['cpu_s'] / f['cpu_s']:>9.3f} "
              f"{o['wall_s'] / f['wall_s']:>9.3f} {o['extra_gb'] / f['extra_gb']:>9.3f} "
              f"{o['fwd_bwd_gb'] / f['fwd_bwd_gb']:>8.3f}")
    return out


# -------------------------------------------------------------- item 2: the student's sweep


def stats_sweep(a) -> float:
    """Student side of the statistics pass on the benchmark batch's (B, R, V) logits: before
    issue 23 (a logsumexp over every (B, R) row for the old log-probs, an (N, V) copy of the
    valid rows, then the top-K / H / log Z pass) vs now (the one pass on the valid rows in
    place, old log-probs = logit - log Z). Returns now / before, wall time."""
    ro = make_batch(a.seqs, a.prompt, a.response, seed=0)
    valid, y_all = ro.response_mask, ro.responses
    logits = torch.randn(*valid.shape, 49152, generator=torch.Generator().manual_seed(0)) * 3  # (B, R, V)
    cfg = TAConfig()

    def before():
        old = token_logp(logits, y_all)  # (B, R)
        s_valid = logits[valid]  # (N, V)
        return old, student_topk(s_valid, topk=cfg.topk, entropy=cfg.entropy, **cfg.stats_chunking())

    def now():
        flat = logits.reshape(-1, logits.shape[-1])
        rows = valid.flatten().nonzero().squeeze(-1)
        top = student_topk(flat, topk=cfg.topk, entropy=cfg.entropy, rows=rows, **cfg.stats_chunking())
        return flat[rows, y_all[valid]] - top.log_z, top

    ob, tb = before()
    on, tn = now()
    torch.testing.assert_close(on, ob[valid], rtol=1e-5, atol=1e-5)  # the same old log-probs
    assert torch.equal(tn.ids, tb.ids)
    t_before, t_now = _median_time(before, a.repeats + 1), _median_time(now, a.repeats + 1)
    print(f"\nitem 2, student side of the statistics pass, V=49152, N={int(valid.sum())}: before {t_before:.3f} s, "
          f"one sweep {t_now:.3f} s, ratio {t_now / t_before:.3f}", flush=True)
    return t_now / t_before


# ------------------------------------------------------------------------ (c) the projection


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 151936

    def layer_params(self) -> int:
        q_o = 2 * self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_o + kv + 3 * self.hidden * self.intermediate

    def body_flops(self, tokens: int) -> float:
        """Forward FLOPs of the decoder layers on one sequence of ``tokens`` tokens: 2 per weight
        per token, plus causal attention (QKᵀ and AV: 2·2·heads·head_dim per token pair, half the
        pairs)."""
        attn = 2 * 2 * self.heads * self.head_dim * tokens * (tokens + 1) / 2
        return self.layers * (2 * self.layer_params() * tokens + attn)

    def head_flops(self, rows: float) -> float:
        """Forward FLOPs of the LM head + log-softmax (~5 per entry) at ``rows`` rows."""
        return rows * (2 * self.hidden * self.vocab + 5 * self.vocab)


SMOLLM2_135M = Arch(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152)
QWEN3_1P7B = Arch(hidden=2048, layers=28, intermediate=6144, heads=16, kv_heads=8, head_dim=128)  # HF config.json
QWEN3_8B = Arch(hidden=4096, layers=36, intermediate=12288, heads=32, kv_heads=8, head_dim=128)


def project(rho: float = 0.05, prompt: int = 1024, responses: tuple[int, ...] = (8192, 4096, 2048, 1024),
            microbatch_tokens: int = 24576, logit_bytes: int = 10) -> list[dict]:
    """Per-sequence FLOPs of one TA-OPD step in the paper's settings, full OPD vs ρ, and the update's
    logits memory per micro-batch. Assumptions (all stated, none measured here):

    - student Qwen3-1.7B, teacher Qwen3-8B, both V = 151,936; prompt ``prompt`` tokens; each row of
      the result is one response length (the paper's cap is 8,192; a long-tailed batch is a mix);
    - the teacher scores every response position in both cases (selection needs its top-K' at every
      position), packed: forward on prompt + response, LM head at the response rows only;
    - the old-log-prob pass (no grad) runs the student's forward and LM head at every response row,
      both cases;
    - the update, gradient checkpointing per decoder layer: the body costs forward + recompute +
      2× backward = 4 forwards; the LM head is not checkpointed: forward + 2× backward = 3. Full OPD:
      LM head at every packed row (prompt + response: verl's engine today). ρ: the kept positions are
      ⌈ρ·r⌉ uniformly random response positions; a sequence keeps none with probability (1-ρ)^r
      (≈ 0 for r ≥ 200: no sequence dropped) and its last kept position is expected at
      r - (1-ρ)/ρ (so the cut saves ~19 tokens at ρ 5 %), and the LM head runs at the ⌈ρ·r⌉ kept rows;
    - logits memory of the update per micro-batch of ``microbatch_tokens`` tokens: ``logit_bytes``
      bytes per logit entry (bf16 logits 2 + fp32 log-softmax copy 4 + its fp32 gradient 4), at
      every row (full) or at the kept rows (ρ); activations of the checkpointed body are the same
      in both cases and not counted; rollout generation is not counted.
    """
    s, t = QWEN3_1P7B, QWEN3_8B
    rows_out = []
    for r in responses:
        tokens = prompt + r
        kept = math.ceil(rho * r)
        cut = prompt + max(1.0, r - (1 - rho) / rho)
        teacher = t.body_flops(tokens) + t.head_flops(r)
        old_lp = s.body_flops(tokens) + s.head_flops(r)
        upd_full = 4 * s.body_flops(tokens) + 3 * s.head_flops(tokens)
        upd_rho = 4 * s.body_flops(round(cut)) + 3 * s.head_flops(kept)
        seqs_per_mb = microbatch_tokens / tokens
        mem_full = microbatch_tokens * s.vocab * logit_bytes / 1e9
        mem_rho = seqs_per_mb * kept * s.vocab * logit_bytes / 1e9
        rows_out.append({"response": r, "teacher_tflop": teacher / 1e12, "old_logprob_tflop": old_lp / 1e12,
                         "update_full_tflop": upd_full / 1e12, "update_rho_tflop": upd_rho / 1e12,
                         "update_rho_vs_full": upd_rho / upd_full,
                         "step_rho_vs_full": (teacher + old_lp + upd_rho) / (teacher + old_lp + upd_full),
                         "logits_gb_full": mem_full, "logits_gb_rho": mem_rho})
    return rows_out


def update_flops(arch: Arch, ro: Rollout, kept: torch.Tensor) -> float:
    """FLOPs of one checkpointed update on the padded batch ``ro`` (model of :func:`project`): the
    rows with a kept position, cut after the batch's last kept column, body 4 forwards, LM head 3
    forwards at the kept rows. kept: (B, R) bool."""
    rows = kept.any(-1)
    if not bool(rows.any()):
        return 0.0
    last = int(kept.any(0).nonzero().max())  # last kept response column
    width = ro.prompt_len + last  # columns 0 .. P - 1 + last feed the logits at P - 1 + last
    return int(rows.sum()) * 4 * arch.body_flops(width) + 3 * arch.head_flops(int(kept.sum()))


def flop_check(a) -> None:
    """What the FLOP model predicts for the measured batch, at the measured depth and at 30 layers."""
    ro = make_batch(a.seqs, a.prompt, a.response, seed=0)
    for layers in sorted({a.layers, 30}):
        arch = Arch(**{**SMOLLM2_135M.__dict__, "layers": layers})
        full = update_flops(arch, ro, make_scored(ro, 1.0).selection.mask)
        r05, r10 = (update_flops(arch, ro, make_scored(ro, r).selection.mask) / full for r in (0.05, 0.10))
        print(f"FLOP model of this batch, {layers} layers: rho05/full {r05:.3f}, rho10/full {r10:.3f}")


def projection_table(rho: float = 0.05) -> None:
    print(f"\n(c) projection, Qwen3-8B teacher -> Qwen3-1.7B student, prompt 1,024, ρ {rho:.0%} vs full OPD "
          "(per sequence; logits GB per 24,576-token update micro-batch; see project())")
    print(f"{'response':>8} {'teacher TF':>10} {'oldlp TF':>9} {'upd full TF':>11} {'upd rho TF':>10} "
          f"{'upd ratio':>9} {'step ratio':>10} {'logits GB full':>14} {'logits GB rho':>13}")
    for x in project(rho):
        print(f"{x['response']:>8} {x['teacher_tflop']:>10.2f} {x['old_logprob_tflop']:>9.2f} "
              f"{x['update_full_tflop']:>11.2f} {x['update_rho_tflop']:>10.2f} {x['update_rho_vs_full']:>9.3f} "
              f"{x['step_rho_vs_full']:>10.3f} {x['logits_gb_full']:>14.2f} {x['logits_gb_rho']:>13.2f}")


# ---------------------------------------------------------------------- (a) and the verl update


def teacher_ratio(repeats: int) -> str:
    try:
        from budget_teacher import measure_teacher
    except ImportError as e:
        print(f"\n(a) teacher packed vs padded: NOT MEASURED: benchmarks/budget_teacher.py (measure_teacher) "
              f"is not importable ({e})", flush=True)
        return "missing"
    print("\n(a) teacher forward, packed vs padded (benchmarks/budget_teacher.py)", flush=True)
    try:
        r = measure_teacher(threads=1, repeats=repeats)
    except Exception as e:  # its own check failing is a result to report, not a reason to lose (b) and (c)
        print(f"(a) NOT MEASURED: measure_teacher raised {type(e).__name__}: {str(e)[:600]}", flush=True)
        return "failed"
    print(r, flush=True)
    ratio = r["teacher_packed_vs_padded"] if isinstance(r, dict) else float(r)
    return f"{ratio:.3f}"


def verl_update() -> None:
    try:
        from budget_update_verl import measure_update_verl
    except ImportError as e:
        print(f"\n(b') verl CPU fit() update: NOT MEASURED: benchmarks/budget_update_verl.py (measure_update_verl) "
              f"is not importable ({e})", flush=True)
        return
    print("\n(b') the update through verl's CPU fit() (benchmarks/budget_update_verl.py)", flush=True)
    print(measure_update_verl(), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="issue 23: does the supervision budget pay")
    p.add_argument("--layers", type=int, default=6, help="decoder layers of the SmolLM2-135M-shaped student "
                   "(SmolLM2-135M has 30; 6 keeps one run within ~10 minutes on a shared 2-core machine)")
    p.add_argument("--seqs", type=int, default=6)
    p.add_argument("--prompt", type=int, default=64, help="longest prompt; prompts are prompt/2 .. prompt tokens")
    p.add_argument("--response", type=int, default=512, help="response length cap")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the configurations (median reported)")
    p.add_argument("--quick", action="store_true", help="4 layers, 1 round: a smoke run, not the reported numbers")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    if a.child:
        return child(a)
    if a.quick:
        a.layers, a.repeats = 4, 1
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average "
          "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg()), flush=True)
    upd = update_table(a)
    flop_check(a)
    teacher = teacher_ratio(a.repeats)
    verl_update()
    stats_sweep(a)
    projection_table(0.05)
    full = upd["full"]
    print(f"teacher_packed_vs_padded={teacher} update_rho05_vs_full={upd['rho05']['cpu_s'] / full['cpu_s']:.3f} "
          f"update_mem_rho05_vs_full={upd['rho05']['extra_gb'] / full['extra_gb']:.3f}")


if __name__ == "__main__":
    sys.exit(main())
