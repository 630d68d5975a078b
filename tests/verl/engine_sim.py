"""A CPU stand-in for verl's FSDP engine forward (``FSDPEngineWithLMHead``, remove-padding "thd"
path, no sequence parallelism), built on verl's OWN batch plumbing: ``prepare_micro_batches``
splits the no-padding TensorDict into micro-batches and ``postprocess_batch_func`` concatenates
(and, with dynamic batch size, re-orders) the per-token outputs, as in
``BaseEngine.forward_backward_batch``. Only the model call is ours: verl's FSDP engine is
registered for CUDA/NPU only.

Per micro-batch, like ``prepare_model_outputs``: packed logits (1, nnz, V) -> the loss function
as logits processor -> per-token outputs nested by the micro-batch's offsets; log-probs of the
rolled input ids; entropy; then the loss function as final loss.
"""

from __future__ import annotations

import torch

from verl.utils import tensordict_utils as tu
from verl.workers.engine.utils import postprocess_batch_func, prepare_micro_batches


def packed_logits(model, micro_batch) -> torch.Tensor:
    """(1, nnz, V) logits of the packed sequences, each sequence run on its own (= varlen attention)."""
    ids = micro_batch["input_ids"]
    pos = micro_batch["position_ids"]
    outs = [model(input_ids=i.unsqueeze(0), position_ids=p.unsqueeze(0)).logits[0]
            for i, p in zip(ids.unbind(), pos.unbind())]
    return torch.cat(outs, dim=0).unsqueeze(0)


def forward_backward(model, data, loss_fn, *, forward_only: bool, logits_hook=None, dp_size: int = 1,
                     batch_num_tokens: int | None = None):
    """Returns (output dict of postprocess_batch_func, summed loss tensor or None). To simulate
    one of several DP ranks, pass dp_size and the GLOBAL batch_num_tokens (verl all-reduces it)."""
    if batch_num_tokens is None:
        batch_num_tokens = int(data["loss_mask"].sum())
    tu.assign_non_tensor(data, batch_num_tokens=batch_num_tokens, dp_size=dp_size, sp_size=1)
    micro_batches, indices = prepare_micro_batches(data=data, dp_group=None, same_micro_num_in_dp=True)
    output_lst, total = [], None
    for mb in micro_batches:
        with torch.set_grad_enabled(not forward_only):
            logits = packed_logits(model, mb)
            if logits_hook is not None:
                logits = logits_hook(logits)
            offsets = mb["input_ids"].offsets()
            model_output = {}
            if tu.get_non_tensor_data(data=mb, key="distillation_use_topk", default=False):
                for k, v in loss_fn(student_logits=logits, data=mb).items():
                    model_output[k] = torch.nested.nested_tensor_from_jagged(v.squeeze(0), offsets)
            if not tu.get_non_tensor_data(data=mb, key="distillation_only", default=False):  # as verl: no log-probs
                x = logits[0].float()
                rolled = torch.roll(mb["input_ids"].values(), shifts=-1, dims=0)
                logz = torch.logsumexp(x, dim=-1)
                log_probs = x.gather(-1, rolled.unsqueeze(-1)).squeeze(-1) - logz
                entropy = logz - (torch.softmax(x, -1) * x).sum(-1)
                model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(log_probs, offsets)
                model_output["entropy"] = torch.nested.nested_tensor_from_jagged(entropy, offsets)
            loss, metrics = loss_fn(model_output=model_output, data=mb, dp_group=None)
            if not forward_only:
                loss.backward()
                total = loss.detach() if total is None else total + loss.detach()
        detached = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in model_output.items()}
        output_lst.append({"model_output": detached, "loss": float(loss), "metrics": metrics})
    return postprocess_batch_func(output_lst=output_lst, indices=indices, data=data), total
