"""W&B for real: the CPU backend with ``trainer.logger=[console,wandb]`` in W&B offline mode, the
offline run read back from its ``.wandb`` file (W&B's record log of ``wandb.proto`` Records; wandb
0.31 ships no Python reader, so :func:`wandb_records` reads the log format), and the run folder's
kept-token pages and token export checked against the same numbers."""

import csv
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
BLOCK, HEADER = 32768, 7  # W&B's LevelDB-style log: 32 KiB blocks, 7-byte record headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every ``wandb_internal_pb2.Record`` of an offline run's ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:HEADER] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), "not a W&B run log (version 0)"
    pos, out, parts = HEADER, [], []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:  # zero-filled rest of the last block
            break
        chunk, pos = data[pos + HEADER:pos + HEADER + n], pos + HEADER + n
        parts = [chunk] if kind in (FULL, FIRST) else parts + [chunk]
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            out.append(rec)
    return out


def history_by_step(records) -> dict[int, dict]:
    """{step: {metric name: value}}; a nested value (histogram, media) as a dict of its parts."""
    steps: dict[int, dict] = {}
    for rec in records:
        if rec.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in rec.history.item:
            keys = list(item.nested_key) or [item.key]
            node = row
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)
        steps.setdefault(int(row["_step"]), {}).update(row)
    return steps


def _run(tmp_path, cache, args):
    env = {**os.environ, "TA_OPD_CACHE": str(cache), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    spec = [f"+ta_opd.toy.spec.{k}={v}" for k, v in TINY.items()]
    return subprocess.run([sys.executable, "-m", "recipe.ta_opd.main", *spec, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_histogram_kept_tokens_and_config(tiny_pair, tmp_path):
    from recipe.ta_opd.main import ta_config
    from recipe.ta_opd.naming import run_name
    from tests.cli_inprocess import config

    cache, _ = tiny_pair
    out = tmp_path / "run"
    args = [f"trainer.default_local_dir={out}", "trainer.total_training_steps=3", "trainer.test_freq=2",
            "trainer.logger=[console,wandb]", "trainer.project_name=ta_opd_wandb_test", "ta_opd.cpu.eval_size=8",
            "data.train_batch_size=4", "ta_opd.topk=8", "ta_opd.budget=0.1", "ta_opd.token_export=true"]
    res = _run(tmp_path, cache, args)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = config([f"+ta_opd.toy.spec.{k}={v}" for k, v in TINY.items()] + args)
    name = run_name(cfg, ta_config(cfg.ta_opd))  # what the run is named when experiment_name is null

    logs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    records = wandb_records(logs[0])
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.display_name, run.project) == (name, "ta_opd_wandb_test")

    # the config: the Hydra config (rho, K) and the resolved pair
    conf = {}
    for r in records:
        items = r.config.update if r.WhichOneof("record_type") == "config" else \
            (run.config.update if r.WhichOneof("record_type") == "run" else [])
        conf.update({i.key: json.loads(i.value_json) for i in items})
    assert conf["ta_opd"]["budget"] == 0.1 and conf["ta_opd"]["topk"] == 8 and conf["ta_opd"]["token_export"]
    assert conf["pair"]["name"] == "the CPU toy"
    assert Path(conf["pair"]["student"]).name == "student" and Path(conf["pair"]["teacher"]).name == "teacher"

    # every ta_opd/* metric of metrics.csv, at every step, with the same value
    hist = history_by_step(records)
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(float(r["step"])) >= 1]
    assert [int(float(r["step"])) for r in rows] == [1, 2, 3]
    names = [k for k in rows[0] if k.startswith("ta_opd/") and rows[0][k] not in ("", None)]
    assert len(names) >= 30, names  # the issue counts ~36
    for r in rows:
        step = int(float(r["step"]))
        for k in names:
            assert k in hist[step], (step, k)
            assert math.isclose(hist[step][k], float(r[k]), rel_tol=1e-6, abs_tol=1e-9), (step, k)

        # the score histogram counts every valid position of the step
        h = hist[step]["ta_opd/score_hist"]
        assert sum(h["values"]) == int(float(r["ta_opd/valid_count"])) and len(h["bins"]) == len(h["values"]) + 1

        # the token export: one row per valid position, the kept ones as many as the selection kept
        import pandas as pd

        tok = pd.read_parquet(out / "tokens" / f"step_{step}.parquet")
        assert len(tok) == int(float(r["ta_opd/valid_count"]))
        assert int(tok["kept"].sum()) == int(float(r["ta_opd/kept_count"]))
        assert set(tok["step"]) == {step}

    # the kept-token page: every test_freq steps and at the end, in the run folder and as a W&B panel
    assert sorted(p.name for p in (out / "kept_tokens").iterdir()) == ["step_2.html", "step_3.html"]
    assert "ta_opd/kept_tokens" not in hist[1]
    for step in (2, 3):
        panel = hist[step]["ta_opd/kept_tokens"]
        assert panel["_type"] == "html-file"
        page = (out / "kept_tokens" / f"step_{step}.html").read_text(encoding="utf-8")
        assert (logs[0].parent / "files" / panel["path"]).read_text(encoding="utf-8") == page
        assert f"step {step}" in page and "ρ = 0.1" in page and 'class="tok kept"' in page
