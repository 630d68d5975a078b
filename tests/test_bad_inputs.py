"""Every kind of bad input to the CPU entry point ends in ``[ta-opd] error: ...`` with exit 2, before
the first training step; never a traceback. The cases also generate docs/bad_inputs.md:

    TA_OPD_WRITE_BAD_INPUTS=1 python -m pytest tests/test_bad_inputs.py   # rewrite the table

Without the variable the test asserts the committed table is current (so it cannot drift).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
from pathlib import Path

import pytest

from tests.cli_inprocess import ROOT, run
from tests.conftest import TINY

TABLE = ROOT / "docs" / "bad_inputs.md"
OWN = ["actor_rollout_ref.model.path={student}", "ta_opd.teacher_model_path={teacher}",
       "data.train_files={train}", "data.val_files={val}"]


def own(**kw) -> list[str]:
    """Overrides of a run with your own models/data, with some of them replaced."""
    base = dict(student="{student}", teacher="{teacher}", train="{train}", val="{val}")
    base.update(kw)
    return [f"actor_rollout_ref.model.path={base['student']}", f"ta_opd.teacher_model_path={base['teacher']}",
            f"data.train_files={base['train']}", f"data.val_files={base['val']}"]


# (what the user did, overrides); {name} placeholders are files made by the `files` fixture
CASES: list[tuple[str, list[str]]] = [
    # --- TA-OPD knobs (ta_opd.*) ---
    ("misspelled selector", ["ta_opd.selector=teachabilty"]),
    ("budget 0", ["ta_opd.budget=0"]),
    ("budget above 1", ["ta_opd.budget=1.5"]),
    ("budget not a number", ["ta_opd.budget=abc"]),
    ("topk 0", ["ta_opd.topk=0"]),
    ("topk above teacher_topk", ["ta_opd.topk=1000"]),
    ("topk not below the vocabulary", ["ta_opd.topk=1000", "ta_opd.teacher_topk=1000"]),
    ("teacher_topk above the vocabulary", ["ta_opd.teacher_topk=1000"]),
    ("q_low negative", ["ta_opd.q_low=-0.1"]),
    ("q_high above 1", ["ta_opd.q_high=1.5"]),
    ("q_low above q_high", ["ta_opd.q_low=0.9", "ta_opd.q_high=0.5"]),
    ("eps 0", ["ta_opd.eps=0"]),
    ("unknown compatibility", ["ta_opd.compatibility=upper"]),
    ("unknown entropy mode", ["ta_opd.entropy=half"]),
    ("topk entropy with K=1", ["ta_opd.entropy=topk", "ta_opd.topk=1", "ta_opd.teacher_topk=1"]),
    ("min_keep_per_sequence negative", ["ta_opd.min_keep_per_sequence=-1"]),
    ("seed negative", ["ta_opd.seed=-1"]),
    ("seed 2**70", ["ta_opd.seed=1180591620717411303424"]),
    ("unknown loss", ["ta_opd.loss=mse"]),
    ("unknown loss_agg", ["ta_opd.loss_agg=sum"]),
    ("clip_low negative", ["ta_opd.clip_low=-0.1"]),
    ("clip_low 1", ["ta_opd.clip_low=1"]),
    ("chunk_size 0", ["ta_opd.chunk_size=0"]),
    ("unknown ta_opd key", ["+ta_opd.budgett=0.1"]),
    ("unknown backend", ["ta_opd.backend=tpu"]),
    ("negative vocab_mismatch_ok_ids", ["ta_opd.vocab_mismatch_ok_ids=[-1]"]),
    ("vocab_mismatch_ok_ids not ids", ["ta_opd.vocab_mismatch_ok_ids=[abc]"]),
    ("num_threads 0", ["+ta_opd.cpu.num_threads=0"]),
    # --- optimization and rollout ---
    ("grad_clip negative (gradient ascent)", ["actor_rollout_ref.actor.grad_clip=-1"]),
    ("grad_clip 0", ["actor_rollout_ref.actor.grad_clip=0"]),
    ("grad_clip NaN", ["actor_rollout_ref.actor.grad_clip=nan"]),
    ("temperature negative", ["actor_rollout_ref.rollout.temperature=-1"]),
    ("temperature zero (greedy training)", ["actor_rollout_ref.rollout.temperature=0"]),
    ("temperature not a number", ["actor_rollout_ref.rollout.temperature=hot"]),
    ("lr negative", ["actor_rollout_ref.actor.optim.lr=-1"]),
    ("lr 0", ["actor_rollout_ref.actor.optim.lr=0"]),
    ("lr infinite", ["actor_rollout_ref.actor.optim.lr=inf"]),
    ("rollout.n 0", ["actor_rollout_ref.rollout.n=0"]),
    ("rollout.n fractional", ["actor_rollout_ref.rollout.n=1.5"]),
    ("max_response_length 0", ["data.max_response_length=0"]),
    ("train_batch_size 0", ["data.train_batch_size=0"]),
    ("train_batch_size above the dataset", ["data.train_batch_size=100000"]),
    ("total_training_steps 0", ["trainer.total_training_steps=0"]),
    ("total_training_steps not a number", ["trainer.total_training_steps=abc"]),
    ("total_training_steps null", ["trainer.total_training_steps=null"]),
    ("test_freq not a number", ["trainer.test_freq=often"]),
    ("save_freq fractional", ["trainer.save_freq=1.5"]),
    ("resume_mode unsupported", ["trainer.resume_mode=resume_path"]),
    ("unknown logger", ["trainer.logger=[foo]"]),
    ("max_actor_ckpt_to_keep 0", ["trainer.max_actor_ckpt_to_keep=0"]),
    ("eval_size 0", ["ta_opd.cpu.eval_size=0"]),
    ("one beta", ["ta_opd.cpu.betas=[0.9]"]),
    ("beta equal to 1", ["ta_opd.cpu.betas=[0.9,1.0]"]),
    ("betas not numbers", ["ta_opd.cpu.betas=[a,b]"]),
    ("weight_decay negative", ["ta_opd.cpu.weight_decay=-0.1"]),
    ("unknown toy.spec key", ["+ta_opd.toy.spec.n_trian=10"]),
    ("toy.spec value of the wrong type", ["+ta_opd.toy.spec.teacher_steps=many"]),
    ("toy.spec probability out of range", ["+ta_opd.toy.spec.student_slip=1.5"]),
    ("interpolation to a missing key", ["trainer.experiment_name=${{nope.missing}}"]),
    # --- folders ---
    ("output folder under a file (unwritable)", ["trainer.default_local_dir={a_file}/run"]),
    ("output folder is a file", ["trainer.default_local_dir={a_file}"]),
    ("rollout folder unwritable", ["trainer.rollout_data_dir={a_file}/rollouts"]),
    ("unwritable cache folder (pair not built yet)", ["ta_opd.toy.cache_dir={a_file}/cache"]),
    ("output folder null", ["trainer.default_local_dir=null"]),
    # --- models ---
    ("student path does not exist", own(student="/nonexistent/student")),
    ("teacher path does not exist", own(teacher="/nonexistent/teacher")),
    ("only the student given", ["actor_rollout_ref.model.path={student}"]),
    ("student path empty", own(student="''")),
    ("student is a file", own(student="{a_file}")),
    ("empty model folder", own(student="{empty_dir}")),
    ("config.json not JSON", own(student="{bad_config}")),
    ("config.json with an unknown model_type", own(student="{unknown_arch}")),
    ("no weight files", own(student="{no_weights}")),
    ("truncated safetensors", own(student="{truncated}")),
    ("tokenizer files deleted", own(student="{no_tokenizer}")),
    ("student with NaN weights", own(student="{nan_student}")),
    ("teacher with inf weights", own(teacher="{inf_teacher}")),
    ("teacher with another tokenizer", own(teacher="{other_tokenizer}")),
    # --- data ---
    ("own models without data files", OWN[:2]),
    ("train file does not exist", own(train="/nonexistent/train.parquet")),
    ("zero-byte parquet", own(train="{zero_byte}")),
    ("CSV given as parquet", own(train="{csv}")),
    ("parquet without a prompt column", own(train="{no_prompt}")),
    ("parquet with no rows", own(train="{no_rows}")),
    ("prompt is a string, not chat messages", own(train="{string_prompt}")),
    ("no ground truth", own(val="{no_truth}")),
    ("two train files", own(train="[{train},{train}]")),
    ("chat template options not a mapping", ["data.apply_chat_template_kwargs=thinking"]),
    # --- resuming ---
    ("tracker file holds 'abc'", ["trainer.default_local_dir={tracker_abc}"]),
    ("tracker file empty", ["trainer.default_local_dir={tracker_empty}"]),
    ("only checkpoint corrupt", ["trainer.default_local_dir={corrupt_only}"]),
    ("planted state.pt (pickle) as the only checkpoint", ["trainer.default_local_dir={planted}"]),
    ("resume with another budget", ["trainer.default_local_dir={finished_run}", "ta_opd.budget=0.2"]),
    ("resume with another student", own(student="{other_student}") + ["trainer.default_local_dir={own_run}"]),
    ("output folder in use by a live run", ["trainer.default_local_dir={locked}"]),
    # --- issue 20: values that cannot be meant, folders that belong to something else, links ---
    ("min_keep_per_sequence above the response length", ["ta_opd.min_keep_per_sequence=100000000"]),
    ("rollout.n beyond the machine's memory", ["actor_rollout_ref.rollout.n=100000000"]),
    ("num_threads above the visible CPUs", ["+ta_opd.cpu.num_threads=100000"]),
    ("resume_from_path given to the CPU backend", ["trainer.resume_from_path=/nonexistent/global_step_3"]),
    ("resume a checkpoint beyond total_training_steps", ["trainer.default_local_dir={two_step_run}"]),
    ("output folder is the student model folder", ["trainer.default_local_dir={toy}/student"]),
    ("output folder is the toy cache", ["trainer.default_local_dir={cache}"]),
    ("output folder is the data folder", ["trainer.default_local_dir={toy}/data"]),
    ("rollout folder is the teacher model folder", ["trainer.rollout_data_dir={toy}/teacher"]),
    ("rollout folder in use by a live run", ["trainer.rollout_data_dir={locked}"]),
    ("lock file is a symbolic link", ["trainer.default_local_dir={linked_lock}"]),
    ("hand-edited state.json as the only checkpoint", ["trainer.default_local_dir={edited_only}"]),
    ("symlinked step folder as the only checkpoint", ["trainer.default_local_dir={linked_step}"]),
]

BASE = [f"+ta_opd.toy.spec.{k}={v}" for k, v in TINY.items()] + [
    "ta_opd.cpu.eval_size=4", "data.train_batch_size=4", "actor_rollout_ref.rollout.n=2",
    "data.max_response_length=8", "trainer.total_training_steps=1", "trainer.logger=[]",
    "+ta_opd.cpu.heldout_kl_prompts=4"]


def _hold_lock(folder, ready, done):
    from recipe.ta_opd import runlock

    runlock.acquire(folder, log=lambda *_: None)
    ready.set()
    done.wait(3600)  # released at teardown; 120 s ran out before the lock cases on a loaded machine


@pytest.fixture(scope="module")
def files(tiny_pair, tmp_path_factory):
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, pair = tiny_pair
    d = tmp_path_factory.mktemp("bad")
    f = {"student": pair.student, "teacher": pair.teacher, "train": pair.train_file, "val": pair.val_file,
         "cache": cache, "tmp": d, "toy": pair.root}
    (d / "a_file").write_text("not a folder")
    f["a_file"] = d / "a_file"
    (d / "empty_dir").mkdir()
    f["empty_dir"] = d / "empty_dir"

    def copy(name, src=pair.student):
        shutil.copytree(src, d / name)
        f[name] = d / name
        return d / name

    (copy("bad_config") / "config.json").write_text("{not json")
    cfg = json.loads((pair.student / "config.json").read_text())
    (copy("unknown_arch") / "config.json").write_text(json.dumps({**cfg, "model_type": "no_such_model"}))
    for w in copy("no_weights").glob("*.safetensors"):
        w.unlink()
    w = next(copy("truncated").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    for t in copy("no_tokenizer").glob("*token*"):
        t.unlink()
    for name, src, value in (("nan_student", pair.student, float("nan")), ("inf_teacher", pair.teacher, float("inf"))):
        m = AutoModelForCausalLM.from_pretrained(src)
        with torch.no_grad():
            next(m.parameters())[0, 0] = value
        m.save_pretrained(d / name)
        AutoTokenizer.from_pretrained(src).save_pretrained(d / name)
        f[name] = d / name
    other = copy("other_tokenizer", pair.teacher)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<|extra|>"])
    tok.save_pretrained(other)
    m = AutoModelForCausalLM.from_pretrained(pair.student)
    with torch.no_grad():
        next(m.parameters()).mul_(1.01)
    m.save_pretrained(d / "other_student")
    AutoTokenizer.from_pretrained(pair.student).save_pretrained(d / "other_student")
    f["other_student"] = d / "other_student"

    (d / "zero.parquet").write_bytes(b"")
    f["zero_byte"] = d / "zero.parquet"
    rows = pd.read_parquet(pair.train_file)
    rows.to_csv(d / "csv.parquet")
    f["csv"] = d / "csv.parquet"
    for name, frame in (("no_prompt", rows.drop(columns=["prompt"])), ("no_rows", rows.iloc[:0]),
                        ("string_prompt", rows.assign(prompt="What is 2+2?")),
                        ("no_truth", rows.assign(reward_model=[{"style": "rule"}] * len(rows)))):
        frame.to_parquet(d / f"{name}.parquet")
        f[name] = d / f"{name}.parquet"

    for name, text in (("tracker_abc", "abc"), ("tracker_empty", "")):
        (d / name / "checkpoints").mkdir(parents=True)
        (d / name / "checkpoints" / "latest_checkpointed_iteration.txt").write_text(text)
        f[name] = d / name
    ck = d / "corrupt_only" / "checkpoints" / "global_step_1"
    ck.mkdir(parents=True)
    (ck / "state.json").write_text("{trunc")
    (ck / "state.safetensors").write_bytes(b"")
    (ck.parent / "latest_checkpointed_iteration.txt").write_text("1")
    f["corrupt_only"] = d / "corrupt_only"
    ck = d / "planted" / "checkpoints" / "global_step_1"
    ck.mkdir(parents=True)
    (ck / "state.pt").write_bytes(_marker_pickle(d / "PWNED"))
    (ck.parent / "latest_checkpointed_iteration.txt").write_text("1")
    f["planted"] = d / "planted"

    # real finished runs to resume with other settings: toy pair, own models, two steps
    for name, extra in (("finished_run", []), ("own_run", own()), ("two_step_run", ["trainer.total_training_steps=2"])):
        status, _, err = run(_fill(BASE + [f"ta_opd.toy.cache_dir={cache}", f"trainer.default_local_dir={d / name}"]
                                   + extra, f))
        assert status == 0, err[-3000:]
        f[name] = d / name
    (d / "victim.txt").write_text("not yours")  # what a planted lock link points at; must stay intact
    (d / "linked_lock").mkdir()
    (d / "linked_lock" / ".ta_opd.lock").symlink_to(d / "victim.txt")
    f["linked_lock"] = d / "linked_lock"
    shutil.copytree(d / "finished_run" / "checkpoints", d / "edited_only" / "checkpoints")
    meta = d / "edited_only" / "checkpoints" / "global_step_1" / "state.json"
    edited = json.loads(meta.read_text())
    edited["state"]["step"] = "two"  # a hand edit: int("two") used to be a traceback
    meta.write_text(json.dumps(edited))
    f["edited_only"] = d / "edited_only"
    (d / "linked_step" / "checkpoints").mkdir(parents=True)
    (d / "linked_step" / "checkpoints" / "global_step_1").symlink_to(d / "finished_run" / "checkpoints" / "global_step_1")
    (d / "linked_step" / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("1")
    f["linked_step"] = d / "linked_step"

    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(d / "locked"), ready, done), daemon=True)
    holder.start()
    assert ready.wait(60)
    f["locked"] = d / "locked"
    yield f
    done.set()
    holder.join(30)


def _marker_pickle(marker: Path) -> bytes:
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Payload())


def _fill(overrides: list[str], f: dict) -> list[str]:
    return [o.format(**{k: str(v) for k, v in f.items()}) for o in overrides]


def _normalize(msg: str, f: dict) -> str:
    msg = msg.replace(str(f["tmp"]), "<tmp>").replace(str(f["toy"]), "<toy>").replace(str(f["cache"]), "<cache>")
    msg = msg.replace(str(ROOT), ".")
    msg = re.sub(r"\(content [0-9a-f]{8}\)", "(content <hash>)", msg)
    msg = re.sub(r"pid \d+ on host \S+ \(started [^;]*; command: [^)]*\)", "pid <pid> on host <host> (...)", msg)
    msg = re.sub(r"but [0-9.]+ GiB is available", "but <available> GiB is available", msg)  # the machine's
    msg = re.sub(r"integer in \[1, \d+\] \(the CPUs visible", "integer in [1, <cpus>] (the CPUs visible", msg)
    msg = re.sub(r"_[0-9a-f]{6} \(nothing is overwritten\)", "_<tag> (nothing is overwritten)", msg)  # identity hash
    return msg


def _table(results: list[tuple[str, list[str], str]]) -> str:
    lines = ["# Bad inputs and what the CPU entry point says", "",
             "Generated by `tests/test_bad_inputs.py` (`TA_OPD_WRITE_BAD_INPUTS=1` rewrites it; otherwise the test",
             "fails when a message changes). Every case exits with status 2 before the first training step;",
             f"none ends in a traceback. {len(results)} cases. `<tmp>` is the test's scratch folder, `<toy>` the cached toy pair; the toy "
             "overrides every case adds (tiny spec, 1 step) are left out.", "",
             "| # | bad input | overrides | message (`[ta-opd] error: ...`) |", "|---|---|---|---|"]
    for i, (what, overrides, msg) in enumerate(results, 1):
        cell = msg.removeprefix("[ta-opd] error: ").replace("|", "\\|")
        lines.append(f"| {i} | {what} | `{' '.join(overrides)}` | {cell} |")
    return "\n".join(lines) + "\n"


@pytest.mark.slow
def test_every_bad_input_gets_a_clear_error(files, tmp_path):
    results, failures = [], []
    for i, (what, overrides) in enumerate(CASES):
        out = tmp_path / f"case{i}"
        args = BASE + [f"ta_opd.toy.cache_dir={files['cache']}", f"trainer.default_local_dir={out}"]
        status, stdout, err = run(_fill(args + overrides, files))
        lines = [ln for ln in err.splitlines() if ln.startswith("[ta-opd] error: ")]
        if status != 2 or len(lines) != 1 or "Traceback" in err:
            failures.append(f"{what}: status {status}\n{err[-2500:]}")
            continue
        assert not (out / "checkpoints").exists(), what  # failed before the first step
        results.append((what, [_normalize(o, files) for o in _fill(overrides, files)], _normalize(lines[0], files)))
    assert not failures, "\n\n".join(failures)
    assert len(results) >= 108  # the table never loses a case
    assert not (files["tmp"] / "PWNED").exists(), "a planted pickle ran"
    assert (files["tmp"] / "victim.txt").read_text() == "not yours", "a lock was written through a link"
    table = _table(results)
    if os.environ.get("TA_OPD_WRITE_BAD_INPUTS"):
        TABLE.write_text(table)
    assert TABLE.exists() and TABLE.read_text() == table, \
        "docs/bad_inputs.md is stale: rerun with TA_OPD_WRITE_BAD_INPUTS=1 and commit it"


@pytest.mark.parametrize("field", ["C", "C_hat", "H", "missing"])
def test_select_positions_rejects_mismatched_statistic_shapes(field):
    """Before: C of another shape than D raised a raw IndexError deep inside normalization."""
    from dataclasses import replace

    import torch

    from ta_opd import TAConfig
    from ta_opd.errors import TAInputError
    from ta_opd.select import select_positions
    from ta_opd.stats import dense_position_stats

    gen = torch.Generator().manual_seed(0)
    stats = dense_position_stats(torch.randn(2, 5, 11, generator=gen), torch.randn(2, 5, 11, generator=gen), topk=3)
    valid = torch.ones(2, 5, dtype=torch.bool)
    cfg = TAConfig(topk=3, teacher_topk=3, compatibility="lower_bound" if field == "C_hat" else "exact")
    select_positions(stats, valid, cfg, step=0)  # the consistent batch is accepted
    bad = replace(stats, **{field: getattr(stats, field)[:, :4]})
    with pytest.raises(TAInputError, match=rf"stats.{field} has shape \(2, 4\), but stats.D has \(2, 5\)"):
        select_positions(bad, valid, cfg, step=0)


@pytest.mark.parametrize("flag,value", [("--n-boot", "0"), ("--max-tokens", "0"), ("--max-responses", "0"),
                                        ("--responses-per-prompt", "0"), ("--ks", "0"), ("--budgets", "1.5"),
                                        ("--seed", "-1"), ("--winsorize", "0.5")])
def test_diagnose_rejects_out_of_range_flags(flag, value, tmp_path, capsys):
    """Before: --n-boot 0 and --max-tokens 0 ended in tracebacks after the models were loaded."""
    from ta_opd.tools.diagnose.__main__ import cli

    missing = str(tmp_path / "missing")  # the flag check must come before any model is opened
    rc = cli(["--theta0", missing, "--theta-tau", missing, "--teacher", missing, "--bank", missing,
              "--out", str(tmp_path / "out"), flag, value])
    assert rc == 2
    assert f"[ta-opd diagnose] error: {flag}=" in capsys.readouterr().err


def test_every_cpu_knob_is_one_row_of_the_plan():
    """A CPU knob is declared once (field, Hydra key, rule); the plan reads every one of them."""
    from dataclasses import fields

    from recipe.ta_opd.cpu.plan import KNOBS, read
    from recipe.ta_opd.cpu.trainer import CPURunConfig
    from tests.cli_inprocess import config

    names, keys = [k.field for k in KNOBS], [k.key for k in KNOBS]
    assert len(set(names)) == len(names) and len(set(keys)) == len(keys)
    derived = {"ta", "pair", "test_file"}  # the TAConfig; what resolving the pair gives
    plan_only = {"num_threads", "cache_dir", "resume_from_path"}  # the plan's own, not the trainer's
    assert set(names) - plan_only == {f.name for f in fields(CPURunConfig)} - derived
    values = read(config(["trainer.experiment_name=t", "trainer.logger=console", "ta_opd.cpu.betas=[0,0.5]"]))
    assert set(values) == set(names)
    assert values["loggers"] == ("console",) and values["betas"] == (0.0, 0.5)  # one name is a list of one
    assert values["vocab_mismatch_ok_ids"] == () and values["chat_template_kwargs"] == {}


# --- issue 20: the core API refuses what the command line refuses ----------------------------------
def test_core_refuses_a_seed_beyond_64_bits_and_a_negative_clip():
    import torch

    from ta_opd import TAConfig
    from ta_opd.errors import TAConfigError
    from ta_opd.losses import LossInputs, compute_loss

    TAConfig(seed=2**64 - 1)  # the widest seed torch and numpy's SeedSequence take
    with pytest.raises(TAConfigError, match=r"seed=1180591620717411303424 is not allowed; .*\[0, 18446744073709551615\]"):
        TAConfig(seed=2**70)
    lp = torch.zeros(1, 3)
    inp = LossInputs(mask=torch.ones(1, 3, dtype=torch.bool), log_prob=lp, old_log_prob=lp, teacher_log_prob=lp)
    compute_loss("pg_opd", inp)
    for kw, msg in (({"clip_low": -1}, "clip_low=-1 is not allowed"), ({"clip_low": 1.0}, "clip_low=1.0 is not allowed"),
                    ({"clip_high": float("nan")}, "clip_high=nan is not allowed")):
        with pytest.raises(TAConfigError, match=msg):
            compute_loss("pg_opd", inp, **kw)


def test_statistics_refuse_positions_with_fewer_than_k_finite_logits():
    """Before: a position with fewer than K finite logits gave non-finite D/C silently."""
    import torch

    from ta_opd.errors import TAInputError
    from ta_opd.stats import dense_position_stats, student_topk

    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 10, generator=gen), torch.randn(2, 3, 10, generator=gen)
    s[1, 2, 2:] = t[1, 2, 2:] = float("-inf")  # 2 finite logits at flattened position 5 (both models)
    with pytest.raises(TAInputError, match=r"1 position\(s\) have fewer than topk=3 finite values \(first: flattened "
                                           r"position 5, 2 finite\)"):
        dense_position_stats(s, t, topk=3)
    with pytest.raises(TAInputError, match="fewer than topk=3"):
        student_topk(s, topk=3)
    assert torch.isfinite(dense_position_stats(s, t, topk=2).D).all()  # K finite values are enough
    t[0, 1, 1:] = float("-inf")  # only the teacher short at position 1
    with pytest.raises(TAInputError, match=r"teacher logits at flattened position 1 have fewer than topk=2"):
        dense_position_stats(s, t, topk=2)


def test_diagnose_with_a_config_json_that_is_not_json(tmp_path, capsys):
    """Before: transformers' OSError escaped as a traceback."""
    from ta_opd.tools.diagnose.__main__ import cli

    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    rc = cli(["--theta0", str(bad), "--theta-tau", str(bad), "--teacher", str(bad), "--bank", str(tmp_path / "b"),
              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"[ta-opd diagnose] error: --theta0={bad} cannot be loaded as a Hugging Face model")
    assert "Traceback" not in err
