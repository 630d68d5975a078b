"""The shipped toy pair (issue 18): it is the default spec's build, intact, loadable, and the
default run uses it without building; an opt-in test rebuilds it and compares."""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from ta_opd.tools.toy import shipped, task
from ta_opd.tools.toy.build import ToySpec, load_or_build

ROOT = Path(__file__).resolve().parents[1]
RESHIP = "python -m ta_opd.tools.toy.build --ship"
# A fresh build may differ from the shipped pair by at most this much student accuracy (greedy
# and sampled, each on the 300 test problems): builds of key 0a726c3c27d5 on two machines of one
# kind differed by 0.013 greedy and 0.020 sampled (issue 18); 0.03 is 9 of 300 problems.
ACCURACY_TOLERANCE = 0.03


def _shipped_root() -> Path:
    key = ToySpec().key()
    root = shipped.find(key)
    present = sorted(p.name for p in shipped.ASSETS.iterdir()) if shipped.ASSETS.is_dir() else []
    assert root is not None, (f"no shipped toy pair for the default ToySpec (key {key}; shipped: {present}): the "
                              f"builder's defaults changed. Re-ship with `{RESHIP}` and re-measure docs/toy.md")
    return root


def test_the_shipped_pair_is_the_default_specs_and_matches_its_manifest():
    root = _shipped_root()
    m = shipped.check(root)  # every file's SHA-256, none missing or added
    assert m["key"] == ToySpec().key() == root.name and m["spec"] == asdict(ToySpec())
    assert [p.name for p in shipped.ASSETS.iterdir()] == [root.name]  # one pair shipped
    names = set(m["files"])
    for model in ("teacher", "student"):
        assert {f"{model}/config.json", f"{model}/model.safetensors", f"{model}/tokenizer.json"} <= names
    assert {f"data/{s}.parquet" for s in ("train", "val", "test")} <= names
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert size < 3e6, f"the shipped pair is {size / 1e6:.2f} MB; it is meant to stay ~2 MB"


def test_a_changed_missing_or_added_file_is_refused(tmp_path):
    copy = tmp_path / "pair"
    shutil.copytree(_shipped_root(), copy)
    shipped.check(copy)
    weights = copy / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(shipped.ShippedPairError, match=r"student/model\.safetensors.*--ship"):
        shipped.check(copy)
    shutil.copy(_shipped_root() / "student" / "model.safetensors", weights)
    (copy / "data" / "extra.parquet").write_bytes(b"")
    (copy / "teacher" / "config.json").unlink()
    with pytest.raises(shipped.ShippedPairError, match=r"data/extra\.parquet, teacher/config\.json"):
        shipped.check(copy)


def test_ship_copies_a_built_pair_with_its_hashes_and_replaces_the_old_one(tmp_path):
    built, assets = tmp_path / "built", tmp_path / "assets"
    shutil.copytree(_shipped_root(), built)
    (assets / "0ld0ld0ld0ld").mkdir(parents=True)  # a pair shipped for an earlier default spec
    dest = shipped.ship(built, assets)
    assert dest == assets / ToySpec().key() and [p.name for p in assets.iterdir()] == [dest.name]
    assert shipped.check(dest)["files"] == shipped.file_hashes(built)
    assert {f.stat().st_mode & 0o777 for f in dest.rglob("*") if f.is_file()} == {0o644}


def test_the_shipped_pair_loads_and_its_tokenizer_round_trips_the_task():
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = _shipped_root()
    m = shipped.check(root)
    spec = ToySpec()
    tok = AutoTokenizer.from_pretrained(root / "student")
    assert AutoTokenizer.from_pretrained(root / "teacher").get_vocab() == tok.get_vocab()
    t, s = (AutoModelForCausalLM.from_pretrained(root / name) for name in ("teacher", "student"))
    assert (sum(p.numel() for p in t.parameters()), sum(p.numel() for p in s.parameters())) == \
        (m["teacher_params"], m["student_params"])
    assert t.config.vocab_size == s.config.vocab_size == len(tok) == m["vocab_size"] == 399
    sizes = {name: len(pd.read_parquet(root / "data" / f"{name}.parquet")) for name in ("train", "val", "test")}
    assert sizes == {"train": spec.n_train, "val": spec.n_val, "test": spec.n_test}
    test = pd.read_parquet(root / "data" / "test.parquet")
    for row in test.head(20).itertuples():
        a, b = (int(x) for x in row.prompt[0]["content"].split("+"))
        for text in (task.solution(task.Problem(a, b), ";", "R="), task.solution(task.Problem(a, b), " ", "A:")):
            ids = tok.encode(text, add_special_tokens=False)
            assert len(ids) == len(text) and tok.decode(ids) == text  # one token per character
        prompt = tok.apply_chat_template([dict(m) for m in row.prompt], add_generation_prompt=True, tokenize=False)
        assert prompt == f"<|user|>{a}+{b}<|assistant|>"
        assert int(row.reward_model["ground_truth"]) == a + b


def test_the_default_spec_loads_the_shipped_pair_and_leaves_the_cache_alone(tmp_path, monkeypatch):
    from ta_opd.tools.toy import build

    def no_build(*_):
        raise AssertionError("the default spec must not be built: it is shipped")

    monkeypatch.setattr(build, "_build_in_child", no_build)
    pair = load_or_build(tmp_path / "cache", ToySpec(), log=lambda *_: None)
    assert pair.root == _shipped_root() and pair.student == pair.root / "student"
    assert not (tmp_path / "cache").exists()


def test_another_spec_is_built_into_the_cache(tiny_pair):
    cache, pair = tiny_pair
    assert pair.root.parent == Path(cache) and shipped.find(pair.manifest["key"]) is None


def test_the_default_cpu_run_uses_the_shipped_pair_without_building(tmp_path, monkeypatch):
    from tests.cli_inprocess import run
    from ta_opd.tools.toy import build

    def no_build(*_):
        raise AssertionError("the default spec must not be built: it is shipped")

    monkeypatch.setattr(build, "_build_in_child", no_build)
    root = _shipped_root()
    status, out, err = run([f"ta_opd.toy.cache_dir={tmp_path / 'cache'}", f"trainer.default_local_dir={tmp_path / 'run'}",
                            "trainer.total_training_steps=1", "trainer.test_freq=0", "trainer.save_freq=0",
                            "trainer.logger=[]", "data.train_batch_size=2", "actor_rollout_ref.rollout.n=2",
                            "ta_opd.cpu.eval_size=4", "ta_opd.cpu.heldout_kl_prompts=2", "ta_opd.cpu.num_threads=1"])
    assert status == 0, err[-3000:]
    assert f"toy pair: using the shipped pair {root}" in out
    assert not (tmp_path / "cache").exists()  # nothing built, nothing cached
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student"] == str(root / "student") and summary["teacher"] == str(root / "teacher")
    shipped.check(root)  # the run wrote nothing into the shipped folder


def test_print_root_with_an_empty_cache_answers_without_building(tmp_path):
    env = {**os.environ, "TA_OPD_CACHE": str(tmp_path / "empty"), "OMP_NUM_THREADS": "1"}
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "ta_opd.tools.toy.build", "--print-root"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == str(_shipped_root()), (res.stdout, time.time() - t0)
    assert not (tmp_path / "empty").exists()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # the build: 329 s on an idle machine, 1,017 s under load
@pytest.mark.skipif(os.environ.get("TA_OPD_TEST_TOY_BUILD") != "1",
                    reason="set TA_OPD_TEST_TOY_BUILD=1 to rebuild the default toy pair (6-17 min) and compare it "
                           "with the shipped one")
def test_a_fresh_build_is_close_to_the_shipped_pair(tmp_path):
    from ta_opd.tools.toy.build import build_cached

    ship = shipped.check(_shipped_root())
    fresh = build_cached(tmp_path, ToySpec(), log=lambda *_: None)
    m = fresh.manifest
    got = {k: m[k] for k in ("teacher_accuracy", "student_accuracy", "student_sampled_accuracy_t1")}
    want = {k: ship[k] for k in got}
    hashes = shipped.file_hashes(fresh.root)
    same = {f: hashes[f] == ship["files"][f] for f in ("teacher/model.safetensors", "student/model.safetensors")}
    print(f"fresh build {got} vs shipped {want}; bit-identical weights: {same}; "
          f"build environment {m['build_environment']} vs shipped {ship['build_environment']}")
    assert m["key"] == ship["key"]
    assert got["teacher_accuracy"] == want["teacher_accuracy"]
    for k in ("student_accuracy", "student_sampled_accuracy_t1"):
        assert abs(got[k] - want[k]) <= ACCURACY_TOLERANCE, (k, got[k], want[k])
