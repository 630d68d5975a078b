"""Global selection across data-parallel shards (2 gloo ranks) equals single-process selection."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ta_opd import TAConfig, select_positions
from tests.test_selection import make_stats


def _batch():
    g = torch.Generator().manual_seed(0)
    B, T = 7, 19
    valid = torch.rand(B, T, generator=g) > 0.25
    raw = [torch.rand(B, T, generator=g) * s for s in (5.0, 1.0, 3.0)]
    return raw, valid


def _worker(rank, world, init_file, out_file, selector):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from ta_opd.distributed import select_across_ranks

    raw, valid = _batch()
    rows = [slice(0, 3), slice(3, 7)][rank]  # ragged shards: 3 and 4 sequences
    mask, sel = select_across_ranks(make_stats(*(r[rows] for r in raw)), valid[rows], TAConfig(selector=selector), step=5)
    torch.save({"mask": mask, "ratio": sel.metrics["ta_opd/kept_ratio"]}, f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_two_rank_selection_equals_single_process(tmp_path):
    for selector in ("teachability", "random", "q3_tip"):
        init_file = tempfile.mktemp(dir=tmp_path)
        out_file = str(tmp_path / f"out_{selector}")
        mp.spawn(_worker, args=(2, init_file, out_file, selector), nprocs=2, join=True)
        raw, valid = _batch()
        want = select_positions(make_stats(*raw), valid, TAConfig(selector=selector), step=5)
        got = [torch.load(f"{out_file}.{r}") for r in range(2)]
        assert torch.equal(torch.cat([got[0]["mask"], got[1]["mask"]]), want.mask), selector
        assert got[0]["ratio"] == got[1]["ratio"] == want.metrics["ta_opd/kept_ratio"]
