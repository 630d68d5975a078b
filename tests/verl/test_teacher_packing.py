"""The teacher on real tokens (issue 23): the ``sorted`` and ``packed`` layouts give today's padded
forward's fields (fp32, atol 1e-5; ids exactly), the ``padded`` layout IS today's forward (bit for
bit against the pre-issue-23 code kept below), micro-batches respect their token budget, and a
2-rank FSDP2 group with unequal token counts per rank agrees on its number of forwards."""

import pytest
import torch

from recipe.ta_opd.verl_backend import fields as F
from recipe.ta_opd.verl_backend.teacher import (TeacherWorkerConfig, _cost, _sequences, compute_teacher_fields,
                                                load_teacher, plan_micro_batches)
from ta_opd.errors import TAConfigError, TAInputError
from ta_opd.rollout import response_slice
from ta_opd.teacher_outputs import teacher_outputs

VOCAB = 96  # the shared vocabulary; the model has 8 padding rows beyond it
ATOL = 1e-5  # fp32: sorted/packed change only padding and batch composition, i.e. summation order


def tiny_llama(path, seed: int = 3):
    """A random Llama (tied LM head, like SmolLM2) saved to ``path``; logit rows >= VOCAB are padding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)


def ragged_batch(prompt_lens, resp_lens, *, P: int = 9, R: int = 24, seed: int = 0, invalid=()):
    """verl's left/right-padded layout with the given real lengths; ``invalid`` = (row, t) positions
    whose sampled id is a logit padding row (>= VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompt_lens)
    pl, rl = torch.tensor(prompt_lens), torch.tensor(resp_lens)
    pm = torch.arange(P)[None] >= (P - pl)[:, None]  # (B, P) left-padded prompt
    rm = torch.arange(R)[None] < rl[:, None]  # (B, R) right-padded response
    prompts = torch.where(pm, torch.randint(0, VOCAB, (B, P), generator=g), 0)
    responses = torch.where(rm, torch.randint(0, VOCAB, (B, R), generator=g), 0)
    for b, t in invalid:
        responses[b, t] = VOCAB + 3
    attention_mask = torch.cat([pm, rm], dim=1).long()
    return {"input_ids": torch.cat([prompts, responses], dim=1), "attention_mask": attention_mask,
            "position_ids": (attention_mask.cumsum(-1) - 1).clamp_min(0), "responses": responses,
            "response_mask": rm.long()}


# rows: very different response lengths, one empty, one of length 1, sampled ids >= VOCAB (one of
# them the last token of its response, which moves that row's last valid position)
PROMPTS = [9, 3, 5, 2, 7, 4, 9, 6]
RESPONSES = [24, 1, 0, 17, 3, 24, 8, 11]
INVALID = [(0, 5), (3, 16), (7, 0), (7, 10)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(path)
    return str(path)


@pytest.fixture(scope="module")
def model(model_path):
    return load_teacher(model_path, torch.float32)


def _cfg(path, **kw):
    kw = {"micro_batch_size": 4, **kw}
    return TeacherWorkerConfig(model_path=path, vocab_size=VOCAB, teacher_topk=8, chunk_size=5, param_dtype="float32",
                               **kw)


@torch.no_grad()
def pre_issue_23_fields(model, batch, cfg):
    """``compute_teacher_fields`` as it was before issue 23 (verbatim but for names): whole padded
    rows, micro_batch_size at a time, the LM head on the last R + 1 columns."""
    input_ids, responses = batch["input_ids"], batch["responses"]
    B, S = input_ids.shape
    R = responses.shape[1]
    P = S - R
    valid = batch["response_mask"].bool() & (responses < cfg.vocab_size)
    safe_ids = torch.where(valid, responses, torch.zeros_like(responses))
    out = {F.TEACHER_IDS: torch.zeros(B, S, cfg.teacher_topk, dtype=torch.int32),
           F.TEACHER_LOGPROBS: torch.zeros(B, S, cfg.teacher_topk, dtype=torch.float32),
           F.TEACHER_LOGP: torch.zeros(B, R, dtype=torch.float32),
           F.TEACHER_ENTROPY: torch.zeros(B, R, dtype=torch.float32)}
    for a in range(0, B, cfg.micro_batch_size):
        b = min(a + cfg.micro_batch_size, B)
        v = valid[a:b]
        logits = model(input_ids=input_ids[a:b], attention_mask=batch["attention_mask"][a:b],
                       position_ids=batch["position_ids"][a:b], use_cache=False,
                       logits_to_keep=R + 1).logits[:, :R, : cfg.vocab_size]
        for i in range(b - a):
            vi = v[i]
            if not bool(vi.any()):
                continue
            n = int(vi.nonzero().max()) + 1
            tout = teacher_outputs(logits[i, :n], safe_ids[a + i, :n], teacher_topk=cfg.teacher_topk,
                                   chunk_size=cfg.chunk_size, logp_dtype=torch.float32)
            keep = vi[:n]
            row = response_slice(P, n)
            out[F.TEACHER_IDS][a + i, row][keep] = tout.topk_ids[keep]
            out[F.TEACHER_LOGPROBS][a + i, row][keep] = tout.topk_logp[keep]
            out[F.TEACHER_LOGP][a + i, :n][keep] = tout.sampled_logp[keep]
            out[F.TEACHER_ENTROPY][a + i, :n][keep] = tout.entropy[keep]
    return out


def assert_same_fields(got, want, atol):
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype, k
        if v.dtype.is_floating_point:
            torch.testing.assert_close(got[k], v, atol=atol, rtol=0, msg=k)
        else:
            assert torch.equal(got[k], v), k


def test_padded_layout_is_the_pre_issue_23_forward(model, model_path):
    batch = ragged_batch(PROMPTS, RESPONSES, invalid=INVALID)
    cfg = _cfg(model_path, layout="padded")
    assert_same_fields(compute_teacher_fields(model, batch, cfg), pre_issue_23_fields(model, batch, cfg), atol=0)


@pytest.mark.parametrize("layout,mbs,budget", [
    ("sorted", 4, None), ("sorted", None, 40), ("sorted", 3, 64), ("sorted", 1, None),
    ("packed", None, 40), ("packed", 8, 1000), ("packed", 1, None)])
def test_real_token_layouts_equal_the_padded_forward(model, model_path, layout, mbs, budget):
    batch = ragged_batch(PROMPTS, RESPONSES, invalid=INVALID)
    want = pre_issue_23_fields(model, batch, _cfg(model_path, layout="padded"))
    got = compute_teacher_fields(model, batch, _cfg(model_path, layout=layout, micro_batch_size=mbs,
                                                    max_tokens_per_micro_batch=budget))
    assert_same_fields(got, want, atol=ATOL)
    assert got[F.TEACHER_LOGP][2].abs().sum() == 0 and got[F.TEACHER_IDS][2].abs().sum() == 0  # the empty row
    for b, t in INVALID:  # an out-of-vocabulary sampled id gets no teacher fields
        assert got[F.TEACHER_LOGP][b, t] == 0 and got[F.TEACHER_IDS][b, 9 - 1 + t].abs().sum() == 0
    assert (got[F.TEACHER_LOGP][0, :24] != 0).sum() == 23  # the fields are really there


def test_packed_stream_has_no_padding_and_a_block_diagonal_mask(model):
    """The premise of ``packed``: transformers reads restarting position ids as separate sequences
    (sdpa here, no flash-attention): two packed sequences give each one's own logits."""
    ids = [torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 4, 1)]
    alone = [model(input_ids=x[None]).logits[0] for x in ids]
    pos = torch.cat([torch.arange(len(x)) for x in ids])[None]
    packed = model(input_ids=torch.cat(ids)[None], position_ids=pos, attention_mask=None, use_cache=False).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), atol=ATOL, rtol=0)
    # the check can fail: without the restart they are one sequence; and with a KV cache (use_cache
    # defaults to True) transformers skips the packed-sequence detection
    for kw in ({"use_cache": False}, {"position_ids": pos}):
        with pytest.raises(AssertionError):
            torch.testing.assert_close(model(input_ids=torch.cat(ids)[None], **kw).logits[0], torch.cat(alone),
                                       atol=ATOL, rtol=0)


def test_plans_respect_budgets_and_skip_empty_rows(model_path):
    batch = ragged_batch(PROMPTS, RESPONSES, invalid=INVALID)
    P = 9
    valid = batch["response_mask"].bool() & (batch["responses"] < VOCAB)
    seqs = _sequences(batch["attention_mask"], valid, P)
    assert [s.n for s in seqs] == [24, 1, 0, 16, 3, 24, 8, 10]  # (3, 16) and (7, 10) were last: n ends earlier
    assert [s.tokens for s in seqs] == [9 + 23, 3, 0, 2 + 15, 7 + 2, 4 + 23, 9 + 7, 6 + 9]
    for layout in ("sorted", "packed"):
        for budget in (32, 50, 100):
            groups = plan_micro_batches(seqs, _cfg(model_path, layout=layout, micro_batch_size=3,
                                                   max_tokens_per_micro_batch=budget), P)
            assert sorted(s.row for g in groups for s in g) == [0, 1, 3, 4, 5, 6, 7]  # each once, row 2 (empty) none
            assert all(len(g) <= 3 and _cost(g, layout, P) <= budget for g in groups)
    packed = plan_micro_batches(seqs, _cfg(model_path, layout="packed", micro_batch_size=None,
                                           max_tokens_per_micro_batch=64), P)
    assert sum(_cost(g, "packed", P) for g in packed) == sum(s.tokens for s in seqs)  # no padding processed
    padded = plan_micro_batches(seqs, _cfg(model_path, layout="padded", micro_batch_size=3), P)
    assert [[s.row for s in g] for g in padded] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_a_sequence_above_the_token_budget_is_an_error(model, model_path):
    batch = ragged_batch(PROMPTS, RESPONSES)
    with pytest.raises(TAInputError, match=r"sequence 0 needs 32 token positions .*teacher.max_tokens_per_micro_batch=31"):
        compute_teacher_fields(model, batch, _cfg(model_path, layout="packed", max_tokens_per_micro_batch=31))


def test_a_valid_token_after_a_masked_column_is_an_error(model, model_path):
    batch = ragged_batch(PROMPTS, RESPONSES)
    batch["attention_mask"][0, 9 + 3] = 0  # response token 4 follows a column the mask hides
    with pytest.raises(TAInputError, match=r"sequence 0: response token 4 is valid but the token before it \(column 12\) has attention_mask 0"):
        compute_teacher_fields(model, batch, _cfg(model_path))


@pytest.mark.parametrize("kw,match", [
    ({"layout": "pack"}, r"layout='pack' is not allowed; choose one of: sorted, packed, padded"),
    ({"max_tokens_per_micro_batch": 0}, r"max_tokens_per_micro_batch=0 is not allowed; it must be an integer >= 1 or null"),
    ({"micro_batch_size": True}, r"micro_batch_size=True is not allowed"),
    ({"micro_batch_size": None}, r"both null: set at least one"),
    ({"layout": "padded", "max_tokens_per_micro_batch": 64}, r"layout='padded' runs whole padded rows"),
    ({"layout": "padded", "micro_batch_size": None, "max_tokens_per_micro_batch": 64}, r"layout='padded'"),
])
def test_bad_teacher_batching_config(model_path, kw, match):
    with pytest.raises(TAConfigError, match=match):
        _cfg(model_path, **kw)


def test_two_rank_fsdp2_group_with_unequal_token_counts(ray_cpu, model_path):
    """Rank 0 gets the long responses, rank 1 short ones and an empty one: under a token budget
    rank 0 runs more forwards with work, rank 1 joins them with 1-token forwards (else FSDP2's
    collectives would hang). Each rank's fields equal a single process's on its shard (atol 1e-6)
    and today's padded forward on the whole batch (atol 1e-5)."""
    from verl import DataProto
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

    from recipe.ta_opd.verl_backend.teacher import TATeacherWorker

    batch = ragged_batch([9, 4, 7, 3, 2, 5], [24, 22, 19, 2, 0, 1], invalid=[(1, 21), (5, 0)])
    model = load_teacher(model_path, torch.float32)
    cfg = _cfg(model_path, layout="sorted", micro_batch_size=None, max_tokens_per_micro_batch=40)
    P = 9
    valid = batch["response_mask"].bool() & (batch["responses"] < VOCAB)
    seqs = _sequences(batch["attention_mask"], valid, P)
    forwards = [len(plan_micro_batches(seqs[a : a + 3], cfg, P)) for a in (0, 3)]
    assert forwards[0] > forwards[1] >= 0, forwards  # the ranks really disagree before the all_reduce
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
    wg = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=RayClassWithInitArgs(
        cls=ray_cpu.remote(TATeacherWorker), config=cfg.__dict__))
    wg.init_model()
    assert all(i["sharded"] for i in wg.describe())
    got = wg.compute_teacher(DataProto.from_dict(tensors=batch))
    shards = [compute_teacher_fields(model, {k: v[a : a + 3] for k, v in batch.items()}, cfg) for a in (0, 3)]
    # 1e-6, not bit for bit: the Ray workers run another thread count than this process (fp32 gemm
    # blocking); measured 4.8e-7 on teacher_logprobs
    assert_same_fields({k: got.batch[k] for k in shards[0]}, {k: torch.cat([s[k] for s in shards]) for k in shards[0]},
                       atol=1e-6)
    want = pre_issue_23_fields(model, batch, _cfg(model_path, layout="padded"))
    assert_same_fields({k: got.batch[k] for k in want}, want, atol=ATOL)
