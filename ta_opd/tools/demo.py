"""``python -m ta_opd.tools.demo``: what each selector keeps on synthetic teacher/student distributions.

Builds a batch whose positions come from four planted kinds, computes the exact statistics
(dense path), and prints, per selector at budget rho, the share of kept positions of each kind
and the mean D, C, H of the kept positions. Teachability should favour "learnable" positions
(large disagreement inside the student's top-K); divergence alone also keeps "incompatible"
ones (teacher mass off the student's support); entropy keeps "uncertain" ones.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from ta_opd.config import TAConfig
from ta_opd.select import select_positions
from ta_opd.selectors import available_selectors
from ta_opd.stats import dense_position_stats

KINDS = ("agree", "learnable", "incompatible", "uncertain")


def synthetic_batch(n_seq: int, seq_len: int, vocab: int, k: int, seed: int):
    """Student/teacher logits (B, R, V) and the planted kind of every position (B, R)."""
    gen = torch.Generator().manual_seed(seed)
    B, R, V = n_seq, seq_len, vocab
    kind = torch.randint(0, len(KINDS), (B, R), generator=gen)
    student = torch.randn(B, R, V, generator=gen)
    top = torch.stack([torch.randperm(V, generator=gen)[: 2 * k] for _ in range(B * R)]).view(B, R, 2 * k)
    s_sup, off_sup = top[..., :k], top[..., k:]  # student support, and ids off it
    confident = torch.linspace(10.0, 5.0, k).expand(B, R, k)
    student.scatter_(-1, s_sup, confident + 0.3 * torch.randn(B, R, k, generator=gen))
    teacher = student + 0.2 * torch.randn(B, R, V, generator=gen)
    # learnable: the teacher reorders the student's own candidates
    learn = (kind == 1).unsqueeze(-1)
    shuffled = confident.flip(-1) + 1.0
    teacher = torch.where(learn, teacher.scatter(-1, s_sup, shuffled), teacher)
    # incompatible: the teacher puts its mass on ids outside the student's top-K
    incompat = (kind == 2).unsqueeze(-1)
    teacher = torch.where(incompat, teacher.scatter(-1, off_sup, confident + 3.0), teacher)
    # uncertain: a flat student, teacher unchanged
    flat = (kind == 3).unsqueeze(-1)
    student = torch.where(flat, torch.randn(B, R, V, generator=gen) * 0.3, student)
    return student, teacher, kind


def run(budget: float, topk: int, seed: int, n_seq: int = 16, seq_len: int = 64, vocab: int = 512) -> str:
    student, teacher, kind = synthetic_batch(n_seq, seq_len, vocab, topk, seed)
    stats = dense_position_stats(student, teacher, topk=topk)
    valid = torch.ones_like(kind, dtype=torch.bool)
    header = f"{'selector':<26}{'kept':>6}" + "".join(f"{k:>14}" for k in KINDS) + f"{'D':>8}{'C':>8}{'H':>8}"
    lines = [
        f"TA-OPD selectors on {n_seq}x{seq_len} synthetic positions, V={vocab}, K={topk}, budget={budget}",
        "share of kept positions by planted kind; mean raw D, C, H of kept positions",
        header, "-" * len(header),
    ]
    for name in available_selectors():
        cfg = TAConfig(selector=name, budget=budget, topk=topk, teacher_topk=topk, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sel = select_positions(stats, valid, cfg, step=0)
        m = sel.mask
        shares = [float((kind[m] == i).float().mean()) for i in range(len(KINDS))]
        lines.append(
            f"{name:<26}{int(m.sum()):>6}" + "".join(f"{s:>14.2f}" for s in shares)
            + f"{stats.D[m].mean():>8.3f}{stats.C[m].mean():>8.3f}{stats.H[m].mean():>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=0.10)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(run(a.budget, a.topk, a.seed))


if __name__ == "__main__":
    main()
