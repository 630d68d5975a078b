"""Per-position teachability statistics (spec: "Per-position statistics"; paper Eqs. 8-10, 14, 17).

Three entry points over the same kernels (``ta_opd.support``):

* :func:`dense_position_stats` — both models' full distributions at hand (the fixed-context
  diagnostic): every statistic is exact.
* :func:`sparse_position_stats` — the training pipeline: full student logits plus the teacher's
  top-K' ids/log-probs (and optionally teacher log-probs at extra ids, e.g. the student's
  top-K). Student quantities are exact; a teacher probability at a student top-K id that was
  not shipped is unknown and lies in [0, min(p_T^(K'), R)] with R the teacher mass outside its
  top-K'. We use the point value R / (V - K') (the tail mass spread evenly over the ids outside
  the top-K'), report the interval [C_low, C_high] it implies for C, how far D moves at the
  interval's ends (``D_spread``), and count the missing ids per position.
* :func:`topk_position_stats` — no logits at all: the student's top-K_s (and entropy) as a
  rollout engine returns them, plus the teacher's top-K'. The student probability at a teacher
  top-K id outside the shipped student list is unknown in the same way (point value
  R_S / (V - K_s), interval [0, min(p_S^(K_s), R_S)]); counted in ``student_missing``.

Cost. The only pass over (chunk, V) data is the student's (log Z, entropy, top-K) and, in the
dense path, the teacher's log-softmax. Rows per chunk come from a memory budget
(``support.chunk_rows``: about a million elements per buffer, at most ``chunk_bytes`` for all
buffers) unless ``chunk_size`` is given. Everything of size (N, K) — the union, D, C and its
interval, Ĉ, the missing counts — is computed afterwards over blocks of 65,536 positions.
Each position's results depend only on its own row, so they do not depend on the chunk size
(bit for bit with one thread). Leading dims are flattened: inputs (..., V) give outputs (...).
Everything is computed in fp32 whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ta_opd import support
from ta_opd._checks import check_ids, check_tensor, is_int
from ta_opd.errors import TAInputError

# Teacher top-K' probabilities may sum above 1 only by rounding (bf16 log-probs: ~1e-3).
_MASS_TOLERANCE = 1e-2
# Positions per block of the (N, K)-sized support statistics (temporaries ~ 64k x K x 4 bytes).
_SUPPORT_BLOCK = 1 << 16


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
    # int32: teacher top-K ids whose student probability was not given (topk_position_stats only)
    student_missing: torch.Tensor | None = None

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
        (B, R) grid of ``valid`` (row-major order of its True entries); zeros elsewhere."""
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


@dataclass(frozen=True)
class StudentTopK:
    """The student side of the statistics, one row per flattened position (N of them).

    Computed once per position by :func:`student_topk` (e.g. before the teacher is asked for its
    log-probs at the student's top-K ids) and handed to :func:`sparse_position_stats`.
    """

    ids: torch.Tensor  # (N, K) long: S_S, descending student probability
    logp: torch.Tensor  # (N, K) fp32: full-vocabulary student log-probs at S_S
    H: torch.Tensor  # (N,) fp32: entropy in mode ``entropy``
    log_z: torch.Tensor  # (N,) fp32: log-partition of the logits (log p = logit - log Z)
    kth_logit: torch.Tensor  # (N,) fp32: the K-th largest logit (an id with a larger one is in S_S)
    entropy: str  # "full" | "topk"


# --------------------------------------------------------------------------------- checks


def _check_k(k: int, vocab: int, name: str = "topk") -> None:
    if not is_int(k) or not (1 <= k < vocab):
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


def _check_chunk(chunk_size: int | None, chunk_bytes: int) -> None:
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        raise TAInputError(f"chunk_size={chunk_size!r} is not allowed; it must be an integer >= 1, "
                           "or None for rows per chunk from chunk_bytes")
    if not is_int(chunk_bytes) or chunk_bytes < 1:
        raise TAInputError(f"chunk_bytes={chunk_bytes!r} is not allowed; it must be an integer >= 1")


def _check_entropy_mode(entropy: str, k: int) -> None:
    if entropy not in ("full", "topk"):
        raise TAInputError(f"entropy={entropy!r} is unknown; choose 'full' or 'topk'")
    if entropy == "topk" and k < 2:
        raise TAInputError("entropy='topk' needs topk >= 2 (it divides by log K)")


def _check_position_vector(name: str, t, lead: torch.Size, floating: bool) -> None:
    if t is not None:
        check_tensor(name, t, floating=floating)
        if t.shape != lead:
            raise TAInputError(f"{name} has shape {tuple(t.shape)}, expected {tuple(lead)}")


def _top_of_shipped(ids: torch.Tensor, logp: torch.Tensor, k: int, desc: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable of a shipped (N, W) list: (log-probs (N, k), ids (N, k)), descending.
    A list already in descending order (``desc``, as pipelines ship it) is sliced, not searched."""
    if desc:
        return logp[:, :k], ids[:, :k]
    lp, idx = logp.topk(k, dim=-1)
    return lp, ids.gather(-1, idx)


def _shipped_topk(prefix: str, ids: torch.Tensor, logp: torch.Tensor, n: int, vocab: int):
    """Flattened (n, W) long ids / fp32 log-probs of a shipped top-W list, validated as
    full-vocabulary log-probs; plus the mass outside it R (n,) and the log of the point value
    R / (V - W) and of the cap min(p^(W), R) used for an unshipped probability."""
    width = ids.shape[-1]
    ids, logp = ids.reshape(n, width).long(), logp.reshape(n, width).float()
    desc = bool((logp[:, 1:] <= logp[:, :-1]).all())  # as pipelines ship it; False with any NaN
    top = logp[:, 0] if desc else logp.max(-1).values  # NaN if any entry is NaN
    if not bool(torch.isfinite(top).all()) or bool((top > 0).any()):
        raise TAInputError(f"{prefix}_logp must be log-probabilities: finite top value, no NaN, none > 0")
    mass = logp.exp().sum(-1)
    if bool((mass > 1 + _MASS_TOLERANCE).any()):
        row = int((mass > 1 + _MASS_TOLERANCE).nonzero()[0, 0])
        raise TAInputError(
            f"{prefix} top-{width} probabilities sum to {mass[row].item():.4f} > 1 at flattened position {row}: "
            f"{prefix}_logp must be full-vocabulary log-probabilities, not logits")
    tail = (1.0 - mass).clamp_min(0)  # rounding can push the shipped mass a hair above 1
    n_outside = vocab - width
    fill = (tail / n_outside).log() if n_outside > 0 else torch.full_like(tail, float("-inf"))
    cap = torch.minimum(logp[:, -1] if desc else logp.min(-1).values, tail.log())
    return ids, logp, tail, fill, cap, desc


# ------------------------------------------------------------------------ the (N, K) part


@dataclass(frozen=True)
class _Side:
    """One model's log-probs at the OTHER model's top-K ids: known values, and what stands in
    for an unknown one (point value ``fill``, interval [0, exp(cap)], total unknown mass <= tail).
    ``known`` None means every value is known."""

    at: torch.Tensor  # (N, K) log-probs (anything where not known)
    known: torch.Tensor | None  # (N, K) bool
    fill: torch.Tensor | None = None  # (N,) log point value
    cap: torch.Tensor | None = None  # (N,) log of the largest possible unknown probability
    tail: torch.Tensor | None = None  # (N,) mass outside the shipped list


def _support_stats(s_ids, s_lp, t_ids, t_lp, teacher_at_s: _Side, student_at_t: _Side, table, dup=None) -> dict:
    """D, C, C_low, C_high, Ĉ, D_spread and the missing counts, (N,) each, over blocks.

    s_ids/s_lp: (N, K) S_S and its student log-probs; t_ids/t_lp: (N, K) S_T and its teacher
    log-probs; ``teacher_at_s``: teacher log-probs at S_S; ``student_at_t``: student log-probs at
    S_T. dup: optional (N, K) bool, which S_T ids are in S_S; else found with ``table``, a
    :class:`support.DenseLookup`.
    """
    n = s_ids.shape[0]
    dev = s_ids.device
    out = {k: torch.empty(n, dtype=torch.float32, device=dev)
           for k in ("D", "C", "C_low", "C_high", "C_hat", "D_spread")}
    out["missing"] = torch.empty(n, dtype=torch.int32, device=dev)
    if student_at_t.known is not None:
        out["student_missing"] = torch.empty(n, dtype=torch.int32, device=dev)
    if dup is None:
        dup = table.member(t_ids, s_ids)  # (N, K): S_T slot already in S_S
    for a in range(0, n, _SUPPORT_BLOCK):
        b = min(a + _SUPPORT_BLOCK, n)
        res = _support_block(s_lp[a:b], t_lp[a:b], dup[a:b], _slice(teacher_at_s, a, b), _slice(student_at_t, a, b))
        for k, v in res.items():
            out[k][a:b] = v
    return out


def _slice(side: _Side, a: int, b: int) -> _Side:
    return _Side(*(None if v is None else v[a:b] for v in (side.at, side.known, side.fill, side.cap, side.tail)))


def _plogratio(p: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Σ p (lp - lq) per row, with 0 where p = 0 (also lp = -inf or unknown) and +inf where
    p > 0 but lq = -inf. All (n, K) -> (n,)."""
    return (p * (lp - lq)).nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf")).sum(-1)


def _support_block(s_lp, t_lp, dup, t_side: _Side, s_side: _Side) -> dict:
    """One block of :func:`_support_stats`. All (n, K) except the (n,) side fields.

    D (Eq. 9) in linear space: with p_T, p_S the full-vocabulary probabilities on the union
    U = S_S ∪ (S_T \\ S_S), Z_T = Σ_U p_T, Z_S = Σ_U p_S and N = Σ_U p_T (log p_T - log p_S),
    D = N / Z_T - log Z_T + log Z_S. An unknown probability enters through closed-form sums
    (see ``d_at``), so the interval ends cost O(n), not another pass.
    """
    t_at_s, s_at_t = t_side.at, s_side.at
    # teacher on S_S (NaN = unknown -> 0); student on S_S is exact
    pt_s = t_at_s.exp()
    if t_side.known is not None:
        pt_s.nan_to_num_(nan=0.0)
    c_low = pt_s.sum(-1)
    num = _plogratio(pt_s, t_at_s, s_lp)
    z_s = s_lp.exp().sum(-1)
    # teacher on S_T is exact; the student's on S_T \ S_S (NaN = unknown -> 0)
    pt_t = t_lp.exp()
    c_hat = (pt_t * dup).sum(-1)
    pt_u = pt_t.masked_fill_(dup, 0.0)  # (n, K): teacher mass on the slots S_T \ S_S
    z_t = c_low + pt_u.sum(-1)
    ps_u = s_at_t.exp().masked_fill_(dup, 0.0)
    if s_side.known is not None:
        ps_u.nan_to_num_(nan=0.0)
    z_s = z_s + ps_u.sum(-1)
    num = num + _plogratio(pt_u, t_lp, s_at_t)  # unknown student slots give NaN -> 0 here
    out = dict(C_low=c_low, C_hat=c_hat)
    n_t = n_s = None
    if t_side.known is not None:  # unknown teacher probs at S_S: n_t slots, student log-probs summing to b_t
        t_miss = ~t_side.known
        n_t = t_miss.sum(-1)
        b_t = torch.where(t_miss, s_lp, 0.0).sum(-1)
    if s_side.known is not None:  # unknown student probs at S_T \ S_S: teacher mass m_s, Σ p_T log p_T = a_s
        s_miss = ~s_side.known & ~dup
        n_s = s_miss.sum(-1)
        pt_m = pt_u * s_miss
        m_s = pt_m.sum(-1)
        a_s = _plogratio(pt_m, t_lp, torch.zeros((), device=t_lp.device))
        out["student_missing"] = n_s.int()

    def d_at(f, g):  # D with every unknown teacher prob exp(f) and every unknown student prob exp(g)
        zt, zs, nm = z_t, z_s, num
        if f is not None:
            ef = f.exp()
            zt = zt + n_t * ef
            nm = nm + torch.where((n_t > 0) & (ef > 0), ef * (n_t * f - b_t), 0.0)
        if g is not None:
            zs = zs + n_s * g.exp()
            nm = nm + torch.where(m_s > 0, a_s - g * m_s, 0.0)
        return nm / zt - zt.log() + zs.log()

    any_t = n_t is not None and bool(n_t.any())
    any_s = n_s is not None and bool(n_s.any())
    d = d_at(t_side.fill if any_t else None, s_side.fill if any_s else None)
    out["D"] = d
    out["missing"] = n_t.int() if n_t is not None else torch.zeros_like(d, dtype=torch.int32)
    if any_t:
        out["C"] = c_low + n_t * t_side.fill.exp()
        out["C_high"] = c_low + torch.minimum(n_t * t_side.cap.exp(), t_side.tail)
    else:
        out["C"] = out["C_high"] = c_low
    spread = torch.zeros_like(d)
    if any_t or any_s:
        neg_inf = torch.full_like(d, float("-inf"))
        for f in ((neg_inf, t_side.cap) if any_t else (None,)):
            for g in ((neg_inf, s_side.cap) if any_s else (None,)):
                spread = torch.maximum(spread, (d_at(f, g) - d).abs())
        missing = (n_t > 0) if any_t else torch.zeros_like(d, dtype=torch.bool)
        if any_s:
            missing = missing | (n_s > 0)
        spread = torch.where(missing, spread, 0.0)
    out["D_spread"] = spread
    return out


# ------------------------------------------------------------------- the (chunk, V) pass


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
    short = ~torch.isfinite(top_val[:, -1])  # fewer than K finite logits: the top-K holds -inf
    if bool(short.any()):
        row = int(short.nonzero()[0, 0])
        raise TAInputError(
            f"student logits at {int(short.sum())} position(s) have fewer than topk={k} finite values (first: "
            f"flattened position {start + row}, {int(torch.isfinite(x[row]).sum())} finite); statistics over the "
            "top-K support need at least K finite logits per position (lower topk)"
        )
    h = h_full if entropy == "full" else support.topk_entropy(top_val)
    return log_z, h, top_val, top_ids


def _flat_logits(student_logits: torch.Tensor, rows: torch.Tensor | None, name: str):
    """(x2 (rows_total, V) view, lead shape, N) after checking ``rows``."""
    check_tensor(name, student_logits, floating=True)
    if student_logits.dim() < 1 or student_logits.shape[-1] < 2:
        raise TAInputError(f"{name} must be (..., V) with V >= 2, got shape {tuple(student_logits.shape)}")
    vocab = student_logits.shape[-1]
    lead = student_logits.shape[:-1]
    x2 = student_logits.reshape(-1, vocab)
    if rows is not None:
        check_tensor("rows", rows, ndim=1, floating=False)
        n_all = x2.shape[0]
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_all):
            raise TAInputError(f"rows must index the {n_all} positions of {name}; got range "
                               f"[{int(rows.min())}, {int(rows.max())}]")
        lead = rows.shape
    n = x2.shape[0] if rows is None else rows.numel()
    return x2, lead, n


def student_topk(
    student_logits: torch.Tensor,
    *,
    topk: int,
    entropy: str = "full",
    rows: torch.Tensor | None = None,
    chunk_size: int | None = None,
    chunk_bytes: int = support.DEFAULT_CHUNK_BYTES,
) -> StudentTopK:
    """The student's top-K ids and log-probs, entropy and log Z: the one pass over (chunk, V).

    student_logits: (..., V) any float dtype; rows: optional (N,) indices into its flattened
    leading positions (see :func:`sparse_position_stats`). Outputs are flattened: (N, K), (N,).
    """
    x2, lead, n = _flat_logits(student_logits, rows, "student_logits")
    vocab = x2.shape[-1]
    _check_k(topk, vocab)
    _check_chunk(chunk_size, chunk_bytes)
    _check_entropy_mode(entropy, topk)
    if n == 0:
        raise TAInputError("empty batch: student_logits hold no positions")
    return _student_topk(x2, rows, n, topk, entropy, chunk_size, chunk_bytes)


def _student_topk(x2, rows, n, k, entropy, chunk_size, chunk_bytes) -> StudentTopK:
    vocab, dev = x2.shape[-1], x2.device
    step = support.chunk_rows(n, vocab, chunk_size=chunk_size, chunk_bytes=chunk_bytes, n_buffers=3)
    ws = support.Workspace(step, vocab, dev)
    ids = torch.empty(n, k, dtype=torch.long, device=dev)
    logp = torch.empty(n, k, dtype=torch.float32, device=dev)
    h = torch.empty(n, dtype=torch.float32, device=dev)
    log_z = torch.empty(n, dtype=torch.float32, device=dev)
    kth = torch.empty(n, dtype=torch.float32, device=dev)
    for a in range(0, n, step):
        b = min(a + step, n)
        buf = ws.get(0, b - a)
        x = support.as_fp32(x2[a:b], buf) if rows is None else support.rows_as_fp32(x2, rows[a:b], buf)
        log_z[a:b], h[a:b], top_val, ids[a:b] = _student_chunk(x, k, entropy, a, ws)
        torch.sub(top_val, log_z[a:b].unsqueeze(-1), out=logp[a:b])
        kth[a:b] = top_val[:, -1]
    return StudentTopK(ids=ids, logp=logp, H=h, log_z=log_z, kth_logit=kth, entropy=entropy)


def _in_student_topk(x_at: torch.Tensor, ids: torch.Tensor, student: StudentTopK) -> torch.Tensor:
    """Which ``ids`` (N, M), with logits ``x_at`` (N, M) fp32, are in S_S: a logit above the
    K-th largest is, one below is not; only a tie with it needs the ids. -> (N, M) bool"""
    tau = student.kth_logit.unsqueeze(-1)
    member = x_at > tau
    tie = x_at == tau
    if bool(tie.any()):  # compare only the tied entries (P of them) with their row's S_S: (P, K)
        rr, cc = tie.nonzero(as_tuple=True)
        member[rr, cc] = (ids[rr, cc].unsqueeze(-1) == student.ids[rr]).any(-1)
    return member


def _logits_at(x2: torch.Tensor, rows: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor:
    """x2[row, id] as fp32 for (N, M) ids, without touching the rest of the rows."""
    r = torch.arange(ids.shape[0], device=ids.device) if rows is None else rows
    if x2.stride(-1) != 1:
        return x2[r.unsqueeze(-1), ids].float()
    # one flat take over the rows' storage (cheaper than 2-D advanced indexing)
    flat = x2.as_strided((x2.stride(0) * (x2.shape[0] - 1) + x2.shape[1],), (1,))
    return flat.take(r.unsqueeze(-1) * x2.stride(0) + ids).float()


def dense_position_stats(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    topk: int,
    entropy: str = "full",
    sampled_ids: torch.Tensor | None = None,
    chunk_size: int | None = None,
    chunk_bytes: int = support.DEFAULT_CHUNK_BYTES,
) -> PositionStats:
    """Exact statistics from full student and teacher distributions.

    student, teacher: (..., V) logits or log-probs (any float dtype; log-softmax is applied).
    sampled_ids: optional (...) sampled tokens y_t, for ℓ_t. chunk_size: rows per chunk, or
    None for rows from ``chunk_bytes`` (the byte budget of the (chunk, V) fp32 buffers).
    Returns :class:`PositionStats`.
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
    _check_chunk(chunk_size, chunk_bytes)
    _check_entropy_mode(entropy, topk)
    s2, t2 = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    n = s2.shape[0]
    if n == 0:
        raise TAInputError("empty batch: student/teacher hold no positions")
    y = None
    if sampled_ids is not None:
        _check_position_vector("sampled_ids", sampled_ids, lead, floating=False)
        check_ids("sampled_ids", sampled_ids, vocab)
        y = sampled_ids.reshape(-1, 1).long()
    dev, f32 = student.device, dict(dtype=torch.float32, device=student.device)
    step = support.chunk_rows(n, vocab, chunk_size=chunk_size, chunk_bytes=chunk_bytes, n_buffers=4)
    ws = support.Workspace(step, vocab, dev, n_buffers=4)
    s_ids = torch.empty(n, topk, dtype=torch.long, device=dev)
    t_ids = torch.empty_like(s_ids)
    s_lp, s_at_t, t_lp, t_at_s = (torch.empty(n, topk, **f32) for _ in range(4))
    h, t_h = torch.empty(n, **f32), torch.empty(n, **f32)
    kl = torch.empty(n, **f32) if y is not None else None
    for a in range(0, n, step):
        b = min(a + step, n)
        x = support.as_fp32(s2[a:b], ws.get(0, b - a))
        log_z, h[a:b], s_top_val, s_ids[a:b] = _student_chunk(x, topk, entropy, a, ws)
        lz = log_z.unsqueeze(-1)
        t_in = support.as_fp32(t2[a:b], ws.get(1, b - a))  # student scratch is free again
        t_logp = support.log_softmax_into(t_in, ws.get(3, b - a))  # (n, V)
        if bool(torch.isnan(t_logp[:, 0]).any()):
            row = int(torch.isnan(t_logp[:, 0]).nonzero()[0, 0])
            raise TAInputError(f"teacher logits at flattened position {a + row} contain NaN or +inf")
        t_lp[a:b], t_ids[a:b] = t_logp.topk(topk, dim=-1)
        if not bool(torch.isfinite(t_lp[a:b, -1]).all()):
            row = int((~torch.isfinite(t_lp[a:b, -1])).nonzero()[0, 0])
            raise TAInputError(f"teacher logits at flattened position {a + row} have fewer than topk={topk} finite "
                               "values; statistics over the top-K support need at least K finite logits (lower topk)")
        s_lp[a:b] = s_top_val - lz
        s_at_t[a:b] = x.gather(-1, t_ids[a:b]) - lz
        t_at_s[a:b] = t_logp.gather(-1, s_ids[a:b])
        t_h[a:b] = support.entropy_from_logp(t_logp, ws.get(2, b - a))
        if y is not None:
            kl[a:b] = (x.gather(-1, y[a:b]) - lz - t_logp.gather(-1, y[a:b])).squeeze(-1)
    del ws
    table = support.DenseLookup(support.lookup_rows(n, vocab, chunk_size=chunk_size, chunk_bytes=chunk_bytes),
                                vocab, dev)
    sup = _support_stats(s_ids, s_lp, t_ids, t_lp, _Side(t_at_s, None), _Side(s_at_t, None), table)
    return _result(lead, topk, sup, h, s_ids, t_ids, t_h, kl)


def _result(lead, k, sup, h, s_ids, t_ids, teacher_h, sampled_kl) -> PositionStats:
    def r(t):
        return None if t is None else t.reshape(lead)

    return PositionStats(
        D=r(sup["D"]), C=r(sup["C"]), C_low=r(sup["C_low"]), C_high=r(sup["C_high"]), C_hat=r(sup["C_hat"]),
        H=r(h), D_spread=r(sup["D_spread"]), missing=r(sup["missing"]),
        student_topk_ids=s_ids.reshape(*lead, k), teacher_topk_ids=t_ids.reshape(*lead, k),
        teacher_H=r(teacher_h), sampled_kl=r(sampled_kl), student_missing=r(sup.get("student_missing")),
    )


def _teacher_pool(tk_ids, tk_lp, extra_ids, extra_logp, n):
    """(ids, log-probs) (N, M + K') to look ids up in: extras first, so that an id shipped both
    as an extra and in the top-K' takes its top-K' value (the lookup's last slot wins)."""
    if extra_ids is None:
        return tk_ids, tk_lp
    return (torch.cat([extra_ids.reshape(n, -1).long(), tk_ids], dim=-1),
            torch.cat([extra_logp.reshape(n, -1).float(), tk_lp], dim=-1))


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
    chunk_size: int | None = None,
    chunk_bytes: int = support.DEFAULT_CHUNK_BYTES,
    rows: torch.Tensor | None = None,
    student: StudentTopK | None = None,
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
    optional (...) passed through as ``teacher_H``. student: optional :func:`student_topk` of
    the same logits (and rows, topk, entropy), so the (chunk, V) pass is not run twice.
    chunk_size / chunk_bytes: see :func:`dense_position_stats`.
    """
    x2, lead, n = _flat_logits(student_logits, rows, "student_logits")
    vocab = x2.shape[-1]
    _check_id_logp_pair("teacher_topk", teacher_topk_ids, teacher_topk_logp, lead, vocab, "K'")
    k_prime = teacher_topk_ids.shape[-1]
    _check_k(topk, vocab)
    if k_prime < topk or k_prime > vocab:
        raise TAInputError(f"teacher top-K' width {k_prime} is not allowed; need topk ({topk}) <= K' <= V ({vocab})")
    _check_chunk(chunk_size, chunk_bytes)
    _check_entropy_mode(entropy, topk)
    if (teacher_extra_ids is None) != (teacher_extra_logp is None):
        raise TAInputError("teacher_extra_ids and teacher_extra_logp must be given together")
    if teacher_extra_ids is not None:
        _check_id_logp_pair("teacher_extra", teacher_extra_ids, teacher_extra_logp, lead, vocab, "M")
    if (sampled_ids is None) != (teacher_sampled_logp is None):
        raise TAInputError("sampled_ids and teacher_sampled_logp must be given together")
    _check_position_vector("sampled_ids", sampled_ids, lead, floating=False)
    _check_position_vector("teacher_sampled_logp", teacher_sampled_logp, lead, floating=True)
    _check_position_vector("teacher_entropy", teacher_entropy, lead, floating=True)
    if sampled_ids is not None:
        check_ids("sampled_ids", sampled_ids, vocab)
    if n == 0:
        raise TAInputError("empty batch: student_logits hold no positions")
    tk_ids, tk_lp, tail, fill, cap, desc = _shipped_topk("teacher_topk", teacher_topk_ids, teacher_topk_logp, n, vocab)
    if student is None:
        student = _student_topk(x2, rows, n, topk, entropy, chunk_size, chunk_bytes)
    else:
        _check_student(student, n, topk, entropy)

    t_lp, t_ids = _top_of_shipped(tk_ids, tk_lp, topk, desc)  # S_T from the shipped top-K'
    lz = student.log_z.unsqueeze(-1)
    x_at_t = _logits_at(x2, rows, t_ids)  # (N, K) student logits at S_T
    s_at_t = x_at_t - lz  # the student's exact log-probs at S_T
    dup = _in_student_topk(x_at_t, t_ids, student)  # (N, K): S_T ids also in S_S
    kl = None
    if sampled_ids is not None:
        y = sampled_ids.reshape(n, 1).long()
        kl = (_logits_at(x2, rows, y) - lz).squeeze(-1) - teacher_sampled_logp.reshape(n).float()
    pool_ids, pool_lp = _teacher_pool(tk_ids, tk_lp, teacher_extra_ids, teacher_extra_logp, n)
    table = support.DenseLookup(support.lookup_rows(n, vocab, chunk_size=chunk_size, chunk_bytes=chunk_bytes),
                                vocab, x2.device)  # allocated after the student pass freed its buffers
    t_at_s, known = table.lookup(student.ids, pool_ids, pool_lp)
    sup = _support_stats(student.ids, student.logp, t_ids, t_lp, _Side(t_at_s, known, fill, cap, tail),
                         _Side(s_at_t, None), table, dup=dup)
    t_h = teacher_entropy.reshape(n).float() if teacher_entropy is not None else None
    return _result(lead, topk, sup, student.H, student.ids, t_ids, t_h, kl)


def _check_student(student: StudentTopK, n: int, k: int, entropy: str) -> None:
    if not isinstance(student, StudentTopK):
        raise TAInputError(f"student must be a StudentTopK (from student_topk), got {type(student).__name__}")
    if student.ids.shape != (n, k) or student.logp.shape != (n, k) or student.H.shape != (n,):
        raise TAInputError(f"student holds top-K of shape {tuple(student.ids.shape)}; expected ({n}, {k}) for "
                           f"{n} positions and topk={k}")
    if student.entropy != entropy:
        raise TAInputError(f"student was computed with entropy={student.entropy!r}, but entropy={entropy!r} was asked")


def topk_position_stats(
    student_topk_ids: torch.Tensor,
    student_topk_logp: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logp: torch.Tensor,
    *,
    topk: int,
    vocab_size: int,
    student_entropy: torch.Tensor | None = None,
    entropy: str = "full",
    teacher_extra_ids: torch.Tensor | None = None,
    teacher_extra_logp: torch.Tensor | None = None,
    student_extra_ids: torch.Tensor | None = None,
    student_extra_logp: torch.Tensor | None = None,
    student_sampled_logp: torch.Tensor | None = None,
    teacher_sampled_logp: torch.Tensor | None = None,
    teacher_entropy: torch.Tensor | None = None,
    chunk_bytes: int = support.DEFAULT_CHUNK_BYTES,
) -> PositionStats:
    """Statistics from top-K lists only: no logits (a rollout engine returns the student side).

    student_topk_ids / student_topk_logp: (..., K_s) with topk <= K_s < V, the student's top-K_s
    ids and FULL-vocabulary log-probs (S_S = its ``topk`` most probable). teacher_topk_ids /
    teacher_topk_logp: (..., K') as in :func:`sparse_position_stats`. student_entropy: (...)
    full-vocabulary entropy, required for entropy="full"; with entropy="topk" H is computed from
    S_S and student_entropy must be None. *_extra_ids/logp: optional (..., M) log-probs at
    further ids (the teacher's at the student's top-K make C exact; the student's at the
    teacher's top-K make D exact). student_sampled_logp + teacher_sampled_logp: optional (...)
    for ℓ_t. chunk_bytes: budget of the (rows, V) lookup table. The contract is
    :class:`PositionStats`, with ``student_missing`` counting the teacher top-K ids whose student
    probability was not given (D then uses the point value R_S / (V - K_s); D_spread is +inf when
    a teacher-weighted id may have student probability 0). The id fields are (..., K).
    """
    if not is_int(vocab_size) or vocab_size < 2:
        raise TAInputError(f"vocab_size={vocab_size!r} is not allowed; it must be an integer >= 2")
    vocab = vocab_size
    check_tensor("student_topk_ids", student_topk_ids, floating=False)
    if student_topk_ids.dim() < 1:
        raise TAInputError(f"student_topk_ids must be (..., K_s), got shape {tuple(student_topk_ids.shape)}")
    lead = student_topk_ids.shape[:-1]
    _check_id_logp_pair("student_topk", student_topk_ids, student_topk_logp, lead, vocab, "K_s")
    _check_id_logp_pair("teacher_topk", teacher_topk_ids, teacher_topk_logp, lead, vocab, "K'")
    _check_k(topk, vocab)
    k_s, k_prime = student_topk_ids.shape[-1], teacher_topk_ids.shape[-1]
    if k_s < topk or k_s >= vocab:
        raise TAInputError(f"student top-K_s width {k_s} is not allowed; need topk ({topk}) <= K_s < V ({vocab})")
    if k_prime < topk or k_prime > vocab:
        raise TAInputError(f"teacher top-K' width {k_prime} is not allowed; need topk ({topk}) <= K' <= V ({vocab})")
    _check_chunk(None, chunk_bytes)
    _check_entropy_mode(entropy, topk)
    if entropy == "full" and student_entropy is None:
        raise TAInputError("entropy='full' needs student_entropy (the full-vocabulary entropy); "
                           "pass it or use entropy='topk'")
    if entropy == "topk" and student_entropy is not None:
        raise TAInputError("entropy='topk' computes H from the student's top-K; student_entropy must be None")
    for prefix, ids, lp in (("teacher_extra", teacher_extra_ids, teacher_extra_logp),
                            ("student_extra", student_extra_ids, student_extra_logp)):
        if (ids is None) != (lp is None):
            raise TAInputError(f"{prefix}_ids and {prefix}_logp must be given together")
        if ids is not None:
            _check_id_logp_pair(prefix, ids, lp, lead, vocab, "M")
    if (student_sampled_logp is None) != (teacher_sampled_logp is None):
        raise TAInputError("student_sampled_logp and teacher_sampled_logp must be given together")
    for name, t in (("student_entropy", student_entropy), ("student_sampled_logp", student_sampled_logp),
                    ("teacher_sampled_logp", teacher_sampled_logp), ("teacher_entropy", teacher_entropy)):
        _check_position_vector(name, t, lead, floating=True)
    n = student_topk_ids.numel() // k_s
    if n == 0:
        raise TAInputError("empty batch: student_topk_ids hold no positions")
    sk_ids, sk_lp, s_tail, s_fill, s_cap, s_desc = _shipped_topk("student_topk", student_topk_ids, student_topk_logp,
                                                                 n, vocab)
    tk_ids, tk_lp, t_tail, t_fill, t_cap, t_desc = _shipped_topk("teacher_topk", teacher_topk_ids, teacher_topk_logp,
                                                                 n, vocab)
    s_lp, s_ids = _top_of_shipped(sk_ids, sk_lp, topk, s_desc)
    t_lp, t_ids = _top_of_shipped(tk_ids, tk_lp, topk, t_desc)
    if entropy == "full":
        h = student_entropy.reshape(n).float()
    else:
        h = support.topk_entropy(s_lp)
    width = max(k_s, k_prime) + max(0 if e is None else e.shape[-1] for e in (teacher_extra_ids, student_extra_ids))
    if vocab <= 16 * width:  # a (rows, V) table is cheapest while V is small
        table = support.DenseLookup(support.lookup_rows(n, vocab, chunk_size=None, chunk_bytes=chunk_bytes),
                                    vocab, sk_ids.device)
    else:
        table = support.SortedLookup()
    t_pool = _teacher_pool(tk_ids, tk_lp, teacher_extra_ids, teacher_extra_logp, n)
    s_pool = _teacher_pool(sk_ids, sk_lp, student_extra_ids, student_extra_logp, n)
    t_at_s, t_known = table.lookup(s_ids, *t_pool)
    s_at_t, s_known = table.lookup(t_ids, *s_pool)
    sup = _support_stats(s_ids, s_lp, t_ids, t_lp, _Side(t_at_s, t_known, t_fill, t_cap, t_tail),
                         _Side(s_at_t, s_known, s_fill, s_cap, s_tail), table)
    kl = None
    if student_sampled_logp is not None:
        kl = student_sampled_logp.reshape(n).float() - teacher_sampled_logp.reshape(n).float()
    t_h = teacher_entropy.reshape(n).float() if teacher_entropy is not None else None
    return _result(lead, topk, sup, h, s_ids, t_ids, t_h, kl)


__all__ = ["PositionStats", "StudentTopK", "student_topk", "dense_position_stats", "sparse_position_stats",
           "topk_position_stats"]
