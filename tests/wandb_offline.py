"""Reading an offline W&B run back, for the tests of both backends (``tests/test_wandb_offline.py``,
``tests/verl/test_fit_shipped.py``).

An offline run's ``.wandb`` file is W&B's record log of ``wandb.proto`` Records; wandb 0.31 ships no
Python reader, so :func:`wandb_records` reads the log format. :func:`check_run` holds a run to what
``recipe/ta_opd/logged.py`` says its backend logs."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

BLOCK, HEADER = 32768, 7  # W&B's LevelDB-style log: 32 KiB blocks, 7-byte record headers
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}  # plus WANDB_DIR=<the test's tmp folder>


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


@dataclass
class OfflineRun:
    folder: Path  # wandb/offline-run-*/
    run: object  # the RunRecord: display_name, project, run_group
    config: dict  # the logged config, updates applied
    history: dict[int, dict]  # history_by_step
    exit_code: int | None  # of the exit record; None when the run was never finished


def read_run(wandb_dir: Path) -> OfflineRun:
    """The one offline run under ``wandb_dir`` (``$WANDB_DIR``)."""
    logs = list(Path(wandb_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    records = wandb_records(logs[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r, k in zip(records, kinds) if k == "run")
    conf: dict = {}
    for r, k in zip(records, kinds):
        items = r.config.update if k == "config" else (run.config.update if k == "run" else [])
        conf.update({i.key: json.loads(i.value_json) for i in items})
    exit_code = next((r.exit.exit_code for r, k in zip(records, kinds) if k == "exit"), None)
    return OfflineRun(logs[0].parent, run, conf, history_by_step(records), exit_code)


def check_run(r: OfflineRun, steps: list[int], expected: tuple[str, ...], page_steps: list[int],
              occasional: tuple[str, ...] = (), finished: bool = True) -> None:
    """Every training step logged exactly the ``ta_opd/*`` names ``expected`` holds (plus, at some
    steps, those of ``occasional``: the evaluations'), each a number, the other ``expected`` names
    too, the score histogram every step and the kept-token page (an HTML file of the run) at
    ``page_steps`` only; the run was finished."""
    from recipe.ta_opd import logged as L

    want = {k for k in expected if k.startswith("ta_opd/")}
    for step in steps:
        h = r.history[step]
        got = {k for k in h if k.startswith("ta_opd/")} - {L.SCORE_HIST, L.KEPT_TOKENS, *occasional}
        assert sorted(got - want) == [] and sorted(want - got) == [], (step, sorted(got ^ want))
        for k in expected:
            assert k in h and isinstance(h[k], (int, float)), (step, k, h.get(k))
        hist = h["ta_opd/score_hist"]
        assert hist["_type"] == "histogram" and len(hist["bins"]) == len(hist["values"]) + 1, hist
        assert sum(hist["values"]) == int(h["ta_opd/valid_count"]), (step, hist)
        if step in page_steps:
            panel = h["ta_opd/kept_tokens"]
            assert panel["_type"] == "html-file" and (r.folder / "files" / panel["path"]).is_file(), panel
        else:
            assert "ta_opd/kept_tokens" not in h, step
    if finished:
        assert r.exit_code == 0, r.exit_code  # the run was finished, not left open
