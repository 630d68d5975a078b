"""The FSDP2 teacher worker group on a CPU Ray pool with 2 ranks (gloo) returns exactly what a
single-process computation returns; the shipped fields are what ta_opd.teacher_outputs gives."""

import pytest
import torch

from recipe.ta_opd.verl_backend import fields as F
from recipe.ta_opd.verl_backend.teacher import TeacherWorkerConfig, compute_teacher_fields, load_teacher
from ta_opd.teacher_outputs import teacher_outputs
from tests.verl.helpers import VOCAB, rollout_batch, tiny_qwen3


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tiny_qwen3(path, seed=1)
    return str(path)


def _cfg(path, **kw):
    return TeacherWorkerConfig(model_path=path, vocab_size=VOCAB, teacher_topk=8, micro_batch_size=4, chunk_size=5,
                               param_dtype="float32", **kw)


def test_fields_match_unbatched_teacher_outputs(teacher_path):
    batch = rollout_batch()
    model = load_teacher(teacher_path, torch.float32)
    out = compute_teacher_fields(model, batch, _cfg(teacher_path))
    B, S = batch["input_ids"].shape
    R = batch["responses"].shape[1]
    P = S - R
    for b in range(B):
        keep = batch["attention_mask"][b].bool()
        ids = batch["input_ids"][b][keep].unsqueeze(0)
        logits = model(input_ids=ids).logits[0, :, :VOCAB]  # unpadded, one sequence
        n_resp = int(batch["response_mask"][b].sum())
        n_prompt = int(keep[:P].sum())
        want = teacher_outputs(logits[n_prompt - 1 : n_prompt - 1 + n_resp], batch["responses"][b, :n_resp],
                               teacher_topk=8)
        got_ids = out[F.TEACHER_IDS][b, P - 1 : P - 1 + n_resp]
        torch.testing.assert_close(out[F.TEACHER_LOGPROBS][b, P - 1 : P - 1 + n_resp], want.topk_logp, atol=1e-5, rtol=0)
        assert torch.equal(got_ids, want.topk_ids)
        torch.testing.assert_close(out[F.TEACHER_LOGP][b, :n_resp], want.sampled_logp, atol=1e-5, rtol=0)
        torch.testing.assert_close(out[F.TEACHER_ENTROPY][b, :n_resp], want.entropy, atol=1e-5, rtol=0)
        assert out[F.TEACHER_LOGP][b, n_resp:].abs().sum() == 0  # padding stays zero
        assert out[F.TEACHER_IDS][b, : P - 1].abs().sum() == 0 and out[F.TEACHER_IDS][b, P - 1 + n_resp :].abs().sum() == 0


def test_two_rank_fsdp2_group_equals_single_process(ray_cpu, teacher_path):
    from verl import DataProto
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

    from recipe.ta_opd.verl_backend.teacher import TATeacherWorker

    # the padded layout's bits do not depend on how rows are grouped; the real-token layouts' group
    # rows by length per rank: tests/verl/test_teacher_packing.py checks those against each shard
    cfg = _cfg(teacher_path, layout="padded")
    batch = rollout_batch(B=6)
    pool = RayResourcePool(process_on_nodes=[2], use_gpu=False, max_colocate_count=1)
    wg = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=RayClassWithInitArgs(
        cls=ray_cpu.remote(TATeacherWorker), config=cfg.__dict__))
    wg.init_model()
    info = wg.describe()
    assert [i["world_size"] for i in info] == [2, 2] and all(i["sharded"] for i in info)
    assert all(i["local_numel"] < i["full_numel"] for i in info)  # each rank holds a shard only
    assert [i["read_checkpoint"] for i in info] == [True, False]  # one host copy: rank 0's, broadcast
    got = wg.compute_teacher(DataProto.from_dict(tensors=batch))
    want = compute_teacher_fields(load_teacher(teacher_path, torch.float32), batch, cfg)
    for k, v in want.items():
        torch.testing.assert_close(got.batch[k], v, atol=0, rtol=0, msg=k)  # bit for bit
    assert torch.equal(got.batch[F.TEACHER_IDS], want[F.TEACHER_IDS])
