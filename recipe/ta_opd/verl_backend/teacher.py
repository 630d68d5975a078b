"""FSDP2 teacher log-prob worker: top-K' ids/log-probs, sampled-token log-prob and entropy.

A verl single-controller ``Worker`` (``@register`` dispatch, ``RayWorkerGroup`` on its own
resource pool). The teacher is sharded with torch FSDP2 (``fully_shard`` per decoder layer, then
the root) across the pool's ranks, built on the meta device and filled from rank 0's copy, so the
host holds one full checkpoint, not one per rank; data parallelism is verl's DP_COMPUTE_PROTO split.

Real tokens only (``layout``): a sequence's work ends at its last valid response position (one
with none costs no forward), and
- ``sorted`` (default): sequences sorted by response length, grouped while the group stays within
  ``micro_batch_size`` sequences and ``max_tokens_per_micro_batch`` token positions; each forward
  is the group's rows of the padded batch cropped to the group's columns (left: its longest real
  prompt; right: its last scored position), so padding is what sorting leaves. Attention costs
  ~ rows x width^2, as unpadded.
- ``packed``: the group's real tokens as one (1, T) stream with position ids restarting per
  sequence (no padding at all); transformers builds the block-diagonal causal mask from them
  (``masking_utils.find_packed_sequence_indices``) or runs varlen flash-attention. With sdpa/eager
  attention the mask is dense (T x T), so attention costs T^2 over the whole stream: the layout
  for flash-attention on GPU, not for CPU.
- ``padded``: today's forward before issue 23, kept as the reference and fallback: every row, all
  S columns, ``micro_batch_size`` rows at a time in batch order.
The LM head runs at the rows that score response tokens only (``logits_to_keep``: the last n
columns, or a 1-D index into the packed stream), and ``ta_opd.teacher_outputs`` turns them into the
shipped fields in chunks of positions, so no full-vocabulary fp32 log-prob tensor of a
micro-batch ever exists. Ranks hold different token counts, so they agree on the number of
forwards (all_reduce MAX); a rank out of work runs 1-token forwards (FSDP2 gathers in each).

Why not verl's own engine (as verl runs its reference model; checked against verl 0.9.1):
- its logits-processor hook returns per-token scalars only: ``prepare_model_outputs`` asserts
  ``v.shape == (nnz,)`` for each output (workers/engine/fsdp/transformer_impl.py:1417 and :1515),
  so (nnz, K') top-K' ids and log-probs cannot come out (only as 2 K' = 128 separate scalar
  fields, each gathered across Ulysses ranks and nested, then reassembled);
- the hook is only called under the ``distillation_use_topk`` flag (:1412, :1511) and is the
  same callable as the loss (``forward_step`` :1572 passes ``loss_function`` as the processor,
  then calls it as the loss at :1576);
- its forward runs the LM head at every packed token, prompts included (``self.module(**inputs)``
  at :1566 with no ``logits_to_keep``);
- verl's own teacher is vLLM servers (``prompt_logprobs``,
  experimental/teacher_loop/teacher_manager.py:142), and its reference model is a ``TrainingWorker``
  inside ``ActorRolloutRefWorker`` (workers/engine_workers.py:460, :587, :696) with per-token
  log-probs only, not a standalone forward-only pool.
Running on it would need an engine subclass (inputs, outputs, LM-head rows) and a worker of our
own around it anyway; that is a larger and riskier change than packing here.

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
from ta_opd.errors import TAConfigError, TAInputError
from ta_opd.rollout import response_slice
from ta_opd.teacher_outputs import teacher_outputs

LAYOUTS = ("sorted", "packed", "padded")
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
    layout: str = "sorted"  # how a forward's sequences are laid out: one of LAYOUTS (module docstring)
    micro_batch_size: int | None = 4  # at most this many sequences per teacher forward; None: no count cap
    max_tokens_per_micro_batch: int | None = None  # at most this many token positions per forward; None: no cap
    chunk_size: int = 64  # positions per chunk of the log-softmax / top-K' pass
    param_dtype: str = "bfloat16"
    logp_dtype: str = "float32"  # dtype of the shipped top-K' log-probs
    fsdp: bool = True  # shard with FSDP2 when the group has more than one rank
    timeout_s: int = 3600  # process-group timeout: rank 0 reads (or downloads) the checkpoint before the first collective

    def __post_init__(self):
        _dtype(self.param_dtype, "ta_opd.teacher.param_dtype")
        _dtype(self.logp_dtype, "ta_opd.teacher.logp_dtype")
        for name in ("teacher_topk", "chunk_size", "vocab_size", "timeout_s"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise TAConfigError(f"teacher {name}={v!r} is not allowed; it must be an integer >= 1")
        for name in ("micro_batch_size", "max_tokens_per_micro_batch"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                raise TAConfigError(f"ta_opd.teacher.{name}={v!r} is not allowed; it must be an integer >= 1 or null")
        if self.layout not in LAYOUTS:
            raise TAConfigError(f"ta_opd.teacher.layout={self.layout!r} is not allowed; choose one of: {', '.join(LAYOUTS)}")
        if self.micro_batch_size is None and self.max_tokens_per_micro_batch is None:
            raise TAConfigError("ta_opd.teacher.micro_batch_size and ta_opd.teacher.max_tokens_per_micro_batch are both "
                                "null: set at least one, or a forward would take the whole batch")
        if self.layout == "padded" and (self.micro_batch_size is None or self.max_tokens_per_micro_batch is not None):
            raise TAConfigError(f"ta_opd.teacher.layout='padded' runs whole padded rows micro_batch_size at a time "
                                f"(micro_batch_size={self.micro_batch_size!r}, max_tokens_per_micro_batch="
                                f"{self.max_tokens_per_micro_batch!r}); set an integer micro_batch_size and "
                                f"max_tokens_per_micro_batch=null, or use layout 'sorted' or 'packed'")


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


@dataclass(frozen=True)
class _Seq:
    """One sequence's share of the teacher's work: ``n`` response rows to score (up to its last
    valid position) and the columns of the padded row that hold its real tokens."""
    row: int  # index in the batch
    n: int  # response positions 0..n-1 are scored (n = last valid position + 1)
    first: int  # first real (attention_mask 1) column of the padded row
    tokens: int  # real tokens fed to the teacher: columns [first, P + n - 1) with attention_mask 1


def _sequences(attention_mask: torch.Tensor, valid: torch.Tensor, P: int) -> list[_Seq]:
    """Every row of the batch; a row with no valid response position has n = 0 (no work)."""
    out = []
    for b in range(valid.shape[0]):
        if not bool(valid[b].any()):
            out.append(_Seq(row=b, n=0, first=0, tokens=0))
            continue
        n = int(valid[b].nonzero().max()) + 1
        real = attention_mask[b, : P + n - 1].bool()  # the input columns that feed rows 0..n-1
        rows = real[P - 1 : P - 1 + n]  # the column whose logits score response token t: P-1+t
        if not bool(rows[valid[b, :n]].all()):
            t = int((~rows & valid[b, :n]).nonzero()[0])
            raise TAInputError(f"sequence {b}: response token {t} is valid but the token before it (column "
                               f"{P - 1 + t}) has attention_mask 0; the teacher cannot score it")
        out.append(_Seq(row=b, n=n, first=int(real.nonzero()[0]), tokens=int(real.sum())))
    return out


def _cost(group: list[_Seq], layout: str, P: int) -> int:
    """Token positions one forward of ``group`` processes (what max_tokens_per_micro_batch bounds)."""
    if layout == "packed":
        return sum(s.tokens for s in group)
    # a window of the padded rows, columns [min first, P + max n - 1), for every sequence of the group
    return len(group) * (P + max(s.n for s in group) - 1 - min(s.first for s in group))


def plan_micro_batches(seqs: list[_Seq], cfg: TeacherWorkerConfig, P: int) -> list[list[_Seq]]:
    """Group the sequences into forwards. ``padded``: batch order, micro_batch_size at a time.
    ``sorted`` / ``packed``: longest response first, greedily while the group stays within
    micro_batch_size sequences and max_tokens_per_micro_batch token positions (``_cost``)."""
    if cfg.layout == "padded":  # today's forward: every row, empty ones included
        m = cfg.micro_batch_size
        return [seqs[a : a + m] for a in range(0, len(seqs), m)]
    groups: list[list[_Seq]] = []
    for s in sorted((s for s in seqs if s.n), key=lambda s: (-s.n, -s.tokens, s.row)):  # empty rows: no forward
        if cfg.max_tokens_per_micro_batch is not None and _cost([s], cfg.layout, P) > cfg.max_tokens_per_micro_batch:
            raise TAInputError(f"sequence {s.row} needs {_cost([s], cfg.layout, P)} token positions in one teacher "
                               f"forward, above ta_opd.teacher.max_tokens_per_micro_batch="
                               f"{cfg.max_tokens_per_micro_batch}; raise it to at least the longest sequence")
        g = groups[-1] if groups else None
        fits = g is not None and (cfg.micro_batch_size is None or len(g) < cfg.micro_batch_size) and (
            cfg.max_tokens_per_micro_batch is None or _cost(g + [s], cfg.layout, P) <= cfg.max_tokens_per_micro_batch)
        if fits:
            g.append(s)
        else:
            groups.append([s])
    return groups


def _forward_window(model, batch: dict[str, torch.Tensor], group: list[_Seq], P: int, device, vocab: int,
                    full: bool) -> list[torch.Tensor]:
    """Rows of the padded batch cropped to the group's columns, the LM head on the response columns
    only; ``full``: today's padded forward (all S columns, the LM head on the last R + 1).
    Returns (n_s, V) logits per sequence."""
    rows = torch.tensor([s.row for s in group])
    S = batch["input_ids"].shape[1]
    n = max(s.n for s in group)
    cols = slice(0, S) if full else slice(min(s.first for s in group), P + n - 1)
    keep = S - P + 1 if full else n
    logits = model(input_ids=batch["input_ids"][rows, cols].to(device),
                   attention_mask=batch["attention_mask"][rows, cols].to(device),
                   position_ids=batch["position_ids"][rows, cols].to(device), use_cache=False,
                   logits_to_keep=keep).logits  # (mb, keep, V): kept row t scores response token t
    return [logits[i, : s.n, :vocab] for i, s in enumerate(group)]


def _forward_packed(model, batch: dict[str, torch.Tensor], group: list[_Seq], P: int, device,
                    vocab: int) -> list[torch.Tensor]:
    """The group's real tokens as one (1, T) stream, no padding; position ids restart per sequence,
    from which transformers builds a block-diagonal causal mask (sdpa/eager) or varlen attention
    (flash-attention). The LM head runs at the response rows only (a 1-D ``logits_to_keep``)."""
    ids, pos, keep = [], [], []
    offset = 0
    for s in group:
        cols = torch.arange(s.first, P + s.n - 1)
        real = batch["attention_mask"][s.row, cols].bool()
        cols = cols[real]  # (T_s,)
        ids.append(batch["input_ids"][s.row, cols])
        p = batch["position_ids"][s.row, cols]
        if offset and int(p[0]) == int(pos[-1][-1]) + 1:  # transformers would read it as one sequence
            raise TAInputError(f"sequence {s.row}: position_ids continue the previous sequence's "
                               f"({int(p[0])} after {int(pos[-1][-1])}); packing needs them to restart")
        pos.append(p)
        # column P-1+t is the (cumsum - 1)-th real token of the sequence
        keep.append(offset + real.cumsum(0)[P - 1 - s.first : P - 1 - s.first + s.n] - 1)
        offset += len(cols)
    # attention_mask=None and use_cache=False are load-bearing: with either, transformers 5.10 skips
    # the packed-sequence detection (masking_utils.py:883) and attends across sequences
    logits = model(input_ids=torch.cat(ids)[None].to(device), position_ids=torch.cat(pos)[None].to(device),
                   attention_mask=None, use_cache=False,
                   logits_to_keep=torch.cat(keep).to(device)).logits[0, :, :vocab]  # (sum n, V)
    return list(logits.split([s.n for s in group]))


def _agreed_forwards(count: int) -> int:
    """FSDP2: every rank of the group must run the same number of forwards (each one gathers the
    shards), and ranks hold different token counts, so they agree on the largest count."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    t = torch.tensor([count])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


@torch.no_grad()
def compute_teacher_fields(model: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: TeacherWorkerConfig,
                           device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The teacher fields of a left/right-padded batch (see module docstring); pure given the model
    (under a process group the number of forwards is agreed with the other ranks).

    batch: input_ids, attention_mask, position_ids (B, S); responses, response_mask (B, R).
    """
    input_ids, responses = batch["input_ids"], batch["responses"]
    B, S = input_ids.shape
    R = responses.shape[1]
    P = S - R
    # a sampled id outside the shared vocabulary (the rollout samples over every logit row, padding
    # rows included) has no teacher probability: such positions get no teacher fields; the driver
    # has already taken them out of selection and the loss (ta_opd/invalid_sampled_fraction)
    valid = batch["response_mask"].bool() & (responses < cfg.vocab_size)  # (B, R)
    safe_ids = torch.where(valid, responses, torch.zeros_like(responses))  # (B, R) in [0, V)
    logp_dtype = _dtype(cfg.logp_dtype, "ta_opd.teacher.logp_dtype")
    out = {
        F.TEACHER_IDS: torch.zeros(B, S, cfg.teacher_topk, dtype=torch.int32),
        F.TEACHER_LOGPROBS: torch.zeros(B, S, cfg.teacher_topk, dtype=logp_dtype),
        F.TEACHER_LOGP: torch.zeros(B, R, dtype=torch.float32),
        F.TEACHER_ENTROPY: torch.zeros(B, R, dtype=torch.float32),
    }
    groups = plan_micro_batches(_sequences(batch["attention_mask"], valid, P), cfg, P)
    for k in range(_agreed_forwards(len(groups))):
        if k >= len(groups):  # this rank is out of work: a 1-token forward joins the others' collectives
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False, logits_to_keep=1)
            continue
        g = groups[k]
        if cfg.layout == "packed":
            per_seq = _forward_packed(model, batch, g, P, device, cfg.vocab_size)
        else:
            per_seq = _forward_window(model, batch, g, P, device, cfg.vocab_size, full=cfg.layout == "padded")
        for s, logits in zip(g, per_seq):
            if s.n:
                    _write(out, s, logits, safe_ids, valid, P, cfg, logp_dtype)
        del per_seq
    return out


def _write(out: dict, s: _Seq, logits: torch.Tensor, safe_ids: torch.Tensor, valid: torch.Tensor, P: int,
           cfg: TeacherWorkerConfig, logp_dtype: torch.dtype) -> None:
    """Sequence ``s``'s shipped fields from its (n, V) response-row logits, at its valid positions."""
    tout = teacher_outputs(logits, safe_ids[s.row, : s.n].to(logits.device), teacher_topk=cfg.teacher_topk,
                           chunk_size=cfg.chunk_size, logp_dtype=logp_dtype)
    keep = valid[s.row, : s.n]
    row = response_slice(P, s.n)
    out[F.TEACHER_IDS][s.row, row][keep] = tout.topk_ids.cpu()[keep]
    out[F.TEACHER_LOGPROBS][s.row, row][keep] = tout.topk_logp.cpu()[keep]
    out[F.TEACHER_LOGP][s.row, : s.n][keep] = tout.sampled_logp.cpu()[keep]
    out[F.TEACHER_ENTROPY][s.row, : s.n][keep] = tout.entropy.cpu()[keep]


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
