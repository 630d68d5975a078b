"""The verl update at ρ 5 % and 10 % (kept-rows engine) vs full OPD (verl's own forward), side by
side: wall time and peak memory of verl's ``forward_backward_batch`` on one micro-batch
(issue 23, item 4b, verl side). ``measure_update_verl() -> dict``; ``python -m
benchmarks.budget_update_verl`` prints it.

The model is SmolLM2-135M-shaped, built from config (LlamaConfig hidden 576, 9 heads, 3 KV
heads, intermediate 1536, V 49,152, tied embeddings) with ``LAYERS`` = 8 of its 30 layers, so the
three configurations fit in ~4 min on one idle thread; the LM head is then a larger share of the step
than in the 30-layer model (per token: head 2·576·49,152 ≈ 57 MFLOP; a layer ≈ 2·3.5M ≈ 7 MFLOP).
Real verl engine (FSDP2, one gloo rank, the test-only CPU platform), fp32, gradient
checkpointing on, ``pg_opd``; batch: 2 sequences, prompts of 64 tokens, responses of 320 and 256
tokens; the kept positions are ⌈ρ·|I|⌉ response positions drawn uniformly (selection is not
timed; spread-out kept positions give the trimmed forward little to cut, so the saving measured
is mostly the LM head and log-softmax at the kept rows only).

Each configuration runs in two fresh subprocesses (``OMP_NUM_THREADS=1``), as in
``bench_budget.py``: one timed, one measuring memory with glibc's mmap threshold fixed
(``bench_scoring.MEMORY_ENV``). Memory: after a warm-up step on a micro-batch with nothing kept
has allocated the gradients, the peak resident set (VmHWM, reset just before the step) minus the
resident set before it: the step's peak above weights + gradients (no optimizer state exists: no
optimizer step is taken). Time: CPU seconds of the
process (``time.process_time``, one thread: unaffected by other jobs on a shared machine) and
wall seconds, each the median of 2 steps; the ratios use CPU seconds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = 8
PROMPT, RESPONSES = 64, (320, 256)
CONFIGS = {"full_verl": (1.0, False), "rho10_kept": (0.10, True), "rho05_kept": (0.05, True)}  # name -> (ρ, kept-rows engine on)


def _smollm2_like(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=LAYERS, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(path)


def _batch(rho: float):
    """verl's left/right-padded rollout layout with ⌈ρ·|I|⌉ kept response positions."""
    import torch

    g = torch.Generator().manual_seed(0)
    B, R = len(RESPONSES), max(RESPONSES)
    prompts = torch.randint(0, 49152, (B, PROMPT), generator=g)
    responses = torch.randint(0, 49152, (B, R), generator=g)
    valid = torch.arange(R).unsqueeze(0) < torch.tensor(RESPONSES).unsqueeze(1)  # (B, R)
    responses = torch.where(valid, responses, 0)
    attention_mask = torch.cat([torch.ones(B, PROMPT, dtype=torch.long), valid.long()], 1)
    idx = valid.flatten().nonzero().squeeze(-1)
    keep = torch.zeros(valid.numel(), dtype=torch.bool)
    keep[idx[torch.randperm(idx.numel(), generator=g)[: math.ceil(rho * idx.numel())]]] = True
    return {"prompts": prompts, "responses": responses, "input_ids": torch.cat([prompts, responses], 1),
            "attention_mask": attention_mask, "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0),
            "response_mask": (keep.view_as(valid) & valid).long(),
            "old_log_probs": torch.where(valid, -10.0, 0.0), "advantages": torch.zeros(B, R),
            "ta_opd_teacher_logp": torch.where(valid, -9.0, 0.0)}


def _one(model_path: str, rho: float, kept: bool, memory: bool = False) -> dict:
    """One configuration, in this (fresh) process."""
    from benchmarks.bench_scoring import peak_extra_gb
    import statistics
    import time

    import torch
    import torch.distributed as dist
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.plugin.platform import platform_manager as pm
    from verl.trainer.config import CheckpointConfig
    from verl.utils import tensordict_utils as tu
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.utils.padding import left_right_2_no_padding

    from recipe.ta_opd.main import ta_config
    from recipe.ta_opd.verl_backend import fields as F
    from recipe.ta_opd.verl_backend.engine import KeptRowsEngine
    from recipe.ta_opd.verl_backend.losses import make_actor_loss, update_flags
    from recipe.ta_opd.verl_backend.validate import plan
    from tests.verl.cpu_fit.platform import PlatformCPU

    torch.set_num_threads(1)
    pm.set_platform(PlatformCPU())
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", 1), rank=0, world_size=1)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    with initialize_config_dir(config_dir=str(REPO / "recipe/ta_opd/config"), version_base=None):
        cfg = compose("ta_opd_trainer", overrides=["ta_opd.loss=pg_opd"])
    ta = ta_config(cfg.ta_opd)
    p = plan(cfg, ta, student_path="unused", teacher_path="unused", vocab_size=49152)
    dist_cfg = omega_conf_to_dataclass(OmegaConf.create(p.actor_distillation))
    loss_fn = make_actor_loss(omega_conf_to_dataclass(cfg.actor_rollout_ref.actor), dist_cfg, ta, 49152)
    flags = update_flags(dist_cfg.distillation_loss.loss_mode)
    eng = KeptRowsEngine(HFModelConfig(path=model_path, load_tokenizer=False, use_remove_padding=True,
                                       enable_gradient_checkpointing=True,
                                       override_config={"attn_implementation": "sdpa"}),
                         FSDPEngineConfig(strategy="fsdp2", mixed_precision={"param_dtype": "fp32"}),
                         FSDPOptimizerConfig(lr=1e-6), CheckpointConfig())
    eng.initialize()

    def td(rho_, phase):  # phase None: verl's own forward_step (today's path)
        t = left_right_2_no_padding(DataProto.from_dict(tensors=_batch(rho_)).to_tensordict())
        tu.assign_non_tensor(t, calculate_entropy=False, compute_loss=True, global_batch_size=len(RESPONSES),
                             use_dynamic_bsz=False, micro_batch_size_per_gpu=len(RESPONSES), temperature=1.0,
                             **{**flags, F.PHASE: phase})
        return t

    def step(data):
        with eng.train_mode():
            t0, c0 = time.perf_counter(), time.process_time()
            eng.forward_backward_batch(data, loss_fn, forward_only=False)
            return time.process_time() - c0, time.perf_counter() - t0

    step(td(0.0, F.PHASE_UPDATE))  # nothing kept: one token through the model, allocates every gradient
    data = td(rho, F.PHASE_UPDATE if kept else None)
    times: list[tuple[float, float]] = []
    peak_gb = peak_extra_gb(lambda: times.extend(step(data) for _ in range(1 if memory else 2)))
    n_valid = sum(RESPONSES)
    return {"rho": rho, "kept_engine": kept, "kept": int(math.ceil(rho * n_valid)), "valid": n_valid,
            "cpu_s": statistics.median(t[0] for t in times), "wall_s": statistics.median(t[1] for t in times),
            "peak_mb": peak_gb * 1024}


def measure_update_verl() -> dict:
    """Every configuration in its own subprocesses (timed; memory), then the ratios against ``full_verl``."""
    from benchmarks.bench_scoring import MEMORY_ENV

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out: dict = {"layers": LAYERS, "prompt": PROMPT, "responses": list(RESPONSES)}
    with tempfile.TemporaryDirectory() as tmp:
        model = f"{tmp}/smollm2_like"
        subprocess.run([sys.executable, "-c", f"from benchmarks.budget_update_verl import _smollm2_like; "
                        f"_smollm2_like({model!r})"], check=True, env=env, cwd=REPO)
        for name, (rho, kept) in CONFIGS.items():
            runs = {}
            for memory in (False, True):  # timed; then memory (fixed mmap threshold: page faults, not timed)
                code = (f"import json; from benchmarks.budget_update_verl import _one; "
                        f"print('RESULT', json.dumps(_one({model!r}, {rho}, {kept}, {memory})))")
                res = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True,
                                     text=True, env=env | (MEMORY_ENV if memory else {}))
                line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
                runs[memory] = json.loads(line[len("RESULT "):])
            out[name] = {**runs[False], "peak_mb": runs[True]["peak_mb"]}
    full = out["full_verl"]
    for name in CONFIGS:
        if name != "full_verl":
            out[f"{name}_time_vs_full"] = out[name]["cpu_s"] / full["cpu_s"]
            out[f"{name}_mem_vs_full"] = out[name]["peak_mb"] / max(full["peak_mb"], 1e-9)
    return out


if __name__ == "__main__":
    r = measure_update_verl()
    print(json.dumps(r, indent=1))
    print(f"update_verl_rho05_vs_full={r['rho05_kept_time_vs_full']:.3f} "
          f"update_verl_mem_rho05_vs_full={r['rho05_kept_mem_vs_full']:.3f}")
