"""Full-vocabulary forward KL(p_T ‖ p_S) per position: the quantity OPD drives down.

Used by the held-out KL every CPU run reports and by the fixed-context diagnostic's gain
G = KL0 − KLτ (paper Eq. 1). Chunked over positions so memory stays at a few (chunk, V) buffers.
``prompt_bootstrap``: the held-out KL's interval, a percentile bootstrap over prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ta_opd import support


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, chunk_size: int = 8
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary KL(p_T ‖ p_S) and the Bhattacharyya coefficient Σ sqrt(p_S p_T). (N, V) x2 -> (N,) x2"""
    n, vocab = teacher_logits.shape
    kl = torch.empty(n)
    bc = torch.empty(n)
    ws = support.Workspace(min(chunk_size, max(n, 1)), vocab, teacher_logits.device, n_buffers=4)
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        lt = support.log_softmax_into(support.as_fp32(teacher_logits[a:b], ws.get(0, b - a)), ws.get(1, b - a))
        ls = support.log_softmax_into(support.as_fp32(student_logits[a:b], ws.get(0, b - a)), ws.get(2, b - a))
        pt = torch.exp(lt, out=ws.get(3, b - a))
        diff = torch.sub(lt, ls, out=ws.get(0, b - a))
        kl[a:b] = torch.where(pt > 0, pt * diff, torch.zeros((), dtype=pt.dtype)).sum(-1)
        bc[a:b] = torch.exp(torch.add(lt, ls, out=ws.get(0, b - a)).mul_(0.5)).sum(-1)
    return kl, bc


def prompt_bootstrap(sums: Sequence[float], counts: Sequence[float], *, seed: int, n_boot: int = 2000,
                     level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of a per-token mean Σ sums / Σ counts, resampling PROMPTS with
    replacement (tokens of one response are not independent; prompts are). ``sums[i]``: prompt i's
    per-token values summed (a before/after difference on the same tokens is fine), ``counts[i]``
    its tokens. Seeded: the same inputs give the same interval. (n,) x2 -> (lo, hi)"""
    s, c = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if s.shape != c.shape or s.ndim != 1 or len(s) == 0 or not (c > 0).all():
        raise ValueError(f"prompt_bootstrap needs one positive count per prompt sum; got {s.shape} sums, counts {c}")
    idx = np.random.default_rng(seed).integers(0, len(s), size=(n_boot, len(s)))  # (n_boot, n) resampled prompts
    means = s[idx].sum(-1) / c[idx].sum(-1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)
