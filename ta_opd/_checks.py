"""Input validation shared by the core's entry points (every failure raises ``TAInputError``), and
the one int/real predicate pair the core and the recipe use for knob values."""

from __future__ import annotations

import math

import torch

from ta_opd.errors import TAInputError


def is_int(x: object) -> bool:
    """An integer and not a bool: ``True`` is an ``int`` to Python, but ``topk=true`` is a mistake."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    """A finite int or float, not a bool (NaN and +-inf are never a valid knob value)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def check_tensor(name: str, x: object, *, ndim: int | None = None, floating: bool | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TAInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise TAInputError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if floating is True and not x.is_floating_point():
        raise TAInputError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if floating is False and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TAInputError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    return x


def check_mask(name: str, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    check_tensor(name, mask)
    if mask.shape != shape:
        raise TAInputError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or mask.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            bad = (mask != 0) & (mask != 1)
            if bool(bad.any()):
                raise TAInputError(f"{name} must hold only 0/1 values, found {mask[bad].flatten()[0].item()}")
            mask = mask != 0
        else:
            raise TAInputError(f"{name} must be a bool or 0/1 tensor, got dtype {mask.dtype}")
    return mask


def check_finite(name: str, x: torch.Tensor, where: torch.Tensor | None = None) -> None:
    """Raise if ``x`` (restricted to ``where`` when given) holds NaN or +-inf."""
    vals = x if where is None else x[where]
    bad = ~torch.isfinite(vals)
    if bool(bad.any()):
        n_bad = int(bad.sum())
        first = vals[bad].flatten()[0].item()
        raise TAInputError(
            f"{name} holds {n_bad} non-finite value(s) at valid positions (first: {first}); "
            "non-finite statistics are reported, never normalized"
        )


def check_ids(name: str, ids: torch.Tensor, vocab_size: int) -> None:
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise TAInputError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
