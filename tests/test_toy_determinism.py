"""The toy build is reproducible: the same spec builds bit-identical weights and the same manifest
accuracies whatever the calling process's thread count and CPU-kernel settings (issue 11, "Also")."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
SPEC = {**TINY, "teacher_steps": 8, "student_steps": 4, "n_test": 8}  # a few SFT steps are enough to diverge

BUILD = """
import hashlib, json, sys
import torch
torch.set_num_threads(int(sys.argv[2]))
from safetensors.torch import load_file
from ta_opd.tools.toy.build import ToySpec, load_or_build
pair = load_or_build(sys.argv[1], ToySpec(**json.loads(sys.argv[3])), log=lambda *_: None)
digest = {}
for name in ("teacher", "student"):
    sd = load_file(str(getattr(pair, name) / "model.safetensors"))
    digest[name] = hashlib.sha256(b"".join(k.encode() + sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest()
m = pair.manifest
print(json.dumps({"weights": digest, "key": m["key"], "threads_after": torch.get_num_threads(),
                  "accuracy": [m["teacher_accuracy"], m["student_accuracy"]], "compatibility": m["compatibility"],
                  "env": m["build_environment"]}))
"""

# Two "machines": different thread counts and CPU-kernel paths in the calling process. Each of
# these settings alone changed the built weights when the build ran in the caller's process.
MACHINES = [
    {"threads": 1, "env": {"OMP_NUM_THREADS": "1"}},
    {"threads": 2, "env": {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "AUTO"}},
]


def _build(cache: Path, machine: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    env.update(machine["env"])
    res = subprocess.run([sys.executable, "-c", BUILD, str(cache), str(machine["threads"]), json.dumps(SPEC)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_same_spec_builds_the_same_pair_under_two_thread_settings(tmp_path):
    a, b = (_build(tmp_path / f"machine{i}", m) for i, m in enumerate(MACHINES))
    assert a["weights"] == b["weights"]
    assert (a["accuracy"], a["compatibility"]) == (b["accuracy"], b["compatibility"])
    assert a["key"] == b["key"]
    assert [a["threads_after"], b["threads_after"]] == [1, 2]  # the caller's setting is left alone
    for got in (a, b):  # what the pair depends on is recorded
        env = got["env"]
        assert env["threads"] == 1 and env["deterministic_algorithms"] is True
        assert env["torch"] and env["cpu_capability"] == "DEFAULT" and env["env"]["MKL_CBWR"] == "COMPATIBLE"


def test_cache_key_covers_the_build_recipe(monkeypatch):
    from ta_opd.tools.toy import build

    spec = build.ToySpec(**TINY)
    key = spec.key()
    monkeypatch.setattr(build, "BUILD_RECIPE", build.BUILD_RECIPE + 1)
    assert spec.key() != key
    monkeypatch.setattr(build, "BUILD_ENV", {**build.BUILD_ENV, "MKL_CBWR": "AUTO"})
    assert len({key, spec.key()}) == 2


def test_deterministic_build_restores_the_callers_settings():
    import torch

    from ta_opd.tools.toy.build import deterministic_build

    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    with deterministic_build(threads=1):
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
