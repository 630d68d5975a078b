"""Per-position teachability statistics (spec: "Per-position statistics"; paper Eqs. 8-10, 14, 17).

Two entry points over the same kernels (``ta_opd.support``):

* :func:`dense_position_stats` — both models' full distributions at hand (the fixed-context
  diagnostic): every statistic is exact.
* :func:`sparse_position_stats` — the training pipeline: full student logits plus the teacher's
  top-K' ids/log-probs (and optionally teacher log-probs at extra ids, e.g. the student's
  top-K). Student quantities are exact; a teacher probability at a student top-K id that was
  not shipped is unknown and lies in [0, min(p_T^(K'), R)] with R the teacher mass outside its
  top-K'. We use the point value R / (V - K') (the tail mass spread evenly over the ids outside
  the top-K'), report the interval [C_low, C_high] it implies for C, how far D moves at the
  interval's ends (``D_spread``), and count the missing ids per position.

Both walk the positions in chunks of ``chunk_size`` rows, so the extra memory is
O(chunk_size x V) on top of the inputs. Leading dims are flattened: inputs (..., V) give
outputs (...). Everything is computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ta_opd import support
from ta_opd._checks import check_ids, check_tensor
from ta_opd.errors import TAInputError

# Teacher top-K' probabilities may sum above 1 only by rounding (bf16 log-probs: ~1e-3).
_MASS_TOLERANCE = 1e-2
# Positions per block of the (N, K)-sized support statistics (the id lookup is block x K x K').
_SUPPORT_BLOCK = 4096


@dataclass(frozen=True)
class PositionStats:
    """Per-position statistics; every tensor has the input's leading shape ``(...)`` unless noted."""

    D: torch.Tensor  # Eq. 9: forward KL on U = S_S ∪ S_T, true probabilities renormalized on U
    C: torch.Tensor  # Eq. 10: teacher mass on S_S (point value where a teacher prob was missing)
    C_low: torch.Tensor  # lower end of C's interval (missing teacher probs at 0); == C when exact
    C_high: torch.Tensor  # upper end of C's interval; == C when exact
    C_hat: torch.Tensor  # Eq. 17: teacher mass on S_S ∩ S_T (lower bound, always exact)
    H: torch.Tensor  # student entropy (full vocabulary, or top-K normalized by log K)
    D_spread: torch.Tensor  # max |D(missing at 0 or at cap) - D|; 0 when nothing was missing
    missing: torch.Tensor  # int32: student top-K ids whose teacher probability was not shipped
    student_topk_ids: torch.Tensor  # (..., K) S_S ids, descending student probability
    teacher_topk_ids: torch.Tensor  # (..., K) S_T ids, descending teacher probability
    teacher_H: torch.Tensor | None = None  # teacher entropy (dense path, or shipped by the teacher)
    sampled_kl: torch.Tensor | None = None  # ℓ_t = log p_S(y_t) - log p_T(y_t)

    def compatibility(self, mode: str) -> torch.Tensor:
        """C for mode "exact", Ĉ for mode "lower_bound"."""
        if mode == "exact":
            return self.C
        if mode == "lower_bound":
            return self.C_hat
        raise TAInputError(f"compatibility mode {mode!r} is unknown; choose 'exact' or 'lower_bound'")

    # The per-position scalars (leading shape only) a pipeline ships between processes; the
    # (..., K) id fields stay where the statistics were computed.
    SCALARS = ("D", "C", "C_low", "C_high", "C_hat", "H", "D_spread", "missing")

    def scalars(self) -> dict[str, torch.Tensor]:
        """The :attr:`SCALARS` fields as fp32 tensors (``missing`` as a float count)."""
        return {name: getattr(self, name).float() for name in self.SCALARS}

    @classmethod
    def from_scalars(cls, values: dict[str, torch.Tensor]) -> "PositionStats":
        """Rebuild from :meth:`scalars` output (e.g. after a trip through verl's batch); the id
        fields come back with zero width, (..., 0), since selection never reads them."""
        absent = [n for n in cls.SCALARS if n not in values]
        if absent:
            raise TAInputError(f"statistics field(s) missing: {', '.join(absent)}; expected {', '.join(cls.SCALARS)}")
        lead = values["D"].shape
        for n in cls.SCALARS:
            if values[n].shape != lead:
                raise TAInputError(f"statistics field {n} has shape {tuple(values[n].shape)}, D has {tuple(lead)}")
        out = {n: values[n].float() for n in cls.SCALARS}
        out["missing"] = values["missing"].round().to(torch.int32)
        empty = torch.zeros((*lead, 0), dtype=torch.long, device=values["D"].device)
        return cls(**out, student_topk_ids=empty, teacher_topk_ids=empty)

    def scatter(self, valid: torch.Tensor) -> "PositionStats":
        """Statistics of the N valid positions (this object, leading shape (N,)) placed into the
        (B, T) grid of ``valid`` (row-major order of its True entries); zeros elsewhere."""
        n = int(valid.sum())
        if self.D.shape != (n,):
            raise TAInputError(f"scatter needs (N,) statistics with N = valid.sum() = {n}, got {tuple(self.D.shape)}")
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                out[f.name] = None
                continue
            grid = torch.zeros((*valid.shape, *v.shape[1:]), dtype=v.dtype, device=v.device)
            grid[valid] = v
            out[f.name] = grid
        return PositionStats(**out)


class _Buffers:
    """Preallocated (N,) / (N, K) outputs filled chunk by chunk."""

    def __init__(self, n: int, k: int, device: torch.device, with_teacher_h: bool, with_kl: bool):
        f32 = dict(dtype=torch.float32, device=device)
        self.D, self.C, self.C_low, self.C_high, self.C_hat, self.H, self.D_spread = (
            torch.empty(n, **f32) for _ in range(7)
        )
        self.missing = torch.zeros(n, dtype=torch.int32, device=device)
        self.s_ids = torch.empty(n, k, dtype=torch.long, device=device)
        self.t_ids = torch.empty(n, k, dtype=torch.long, device=device)
        self.teacher_H = torch.empty(n, **f32) if with_teacher_h else None
        self.sampled_kl = torch.empty(n, **f32) if with_kl else None

    def result(self, lead: torch.Size, k: int) -> PositionStats:
        def r(t):
            return None if t is None else t.reshape(lead)

        return PositionStats(
            D=r(self.D), C=r(self.C), C_low=r(self.C_low), C_high=r(self.C_high), C_hat=r(self.C_hat),
            H=r(self.H), D_spread=r(self.D_spread), missing=r(self.missing),
            student_topk_ids=self.s_ids.reshape(*lead, k), teacher_topk_ids=self.t_ids.reshape(*lead, k),
            teacher_H=r(self.teacher_H), sampled_kl=r(self.sampled_kl),
        )


def _check_k(k: int, vocab: int, name: str = "topk") -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not (1 <= k < vocab):
        raise TAInputError(f"{name}={k!r} is not allowed for a vocabulary of {vocab}; K must be an integer in [1, V)")


def _check_id_logp_pair(prefix: str, ids, logp, lead: torch.Size, vocab: int, width: str) -> None:
    """``<prefix>_ids`` (integer) and ``<prefix>_logp`` (float): both (..., width), leading
    shape ``lead``, ids inside the vocabulary."""
    check_tensor(f"{prefix}_ids", ids, floating=False)
    check_tensor(f"{prefix}_logp", logp, floating=True)
    if ids.shape != logp.shape or ids.shape[:-1] != lead:
        raise TAInputError(
            f"{prefix}_ids {tuple(ids.shape)} and {prefix}_logp {tuple(logp.shape)} must both be "
            f"(..., {width}) with leading shape {tuple(lead)}")
    check_ids(f"{prefix}_ids", ids, vocab)


def _check_chunk(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise TAInputError(f"chunk_size={chunk_size!r} is not allowed; it must be an integer >= 1")


def _check_entropy_mode(entropy: str, k: int) -> None:
    if entropy not in ("full", "topk"):
        raise TAInputError(f"entropy={entropy!r} is unknown; choose 'full' or 'topk'")
    if entropy == "topk" and k < 2:
        raise TAInputError("entropy='topk' needs topk >= 2 (it divides by log K)")


def _student_chunk(x: torch.Tensor, k: int, entropy: str, start: int, ws: support.Workspace):
    """Student side of one chunk: (log Z, H, top values, top ids); raises on NaN/+inf logits."""
    n = x.shape[0]
    log_z, h_full, top_val, top_ids = support.student_pass(x, k, ws.get(1, n), ws.get(2, n))
    bad = ~torch.isfinite(log_z) | torch.isnan(h_full)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise TAInputError(
            f"student logits at flattened position {start + row} contain NaN or +inf "
            "(or are all -inf); statistics need finite logits"
        )
    h = h_full if entropy == "full" else support.topk_entropy(top_val)
    return log_z, h, top_val, top_ids


def _union_stats(s_ids, s_top_logp, s_logp_at_t, t_ids, t_top_logp, t_logp_at_s, known, fill_logp, cap_logp):
    """D, C interval, Ĉ and D_spread for one chunk. All (n, K) except fill/cap (n,)."""
    dup = support.union_slots(s_ids, t_ids)  # (n, K): teacher slot already in S_S
    in_u = torch.cat([torch.ones_like(dup), ~dup], dim=-1)  # (n, 2K)
    s_u = torch.cat([s_top_logp, s_logp_at_t], dim=-1)  # (n, 2K)

    def d_with(fill):  # D with missing teacher probs set to exp(fill)
        t_at_s = torch.where(known, t_logp_at_s, fill.unsqueeze(-1).expand_as(t_logp_at_s))
        return support.renormalized_kl(torch.cat([t_at_s, t_top_logp], dim=-1), s_u, in_u)

    d = d_with(fill_logp)
    p_known = torch.where(known, t_logp_at_s.exp(), torch.zeros_like(t_logp_at_s))
    c_low = p_known.sum(-1)
    n_missing = (~known).sum(-1)
    c_hat = (t_top_logp.exp() * dup).sum(-1)
    if bool(n_missing.any()):
        c_point = c_low + n_missing * fill_logp.exp()
        tail = (1.0 - t_top_logp.exp().sum(-1)).clamp_min(0)  # upper bound on the missing mass
        c_high = c_low + torch.minimum(n_missing * cap_logp.exp(), tail)
        spread = torch.maximum((d_with(torch.full_like(fill_logp, float("-inf"))) - d).abs(),
                               (d_with(cap_logp) - d).abs())
        spread = torch.where(n_missing > 0, spread, torch.zeros_like(spread))
    else:
        c_point, c_high, spread = c_low, c_low, torch.zeros_like(d)
    return d, c_point, c_low, c_high, c_hat, spread, n_missing


def dense_position_stats(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    topk: int,
    entropy: str = "full",
    sampled_ids: torch.Tensor | None = None,
    chunk_size: int = 8,
) -> PositionStats:
    """Exact statistics from full student and teacher distributions.

    student, teacher: (..., V) logits or log-probs (any float dtype; log-softmax is applied).
    sampled_ids: optional (...) sampled tokens y_t, for ℓ_t. Returns :class:`PositionStats`.
    """
    check_tensor("student", student, floating=True)
    check_tensor("teacher", teacher, floating=True)
    if student.shape != teacher.shape:
        raise TAInputError(
            f"student has shape {tuple(student.shape)} but teacher has shape {tuple(teacher.shape)}; "
            "dense statistics need the same (..., V) shape (slice padded vocabularies first)"
        )
    if student.dim() < 1 or student.shape[-1] < 2:
        raise TAInputError(f"student/teacher must be (..., V) with V >= 2, got shape {tuple(student.shape)}")
    vocab = student.shape[-1]
    lead = student.shape[:-1]
    _check_k(topk, vocab)
    _check_chunk(chunk_size)
    _check_entropy_mode(entropy, topk)
    s2, t2 = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    n = s2.shape[0]
    if n == 0:
        raise TAInputError("empty batch: student/teacher hold no positions")
    y = None
    if sampled_ids is not None:
        check_tensor("sampled_ids", sampled_ids, floating=False)
        if sampled_ids.shape != lead:
            raise TAInputError(f"sampled_ids has shape {tuple(sampled_ids.shape)}, expected {tuple(lead)}")
        check_ids("sampled_ids", sampled_ids, vocab)
        y = sampled_ids.reshape(-1, 1).long()
    out = _Buffers(n, topk, student.device, with_teacher_h=True, with_kl=y is not None)
    ws = support.Workspace(min(chunk_size, n), vocab, student.device, n_buffers=4)
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        x = support.as_fp32(s2[a:b], ws.get(0, b - a))
        log_z, h, s_top_val, s_ids = _student_chunk(x, topk, entropy, a, ws)
        t_in = support.as_fp32(t2[a:b], ws.get(1, b - a))  # student scratch is free again
        t_logp = support.log_softmax_into(t_in, ws.get(3, b - a))  # (n, V)
        if bool(torch.isnan(t_logp[:, 0]).any()):
            row = int(torch.isnan(t_logp[:, 0]).nonzero()[0, 0])
            raise TAInputError(f"teacher logits at flattened position {a + row} contain NaN or +inf")
        t_top_logp, t_ids = t_logp.topk(topk, dim=-1)
        s_top_logp = s_top_val - log_z.unsqueeze(-1)
        s_logp_at_t = x.gather(-1, t_ids) - log_z.unsqueeze(-1)
        t_logp_at_s = t_logp.gather(-1, s_ids)
        known = torch.ones_like(s_ids, dtype=torch.bool)
        unused = torch.zeros(b - a, device=x.device)
        d, c, c_low, c_high, c_hat, spread, miss = _union_stats(
            s_ids, s_top_logp, s_logp_at_t, t_ids, t_top_logp, t_logp_at_s, known, unused, unused)
        out.D[a:b], out.C[a:b], out.C_low[a:b], out.C_high[a:b] = d, c, c_low, c_high
        out.C_hat[a:b], out.H[a:b], out.D_spread[a:b], out.missing[a:b] = c_hat, h, spread, miss.int()
        out.s_ids[a:b], out.t_ids[a:b] = s_ids, t_ids
        out.teacher_H[a:b] = support.entropy_from_logp(t_logp, ws.get(2, b - a))
        if y is not None:
            out.sampled_kl[a:b] = (x.gather(-1, y[a:b]) - log_z.unsqueeze(-1) - t_logp.gather(-1, y[a:b])).squeeze(-1)
    return out.result(lead, topk)


def sparse_position_stats(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    *,
    topk: int,
    teacher_extra_ids: torch.Tensor | None = None,
    teacher_extra_logp: torch.Tensor | None = None,
    sampled_ids: torch.Tensor | None = None,
    teacher_sampled_logp: torch.Tensor | None = None,
    teacher_entropy: torch.Tensor | None = None,
    entropy: str = "full",
    chunk_size: int = 8,
    rows: torch.Tensor | None = None,
) -> PositionStats:
    """Statistics from full student logits and the teacher's shipped top-K' (training pipeline).

    rows: optional (N,) indices into the flattened leading positions of ``student_logits``: only
    those positions are scored (chunk by chunk, no (N, V) copy) and every other input is given
    for those N positions, leading shape (N,). This is how a packed (tokens, V) logits tensor that
    also holds prompt positions is scored in place (the verl logits-processor hook).

    student_logits: (..., V). teacher_topk_ids / teacher_topk_logp: (..., K') with K' >= topk,
    the teacher's top-K' ids and their FULL-vocabulary log-probs. teacher_extra_ids/logp:
    optional (..., M) teacher log-probs at further ids (e.g. the student's top-K ids; with them
    C is exact). sampled_ids + teacher_sampled_logp: optional (...) for ℓ_t. teacher_entropy:
    optional (...) passed through as ``teacher_H``.
    """
    check_tensor("student_logits", student_logits, floating=True)
    if student_logits.dim() < 1 or student_logits.shape[-1] < 2:
        raise TAInputError(f"student_logits must be (..., V) with V >= 2, got shape {tuple(student_logits.shape)}")
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    if rows is not None:
        check_tensor("rows", rows, ndim=1, floating=False)
        n_all = student_logits.numel() // vocab
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_all):
            raise TAInputError(f"rows must index the {n_all} positions of student_logits; got range "
                               f"[{int(rows.min())}, {int(rows.max())}]")
        lead = rows.shape
    _check_id_logp_pair("teacher_topk", teacher_topk_ids, teacher_topk_logp, lead, vocab, "K'")
    k_prime = teacher_topk_ids.shape[-1]
    _check_k(topk, vocab)
    if k_prime < topk or k_prime > vocab:
        raise TAInputError(f"teacher top-K' width {k_prime} is not allowed; need topk ({topk}) <= K' <= V ({vocab})")
    _check_chunk(chunk_size)
    _check_entropy_mode(entropy, topk)
    if (teacher_extra_ids is None) != (teacher_extra_logp is None):
        raise TAInputError("teacher_extra_ids and teacher_extra_logp must be given together")
    if teacher_extra_ids is not None:
        _check_id_logp_pair("teacher_extra", teacher_extra_ids, teacher_extra_logp, lead, vocab, "M")
    if (sampled_ids is None) != (teacher_sampled_logp is None):
        raise TAInputError("sampled_ids and teacher_sampled_logp must be given together")
    for name, t in (("sampled_ids", sampled_ids), ("teacher_sampled_logp", teacher_sampled_logp),
                    ("teacher_entropy", teacher_entropy)):
        if t is not None:
            check_tensor(name, t, floating=name != "sampled_ids")
            if t.shape != lead:
                raise TAInputError(f"{name} has shape {tuple(t.shape)}, expected {tuple(lead)}")
    if sampled_ids is not None:
        check_ids("sampled_ids", sampled_ids, vocab)

    x2 = student_logits.reshape(-1, vocab)
    n = x2.shape[0] if rows is None else rows.numel()
    if n == 0:
        raise TAInputError("empty batch: student_logits hold no positions")
    tk_ids = teacher_topk_ids.reshape(n, k_prime).long()
    tk_logp = teacher_topk_logp.reshape(n, k_prime).float()
    if not bool(torch.isfinite(tk_logp.max(-1).values).all()) or bool(torch.isnan(tk_logp).any()) or bool((tk_logp > 0).any()):
        raise TAInputError("teacher_topk_logp must be log-probabilities: finite top value, no NaN, none > 0")
    mass = tk_logp.exp().sum(-1)
    if bool((mass > 1 + _MASS_TOLERANCE).any()):
        row = int((mass > 1 + _MASS_TOLERANCE).nonzero()[0, 0])
        raise TAInputError(
            f"teacher top-K' probabilities sum to {mass[row].item():.4f} > 1 at flattened position {row}: "
            "teacher_topk_logp must be full-vocabulary log-probabilities, not logits"
        )
    if teacher_extra_ids is not None:
        pool_ids = torch.cat([tk_ids, teacher_extra_ids.reshape(n, -1).long()], dim=-1)
        pool_logp = torch.cat([tk_logp, teacher_extra_logp.reshape(n, -1).float()], dim=-1)
    else:
        pool_ids, pool_logp = tk_ids, tk_logp
    # Point value and cap for a teacher probability that was not shipped (see module docstring).
    tail = (1.0 - mass).clamp_min(0)  # rounding can push the shipped mass a hair above 1
    n_outside = vocab - k_prime
    fill_logp = (tail / n_outside).log() if n_outside > 0 else torch.full_like(tail, float("-inf"))
    cap_logp = torch.minimum(tk_logp.min(-1).values, tail.log())
    y = sampled_ids.reshape(n, 1).long() if sampled_ids is not None else None

    out = _Buffers(n, topk, student_logits.device, with_teacher_h=teacher_entropy is not None, with_kl=y is not None)
    t_top_logp_all, t_top_idx = tk_logp.topk(topk, dim=-1)  # S_T from the shipped top-K'
    t_ids_all = tk_ids.gather(-1, t_top_idx)
    # 1) the only pass over (chunk, V): student log Z, H, top-K and the log-probs we gather
    ws = support.Workspace(min(chunk_size, n), vocab, student_logits.device)
    s_top_logp = torch.empty(n, topk, dtype=torch.float32, device=student_logits.device)
    s_logp_at_t = torch.empty_like(s_top_logp)
    for a in range(0, n, chunk_size):
        b = min(a + chunk_size, n)
        buf = ws.get(0, b - a)
        x = support.as_fp32(x2[a:b], buf) if rows is None else support.rows_as_fp32(x2, rows[a:b], buf)
        log_z, out.H[a:b], s_top_val, out.s_ids[a:b] = _student_chunk(x, topk, entropy, a, ws)
        s_top_logp[a:b] = s_top_val - log_z.unsqueeze(-1)
        s_logp_at_t[a:b] = x.gather(-1, t_ids_all[a:b]) - log_z.unsqueeze(-1)
        if y is not None:
            out.sampled_kl[a:b] = (x.gather(-1, y[a:b]) - log_z.unsqueeze(-1)).squeeze(-1)
    # 2) support statistics on (N, K)-sized tensors, in blocks that bound the (block, K, P) lookup
    out.t_ids.copy_(t_ids_all)
    for a in range(0, n, _SUPPORT_BLOCK):
        b = min(a + _SUPPORT_BLOCK, n)
        t_logp_at_s, known = support.lookup(out.s_ids[a:b], pool_ids[a:b], pool_logp[a:b])
        d, c, c_low, c_high, c_hat, spread, miss = _union_stats(
            out.s_ids[a:b], s_top_logp[a:b], s_logp_at_t[a:b], t_ids_all[a:b], t_top_logp_all[a:b],
            t_logp_at_s, known, fill_logp[a:b], cap_logp[a:b])
        out.D[a:b], out.C[a:b], out.C_low[a:b], out.C_high[a:b] = d, c, c_low, c_high
        out.C_hat[a:b], out.D_spread[a:b], out.missing[a:b] = c_hat, spread, miss.int()
    if y is not None:
        out.sampled_kl -= teacher_sampled_logp.reshape(n).float()
    if teacher_entropy is not None:
        out.teacher_H.copy_(teacher_entropy.reshape(n).float())
    return out.result(lead, topk)


__all__ = ["PositionStats", "dense_position_stats", "sparse_position_stats"]
