"""Small kernels shared by the statistics paths: chunk sizing, the one pass over (chunk, V)
student logits (log Z, entropy, top-K), and per-position id lookups.

Shape vocabulary: n positions in a chunk, N in a call, V vocabulary, K support size,
P = K' (+ extra) ids shipped per position.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class Workspace:
    """Chunk-sized fp32 buffers reused across chunks.

    Allocating a few-MB temporary per chunk makes the allocator alternate between its heap and
    fresh pages, and every fresh page costs a fault: measured here, the same pass ran 1x or 3x
    slower from one call to the next. Writing into these buffers with ``out=`` avoids that.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device, n_buffers: int = 3):
        self.bufs = [torch.empty(rows, vocab, dtype=torch.float32, device=device) for _ in range(n_buffers)]

    def get(self, i: int, rows: int) -> torch.Tensor:
        return self.bufs[i][:rows]  # leading-dim slice: contiguous


def as_fp32(x: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """x as fp32: x itself when already fp32, else copied into buf."""
    if x.dtype == torch.float32:
        return x
    return buf.copy_(x)


def rows_as_fp32(x: torch.Tensor, rows: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """x[rows] as fp32 in buf: one gather straight into the buffer when x is fp32."""
    if x.dtype == torch.float32:
        return torch.index_select(x, 0, rows, out=buf)
    return buf.copy_(x.index_select(0, rows))


def _xlogy_dot(e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum_v e_v d_v per row, with 0 * (-inf) = 0 (masked logits). (n, V), (n, V) -> (n,)"""
    ed = torch.linalg.vecdot(e, d)  # (n,)
    bad = torch.isnan(ed)
    if bool(bad.any()):
        ed[bad] = torch.where(e[bad] > 0, e[bad] * d[bad], torch.zeros_like(d[bad])).sum(-1)
    return ed


# Above this V, torch.topk's per-row selection is cheaper than the partition + read-off below
# (measured on one AVX2 core: 4x faster at V = 128, even at ~2,048, 1.5x slower at 65,536).
NUMPY_TOPK_MAX_V = 2048
# From this V on, torch.topk runs over a shortlist of the best groups (5x faster at 151,936).
GROUPED_TOPK_MIN_V = 8192


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k values and ids of each row of a CPU fp32 (n, V) tensor, descending. (n, k) each.

    ``torch.topk`` costs ~2 µs per row even at V = 128. For V <= NUMPY_TOPK_MAX_V, numpy's
    SIMD partition finds each row's k-th largest value tau; when exactly k entries reach tau
    they are the top-k, read off in one pass and ordered by value. Rows with ties at tau (or
    NaN) are sorted whole. Ties go to the lower id (the order of a stable descending sort).
    Larger V use ``torch.topk`` (over a shortlist from V = GROUPED_TOPK_MIN_V on, see
    :func:`_grouped_topk`), as do other devices; its order among equal values is unspecified.
    """
    n, vocab = x.shape
    if x.device.type != "cpu" or x.dtype != torch.float32 or k >= vocab:
        return x.topk(k, dim=-1)
    if vocab > NUMPY_TOPK_MAX_V:
        return _grouped_topk(x, k) if vocab >= GROUPED_TOPK_MIN_V else x.topk(k, dim=-1)
    xn = x.numpy()
    part = np.partition(xn, vocab - k, axis=-1)  # (n, V): row's top-k values in the last k slots
    tau = part[:, vocab - k : vocab - k + 1]  # (n, 1)
    mask = xn >= tau  # (n, V)
    ok = (np.count_nonzero(mask, axis=-1) == k) & ~np.isnan(part[:, -1])  # (n,); NaN sorts last
    if not ok.all():
        mask[~ok] = False
    ids = np.empty((n, k), dtype=np.int64)
    ids[ok] = (np.flatnonzero(mask) % vocab).reshape(-1, k)  # ascending ids per row
    ids_t = torch.from_numpy(ids)
    if not ok.all():  # ties at tau (or NaN): a stable sort of those rows keeps the lower ids
        bad = np.flatnonzero(~ok)
        ids[bad] = np.argsort(-xn[bad], axis=-1, kind="stable")[:, :k]
    # order by (value desc, id asc): one sort of int64 keys (order-preserving int of the fp32
    # value, then V - 1 - id) instead of an argsort and two gathers
    bits = x.gather(-1, ids_t).numpy().view(np.int32)
    key = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64) << 32) | (vocab - 1 - ids)
    key = np.sort(key, axis=-1)[:, ::-1]
    top_ids = (vocab - 1) - (key & 0xFFFFFFFF)
    high = (key >> 32).astype(np.int32)
    vals = (high ^ ((high >> 31) & 0x7FFFFFFF)).view(np.float32)
    return torch.from_numpy(np.ascontiguousarray(vals)), torch.from_numpy(np.ascontiguousarray(top_ids))


def _grouped_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk over a shortlist: split each row into groups of L ids, keep the k groups with
    the largest maxima (plus the < L trailing ids), take the top-k of those k·L candidates.

    Exact for the values: every entry above the k-th largest group maximum g lies in a kept
    group, and the k kept maxima are k entries >= g, so the k-th largest entry t >= g and the
    shortlist holds every entry above t and enough entries equal to t. Among equal values the
    ids kept may differ from ``torch.topk`` on the whole row (unspecified there too).
    x: (n, V) fp32, rows contiguous. Returns (values, ids), (n, k) each, descending.
    """
    n, vocab = x.shape
    size = 1 << max(6, round(math.log2(math.sqrt(vocab / k))))  # L: balances V / L maxima against k·L
    groups = vocab // size
    if groups <= 2 * k or not x.is_contiguous():
        return x.topk(k, dim=-1)
    main = x[:, : groups * size].view(n, groups, size)  # (n, G, L)
    top_groups = main.amax(-1).topk(k, dim=-1).indices  # (n, k)
    cand = main.gather(1, top_groups.unsqueeze(-1).expand(n, k, size)).reshape(n, k * size)
    cand_ids = (top_groups.unsqueeze(-1) * size + torch.arange(size, device=x.device)).reshape(n, k * size)
    if groups * size < vocab:  # the trailing ids are always candidates
        cand = torch.cat([cand, x[:, groups * size:]], dim=-1)
        tail = torch.arange(groups * size, vocab, device=x.device).expand(n, -1)
        cand_ids = torch.cat([cand_ids, tail], dim=-1)
    vals, idx = cand.topk(k, dim=-1)
    return vals, cand_ids.gather(-1, idx)


def student_pass(x: torch.Tensor, k: int, ws_d: torch.Tensor, ws_e: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One cache-friendly pass over a chunk of student logits (or log-probs).

    x: (n, V) fp32; ws_d, ws_e: (n, V) fp32 scratch. Returns log Z (n,), full-vocabulary
    entropy H (n,), and the top-K logits and ids (n, K) each. Uses
    H = log Z' - sum_v e_v d_v / Z' with d = x - max(x), e = exp(d), Z' = sum e: no (n, V)
    log-prob tensor is kept and there is no cancellation against large logits.
    """
    top_val, top_ids = topk_rows(x, k)  # (n, K) each
    d = torch.sub(x, top_val[:, :1], out=ws_d)  # (n, V), <= 0
    e = torch.exp(d, out=ws_e)  # (n, V)
    z = e.sum(-1)  # (n,)
    ed = _xlogy_dot(e, d)
    log_z = z.log() + top_val[:, 0]
    entropy = z.log() - ed / z
    return log_z, entropy, top_val, top_ids


def log_softmax_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim written into out (n, V) fp32."""
    return torch.log_softmax(x, dim=-1, out=out)


def entropy_from_logp(logp: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row with 0 log 0 = 0; ws: (n, V) scratch. (n, V) -> (n,)"""
    return -_xlogy_dot(torch.exp(logp, out=ws), logp)


def topk_entropy(top_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the renormalized top-K distribution divided by log K (the authors' variant). (n,K) -> (n,)"""
    k = top_logits.shape[-1]
    logq = torch.log_softmax(top_logits, dim=-1)
    return -(logq.exp() * logq).sum(-1) / torch.log(torch.tensor(float(k)))


def union_slots(s_ids: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
    """Which teacher top-K ids are also student top-K ids. (n,K),(n,K) -> (n,K) bool.

    The union U = S_S ∪ S_T is laid out as 2K slots [S_S, S_T]; a teacher slot whose id is
    already in S_S is a duplicate and is excluded from U.
    """
    return (t_ids.unsqueeze(-1) == s_ids.unsqueeze(-2)).any(-1)


# Rows per chunk of a (chunk, V) pass: enough elements that per-op overhead vanishes (a few
# million per buffer), few enough that the buffers stay cache-resident between the ops of one
# chunk; and never more than the caller's byte budget allows.
CHUNK_ELEMENTS = 1 << 20
DEFAULT_CHUNK_BYTES = 64 << 20


def chunk_rows(n: int, vocab: int, *, chunk_size: int | None, chunk_bytes: int, n_buffers: int) -> int:
    """Rows per chunk: ``chunk_size`` when given, else from the element target and the byte
    budget of ``n_buffers`` fp32 (rows, V) workspaces. Always in [1, max(n, 1)]."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    rows = min(CHUNK_ELEMENTS // vocab, chunk_bytes // (4 * vocab * n_buffers))
    return max(1, min(rows, n))


def lookup_rows(n: int, vocab: int, *, chunk_size: int | None, chunk_bytes: int) -> int:
    """Rows of a :class:`DenseLookup` table: ``chunk_size`` when given, else about a million
    elements (cache-resident at small V) but at least 32 rows (at large V every access misses
    the cache anyway, and fewer blocks cost less), within ``chunk_bytes``."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    return max(1, min(max(CHUNK_ELEMENTS // vocab, 32), chunk_bytes // (4 * vocab), n))


class DenseLookup:
    """Per-position id lookups through a NaN-filled (rows, V) fp32 table.

    A pool of (id, value) pairs per position is scattered into the table, the query ids are
    read back, and the table is reset to NaN: O(pool + queries) per position, whatever V,
    instead of the O(queries x pool) comparison. Values must not be NaN (NaN means "absent").
    """

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.table = torch.full((rows, vocab), float("nan"), dtype=torch.float32, device=device)
        self.rows, self.vocab = rows, vocab

    def _blocks(self, n: int):
        for a in range(0, n, self.rows):
            yield a, min(a + self.rows, n)

    def _read(self, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """t[i, ids[i, j]] for a block: a flat take (much cheaper than gather for few ids)."""
        offsets = torch.arange(ids.shape[0], device=ids.device).unsqueeze(-1) * self.vocab
        return t.reshape(-1).take(offsets + ids)

    def _reset(self, t: torch.Tensor, ids: torch.Tensor) -> None:
        # rewriting the whole block is cheaper than undoing each write when V is small
        if self.vocab <= 4 * ids.shape[-1]:
            t.fill_(float("nan"))
        else:
            t.scatter_(-1, ids, float("nan"))

    def lookup(self, ids: torch.Tensor, pool_ids: torch.Tensor, pool_vals: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Values of ``ids`` (N, K) in the per-position pool (N, P); where an id occurs more than
        once in a pool, its LAST slot wins. Returns (values (N, K) fp32, known (N, K) bool);
        values are NaN where known is False."""
        out = torch.empty(ids.shape, dtype=torch.float32, device=ids.device)
        vals = pool_vals.float()
        for a, b in self._blocks(ids.shape[0]):
            t = self.table[: b - a]
            t.scatter_(-1, pool_ids[a:b], vals[a:b])
            out[a:b] = self._read(t, ids[a:b])
            self._reset(t, pool_ids[a:b])
        return out, ~torch.isnan(out)

    def member(self, ids: torch.Tensor, set_ids: torch.Tensor) -> torch.Tensor:
        """Which ``ids`` (N, K) occur in the per-position set ``set_ids`` (N, M). -> (N, K) bool"""
        out = torch.empty(ids.shape, dtype=torch.bool, device=ids.device)
        for a, b in self._blocks(ids.shape[0]):
            t = self.table[: b - a]
            t.scatter_(-1, set_ids[a:b], 0.0)
            out[a:b] = ~torch.isnan(self._read(t, ids[a:b]))
            self._reset(t, set_ids[a:b])
        return out


class SortedLookup:
    """The :class:`DenseLookup` interface without a (rows, V) table, for large V and no logits
    (``topk_position_stats``): each position's pool is sorted once by (id, slot) and the
    queries are binary-searched in it. O((P log P + K log P)) per position, whatever V."""

    def lookup(self, ids: torch.Tensor, pool_ids: torch.Tensor, pool_vals: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`DenseLookup.lookup` (the last slot of a repeated id wins)."""
        slot, known = self._find(ids, pool_ids)
        vals = pool_vals.float().gather(-1, slot)
        return vals.masked_fill_(~known, float("nan")), known

    def member(self, ids: torch.Tensor, set_ids: torch.Tensor) -> torch.Tensor:
        """As :meth:`DenseLookup.member`."""
        return self._find(ids, set_ids)[1]

    @staticmethod
    def _find(ids: torch.Tensor, pool_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot (N, K) of each id's last occurrence in its pool (N, P), found (N, K) bool)."""
        n, p = pool_ids.shape
        bits = max(1, (p - 1).bit_length())
        keys = (pool_ids.long() << bits) | torch.arange(p, device=pool_ids.device)  # (N, P): by id, then slot
        if keys.device.type == "cpu":  # numpy's SIMD sort is several times faster on CPU
            keys = torch.from_numpy(np.sort(keys.numpy(), axis=-1))
        else:
            keys = keys.sort(dim=-1).values
        q = (ids.long() << bits) | ((1 << bits) - 1)  # (N, K): the largest key an id can have
        pos = torch.searchsorted(keys, q, right=True) - 1  # (N, K): the last key <= q
        rows = torch.arange(n, device=ids.device).unsqueeze(-1) * p
        hit = keys.reshape(-1).take(rows + pos.clamp_min(0))  # flat take: cheaper than gather
        found = (pos >= 0) & ((hit >> bits) == ids)
        return hit & ((1 << bits) - 1), found
