"""Fine-tune only the top layers of a Llama-architecture causal LM, on cached frozen-prefix features.

Shapes: B sequences, L tokens (right-padded), H hidden size, N response tokens of a batch, V vocab.

Why this shape of SFT: on 2 shared CPU cores a forward+backward of the whole 135M model is ~29 s
per 8×128 tokens. With the embeddings and the bottom ``n_frozen`` layers frozen, their output for
a training sequence never changes, so it is computed once (:func:`prefix_features`) and each SFT
step runs only the top layers, the final norm and the (tied, frozen) LM head, the head only at the
response positions that carry a loss. The trainable parameters are the top layers and the final
norm (:func:`trainable_parameters`).

Sequences are right-padded with a causal mask: a real token only attends to earlier real tokens,
so padding after a sequence never changes its hidden states, and position ids are 0..L-1 as in the
unpadded sequence (tested: the split forward equals the model's own logits).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Example:
    ids: list[int]  # prompt then response (EOS included)
    n_prompt: int  # tokens of the prompt: the loss is on ids[n_prompt:]


def _body(model):
    body = getattr(model, "model", None)
    if body is None or not all(hasattr(body, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise TypeError(f"{type(model).__name__}: a Llama-style causal LM (model.model.embed_tokens/layers/norm/"
                        "rotary_emb, model.lm_head) is required for top-layer SFT")
    return body


def check_split(model, n_frozen: int) -> None:
    n = len(_body(model).layers)
    if not 0 <= n_frozen < n:
        raise ValueError(f"n_frozen={n_frozen} is not allowed; the model has {n} layers, so it must be in [0, {n - 1}] "
                         "(at least one layer is trained)")


def _run_layers(model, h: torch.Tensor, layers) -> torch.Tensor:
    """h (B, L, H) through ``layers`` with a causal mask and positions 0..L-1. -> (B, L, H)"""
    B, L, _ = h.shape
    pos = torch.arange(L).unsqueeze(0).expand(B, L)  # (B, L)
    rope = _body(model).rotary_emb(h, pos)
    causal = torch.full((L, L), torch.finfo(h.dtype).min, dtype=h.dtype).triu(1)[None, None]  # (1, 1, L, L)
    for layer in layers:
        out = layer(h, attention_mask=causal, position_ids=pos, position_embeddings=rope)
        h = out[0] if isinstance(out, tuple) else out
    return h


def pad_right(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)  # (B, L)


@torch.no_grad()
def prefix_features(model, examples: list[Example], n_frozen: int, pad_id: int, batch_size: int = 16,
                    log=None) -> list[torch.Tensor]:
    """Output of the embeddings and the bottom ``n_frozen`` layers per example, each (L_i, H)."""
    check_split(model, n_frozen)
    body, out = _body(model), []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        h = _run_layers(model, body.embed_tokens(pad_right([e.ids for e in chunk], pad_id)), body.layers[:n_frozen])
        out += [h[j, :len(e.ids)].clone() for j, e in enumerate(chunk)]
        if log is not None and (i // batch_size) % 10 == 0:
            log(f"  prefix features {min(i + batch_size, len(examples))}/{len(examples)}")
    return out


def top_logits(model, feats: torch.Tensor, n_frozen: int, select: torch.Tensor | None = None) -> torch.Tensor:
    """Logits from prefix features (B, L, H): the top layers, the final norm, the LM head; at the
    positions where ``select`` (B, L) is True when given -> (N, V), else (B, L, V)."""
    body = _body(model)
    h = body.norm(_run_layers(model, feats, body.layers[n_frozen:]))
    return model.lm_head(h[select] if select is not None else h)


def trainable_parameters(model, n_frozen: int) -> list[torch.nn.Parameter]:
    """Freeze everything but the layers above ``n_frozen`` and the final norm; return those."""
    check_split(model, n_frozen)
    body = _body(model)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in body.layers[n_frozen:] for p in layer.parameters()] + list(body.norm.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def batch_loss(model, feats: list[torch.Tensor], examples: list[Example], n_frozen: int) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of one batch."""
    B, H = len(examples), feats[0].shape[-1]
    L = max(len(e.ids) for e in examples)
    x = torch.zeros(B, L, H, dtype=feats[0].dtype)  # (B, L, H); padding after each sequence is never attended
    select = torch.zeros(B, L, dtype=torch.bool)  # positions predicting a response token
    targets = []
    for i, (f, e) in enumerate(zip(feats, examples)):
        x[i, :len(e.ids)] = f
        select[i, e.n_prompt - 1:len(e.ids) - 1] = True
        targets += e.ids[e.n_prompt:]
    logits = top_logits(model, x, n_frozen, select)  # (N, V)
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets, dtype=torch.long))


@dataclass(frozen=True)
class SFTConfig:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    seed: int

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"sft {name}={getattr(self, name)} is not allowed; it must be >= 1")
        if not self.lr > 0 or not 0 <= self.warmup < self.steps:
            raise ValueError(f"sft lr={self.lr}, warmup={self.warmup}: lr must be > 0 and warmup in [0, steps)")

    def lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to 0."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - self.warmup) / (self.steps - self.warmup)))


def make_optimizer(params, cfg: SFTConfig):
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)


def batch_indices(n: int, cfg: SFTConfig, step: int) -> list[int]:
    """The examples of ``step``: a function of (seed, step) only, so a resumed run draws the same ones."""
    return random.Random(cfg.seed * 1_000_003 + step).sample(range(n), min(cfg.batch_size, n))


def train_steps(model, params, opt, sched, feats, examples, n_frozen: int, cfg: SFTConfig, start: int, stop: int,
                log=None) -> list[float]:
    """SFT steps ``start``..``stop - 1`` (the optimizer and scheduler are at ``start``). Returns the losses."""
    model.train()
    losses = []
    for step in range(start, stop):
        idx = batch_indices(len(examples), cfg, step)
        loss = batch_loss(model, [feats[i] for i in idx], [examples[i] for i in idx], n_frozen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(f"  sft step {step + 1}/{cfg.steps} loss {losses[-1]:.4f}")
    model.eval()
    return losses
