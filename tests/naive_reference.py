"""A deliberately naive per-position implementation of the spec, in float64 numpy loops.

Written from docs/spec.md (the numerical contract) only, never from ta_opd's code, to check it.
"""

from __future__ import annotations

import math

import numpy as np


def softmax64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def topk_set(p: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-p, kind="stable")[:k]]


def position_stats(student_row, teacher_row, k, sampled=None, entropy="full"):
    """Every spec statistic of one position from full student/teacher logits."""
    ps, pt = softmax64(student_row), softmax64(teacher_row)
    s_set, t_set = topk_set(ps, k), topk_set(pt, k)
    union = sorted(set(s_set) | set(t_set))
    zt = sum(pt[v] for v in union)
    zs = sum(ps[v] for v in union)
    d = 0.0
    for v in union:
        a, b = pt[v] / zt, ps[v] / zs
        if a > 0:
            d += a * math.log(a / b) if b > 0 else math.inf
    c = sum(pt[v] for v in s_set)
    c_hat = sum(pt[v] for v in s_set if v in t_set)
    if entropy == "full":
        h = -sum(p * math.log(p) for p in ps if p > 0)
    else:
        q = np.array([ps[v] for v in s_set])
        q = q / q.sum()
        h = -sum(x * math.log(x) for x in q if x > 0) / math.log(k)
    th = -sum(p * math.log(p) for p in pt if p > 0)
    out = dict(D=d, C=c, C_hat=c_hat, H=h, teacher_H=th)
    if sampled is not None:
        out["sampled_kl"] = math.log(ps[sampled]) - math.log(pt[sampled])
    return out


def quantile_linear(values, q):
    v = sorted(float(x) for x in values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def normalize(values, q_low=0.05, q_high=0.95, eps=1e-8):
    lo, hi = quantile_linear(values, q_low), quantile_linear(values, q_high)
    return [min(max((x - lo) / (hi - lo + eps), 0.0), 1.0) for x in values]
