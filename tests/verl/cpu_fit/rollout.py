"""A CPU rollout backend for verl's agent loop: Hugging Face generation in a Ray actor.

verl's rollout is an inference server per replica (vLLM/SGLang/TRT-LLM) that the agent loop
calls token-in/token-out (``server.generate``), plus an adapter object inside each hybrid
actor worker that hands the trainer's weights to that server after every update
(``ActorRolloutRefWorker.update_weights`` with checkpoint engine ``naive``). Here:

- :class:`HFServer`: one Ray actor per replica holding the student as an HF model on the CPU.
  ``generate`` samples one request over ALL logit rows (as vLLM does; padding rows included)
  with a generator seeded by (weights version, request id): with ``rollout.full_determinism``
  verl's agent loop sends ``det-<index in batch>`` as request id, so a step's samples do not
  depend on scheduling, routing or batching, and a resumed run samples what an uninterrupted
  one samples.
- :class:`HFReplica`: the ``RolloutReplica`` that starts the server (registered with
  ``RolloutReplicaRegistry`` under :data:`NAME`).
- :class:`HFWeightAdapter`: the ``BaseRollout`` built inside each actor worker; its
  ``update_weights`` receives verl's full per-tensor parameters (gathered from the FSDP2
  shards by verl) and loads them into its replica's server.
"""

from __future__ import annotations

import zlib
from typing import Any

import ray
import ray.util.scheduling_strategies
import torch

from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, TokenOutput

NAME = "ta_opd_hf_cpu"


def server_name(replica_rank: int) -> str:
    return f"ta_opd_hf_cpu_server_{replica_rank}"


class HFServer:
    def __init__(self, config, model_path: str, replica_rank: int):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.config = config
        self.replica_rank = replica_rank
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval().requires_grad_(False)
        tok = AutoTokenizer.from_pretrained(model_path)
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos = set(eos) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
        self.version = -1  # global step of the loaded weights; -1 = the checkpoint on disk
        self.loads = 0

    def load_weights(self, state: dict[str, torch.Tensor], global_steps) -> int:
        own = self.model.state_dict()
        unknown = sorted(set(state) - set(own))
        missing = sorted(k for k in own if k not in state and not k.endswith("rotary_emb.inv_freq"))
        if unknown or missing:
            raise KeyError(f"weights do not match the rollout model: unknown {unknown[:3]}, missing {missing[:3]}")
        self.model.load_state_dict(state, strict=False)
        self.version = int(global_steps) if global_steps is not None else self.version
        self.loads += 1
        return self.loads

    def describe(self) -> dict:
        return {"version": self.version, "loads": self.loads,
                "params": {k: v.clone() for k, v in self.model.state_dict().items()}}

    @torch.no_grad()
    def generate(self, request_id: str, prompt_ids: list[int], sampling_params: dict[str, Any], **_) -> TokenOutput:
        p = dict(sampling_params)
        max_tokens = p.pop("max_tokens", None) or p.pop("max_new_tokens", None) or self.config.response_length
        max_tokens = min(int(max_tokens), self.config.response_length)
        temperature = float(p.get("temperature", 1.0))
        top_k, top_p = int(p.get("top_k", -1) or -1), float(p.get("top_p", 1.0))
        g = torch.Generator().manual_seed(zlib.crc32(f"{self.config.seed}:{self.version}:{request_id}".encode()))
        ids = torch.tensor([list(prompt_ids)])
        out = self.model(input_ids=ids, use_cache=True)
        tokens, logps = [], []
        for _ in range(max_tokens):
            logits = out.logits[0, -1].float()  # (V_model,): every logit row, as vLLM samples
            logp = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
            if temperature <= 0:
                tok = int(logits.argmax())
            else:
                probs = _filter(logp.exp(), top_k, top_p)
                tok = int(torch.multinomial(probs, 1, generator=g))
            tokens.append(tok)
            logps.append(float(logp[tok]))
            if tok in self.eos:
                break
            out = self.model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
        stop = "completed" if tokens and tokens[-1] in self.eos else "length"
        return TokenOutput(token_ids=tokens, log_probs=logps if p.get("logprobs") else None, stop_reason=stop,
                           extra_fields={"global_steps": self.version})

    # lifecycle calls of verl's replica / checkpoint manager: nothing to free on the CPU
    def wake_up(self):
        return None

    def sleep(self):
        return None

    def clear_kv_cache(self):
        return None

    def release_kv_cache(self):
        return None

    def resume_kv_cache(self):
        return None

    def abort_all_requests(self, reject_request: bool = False):
        return None

    def resume_generation(self):
        return None


def _filter(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = probs.topk(min(top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > top_p * sorted_p.sum()
        probs = probs.scatter(0, order, torch.where(drop, torch.zeros_like(sorted_p), sorted_p))
    return probs


class HFReplica(RolloutReplica):
    async def launch_servers(self):
        """One server per replica, placed as verl places a vLLM server
        (``verl/workers/rollout/vllm_rollout/vllm_async_server.py:1342-1384``): on the node of the
        replica's first worker, hard node affinity, no resources named, so Ray needs one free CPU on
        that node to place it (``ray/actor.py:2045-2066``: placement CPU 1, lifetime CPU 0)."""
        model_path = str(self.model_config.get("path"))
        node = await self.workers[0].__ray_call__.remote(lambda w: ray.get_runtime_context().get_node_id())
        server = ray.remote(HFServer).options(
            name=server_name(self.replica_rank),
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node, soft=False),
        ).remote(self.config, model_path, self.replica_rank)
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"ta_opd_hf_cpu://{self.replica_rank}"

    def rollout_worker_use_gpu(self) -> bool:
        return False


def load_replica():
    return HFReplica


class HFWeightAdapter(BaseRollout):
    """The rollout object inside an actor worker: forwards the trainer's weights to the server."""

    def __init__(self, config, model_config, device_mesh, *args, **kwargs):
        super().__init__(config, model_config, device_mesh)
        import torch.distributed as dist

        size = self.config.tensor_model_parallel_size * self.config.data_parallel_size * \
            self.config.pipeline_model_parallel_size
        self.replica_rank = dist.get_rank() // size
        self.is_leader_rank = dist.get_rank() % size == 0

    async def update_weights(self, weights, wire_format: str = "named_tensors", **kwargs):
        if wire_format != "named_tensors":
            raise NotImplementedError(f"wire format {wire_format!r}: the CPU rollout takes named tensors")
        # every rank consumes the generator: verl gathers each full tensor collectively
        state = {name: t.detach().to("cpu", copy=True) for name, t in weights}
        if self.is_leader_rank:
            server = ray.get_actor(server_name(self.replica_rank))
            await server.load_weights.remote(state, kwargs.get("global_steps"))

    async def resume(self, tags: list[str]):
        return None

    async def release(self):
        return None
