"""The teacher on real tokens vs today's padded forward, side by side in one process (issue 23, 4a).

``measure_teacher(threads=1)`` times ``compute_teacher_fields`` (forward + the top-K' fields) on
one batch in the three layouts of ``recipe/ta_opd/verl_backend/teacher.py``: ``padded`` (whole
left/right-padded rows, ``micro_batch_size`` 4, the LM head on R + 1 rows each), ``sorted`` (the
default: rows sorted by response length, cropped per micro-batch, the LM head on response rows)
and ``packed`` (one stream of real tokens per micro-batch; on CPU sdpa its mask is dense, so its
attention is quadratic in the stream). The real-token layouts get the padded micro-batch's token
budget, 4 x (P + R). It returns the time ratios and the token positions each layout processes,
and checks that all three return the same log-probs and entropies (fp32, atol 1e-4; the
ids are not compared: random logits over 49,152 rows tie near rank K' within fp32 noise).

Model: SmolLM2-135M's shape from config (Llama, hidden 576, 9 heads, 3 KV heads, intermediate
1,536, V 49,152, tied LM head), random weights, fp32, with ``LAYERS`` = 6 of its 30 decoder layers
to keep the run short (fewer layers make the LM head, 28 M multiply-adds per row, a larger share
of the time; the padded path runs it on R + 1 rows per sequence; 30 layers were not measured).

Batch: ``B`` = 16 sequences, prompts uniform in [16, 64] tokens (left-padded to P = 64), response
lengths log-normal (median 192, sigma 1.0, so ~16 % expected above the cap) clipped to [1, R = 512].
Reasoning rollouts look like this: most responses end well below the cap, lengths spread over an
order of magnitude with a right tail, and a share is truncated at ``max_response_length``. With
seed 0: lengths 23 ... 512, 2 of 16 clipped at 512, 3,634 response tokens of 8,192 slots (44 %).

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.budget_teacher
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time

import torch

LAYERS, B, P, R, PROMPT_MIN = 6, 16, 64, 512, 16
MEDIAN, SIGMA, SEED = 192, 1.0, 0
MICRO = 4  # sequences per padded forward (ta_opd.teacher.micro_batch_size's default)
TOPK = 64  # K' (the paper's)


def smollm2_shaped(path: str, layers: int = LAYERS) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
                      rope_theta=100000.0, rms_norm_eps=1e-5)
    LlamaForCausalLM(cfg).save_pretrained(path)


def response_lengths(n: int = B, seed: int = SEED) -> torch.Tensor:
    """(n,) log-normal response lengths, median MEDIAN, clipped to [1, R]."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(math.log(MEDIAN) + SIGMA * torch.randn(n, generator=g))
    return raw.round().clamp(1, R).long()


def long_tailed_batch(seed: int = SEED) -> dict[str, torch.Tensor]:
    """verl's left/right-padded rollout layout, (B, P + R), with the lengths above."""
    g = torch.Generator().manual_seed(seed + 1)
    pl = torch.randint(PROMPT_MIN, P + 1, (B,), generator=g)
    rl = response_lengths(seed=seed)
    pm = torch.arange(P)[None] >= (P - pl)[:, None]  # (B, P)
    rm = torch.arange(R)[None] < rl[:, None]  # (B, R)
    prompts = torch.where(pm, torch.randint(0, 49152, (B, P), generator=g), 0)
    responses = torch.where(rm, torch.randint(0, 49152, (B, R), generator=g), 0)
    attention_mask = torch.cat([pm, rm], dim=1).long()
    return {"input_ids": torch.cat([prompts, responses], 1), "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0), "responses": responses,
            "response_mask": rm.long()}


def _tokens(batch, cfg) -> tuple[int, int]:
    """(token positions through the decoder, rows through the LM head) of one call."""
    from recipe.ta_opd.verl_backend.teacher import _cost, _sequences, plan_micro_batches

    valid = batch["response_mask"].bool()
    groups = plan_micro_batches(_sequences(batch["attention_mask"], valid, P), cfg, P)
    if cfg.layout == "padded":
        return len(groups) * MICRO * (P + R), len(groups) * MICRO * (R + 1)
    head = sum(len(g) * max(s.n for s in g) if cfg.layout == "sorted" else sum(s.n for s in g) for g in groups)
    return sum(_cost(g, cfg.layout, P) for g in groups), head


def _time(fn, repeats: int) -> tuple[float, dict]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def measure_teacher(threads: int = 1, repeats: int = 3) -> dict:
    """Median wall time of ``compute_teacher_fields`` per layout, ratios to ``padded``, tokens."""
    from recipe.ta_opd.verl_backend.teacher import TeacherWorkerConfig, compute_teacher_fields, load_teacher

    torch.set_num_threads(threads)
    batch = long_tailed_batch()
    with tempfile.TemporaryDirectory() as path:
        smollm2_shaped(path)
        model = load_teacher(path, torch.float32)
        base = dict(model_path=path, vocab_size=49152, teacher_topk=TOPK, param_dtype="float32")
        cfgs = {"padded": TeacherWorkerConfig(**base, layout="padded", micro_batch_size=MICRO),
                **{lay: TeacherWorkerConfig(**base, layout=lay, micro_batch_size=None,
                                            max_tokens_per_micro_batch=MICRO * (P + R)) for lay in ("sorted", "packed")}}
        res, outs = {}, {}
        for name, cfg in cfgs.items():
            res[f"teacher_s_{name}"], outs[name] = _time(lambda: compute_teacher_fields(model, batch, cfg), repeats)
            print(f"{name}: {res[f'teacher_s_{name}']:.2f} s", flush=True)
            res[f"tokens_{name}"], res[f"lm_head_rows_{name}"] = _tokens(batch, cfg)
    for name in ("sorted", "packed"):  # ids are left out: at V 49,152 random logits tie near rank K' within 1e-6
        for k, v in outs["padded"].items():
            if v.dtype.is_floating_point:
                torch.testing.assert_close(outs[name][k], v, atol=1e-4, rtol=0, msg=f"{name} {k}")
    rl = batch["response_mask"].sum(1)
    res = {f"{k}_stream" if k.endswith("_packed") else k: v for k, v in res.items()}  # layout packed = "stream"
    return {"teacher_packed_vs_padded": res["teacher_s_sorted"] / res["teacher_s_padded"],  # the default layout
            "teacher_stream_vs_padded": res["teacher_s_packed_stream"] / res["teacher_s_padded"],
            "tokens_packed": res["tokens_sorted"], "tokens_padded": res["tokens_padded"],
            "tokens_stream": res["tokens_packed_stream"], "real_tokens": int(batch["attention_mask"].sum()), **res,
            "response_lengths": rl.tolist(), "layers": LAYERS, "threads": threads, "repeats": repeats}


if __name__ == "__main__":
    import sys

    r = measure_teacher(repeats=int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    for k, v in r.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    print(f"teacher_packed_vs_padded={r['teacher_packed_vs_padded']:.3f}")
