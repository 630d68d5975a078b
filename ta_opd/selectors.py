"""Selector registry (spec: "Selectors"; paper Eqs. 13-16).

A selector maps the normalized statistics of a batch to a per-position score (higher is kept
first) and, for the Q3 variants, restricts the candidates to Q3 = {H̃ < median(H̃) and
D̃ >= median(D̃)} (Section 3.4, Table 12). ``full`` keeps every valid position.
New selectors are added with :func:`register_selector`; names are unique.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ta_opd.registry import Registry


@dataclass(frozen=True)
class ScoreInputs:
    """Normalized statistics of one batch, all (B, R) float32 with 0 at invalid positions."""

    D: torch.Tensor  # D̃
    C: torch.Tensor  # C̃ (from C or Ĉ, per the compatibility mode)
    H: torch.Tensor  # H̃
    valid: torch.Tensor  # (B, R) bool
    seed: int
    step: int


ScoreFn = Callable[[ScoreInputs], torch.Tensor]


@dataclass(frozen=True)
class Selector:
    name: str
    score: ScoreFn | None  # None: keep every candidate (no budget)
    q3: bool = False  # candidates restricted to Q3
    description: str = ""


_REGISTRY: Registry[Selector] = Registry("selector")


def register_selector(name: str, *, description: str = "", with_q3: bool = True) -> Callable[[ScoreFn], ScoreFn]:
    """Register a score function under ``name`` (and ``q3_<name>`` unless with_q3=False)."""

    def deco(fn: ScoreFn) -> ScoreFn:
        _add(Selector(name, fn, q3=False, description=description))
        if with_q3:
            _add(Selector(f"q3_{name}", fn, q3=True, description=f"{description}, candidates restricted to Q3"))
        return fn

    return deco


def _add(sel: Selector) -> None:
    _REGISTRY.add(sel.name, sel)


def available_selectors() -> tuple[str, ...]:
    return _REGISTRY.names()


def get_selector(name: str) -> Selector:
    return _REGISTRY.get(name)


def probabilistic_or(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b - a·b, the soft OR used by TIP (Eq. 15) and TA-OPD+Ent. (Eq. 16), computed as
    1 - (1 - a)(1 - b): exactly 1 when either input is 1, so saturated positions tie exactly and
    the budget's tie rule (earlier position, then earlier sequence) decides, not rounding noise."""
    return 1 - (1 - a) * (1 - b)


def random_scores(valid: torch.Tensor, seed: int, step: int) -> torch.Tensor:
    """Uniform scores drawn from a generator seeded by (seed, step), one draw per VALID position
    in row-major order, so padding never changes which real positions are kept."""
    state = np.random.SeedSequence([int(seed), int(step)]).generate_state(1, dtype=np.uint64)[0]
    gen = torch.Generator().manual_seed(int(state))
    out = torch.zeros(valid.shape, dtype=torch.float32)
    out[valid.cpu()] = torch.rand(int(valid.sum()), generator=gen, dtype=torch.float32)
    return out.to(valid.device)


def q3_candidates(H: torch.Tensor, D: torch.Tensor, valid: torch.Tensor, *,
                  med_h: float | None = None, med_d: float | None = None) -> torch.Tensor:
    """Q3 = {H̃ < median(H̃) and D̃ >= median(D̃)} over the valid positions (Section 3.4).

    H, D: normalized (B, R); medians over valid positions (computed here unless given).
    Returns (B, R) bool.
    """
    from ta_opd.normalize import quantiles

    if med_h is None:
        med_h = quantiles(H[valid], (0.5,))[0]
    if med_d is None:
        med_d = quantiles(D[valid], (0.5,))[0]
    return valid & (H.double() < med_h) & (D.double() >= med_d)


_add(Selector("full", None, description="Full OPD: every valid position"))


@register_selector("teachability", description="TA-OPD: D̃·C̃ (Eq. 12-13)")
def _teachability(x: ScoreInputs) -> torch.Tensor:
    return x.D * x.C


@register_selector("teachability_entropy", description="TA-OPD+Ent.: H̃ + s - H̃·s, s = D̃·C̃ (Eq. 16)")
def _teachability_entropy(x: ScoreInputs) -> torch.Tensor:
    return probabilistic_or(x.H, x.D * x.C)


@register_selector("entropy", description="entropy baseline: H̃ (Eq. 14)")
def _entropy(x: ScoreInputs) -> torch.Tensor:
    return x.H


@register_selector("divergence", description="raw-disagreement baseline: D̃ (Eq. 14)")
def _divergence(x: ScoreInputs) -> torch.Tensor:
    return x.D


@register_selector("tip", description="TIP-style: H̃ + D̃ - H̃·D̃ (Eq. 15)")
def _tip(x: ScoreInputs) -> torch.Tensor:
    return probabilistic_or(x.H, x.D)


@register_selector("compatibility", description="C-only ablation: C̃ (Eq. 15)")
def _compatibility(x: ScoreInputs) -> torch.Tensor:
    return x.C


@register_selector("incompatible", description="D^I diagnostic: D̃(1 - C̃)")
def _incompatible(x: ScoreInputs) -> torch.Tensor:
    return x.D * (1 - x.C)


@register_selector("random", description="random baseline, seeded by (seed, step)")
def _random(x: ScoreInputs) -> torch.Tensor:
    return random_scores(x.valid, x.seed, x.step)


__all__ = [
    "ScoreInputs", "Selector", "register_selector", "available_selectors", "get_selector",
    "random_scores", "q3_candidates", "probabilistic_or",
]
