"""``TAConfig``: every TA-OPD knob in one frozen, validated dataclass.

The Hydra group ``ta_opd.*`` of the recipe maps one-to-one onto these fields
(``ta_opd.budget=0.05 ta_opd.topk=8`` ...). Values are checked when the object is built;
vocabulary-dependent checks (K < V) run in :meth:`TAConfig.check_vocab` once V is known.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ta_opd._checks import is_int, is_real
from ta_opd.errors import TAConfigError

COMPATIBILITY_MODES = ("exact", "lower_bound")  # C (Eq. 10, exact where data allows) | Ĉ (Eq. 17)
ENTROPY_MODES = ("full", "topk")  # full-vocabulary H | entropy of renormalized top-K / log K
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean")  # Eq. 7 | the authors' code
SEED_MAX = 2**64 - 1  # numpy's SeedSequence entropy and torch's manual_seed both take up to 64 bits


@dataclass(frozen=True)
class TAConfig:
    # selector name, see ta_opd.selectors.available_selectors()
    selector: str = "teachability"
    # supervised-token budget rho in (0, 1]; n = ceil(rho * |I|) positions are kept (Eq. 13)
    budget: float = 0.10
    # K: support size of the student/teacher top-K sets (Eq. 8)
    topk: int = 16
    # K' >= K: teacher top-K' ids/log-probs shipped per position by the teacher worker
    teacher_topk: int = 64
    # robust-normalization quantiles (Eq. 11) and the +eps in its denominator
    q_low: float = 0.05
    q_high: float = 0.95
    eps: float = 1e-8
    # "exact": C = teacher mass on the student top-K (Eq. 10); "lower_bound": Ĉ (Eq. 17)
    compatibility: str = "exact"
    # "full": full-vocabulary student entropy; "topk": renormalized top-K entropy / log K
    entropy: str = "full"
    # every sequence keeps at least this many positions on top of the global top-n (0 = off)
    min_keep_per_sequence: int = 0
    # seed of the random selector; the mask of step s depends only on (seed, s)
    seed: int = 0
    # training loss, see ta_opd.losses.available_losses()
    loss: str = "pg_opd"
    # "token-mean": Eq. 7 (mean over kept positions of the batch); or "seq-mean-token-mean"
    loss_agg: str = "token-mean"
    # PPO clip range of the sampled-token PG-OPD loss: ratio in [1 - clip_low, 1 + clip_high]
    clip_low: float = 0.2
    clip_high: float = 0.28
    # positions per chunk of the (chunk, V) passes (extra memory O(chunk * V)); the statistics
    # pass uses it only when chunk_bytes is None
    chunk_size: int = 8
    # byte budget that sizes the statistics pass's chunks (about a million elements per
    # (chunk, V) fp32 buffer, all buffers within this many bytes); None = chunk_size rows
    chunk_bytes: int | None = 64 << 20

    def __post_init__(self) -> None:
        from ta_opd.losses import available_losses
        from ta_opd.selectors import available_selectors

        if not isinstance(self.selector, str) or self.selector not in available_selectors():
            raise TAConfigError(
                f"selector={self.selector!r} is unknown; valid selectors: {', '.join(available_selectors())}"
            )
        if not is_real(self.budget) or not (0.0 < float(self.budget) <= 1.0):
            raise TAConfigError(f"budget={self.budget!r} is not allowed; the budget rho must be a number in (0, 1]")
        if not is_int(self.topk) or self.topk < 1:
            raise TAConfigError(f"topk={self.topk!r} is not allowed; K must be an integer >= 1")
        if not is_int(self.teacher_topk) or self.teacher_topk < self.topk:
            raise TAConfigError(
                f"teacher_topk={self.teacher_topk!r} is not allowed; K' must be an integer >= topk (K={self.topk})"
            )
        for name in ("q_low", "q_high"):
            v = getattr(self, name)
            if not is_real(v) or not (0.0 <= float(v) <= 1.0):
                raise TAConfigError(f"{name}={v!r} is not allowed; quantiles must be numbers in [0, 1]")
        if self.q_low >= self.q_high:
            raise TAConfigError(f"q_low={self.q_low!r} >= q_high={self.q_high!r}; q_low must be below q_high")
        if not is_real(self.eps) or self.eps <= 0:
            raise TAConfigError(f"eps={self.eps!r} is not allowed; eps must be a number > 0")
        self._check_choice("compatibility", COMPATIBILITY_MODES)
        self._check_choice("entropy", ENTROPY_MODES)
        if self.entropy == "topk" and self.topk < 2:
            raise TAConfigError(f"entropy='topk' needs topk >= 2 (it divides by log K), got topk={self.topk}")
        self._check_choice("loss_agg", LOSS_AGG_MODES)
        if not isinstance(self.loss, str) or self.loss not in available_losses():
            raise TAConfigError(f"loss={self.loss!r} is unknown; valid losses: {', '.join(available_losses())}")
        if not is_int(self.min_keep_per_sequence) or self.min_keep_per_sequence < 0:
            raise TAConfigError(
                f"min_keep_per_sequence={self.min_keep_per_sequence!r} is not allowed; it must be an integer >= 0"
            )
        if not is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            raise TAConfigError(f"seed={self.seed!r} is not allowed; the seed must be an integer in [0, {SEED_MAX}]")
        for name in ("clip_low", "clip_high"):
            v = getattr(self, name)
            if not is_real(v) or v < 0:
                raise TAConfigError(f"{name}={v!r} is not allowed; clip ranges must be numbers >= 0")
        if self.clip_low >= 1:
            raise TAConfigError(f"clip_low={self.clip_low!r} is not allowed; it must be < 1 (ratio floor 1 - clip_low > 0)")
        if not is_int(self.chunk_size) or self.chunk_size < 1:
            raise TAConfigError(f"chunk_size={self.chunk_size!r} is not allowed; it must be an integer >= 1")
        if self.chunk_bytes is not None and (not is_int(self.chunk_bytes) or self.chunk_bytes < 1):
            raise TAConfigError(f"chunk_bytes={self.chunk_bytes!r} is not allowed; it must be an integer >= 1 "
                                "(bytes), or null to use chunk_size rows")

    def _check_choice(self, name: str, allowed: tuple[str, ...]) -> None:
        v = getattr(self, name)
        if v not in allowed:
            raise TAConfigError(f"{name}={v!r} is not allowed; choose one of: {', '.join(allowed)}")

    def stats_chunking(self) -> dict[str, Any]:
        """``chunk_size`` / ``chunk_bytes`` keyword arguments for the ``ta_opd.stats`` functions."""
        if self.chunk_bytes is None:
            return {"chunk_size": self.chunk_size}
        return {"chunk_size": None, "chunk_bytes": self.chunk_bytes}

    def check_vocab(self, vocab_size: int) -> None:
        """Checks that need V: K < V and K' <= V."""
        if not is_int(vocab_size) or vocab_size < 2:
            raise TAConfigError(f"vocab_size={vocab_size!r} is not allowed; it must be an integer >= 2")
        if self.topk >= vocab_size:
            raise TAConfigError(
                f"topk={self.topk} is not allowed for a vocabulary of {vocab_size}; K must be below V"
            )
        if self.teacher_topk > vocab_size:
            raise TAConfigError(
                f"teacher_topk={self.teacher_topk} exceeds the vocabulary size {vocab_size}; K' must be <= V"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "TAConfig":
        """Build from a plain mapping (e.g. an OmegaConf ``ta_opd`` node); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TAConfigError(f"unknown TA-OPD key(s) {unknown}; valid keys: {', '.join(sorted(known))}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
