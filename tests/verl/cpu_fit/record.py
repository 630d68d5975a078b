"""Recorders installed by the CPU ``fit()`` test's setup hook (``TA_OPD_CPU_FIT_RECORD=<dir>``).

They wrap OUR classes only (never verl's) and save what the test asserts on:

- task runner (driver of the step): at each ``_update_actor`` of ``TAOPDRayTrainer``, the
  whole batch as selection saw it (ids, masks, old log-probs, teacher fields, statistics), the
  kept mask, the step's metrics and the placement (Ray node of every actor rank, teacher rank and
  rollout server; the cluster's total and free resources), to ``<dir>/step_<k>.pt``;
- actor ranks: per ``update_actor`` call, the kept and token counts of each sequence this rank
  received and of each micro-batch verl's engine formed from them, what the engine runs with (FSDP
  version, autocast dtype, gradient checkpointing, compiled entropy), and (rank 0) the full gradient
  as verl's FSDP engine holds it right before its optimizer step (before clipping), to
  ``<dir>/actor_rank<r>_call<n>.pt``.
"""

from __future__ import annotations

import functools
import os

import torch


def _save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def install(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    _install_trainer(out_dir)
    _install_actor(out_dir)


def _install_trainer(out_dir: str) -> None:
    from recipe.ta_opd.verl_backend import trainer as T

    if getattr(T.TAOPDRayTrainer, "_ta_recorded", False):
        return
    apply_selection, update_actor = T.apply_selection, T.TAOPDRayTrainer._update_actor
    seen = {}

    def recording_selection(batch, cfg, step):
        before = {k: v.clone() for k, v in batch.batch.items()}
        sel, full = apply_selection(batch, cfg, step)
        seen["batch"] = before
        seen["kept"] = batch.batch["response_mask"].clone()
        seen["scores"] = sel.scores.clone()
        return sel, full

    def recording_update(self, batch):
        out = update_actor(self, batch)
        _save({"step": int(self.global_steps), "batch": seen.pop("batch"), "kept": seen.pop("kept"),
               "scores": seen.pop("scores"), "metrics": dict(out.meta_info["metrics"]), "placement": _placement(self)},
              os.path.join(out_dir, f"step_{int(self.global_steps)}.pt"))
        return out

    T.apply_selection = recording_selection
    T.TAOPDRayTrainer._update_actor = recording_update
    T.TAOPDRayTrainer._ta_recorded = True


def _placement(trainer) -> dict:
    """The Ray node of every actor rank, teacher rank and rollout server, and the cluster's nodes."""
    import ray

    from tests.verl.cpu_fit.rollout import server_name

    def nodes(workers):
        return ray.get([w.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()) for w in workers])

    teacher = trainer.ta_teacher_wg
    servers = [ray.get_actor(server_name(r)) for r in range(len(trainer.actor_rollout_wg.workers))
               if _exists(server_name(r))]
    return {"actor": nodes(trainer.actor_rollout_wg.workers), "teacher": nodes(teacher.workers) if teacher else [],
            "servers": nodes(servers),
            "cluster": {n["NodeID"]: n["Resources"] for n in ray.nodes() if n.get("Alive", True)},
            # what is free while the run holds everything it places (what verl's own check reads)
            "available": {k: {r: float(v.get(r, 0)) for r in ("CPU", "GPU")}
                          for k, v in ray._private.state.available_resources_per_node().items()}}


def _exists(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name)
        return True
    except ValueError:
        return False


def _install_actor(out_dir: str) -> None:
    from recipe.ta_opd.verl_backend import actor as A

    cls = A.TAOPDActorRolloutRefWorker
    if getattr(cls, "_ta_recorded", False):
        return
    inner = cls.update_actor
    calls = {"n": 0}

    def recording_update_actor(self, data):
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        rank = dist.get_rank()
        calls["n"] += 1
        mask = data["response_mask"]
        mask = mask.to_padded_tensor(0) if mask.is_nested else mask
        rec = {"kept_per_sequence": mask.sum(-1).tolist(), "grads": None, "tokens": _tokens(data)}
        engine = self.actor.engine
        rec["engine"] = _engine_facts(engine)
        step = engine.optimizer_step

        def recording_step():
            grads = {}
            for name, p in engine.module.named_parameters():
                g = p.grad
                if g is None:
                    continue
                g = g.full_tensor() if isinstance(g, DTensor) else g  # collective: every rank runs it
                if rank == 0:
                    grads[name] = g.detach().clone()
            if rank == 0:
                rec["grads"] = grads
            return step()

        loss_fn = self.actor.loss_fn
        micro = rec["kept_per_micro_batch"] = []
        micro_tokens = rec["tokens_per_micro_batch"] = []

        def recording_loss(**kw):  # verl calls it once per micro-batch as the final loss
            if "model_output" in kw:
                m = kw["data"]["response_mask"]
                micro.append(int((m.to_padded_tensor(0) if m.is_nested else m).sum()))
                micro_tokens.append(_tokens(kw["data"]))
            return loss_fn(**kw)

        engine.optimizer_step = recording_step
        self.actor.loss_fn = recording_loss
        try:
            out = inner(self, data)
        finally:
            del engine.optimizer_step
            self.actor.loss_fn = loss_fn
        _save(rec, os.path.join(out_dir, f"actor_rank{rank}_call{calls['n']}.pt"))
        return out

    # functools.wraps copies the method's __dict__, i.e. verl's @register dispatch attributes
    cls.update_actor = functools.wraps(inner)(recording_update_actor)
    cls._ta_recorded = True


def _tokens(data) -> int:
    """Tokens (prompt + response, no padding) of a batch as verl's engine holds it."""
    ids = data["input_ids"]
    if ids.is_nested:
        return int(ids.values().numel())
    return int(data["attention_mask"].sum())


def _engine_facts(engine) -> dict:
    """What the actor's engine runs with: FSDP version, mixed-precision compute dtype, gradient
    checkpointing on the Hugging Face module, compiled entropy, the Ray node of this rank."""
    import ray
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    module = engine.module
    hf = next(m for m in module.modules() if hasattr(m, "is_gradient_checkpointing"))
    return {"fsdp1": isinstance(module, FSDP), "autocast_dtype": str(engine._autocast_dtype),
            "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
            "gradient_checkpointing": bool(hf.is_gradient_checkpointing),
            "entropy_compiled": hasattr(engine.compute_entropy_from_logits, "_torchdynamo_orig_callable"),
            "node": ray.get_runtime_context().get_node_id()}
