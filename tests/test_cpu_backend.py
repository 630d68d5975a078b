"""CPU backend: alignment, teacher outputs, resume, every selector, the real entry point."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ta_opd import TAConfig, available_selectors
from ta_opd.errors import TAConfigError
from ta_opd.teacher_outputs import teacher_outputs
from ta_opd.rollout import encode_prompt, generate
from ta_opd.tools.toy.models import STUDENT_ARCH, build_model
from ta_opd.tools.toy.tokenizer import build_tokenizer

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


def test_toy_pair_layout(tiny_pair):
    _, pair = tiny_pair
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    df = pd.read_parquet(pair.train_file)
    assert {"prompt", "data_source", "reward_model", "extra_info"} <= set(df.columns)
    assert list(df.iloc[0]["prompt"][0].keys()) == ["role", "content"]
    tok = AutoTokenizer.from_pretrained(pair.student)
    t = AutoModelForCausalLM.from_pretrained(pair.teacher)
    s = AutoModelForCausalLM.from_pretrained(pair.student)
    assert sum(p.numel() for p in t.parameters()) > sum(p.numel() for p in s.parameters())
    assert t.config.vocab_size == s.config.vocab_size == len(tok) == 399
    assert set(pair.manifest) >= {"teacher_accuracy", "student_accuracy", "compatibility"}


def test_position_alignment_against_unbatched_forward():
    from recipe.ta_opd.cpu.step import response_logits
    from ta_opd.rollout import token_logp

    tok = build_tokenizer()
    model = build_model(tok, STUDENT_ARCH, seed=3)
    prompts = [encode_prompt(tok, [{"role": "user", "content": c}]) for c in ("1+2", "345+67", "89+1000")]
    ro = generate(model, prompts, max_new_tokens=12, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding is exercised
    batched = response_logits(model, ro)  # (B, R, V)
    lp = token_logp(batched, ro.responses)
    for i, p in enumerate(prompts):
        n = int(ro.response_mask[i].sum())
        resp = ro.responses[i, :n]
        assert bool((ro.response_mask[i, n:] == 0).all())
        if n < ro.responses.shape[1]:
            assert int(resp[-1]) == tok.eos_token_id  # stopped at EOS
        seq = torch.tensor([p + resp.tolist()])
        direct = model(input_ids=seq).logits[0, len(p) - 1: len(p) - 1 + n]  # logits at t score token t+1
        torch.testing.assert_close(batched[i, :n], direct, rtol=1e-4, atol=1e-4)
        want = torch.log_softmax(direct, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(lp[i, :n], want, rtol=1e-4, atol=1e-4)


def test_teacher_outputs_match_direct():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 50, generator=gen) * 2
    y = torch.randint(0, 50, (3, 5), generator=gen)
    extra = torch.randint(0, 50, (3, 5, 4), generator=gen)
    out = teacher_outputs(logits, y, teacher_topk=8, extra_ids=extra, chunk_size=4)
    lp = torch.log_softmax(logits, -1)
    v, i = lp.topk(8, dim=-1)
    assert out.topk_ids.dtype == torch.int32 and torch.equal(out.topk_ids.long(), i)
    torch.testing.assert_close(out.topk_logp, v)
    torch.testing.assert_close(out.sampled_logp, lp.gather(-1, y.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(out.entropy, -(lp.exp() * lp).sum(-1))
    torch.testing.assert_close(out.extra_logp, lp.gather(-1, extra))
    half = teacher_outputs(logits, y, teacher_topk=8, logp_dtype=torch.bfloat16)
    assert half.topk_logp.dtype == torch.bfloat16


def run_config(pair, out_dir, **kw):
    from recipe.ta_opd.cpu.trainer import CPURunConfig

    base = dict(student_path=str(pair.student), teacher_path=str(pair.teacher), train_file=str(pair.train_file),
                val_file=str(pair.val_file), test_file=str(pair.test_file), out_dir=str(out_dir),
                prompts_per_step=4, n_samples=2, max_response_length=24, temperature=1.0, total_steps=4,
                lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), grad_clip=1.0, test_freq=2, save_freq=2,
                resume_mode="auto", seed=0, eval_size=8, project="t", experiment="t", loggers=(), ta=TAConfig())
    base.update(kw)
    return CPURunConfig(**base)


def test_resume_equals_uninterrupted(tiny_pair, tmp_path):
    from recipe.ta_opd.cpu.trainer import CPUTrainer

    _, pair = tiny_pair
    full = CPUTrainer(run_config(pair, tmp_path / "a"), log=lambda *_: None)
    full.fit()
    first = CPUTrainer(run_config(pair, tmp_path / "b", total_steps=2), log=lambda *_: None)
    first.fit()
    resumed = CPUTrainer(run_config(pair, tmp_path / "b", total_steps=4), log=lambda *_: None)
    resumed.fit()
    assert resumed.step == full.step == 4
    for (k, a), (_, b) in zip(full.student.state_dict().items(), resumed.student.state_dict().items()):
        assert torch.equal(a, b), k
    # every step's metrics (selection, loss, rollout) are identical: nothing repeated or skipped
    def steps(t):
        return [{k: v for k, v in h.items() if not k.startswith("ta_opd/timing/")} for h in t.history]
    assert [h["step"] for h in resumed.history] == [0, 1, 2, 3, 4]
    phases = ("rollout", "teacher_and_scoring", "update", "step_cpu")
    assert {f"ta_opd/timing/{p}_s" for p in phases} <= set(full.history[-1])
    assert steps(full) == steps(resumed)


def test_checkpoint_is_atomic_and_loadable(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from recipe.ta_opd.cpu import checkpoint
    from recipe.ta_opd.cpu.trainer import CPUTrainer

    _, pair = tiny_pair
    CPUTrainer(run_config(pair, tmp_path, total_steps=2), log=lambda *_: None).fit()
    ck = tmp_path / "checkpoints"
    assert checkpoint.latest(ck).name == "global_step_2"
    assert not [p for p in ck.iterdir() if p.name.startswith(".tmp")]
    AutoModelForCausalLM.from_pretrained(ck / "global_step_2" / "actor")  # θτ for the diagnostic
    for name in ("summary.json", "metrics.csv", "curves.png"):
        assert (tmp_path / name).exists()


@pytest.mark.slow
@pytest.mark.parametrize("selector", available_selectors())
def test_every_selector_runs_one_step(tiny_pair, tmp_path, selector):
    from recipe.ta_opd.cpu.trainer import CPUTrainer

    _, pair = tiny_pair
    cfg = run_config(pair, tmp_path, total_steps=1, save_freq=0, eval_size=4,
                      ta=TAConfig(selector=selector, budget=0.3))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # q3_* may warn about a budget shortfall on tiny batches
        trainer = CPUTrainer(cfg, log=lambda *_: None)
        summary = trainer.fit()
    assert summary["steps"] == 1 and summary["selector"] == selector
    m = trainer.history[-1]
    valid, kept = int(m["ta_opd/valid_count"]), int(m["ta_opd/kept_count"])
    assert valid == int(trainer.history[-1]["rollout/response_length"] * cfg.prompts_per_step * cfg.n_samples)
    assert 0.0 <= m["ta_opd/kept/neg_adv_fraction"] <= 1.0  # issue 11 §2: logged every step
    if selector == "full":
        assert kept == valid and summary["kept_ratio"] == 1.0
        assert m["ta_opd/kept/neg_adv_fraction"] == m["ta_opd/valid/neg_adv_fraction"]
    else:
        n = -(-3 * valid // 10)  # ⌈0.3·|I|⌉ in integers (Eq. 13; no float rounding)
        # Q3 selectors keep all of Q3 when it holds fewer than n, and log the gap
        assert kept + int(m["ta_opd/budget/shortfall"]) == n
        assert selector.startswith("q3_") or kept == n
        assert summary["kept_ratio"] == kept / valid


@pytest.mark.parametrize("loss", ["topk_forward_kl", "topk_reverse_kl"])
def test_distribution_losses_run(tiny_pair, tmp_path, loss):
    from recipe.ta_opd.cpu.trainer import CPUTrainer

    _, pair = tiny_pair
    cfg = run_config(pair, tmp_path, total_steps=1, save_freq=0, eval_size=4, ta=TAConfig(loss=loss))
    assert CPUTrainer(cfg, log=lambda *_: None).fit()["steps"] == 1


def _main(args, cache, out):
    env = {**os.environ, "TA_OPD_CACHE": str(cache), "WANDB_MODE": "disabled"}
    spec = [f"+ta_opd.toy.spec.{k}={v}" for k, v in TINY.items()]
    return subprocess.run([sys.executable, "-m", "recipe.ta_opd.main", *spec, f"trainer.default_local_dir={out}",
                           "ta_opd.cpu.eval_size=8", "data.train_batch_size=4", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_entry_point_two_steps(tiny_pair, tmp_path):
    cache, _ = tiny_pair
    res = _main(["trainer.total_training_steps=2", "ta_opd.selector=entropy", "ta_opd.budget=0.05",
                 "ta_opd.topk=8"], cache, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[ta-opd] backend: cpu (auto: no CUDA GPU visible)" in res.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("backend", "selector", "budget", "topk", "steps", "kept_ratio", "student_accuracy_before",
                "student_accuracy_after", "teacher_accuracy", "wall_seconds"):
        assert key in summary
    assert (summary["backend"], summary["selector"], summary["budget"], summary["topk"], summary["steps"]) == \
        ("cpu", "entropy", 0.05, 8, 2)


@pytest.mark.slow
@pytest.mark.parametrize("override,pattern", [
    ("ta_opd.selector=teachabilty", "selector='teachabilty' is unknown"),
    ("ta_opd.budget=0", "budget=0 is not allowed"),
    ("ta_opd.topk=1000", "topk=1000 is not allowed for a vocabulary of 399"),
    ("actor_rollout_ref.model.path=/nonexistent/student", "actor_rollout_ref.model.path=/nonexistent/student does not exist"),
])
def test_bad_overrides_exit_nonzero(tiny_pair, tmp_path, override, pattern):
    cache, _ = tiny_pair
    extra = ["ta_opd.teacher_model_path=/nonexistent/teacher"] if "model.path" in override else []
    if "topk=1000" in override:
        extra.append("ta_opd.teacher_topk=1000")
    res = _main([override, *extra, "trainer.total_training_steps=1"], cache, tmp_path)
    assert res.returncode != 0
    assert pattern in res.stderr, res.stderr[-2000:]


def test_padded_logit_rows_are_sliced_and_tokenizer_mismatch_rejected(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from recipe.ta_opd.cpu.trainer import CPUTrainer, check_vocab
    from ta_opd.errors import TAConfigError

    _, pair = tiny_pair
    padded = AutoModelForCausalLM.from_pretrained(pair.teacher)
    padded.resize_token_embeddings(416)  # padding rows beyond the 399-token tokenizer
    padded.save_pretrained(tmp_path / "teacher_padded")
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path / "teacher_padded")
    cfg = run_config(pair, tmp_path / "out", teacher_path=str(tmp_path / "teacher_padded"), total_steps=1,
                     save_freq=0, eval_size=4)
    trainer = CPUTrainer(cfg, log=lambda *_: None)
    assert trainer.teacher.config.vocab_size == 416
    assert trainer.fit()["steps"] == 1  # statistics ran on the 399 real rows
    other = build_tokenizer()
    other.add_tokens(["<|extra|>"])
    with pytest.raises(TAConfigError, match="tokenizers differ"):
        check_vocab(tok, other, trainer.student, trainer.teacher)


def test_student_scored_at_rollout_temperature_teacher_at_one():
    """verl's actor divides the student's logits by rollout.temperature before log-probs and before
    the statistics hook; its teacher path scores at 1. The CPU step must do the same."""
    from recipe.ta_opd.cpu.step import rollout_logits, score_batch

    tok = build_tokenizer()
    student, teacher = build_model(tok, STUDENT_ARCH, seed=3), build_model(tok, STUDENT_ARCH, seed=4)
    prompts = [encode_prompt(tok, [{"role": "user", "content": c}]) for c in ("1+2", "34+67")]
    ro = generate(student, prompts, max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                  temperature=0.6, generator=torch.Generator().manual_seed(0))
    cfg = TAConfig(selector="full", topk=4, teacher_topk=8)
    with torch.no_grad():
        s, t = rollout_logits(student, ro), rollout_logits(teacher, ro)
    scored = score_batch(student, teacher, ro, cfg, step=0, temperature=0.6)
    valid = ro.response_mask
    want_s = torch.log_softmax(s / 0.6, -1).gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(scored.old_logp[valid], want_s[valid], rtol=1e-5, atol=1e-5)
    at_one = torch.log_softmax(s, -1).gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)
    assert (scored.old_logp[valid] - at_one[valid]).abs().max() > 1e-2  # the scaling is not a no-op here
    want_t = torch.log_softmax(t, -1).gather(-1, ro.responses.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(scored.teacher_logp[valid], want_t[valid], rtol=1e-5, atol=1e-5)
    want_h = -(torch.softmax(s / 0.6, -1) * torch.log_softmax(s / 0.6, -1)).sum(-1)
    torch.testing.assert_close(scored.stats.H[valid], want_h[valid], rtol=1e-4, atol=1e-4)
    # D and C from the dense formulas on the student at T and the teacher at 1
    from ta_opd.stats import dense_position_stats
    dense = dense_position_stats(s / 0.6, t, topk=cfg.topk)
    torch.testing.assert_close(scored.stats.D[valid], dense.D[valid], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scored.stats.C[valid], dense.C[valid], rtol=1e-4, atol=1e-4)
    # the update scores at the same temperature: with lr 0 the policy ratio is exactly 1
    from recipe.ta_opd.cpu.step import update
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    m = update(student, opt, ro, scored, cfg, grad_clip=1.0, temperature=0.6)
    assert abs(m["ta_opd/loss/ppo_kl"]) < 1e-6
    m1 = update(student, opt, ro, scored, cfg, grad_clip=1.0, temperature=1.0)
    assert abs(m1["ta_opd/loss/ppo_kl"]) > 1e-3  # scoring the update at 1 would be off-policy
    with pytest.raises(TAConfigError, match="temperature=0 is not allowed for scoring"):
        score_batch(student, teacher, ro, cfg, step=0, temperature=0)
