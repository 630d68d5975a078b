"""Your own pair on the CPU backend: a real-style tokenizer (byte-level BPE, no pad token, ChatML
chat template, EOS a list), GSM8K-style string ground truths graded by verl's scorer, the
held-out teacher–student KL, output identity, prompts, pad/eos, and the loss registry reaching
both backends."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from ta_opd.errors import TAConfigError, TAInputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def own_pair(tmp_path_factory):
    from benchmarks.own_pair import build_pair

    # validation problems are training problems here: the SFT'd models answer some of them, so a
    # non-zero accuracy can only come from verl's GSM8K scorer (the toy's regex never matches "#### n")
    return build_pair(tmp_path_factory.mktemp("own_pair"), sft_steps=60, n_train=32, n_val=8, val_from_train=True)


def _run_main(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "recipe.ta_opd.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_main_job_on_own_pair_two_steps(own_pair, tmp_path):
    """The acceptance run: default output folder, no crash, verl-graded accuracy, held-out KL."""
    args = [f"actor_rollout_ref.model.path={own_pair.student}", f"ta_opd.teacher_model_path={own_pair.teacher}",
            f"data.train_files={own_pair.train_file}", f"data.val_files={own_pair.val_file}",
            "trainer.total_training_steps=2", "trainer.test_freq=1", "trainer.save_freq=2", "trainer.logger=[]",
            "data.train_batch_size=4", "actor_rollout_ref.rollout.n=2", "data.max_response_length=24",
            "ta_opd.topk=8", "ta_opd.teacher_topk=16", "ta_opd.cpu.eval_size=8", "ta_opd.cpu.heldout_kl_prompts=4"]
    res = _run_main(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("has no pad token: padding with the EOS id") == 1
    assert "grading: verl's default_compute_score" in res.stdout
    assert "torch threads: 1 ($OMP_NUM_THREADS)" in res.stdout
    runs = list((tmp_path / "runs" / "ta_opd").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("student_from_teacher_")
    assert not runs[0].name.startswith("toy_")  # never the toy's folder
    assert not (tmp_path / "main.log").exists()  # Hydra writes no log file into the working directory
    s = json.loads((runs[0] / "summary.json").read_text())
    assert s["steps"] == 2 and s["pair"] == "student (student) <- teacher (teacher)"
    for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after"):
        assert isinstance(s[key], float) and 0.0 <= s[key] <= 1.0, (key, s[key])
    assert s["teacher_accuracy"] > 0  # from verl's "#### n" scorer
    assert s["unscorable_data_sources"] == []
    for key in ("heldout_kl_before", "heldout_kl_after", "heldout_kl_sampled_before", "heldout_kl_sampled_after"):
        assert isinstance(s[key], float) and s[key] == s[key], key
    assert s["heldout_kl_before"] > 0 and s["heldout_kl_prompts"] == 4
    metrics = pd.read_csv(runs[0] / "metrics.csv")
    assert metrics["ta_opd/heldout/kl"].notna().sum() == 3  # before, after step 1, after step 2
    assert metrics["rollout/accuracy"].iloc[1:].notna().all()


def test_run_name_separates_pairs(tmp_path):
    from hydra import compose, initialize_config_dir

    from recipe.ta_opd.main import run_name, ta_config

    def name(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "recipe/ta_opd/config"), version_base=None):
            cfg = compose("ta_opd_trainer", overrides=list(overrides))
        return run_name(cfg, ta_config(cfg.ta_opd))

    toy = name()
    assert toy == "toy_teachability_rho0.1_k16_seed0"
    a = name(f"actor_rollout_ref.model.path={tmp_path}/a/model", f"ta_opd.teacher_model_path={tmp_path}/t")
    b = name(f"actor_rollout_ref.model.path={tmp_path}/b/model", f"ta_opd.teacher_model_path={tmp_path}/t")
    assert a.startswith("model_from_t_") and a.endswith("_teachability_rho0.1_k16_seed0")
    assert a != b != toy  # same folder names, different paths: different runs


def test_special_ids_eos_list_pad_fallback_and_refusal():
    from ta_opd.rollout import special_ids

    tok = SimpleNamespace(eos_token_id=7, pad_token_id=None)
    s = special_ids(tok, SimpleNamespace(eos_token_id=[5, 7]))
    assert s.eos_ids == (5, 7) and s.pad_id == 5 and s.pad_is_eos
    assert special_ids(SimpleNamespace(eos_token_id=7, pad_token_id=0), None).pad_id == 0
    with pytest.raises(TAConfigError, match="neither the tokenizer nor generation_config.json defines"):
        special_ids(SimpleNamespace(eos_token_id=None, pad_token_id=None), SimpleNamespace(eos_token_id=None))


class _ScriptedLM(torch.nn.Module):
    """Emits token script[row][t] at step t (a causal-LM interface without a real model)."""

    def __init__(self, script, vocab=10):
        super().__init__()
        self.script, self.vocab, self.t = script, vocab, 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        if past_key_values is None:
            self.t = 0
        logits = torch.zeros(len(self.script), input_ids.shape[1], self.vocab)
        for i, row in enumerate(self.script):
            logits[i, -1, row[min(self.t, len(row) - 1)]] = 10.0
        self.t += 1
        return SimpleNamespace(logits=logits, past_key_values=())


def test_generate_stops_at_any_eos_id():
    from ta_opd.rollout import generate

    lm = _ScriptedLM([[3, 4, 5, 9], [3, 6, 3, 3], [3, 3, 3, 3]])
    ro = generate(lm, [[1, 2], [1], [2, 2, 2]], max_new_tokens=4, eos_id=(5, 6), pad_id=0, temperature=0.0)
    assert ro.response_mask.sum(-1).tolist() == [3, 2, 4]  # row 0 stops at 5, row 1 at 6, row 2 runs out
    assert ro.responses[0].tolist() == [3, 4, 5, 0] and ro.responses[1].tolist() == [3, 6, 0, 0]


def test_grading_by_data_source_reports_unscorable_once(tmp_path):
    from recipe.ta_opd.grading import Grader, resolve_score_fn
    from ta_opd.tools.toy.task import DATA_SOURCE

    logs = []
    g = Grader(log=logs.append)
    rows = [{"data_source": "openai/gsm8k", "reward_model": {"ground_truth": "42"}},
            {"data_source": "openai/gsm8k", "reward_model": {"ground_truth": "42"}},
            {"data_source": DATA_SOURCE, "reward_model": {"ground_truth": "12"}},
            {"data_source": DATA_SOURCE, "reward_model": {"ground_truth": "twelve"}},  # never matched, no error
            {"data_source": "my/own", "reward_model": {"ground_truth": "x"}},
            {"data_source": "my/own", "reward_model": {"ground_truth": "x"}}]
    texts = ["so #### 42", "A:42", "7+5+0=12 A:12", "A:12", "x", "x"]
    assert g.scores(rows, texts) == [1.0, 0.0, 1.0, 0.0, None, None]
    assert g.accuracy(rows, texts) == 0.5
    assert len(logs) == 1 and "no scorer for data_source 'my/own'" in logs[0]
    assert g.accuracy(rows[4:], texts[4:]) is None  # nothing scorable: null, never 0.0
    # reward.custom_reward_function is honoured as in verl (reward_kwargs merged in)
    f = tmp_path / "my_reward.py"
    f.write_text("def score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):\n"
                 "    return float(solution_str == ground_truth) + bonus\n")
    from omegaconf import OmegaConf

    fn, desc = resolve_score_fn(OmegaConf.create({"custom_reward_function": {
        "path": str(f), "name": "score", "reward_kwargs": {"bonus": 0.5}}}))
    assert "my_reward.py:score" in desc
    assert Grader(fn).scores(rows[4:], ["x", "y"]) == [1.5, 0.5]


def test_plain_string_prompt_is_refused_naming_the_row(tmp_path):
    from recipe.ta_opd.cpu.data import load_rows

    rows = [{"data_source": "d", "prompt": [{"role": "user", "content": "hi"}], "reward_model": {"ground_truth": "1"}},
            {"data_source": "d", "prompt": [{"role": "user", "content": "ho"}], "reward_model": {"ground_truth": "1"}}]
    pd.DataFrame(rows).to_parquet(tmp_path / "ok.parquet")
    assert load_rows(tmp_path / "ok.parquet")[1]["prompt"] == [{"role": "user", "content": "ho"}]
    for r, text in zip(rows, ("What is 1+1?", "What is 2+2?")):  # parquet cannot mix strings and lists
        r["prompt"] = text
    pd.DataFrame(rows).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(TAInputError, match=r"bad.parquet' row 0: 'prompt' is str 'What is 1\+1\?'; verl's layout"):
        load_rows(tmp_path / "bad.parquet")


def test_model_folder_without_config_json_is_a_clear_error(tmp_path):
    from recipe.ta_opd.cpu.trainer import _load

    (tmp_path / "empty").mkdir()
    with pytest.raises(TAConfigError, match="actor_rollout_ref.model.path=.*empty holds no config.json"):
        _load(str(tmp_path / "empty"), "actor_rollout_ref.model.path")


def test_a_newly_registered_loss_runs_on_cpu_and_is_refused_clearly_by_verl(tiny_pair, tmp_path):
    """One registry from ta_opd.loss to both backends: the CPU update dispatches any registered
    loss (no edit of cpu/step.py); the verl backend names what it supports instead of a KeyError."""
    from hydra import compose, initialize_config_dir

    from recipe.ta_opd.cpu.trainer import CPUTrainer
    from recipe.ta_opd.main import ta_config
    from recipe.ta_opd.verl_backend.validate import plan
    from ta_opd import TAConfig
    from ta_opd.losses import LossOutput, _LOSSES, aggregate, register_loss
    from tests.test_cpu_backend import run_config

    name = "test_only_topk_l2"
    seen = {}

    @register_loss(name)
    def _l2(inp, *, loss_agg="token-mean", denominator=None, **_):
        seen["shapes"] = (tuple(inp.student_topk_logp.shape), tuple(inp.log_prob.shape))
        per_token = (inp.student_topk_logp - inp.teacher_topk_logp).pow(2).mean(-1)  # (B, R)
        return LossOutput(aggregate(per_token, inp.mask, loss_agg, denominator), {"ta_opd/loss/l2": 0.0})

    try:
        _, pair = tiny_pair
        cfg = run_config(pair, tmp_path, total_steps=1, save_freq=0, eval_size=4, ta=TAConfig(loss=name, topk=8))
        before = [p.detach().clone() for p in CPUTrainer(cfg, log=lambda *_: None).student.parameters()]
        trainer = CPUTrainer(cfg, log=lambda *_: None)
        assert trainer.fit()["steps"] == 1
        B = cfg.prompts_per_step * cfg.n_samples
        assert seen["shapes"][0][0] == B and seen["shapes"][0][2] == 8 and seen["shapes"][1][0] == B
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
        with initialize_config_dir(config_dir=str(ROOT / "recipe/ta_opd/config"), version_base=None):
            vcfg = compose("ta_opd_trainer", overrides=[f"ta_opd.loss={name}"])
        with pytest.raises(TAConfigError, match=f"ta_opd.loss='{name}' is registered without a per-token form, so "
                                                "only the CPU backend can run it"):
            plan(vcfg, ta_config(vcfg.ta_opd), student_path="s", teacher_path="t", vocab_size=151936)
    finally:
        _LOSSES._items.pop(name, None)


def test_diagnostic_compares_tokenizers_not_only_logit_widths(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ta_opd.tools.diagnose.__main__ import check_tokenizers

    _, pair = tiny_pair
    tok = AutoTokenizer.from_pretrained(pair.student)
    models = {f: AutoModelForCausalLM.from_pretrained(p) for f, p in
              (("--theta0", pair.student), ("--theta-tau", pair.student), ("--teacher", pair.teacher))}
    assert check_tokenizers(tok, {"--theta-tau": str(pair.student), "--teacher": str(pair.teacher)}, models) == 399
    # the same size, a different tokenizer: one id now maps to another string
    other = tmp_path / "other"
    tok.save_pretrained(other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["<|renamed|>"] = vocab.pop("<|unused_7|>")
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(TAConfigError, match=r"tokenizers differ at 1 id\(s\); first: id \d+: student '<\|unused_7\|>' "
                                            r"vs teacher '<\|renamed\|>'"):
        check_tokenizers(tok, {"--theta-tau": str(pair.student), "--teacher": str(other)}, models)


def test_heldout_kl_equals_a_direct_unbatched_computation(tiny_pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe.ta_opd.cpu.evaluate import heldout_kl
    from ta_opd.rollout import encode_prompt, generate, special_ids

    _, pair = tiny_pair
    tok = AutoTokenizer.from_pretrained(pair.student)
    s, t = (AutoModelForCausalLM.from_pretrained(p).eval() for p in (pair.student, pair.teacher))
    prompts = [encode_prompt(tok, [{"role": "user", "content": c}]) for c in ("1+2", "345+67", "89+10")]
    sp = special_ids(tok, s.generation_config)
    got = heldout_kl(s, t, prompts, sp, max_new_tokens=12, temperature=1.0, seed=3, vocab_size=len(tok),
                     batch_size=2, chunk_size=4)
    # the same samples (same seed, same batches), scored one sequence at a time with plain log_softmax
    gen = torch.Generator().manual_seed(3)
    kl, est, n = 0.0, 0.0, 0
    for a in (0, 2):
        ro = generate(s, prompts[a:a + 2], max_new_tokens=12, eos_id=sp.eos_ids, pad_id=sp.pad_id,
                      temperature=1.0, generator=gen)
        for i, p in enumerate(prompts[a:a + 2]):
            m = int(ro.response_mask[i].sum())
            seq = torch.tensor([p + ro.responses[i, :m].tolist()])
            with torch.no_grad():
                ls, lt = (torch.log_softmax(x(input_ids=seq).logits[0, len(p) - 1: len(p) - 1 + m].double(), -1)
                          for x in (s, t))
            y = ro.responses[i, :m]
            kl += float((lt.exp() * (lt - ls)).sum())
            est += float((ls - lt).gather(-1, y.unsqueeze(-1)).sum())
            n += m
    assert got["ta_opd/heldout/tokens"] == n
    assert got["ta_opd/heldout/kl"] == pytest.approx(kl / n, rel=1e-4, abs=1e-6)
    assert got["ta_opd/heldout/kl_sampled"] == pytest.approx(est / n, rel=1e-4, abs=1e-6)


def test_thread_count_is_chosen_and_said(monkeypatch):
    from recipe.ta_opd.cpu.plan import read
    from recipe.ta_opd.cpu.run import set_threads
    from tests.cli_inprocess import config

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
        assert set_threads(None) == "[ta-opd] torch threads: 4 (half of the 8 visible CPUs; set ta_opd.cpu.num_threads to change)"
        assert torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert set_threads(None).startswith("[ta-opd] torch threads: 3 ($OMP_NUM_THREADS)")
        assert set_threads(2).startswith("[ta-opd] torch threads: 2 (ta_opd.cpu.num_threads)")
        with pytest.raises(TAConfigError, match="num_threads=0 is not allowed"):
            read(config(["trainer.experiment_name=t", "ta_opd.cpu.num_threads=0"]))  # checked by the plan
    finally:
        torch.set_num_threads(before)
