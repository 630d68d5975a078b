"""FSDP2 teacher log-prob worker: top-K' ids/log-probs, sampled-token log-prob and entropy.

A verl single-controller ``Worker`` (``@register`` dispatch, ``RayWorkerGroup`` on its own
resource pool). The teacher is sharded with torch FSDP2 (``fully_shard`` per decoder layer, then
the root) across the pool's ranks, built on the meta device and filled from rank 0's copy, so the
host holds one full checkpoint, not one per rank; data parallelism is verl's DP_COMPUTE_PROTO split.

Memory: the forward keeps only the logits that score response tokens (``logits_to_keep``), one
micro-batch at a time, and ``ta_opd.teacher_outputs`` turns them into the shipped fields in
chunks of positions, so no full-vocabulary fp32 log-prob tensor of a micro-batch ever exists.

Output layout (what verl's ``left_right_2_no_padding`` expects of ``teacher_ids`` and
``teacher_logprobs``): (B, S, K') over the whole left/right-padded sequence, where row P-1+t
(P = prompt width) holds the teacher's top-K' for response token t; other rows are zeros, as in
verl's own teacher. Per response position: ``ta_opd_teacher_logp`` and ``ta_opd_teacher_entropy``
(B, R) fp32.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from verl import DataProto
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register

from recipe.ta_opd.verl_backend import fields as F
from ta_opd._checks import is_int
from ta_opd.errors import TAConfigError
from ta_opd.rollout import response_slice
from ta_opd.teacher_outputs import teacher_outputs

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str, key: str) -> torch.dtype:
    if name not in _DTYPES:
        raise TAConfigError(f"{key}={name!r} is not allowed; choose one of: {', '.join(_DTYPES)}")
    return _DTYPES[name]


@dataclass(frozen=True)
class TeacherWorkerConfig:
    model_path: str
    vocab_size: int  # shared tokenizer vocabulary; logits beyond it are padding rows, sliced off
    teacher_topk: int = 64  # K': ids/log-probs shipped per response position
    micro_batch_size: int = 4  # sequences per teacher forward
    chunk_size: int = 64  # positions per chunk of the log-softmax / top-K' pass
    param_dtype: str = "bfloat16"
    logp_dtype: str = "float32"  # dtype of the shipped top-K' log-probs
    fsdp: bool = True  # shard with FSDP2 when the group has more than one rank
    timeout_s: int = 3600  # process-group timeout: rank 0 reads (or downloads) the checkpoint before the first collective

    def __post_init__(self):
        _dtype(self.param_dtype, "ta_opd.teacher.param_dtype")
        _dtype(self.logp_dtype, "ta_opd.teacher.logp_dtype")
        for name in ("teacher_topk", "micro_batch_size", "chunk_size", "vocab_size", "timeout_s"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise TAConfigError(f"teacher {name}={v!r} is not allowed; it must be an integer >= 1")


def load_teacher(path: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval().requires_grad_(False)
    return model


def load_sharded_teacher(path: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The teacher as FSDP2 shards with ONE full copy in host memory (rank 0's), not one per rank:
    every rank builds the model on the meta device and shards it; rank 0 reads the checkpoint and
    the shards are filled by broadcast. Buffers that are not in the state dict (e.g. rotary
    frequencies) are broadcast from rank 0 too."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    rank0 = dist.get_rank() == 0
    full = load_teacher(path, dtype) if rank0 else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    model.eval().requires_grad_(False)
    shard_fsdp2(model, device)
    model.to_empty(device=device)
    set_model_state_dict(model, full.state_dict() if rank0 else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    full_buffers = dict(full.named_buffers()) if rank0 else {}
    for name, buf in model.named_buffers():
        if rank0:
            buf.copy_(full_buffers[name])
        dist.broadcast(buf, src=0)
    del full
    return model


def shard_fsdp2(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """FSDP2: one shard group per decoder layer, then the root (embeddings, norm, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise TAConfigError(f"cannot shard teacher {type(model).__name__}: expected decoder layers at model.model.layers")
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@torch.no_grad()
def compute_teacher_fields(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TeacherWorkerConfig,
                           device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The teacher fields of a left/right-padded batch (see module docstring); pure given the model.

    batch: input_ids, attention_mask, position_ids (B, S); responses, response_mask (B, R).
    """
    input_ids, responses = batch["input_ids"], batch["responses"]
    B, S = input_ids.shape
    R = responses.shape[1]
    P = S - R
    # a sampled id outside the shared vocabulary (the rollout samples over every logit row, padding
    # rows included) has no teacher probability: such positions get no teacher fields; the driver
    # has already taken them out of selection and the loss (ta_opd/invalid_sampled_fraction)
    valid = batch["response_mask"].bool() & (responses < cfg.vocab_size)
    safe_ids = torch.where(valid, responses, torch.zeros_like(responses))  # (B, R) in [0, V)
    logp_dtype = _dtype(cfg.logp_dtype, "ta_opd.teacher.logp_dtype")
    out = {
        F.TEACHER_IDS: torch.zeros(B, S, cfg.teacher_topk, dtype=torch.int32),
        F.TEACHER_LOGPROBS: torch.zeros(B, S, cfg.teacher_topk, dtype=logp_dtype),
        F.TEACHER_LOGP: torch.zeros(B, R, dtype=torch.float32),
        F.TEACHER_ENTROPY: torch.zeros(B, R, dtype=torch.float32),
    }
    for a in range(0, B, cfg.micro_batch_size):
        b = min(a + cfg.micro_batch_size, B)
        v = valid[a:b]
        # never skip a forward: under FSDP2 every rank must run the same number of them (collectives)
        logits = model(
            input_ids=input_ids[a:b].to(device), attention_mask=batch["attention_mask"][a:b].to(device),
            position_ids=batch["position_ids"][a:b].to(device), use_cache=False, logits_to_keep=R + 1,
        ).logits[:, :R, : cfg.vocab_size]  # (mb, R, V): row t scores response token t
        for i in range(b - a):
            vi = v[i]
            if not bool(vi.any()):
                continue
            n = int(vi.nonzero().max()) + 1  # a view up to the last valid position: no (N, V) copy
            tout = teacher_outputs(logits[i, :n], safe_ids[a + i, :n].to(logits.device), teacher_topk=cfg.teacher_topk,
                                   chunk_size=cfg.chunk_size, logp_dtype=logp_dtype)
            keep = vi[:n]
            row = response_slice(P, n)
            out[F.TEACHER_IDS][a + i, row][keep] = tout.topk_ids.cpu()[keep]
            out[F.TEACHER_LOGPROBS][a + i, row][keep] = tout.topk_logp.cpu()[keep]
            out[F.TEACHER_LOGP][a + i, :n][keep] = tout.sampled_logp.cpu()[keep]
            out[F.TEACHER_ENTROPY][a + i, :n][keep] = tout.entropy.cpu()[keep]
        del logits
    return out


class TATeacherWorker(Worker):
    """One rank of the teacher worker group."""

    def __init__(self, config: dict):
        super().__init__()
        self.cfg = TeacherWorkerConfig(**config)
        self.model = None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        if not torch.distributed.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if self.device == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=self.cfg.timeout_s))
        if self.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dtype = _dtype(self.cfg.param_dtype, "ta_opd.teacher.param_dtype")
        sharded = self.cfg.fsdp and torch.distributed.get_world_size() > 1
        self.read_checkpoint = not sharded or torch.distributed.get_rank() == 0
        if sharded:
            self.model = load_sharded_teacher(self.cfg.model_path, dtype, self.device)
        else:
            self.model = load_teacher(self.cfg.model_path, dtype).to(self.device)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def describe(self) -> dict:
        """This rank's view: world size, whether parameters are FSDP2 shards, local element count,
        whether it read the checkpoint from disk."""
        from torch.distributed.tensor import DTensor

        params = list(self.model.parameters())
        return {"world_size": torch.distributed.get_world_size(),
                "sharded": all(isinstance(p, DTensor) for p in params),
                "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in params),
                "full_numel": sum(p.numel() for p in params), "read_checkpoint": self.read_checkpoint}

    @register(dispatch_mode=Dispatch.DP_COMPUTE_PROTO)
    def compute_teacher(self, data: DataProto) -> DataProto:
        batch = {k: data.batch[k] for k in F.TEACHER_INPUTS}
        out = compute_teacher_fields(self.model, batch, self.cfg, device=self.device)
        if self.device == "cuda":  # hand cached blocks back: a colocated rollout/actor needs them next
            torch.cuda.empty_cache()
        return DataProto.from_dict(tensors=out)
