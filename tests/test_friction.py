"""Issue 19's friction points on the CPU backend: the answer-extraction rate of training-time
grading, evaluations that say what they evaluate and never run twice or for a null, the compact
console line, a finished run re-run leaving its summary intact, data content in the run name and
refusals that offer the non-destructive way out first, the held-out KL on fixed samples with a
bootstrap interval."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from tests.test_cpu_backend import run_config

SMALL = dict(total_steps=2, test_freq=0, save_freq=0, eval_size=6, heldout_kl_prompts=6, prompts_per_step=2)


def _train(pair, out, log=None, **kw):
    from recipe.ta_opd.cpu.trainer import CPUTrainer

    lines = [] if log is None else log
    t = CPUTrainer(run_config(pair, out, **{**SMALL, **kw}), log=lines.append)
    return t, t.fit(), lines


def _count_greedy(monkeypatch):
    """Record every greedy evaluation pass as (model, number of rows)."""
    from recipe.ta_opd.cpu import trainer as T

    calls, real = [], T.greedy_texts

    def counting(model, tok, prompts, *a, **k):
        calls.append((model, len(prompts)))
        return real(model, tok, prompts, *a, **k)

    monkeypatch.setattr(T, "greedy_texts", counting)
    return calls


# --- 1. answer extraction ----------------------------------------------------------------------
def test_extraction_rate_and_one_warning_below_the_threshold():
    from recipe.ta_opd.grading import MIN_EXTRACTION_RATE, Grader
    from recipe.ta_opd.reproduce.evaluate import parser

    lines = []
    g = Grader(log=lines.append)
    rows = [{"data_source": "openai/gsm8k", "reward_model": {"ground_truth": "4"}}] * 4
    assert g.extraction_rate(rows, ["so #### 4", "#### 5", "four", "4"]) == (0.5, "'#### N'")
    assert g.check_extraction(rows, ["#### 4", "x", "y", "z"], "the rollouts") == 0.25
    assert g.check_extraction(rows, ["x"] * 4, "the rollouts") == 0.0  # warned once per subject
    assert len(lines) == 1 and "only 25% of the rollouts have a final answer" in lines[0] and "'#### N'" in lines[0]
    assert "below 50%" in lines[0]
    assert g.check_extraction(rows, ["#### 1"] * 2 + ["x"] * 2, "the teacher's greedy responses") == 0.5
    assert len(lines) == 1  # 0.5 is not below the threshold
    # a custom scorer's answer format is unknown: no rate, no warning
    assert Grader(lambda *a: 0.0, log=lines.append).extraction_rate(rows, ["x"] * 4) == (None, "")
    # whether an evaluation can give anything but null: one probe per data source
    assert g.scorable(rows) and not g.scorable([{"data_source": "nobody_scores_this"}])
    assert Grader(lambda s, text, *a: float(int(text)), log=lines.append).scorable(rows)  # rejects "", still a scorer
    # the benchmark evaluation fails on the same threshold (exit 3 there)
    assert parser().parse_args(["x", "--out", "y"]).min_extraction_rate == MIN_EXTRACTION_RATE == 0.5


def test_training_reports_the_extraction_rate(tiny_pair, tmp_path):
    _, pair = tiny_pair
    t, summary, _ = _train(pair, tmp_path)
    steps = [h for h in t.history if "ta_opd/kept_ratio" in h]
    rates = [h["ta_opd/grading/extraction_rate"] for h in steps]
    assert len(rates) == 2 and all(0.0 <= r <= 1.0 for r in rates)
    assert summary["extraction_rate"]["rollouts"] == pytest.approx(np.mean(rates))
    for who in ("student_before", "teacher", "student_after"):
        assert 0.0 <= summary["extraction_rate"][who] <= 1.0, who
    assert summary["min_extraction_rate"] == 0.5
    assert json.loads((tmp_path / "summary.json").read_text())["extraction_rate"] == summary["extraction_rate"]
    assert "ta_opd/grading/extraction_rate" in pd.read_csv(tmp_path / "metrics.csv").columns


# --- 2. evaluations ------------------------------------------------------------------------------
def test_no_test_file_each_greedy_pass_runs_once_and_is_announced(tiny_pair, tmp_path, monkeypatch):
    _, pair = tiny_pair
    calls = _count_greedy(monkeypatch)
    t, summary, lines = _train(pair, tmp_path, test_file=None)
    # before: the student on the validation rows (= its test pass), the teacher; after: the student once
    assert [(m is t.teacher, n) for m, n in calls] == [(False, 6), (True, 6), (False, 6)]
    assert summary["student_accuracy_before"] == t.history[0]["val/student_accuracy"]
    assert summary["student_accuracy_after"] == t.history[-1]["val/student_accuracy"]
    said = [ln for ln in lines if "evaluating" in ln]
    assert said == ["[ta-opd] step 0: evaluating student greedy accuracy on 6 validation rows; held-out KL on 6 "
                    "fixed samples",
                    "[ta-opd] evaluating the teacher's greedy accuracy on 6 validation rows",
                    "[ta-opd] step 2: evaluating student greedy accuracy on 6 validation rows; held-out KL on 6 "
                    "fixed samples"]
    assert sum("the held-out KL has only 6 prompts" in ln for ln in lines) == 1  # below MIN_STABLE_PROMPTS, once


def test_with_a_test_file_the_test_passes_are_their_own(tiny_pair, tmp_path, monkeypatch):
    _, pair = tiny_pair
    calls = _count_greedy(monkeypatch)
    t, _, _ = _train(pair, tmp_path)  # the toy's test split: student and teacher before, the student after
    assert [(m is t.teacher, n) for m, n in calls] == [(False, 6), (False, 6), (True, 6), (False, 6), (False, 6)]


def test_no_scorer_skips_every_accuracy_evaluation(tiny_pair, tmp_path, monkeypatch):
    _, pair = tiny_pair
    files = {}
    for split in ("train", "val"):
        df = pd.read_parquet(getattr(pair, f"{split}_file"))
        df["data_source"] = "nobody_scores_this"
        files[split] = tmp_path / f"{split}.parquet"
        df.to_parquet(files[split])
    calls = _count_greedy(monkeypatch)
    _, summary, lines = _train(pair, tmp_path / "run", train_file=str(files["train"]), val_file=str(files["val"]),
                               test_file=None)
    assert calls == []  # each could only give null
    assert summary["student_accuracy_before"] is summary["teacher_accuracy"] is summary["student_accuracy_after"] is None
    assert summary["unscorable_data_sources"] == ["nobody_scores_this"]
    assert summary["heldout_kl_after"] > 0  # the held-out KL still runs
    assert any("accuracy evaluations skipped" in ln for ln in lines)
    assert "[ta-opd] step 0: evaluating held-out KL on 6 fixed samples" in lines


# --- 3. the console line -------------------------------------------------------------------------
def test_console_line_is_compact():
    from recipe.ta_opd.cpu.console import line

    m = {"ta_opd/kept_ratio": 0.1, "ta_opd/loss/pg_opd": -0.01234, "rollout/accuracy": 0.75, "ta_opd/heldout/kl": 0.688,
         "ta_opd/heldout/kl_lo": 0.61, "ta_opd/heldout/kl_hi": 0.76, "ta_opd/timing/step_s": 4.123,
         **{f"ta_opd/other/{i}": float(i) for i in range(40)}}
    assert line(m, 3, 100, "pg_opd") == ("[ta-opd] step 3/100 | kept 0.1 | loss -0.01234 | rollout acc 0.75 | "
                                         "held-out KL 0.688 [0.61, 0.76] | 4.12 s/step")
    assert line({"val/student_accuracy": None, "ta_opd/heldout/kl": 0.5}, 0, 10, "pg_opd") == \
        "[ta-opd] step 0/10 | held-out KL 0.5"


def test_console_logger_prints_one_short_line_per_step(tiny_pair, tmp_path):
    _, pair = tiny_pair
    _, _, lines = _train(pair, tmp_path, loggers=("console",))
    steps = [ln for ln in lines if ln.startswith("[ta-opd] step ") and "/2 |" in ln]
    assert [ln.split(" |")[0] for ln in steps] == ["[ta-opd] step 0/2", "[ta-opd] step 1/2", "[ta-opd] step 2/2"]
    assert max(len(ln) for ln in steps) < 160
    assert "held-out KL" in steps[0] and "held-out KL" not in steps[1] and "kept" in steps[1]
    assert len(pd.read_csv(tmp_path / "metrics.csv").columns) > 30  # everything else is in metrics.csv


# --- 4. a finished run launched again --------------------------------------------------------------
def test_rerunning_a_finished_run_leaves_its_summary_intact(tiny_pair, tmp_path, monkeypatch):
    _, pair = tiny_pair
    _, first, _ = _train(pair, tmp_path, save_freq=1)
    written = (tmp_path / "summary.json").read_bytes()
    calls = _count_greedy(monkeypatch)
    _, again, lines = _train(pair, tmp_path, save_freq=1)
    assert (tmp_path / "summary.json").read_bytes() == written and again == first
    assert calls == []  # nothing re-evaluated
    assert any("the run is finished (step 2 of trainer.total_training_steps=2)" in ln for ln in lines)
    assert first["wall_seconds"] > 0 and first["resumed"] is False  # a duration, not a timing bound
    # interrupted after step 1 and resumed: the wall time counts both sessions
    _train(pair, tmp_path / "b", save_freq=1, total_steps=1)
    _, resumed, _ = _train(pair, tmp_path / "b", save_freq=1)
    assert resumed["resumed"] is True
    state = json.loads((tmp_path / "b/checkpoints/global_step_1/state.json").read_text())
    assert resumed["wall_seconds"] > state["state"]["wall_seconds"] > 0


# --- 5. data in the run name, refusals ------------------------------------------------------------
def test_run_name_holds_the_data_content(tmp_path):
    from recipe.ta_opd.naming import run_name
    from ta_opd.config import TAConfig
    from tests.cli_inprocess import config

    (tmp_path / "a").mkdir()
    for name, text in (("train.parquet", "one"), ("val.parquet", "v"), ("other.parquet", "two")):
        (tmp_path / name).write_text(text)
    shutil.copy(tmp_path / "train.parquet", tmp_path / "a" / "moved.parquet")

    def name(train, val="val.parquet"):
        return run_name(config([f"data.train_files={tmp_path / train}", f"data.val_files={tmp_path / val}"]), TAConfig())

    assert name("train.parquet") == name("a/moved.parquet")  # the content, not the path
    assert name("train.parquet") != name("other.parquet") != name("train.parquet", "other.parquet")
    assert name("train.parquet").startswith("toy_data") and name("train.parquet").endswith("_teachability_rho0.1_k16_seed0")
    assert run_name(config([]), TAConfig()) == "toy_teachability_rho0.1_k16_seed0"  # the toy's own data


def test_refused_resume_offers_a_folder_of_its_own_first(tiny_pair, tmp_path):
    from recipe.ta_opd.cpu import identity
    from recipe.ta_opd.cpu.trainer import CPUTrainer
    from ta_opd.config import TAConfig
    from ta_opd.errors import TAConfigError

    _, pair = tiny_pair
    out = tmp_path / "t"  # named after the experiment ("t"), as runs/<project>/<experiment> is
    _train(pair, out, total_steps=1)
    other = run_config(pair, out, **{**SMALL, "total_steps": 1, "ta": TAConfig(budget=0.2)})
    with pytest.raises(TAConfigError) as e:
        CPUTrainer(other, log=lambda *_: None).fit()
    msg = str(e.value)
    fresh = identity.own_folder(other, identity.of(other))
    assert fresh.startswith("trainer.experiment_name=t_") and len(fresh) == len("trainer.experiment_name=t_") + 6
    assert msg.index(fresh) < msg.index("resume_mode=disable") < msg.index("overwrites its checkpoints")
    assert "ta_opd.budget: 0.1 in the checkpoint, 0.2 now" in msg
    moved = run_config(pair, tmp_path / "elsewhere", experiment="t")
    assert identity.own_folder(moved, {}).startswith(f"trainer.default_local_dir={tmp_path / 'elsewhere'}_")


# --- 6. the held-out KL --------------------------------------------------------------------------
def test_prompt_bootstrap_is_a_seeded_percentile_bootstrap_over_prompts():
    from ta_opd.kl import prompt_bootstrap

    sums, counts = [3.0, 1.0, 8.0, 0.5, 2.0], [3, 2, 4, 1, 5]
    lo, hi = prompt_bootstrap(sums, counts, seed=7, n_boot=500)
    rng = np.random.default_rng(7)  # the same resamples, by a plain loop
    means = []
    for _ in range(500):
        idx = rng.integers(0, 5, size=5)
        means.append(sum(sums[i] for i in idx) / sum(counts[i] for i in idx))
    assert (lo, hi) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), rel=1e-12)
    assert lo < sum(sums) / sum(counts) < hi
    assert prompt_bootstrap([2.0, 4.0], [1, 2], seed=0) == pytest.approx((2.0, 2.0))  # every prompt's mean is 2
    with pytest.raises(ValueError, match="one positive count per prompt"):
        prompt_bootstrap([1.0], [0], seed=0)


def test_heldout_kl_scores_the_same_samples_before_after_and_across_a_resume(tiny_pair, tmp_path):
    _, pair = tiny_pair
    full, summary, _ = _train(pair, tmp_path / "a", total_steps=2, save_freq=1)
    before, last = full.heldout_set["before"], full.heldout_last
    assert before["tokens"] == last["tokens"] and summary["heldout_kl_tokens"] == sum(before["tokens"])
    assert summary["heldout_kl_prompts"] == 6 == len(full.heldout_set["responses"])
    for when in ("before", "after"):
        for k in ("", "_sampled"):
            lo, mid, hi = (summary[f"heldout_kl{k}_{when}{b}"] for b in ("_lo", "", "_hi"))
            assert lo <= mid <= hi, (when, k)
    assert summary["heldout_kl_change"] == pytest.approx(summary["heldout_kl_after"] - summary["heldout_kl_before"])
    assert summary["heldout_kl_change_lo"] <= summary["heldout_kl_change"] <= summary["heldout_kl_change_hi"]
    # interrupted after step 1: the checkpoint carries the samples, the resumed run scores the same ones
    _train(pair, tmp_path / "b", total_steps=1, save_freq=1)
    resumed, again, _ = _train(pair, tmp_path / "b", total_steps=2, save_freq=1)
    assert resumed.heldout_set == full.heldout_set
    assert again["heldout_kl_after"] == pytest.approx(summary["heldout_kl_after"], rel=1e-6)


def test_evaluations_never_change_the_training_trajectory(tiny_pair, tmp_path):
    """The held-out samples are drawn once from their own seeded generator and later evaluations
    only score them: a run evaluated every step trains exactly like one evaluated only at the end."""
    _, pair = tiny_pair
    a, _, _ = _train(pair, tmp_path / "every", total_steps=3, test_freq=1)
    b, _, _ = _train(pair, tmp_path / "end", total_steps=3, test_freq=0)

    def trained(t):
        return [{k: v for k, v in h.items() if not k.startswith(("ta_opd/timing/", "ta_opd/heldout/", "val/",
                                                                 "ta_opd/grading/val_"))}
                for h in t.history if "ta_opd/kept_ratio" in h]
    assert trained(a) == trained(b) and len(trained(a)) == 3
    assert a.history[-1]["ta_opd/heldout/kl"] == b.history[-1]["ta_opd/heldout/kl"]
