"""The kept-rows plan (ta_opd.kept_rows): golden values on a hand-made packed batch, dropped
sequences, agreement with a per-sequence loop on random inputs, validation errors."""

import pytest
import torch

from ta_opd.errors import TAInputError
from ta_opd.kept_rows import plan_kept_rows


def _t(*xs):
    return torch.tensor(xs, dtype=torch.long)


def test_golden_hand_made_packed_batch():
    # 4 sequences of lengths 3, 4, 2, 3 (N = 12): seq 0 = rows 0-2, seq 1 = rows 3-6,
    # seq 2 = rows 7-8, seq 3 = rows 9-11
    cu = _t(0, 3, 7, 9, 12)
    need = torch.zeros(12, dtype=torch.bool)
    need[[1, 7, 9, 10]] = True  # seq 0 row 1; seq 1 nothing; seq 2 row 7 (its first); seq 3 rows 9, 10
    plan = plan_kept_rows(cu, need)
    assert plan.lengths.tolist() == [2, 0, 1, 2]
    assert plan.token_index.tolist() == [0, 1, 7, 9, 10]
    assert plan.cu_seqlens.tolist() == [0, 2, 3, 5]
    assert plan.logit_rows.tolist() == [1, 2, 3, 4]
    assert plan.orig_rows.tolist() == [1, 7, 9, 10]
    assert plan.kept_sequences.tolist() == [0, 2, 3]
    for t in (plan.lengths, plan.token_index, plan.cu_seqlens, plan.logit_rows, plan.orig_rows):
        assert t.dtype == torch.long
    # the trimmed stream at logit_rows is the original stream at orig_rows
    assert plan.token_index[plan.logit_rows].tolist() == plan.orig_rows.tolist()


def test_nothing_needed_drops_every_sequence():
    plan = plan_kept_rows(_t(0, 3, 5), torch.zeros(5, dtype=torch.bool))
    assert plan.lengths.tolist() == [0, 0]
    assert plan.token_index.numel() == plan.logit_rows.numel() == plan.orig_rows.numel() == 0
    assert plan.cu_seqlens.tolist() == [0]


def test_everything_needed_keeps_the_whole_stream_and_empty_sequences_drop():
    cu = _t(0, 2, 2, 5)  # sequence 1 is empty
    plan = plan_kept_rows(cu, torch.ones(5, dtype=torch.bool))
    assert plan.lengths.tolist() == [2, 0, 3]
    assert plan.token_index.tolist() == list(range(5))
    assert plan.cu_seqlens.tolist() == [0, 2, 5]
    assert plan.logit_rows.tolist() == plan.orig_rows.tolist() == list(range(5))


def test_matches_a_per_sequence_loop_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        n_seq = int(torch.randint(1, 8, (1,), generator=g))
        lens = torch.randint(0, 9, (n_seq,), generator=g)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        need = torch.rand(int(cu[-1]), generator=g) < 0.2
        plan = plan_kept_rows(cu, need)
        lengths, index, kept_lens = [], [], []
        for b in range(n_seq):
            rows = [r for r in range(int(cu[b]), int(cu[b + 1])) if need[r]]
            cut = rows[-1] - int(cu[b]) + 1 if rows else 0
            lengths.append(cut)
            index += list(range(int(cu[b]), int(cu[b]) + cut))
            if cut:
                kept_lens.append(cut)
        assert plan.lengths.tolist() == lengths
        assert plan.token_index.tolist() == index
        assert plan.cu_seqlens.tolist() == [0] + torch.tensor(kept_lens, dtype=torch.long).cumsum(0).tolist()
        assert plan.orig_rows.tolist() == need.nonzero().squeeze(-1).tolist()
        assert plan.token_index[plan.logit_rows].tolist() == plan.orig_rows.tolist()


@pytest.mark.parametrize("cu, need, match", [
    (torch.tensor([0.0, 2.0]), torch.zeros(2, dtype=torch.bool), "cu_seqlens must be a 1-D integer"),
    (_t(0, 2).view(1, 2), torch.zeros(2, dtype=torch.bool), "cu_seqlens must be a 1-D integer"),
    ([0, 2], torch.zeros(2, dtype=torch.bool), "cu_seqlens must be a 1-D integer tensor"),
    (_t(1, 3), torch.zeros(2, dtype=torch.bool), r"start at 0, got cu_seqlens\[0\]=1"),
    (_t(0, 3, 2), torch.zeros(2, dtype=torch.bool), r"non-decreasing; cu_seqlens\[2\]=2 < cu_seqlens\[1\]=3"),
    (_t(0, 2), torch.zeros(2, dtype=torch.long), "need must be a 1-D bool"),
    (_t(0, 2), torch.zeros(1, 2, dtype=torch.bool), "need must be a 1-D bool"),
    (_t(0, 2), torch.zeros(3, dtype=torch.bool), r"need has 3 rows but cu_seqlens\[-1\]=2"),
])
def test_bad_inputs_are_named(cu, need, match):
    with pytest.raises(TAInputError, match=match) as err:
        plan_kept_rows(cu, need)
    assert isinstance(err.value, ValueError)
