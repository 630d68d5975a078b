"""What TA-OPD kept, for a person to look at: a few rollouts with each response token shaded by
its selector score, kept tokens marked, and D, C, H, the score and the advantage on hover (one
self-contained HTML page: inline CSS, no script, no external file); and the same numbers as flat
rows, one per valid response position, for analysis (the opt-in per-step token export).

Pure: arrays and strings in, a string or a list of dicts out; no file, no tracker, no tokenizer
(the caller decodes, :func:`decode_tokens`). Shapes: B sequences, R response positions.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ta_opd.errors import TAInputError

FIELDS = ("D", "C", "H", "score", "advantage")  # the per-position numbers, in hover and export order
EXPORT_COLUMNS = ("sample", "position", "token_id", "token", *FIELDS[:4], "kept", "advantage")


@dataclass(frozen=True)
class TokenView:
    """One rollout batch at selection time, every array (B, R), as numpy."""

    token_ids: np.ndarray  # (B, R) int, the sampled response tokens
    texts: list[list[str]]  # B lists of R token texts ("" at invalid positions is fine)
    valid: np.ndarray  # (B, R) bool, the positions I selection chose from
    D: np.ndarray  # (B, R) raw divergence (Eq. 9)
    C: np.ndarray  # (B, R) raw compatibility (Eq. 10, or Ĉ with compatibility lower_bound)
    H: np.ndarray  # (B, R) student entropy
    score: np.ndarray  # (B, R) selector score (Eqs. 12-16)
    kept: np.ndarray  # (B, R) bool, positions that receive the OPD loss
    advantage: np.ndarray  # (B, R) log π_T(y_t) - log π_old(y_t) at the sampled token

    def __post_init__(self):
        shape = np.shape(self.token_ids)
        if len(shape) != 2:
            raise TAInputError(f"token_ids has shape {shape}; it must be (B, R)")
        for name in ("valid", "kept", *FIELDS):
            if np.shape(getattr(self, name)) != shape:
                raise TAInputError(f"{name} has shape {np.shape(getattr(self, name))}, token_ids has {shape}; "
                                   "every per-position array must be (B, R)")
        if len(self.texts) != shape[0] or any(len(t) != shape[1] for t in self.texts):
            raise TAInputError(f"texts must be {shape[0]} lists of {shape[1]} token texts (one per position)")
        if bool((np.asarray(self.kept, bool) & ~np.asarray(self.valid, bool)).any()):
            raise TAInputError("kept marks a position outside valid; selection keeps only valid positions")

    @classmethod
    def of(cls, token_ids, texts, valid, D, C, H, score, kept, advantage) -> "TokenView":
        """From torch tensors or arrays (anything ``np.asarray`` takes; floats become float64)."""
        f = lambda x: np.asarray(_numpy(x), dtype=np.float64)  # noqa: E731
        return cls(np.asarray(_numpy(token_ids), dtype=np.int64), [list(t) for t in texts],
                   np.asarray(_numpy(valid), bool), f(D), f(C), f(H), f(score), np.asarray(_numpy(kept), bool),
                   f(advantage))


@dataclass(frozen=True)
class Header:
    """What the page's header says about the step."""

    step: int
    rho: float  # the budget ρ
    kept_ratio: float  # kept / valid over the WHOLE batch (not only the rollouts shown)
    selector: str
    title: str = ""  # e.g. the experiment name


def _numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def decode_tokens(decode_one: Callable[[int], str], token_ids, valid) -> list[list[str]]:
    """(B, R) ids -> B lists of R texts, each valid token decoded alone ("" elsewhere)."""
    ids, ok = np.asarray(_numpy(token_ids)), np.asarray(_numpy(valid), bool)
    return [[decode_one(int(i)) if v else "" for i, v in zip(row, vrow)] for row, vrow in zip(ids, ok)]


def export_rows(view: TokenView, step: int) -> list[dict]:
    """One dict per valid position, in (sample, position) order: the token export's rows."""
    rows = []
    for b, t in zip(*np.nonzero(view.valid)):
        rows.append({"step": step, "sample": int(b), "position": int(t), "token_id": int(view.token_ids[b, t]),
                     "token": view.texts[b][t], **{n: float(getattr(view, n)[b, t]) for n in FIELDS[:4]},
                     "kept": bool(view.kept[b, t]), "advantage": float(view.advantage[b, t])})
    return rows


def _fmt(x: float) -> str:
    return f"{x:.3f}" if np.isfinite(x) else str(x)


def _token_span(view: TokenView, b: int, t: int, lo: float, span: float) -> str:
    kept = bool(view.kept[b, t])
    # in [0, 1] over the batch's valid positions; the square root spreads the many near-zero scores
    # (on the toy the median score is ~10 % of the maximum) into visible shades
    shade = math.sqrt(min(max((float(view.score[b, t]) - lo) / span, 0.0), 1.0))
    numbers = "  ".join(f"{n}={_fmt(float(getattr(view, n)[b, t]))}" for n in FIELDS)
    title = f"position {t}  token id {int(view.token_ids[b, t])}  {'KEPT' if kept else 'not kept'}\n{numbers}"
    text = view.texts[b][t]
    shown = text.replace("\n", "↵\n") if text.strip() or "\n" in text else (text.replace(" ", "·") or "∅")
    return (f'<span class="tok{" kept" if kept else ""}" style="background:rgba(230,120,0,{0.06 + 0.84 * shade:.3f})" '
            f'title="{html.escape(title, quote=True)}">{html.escape(shown, quote=True)}</span>')


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.25em;margin:0 0 .3em}.meta{color:#555;margin:0 0 1em}
.legend span{padding:1px 6px;margin-right:6px}
.rollout{border:1px solid #ddd;border-radius:6px;padding:.6em .8em;margin:.8em 0}
.rollout h2{font-size:.95em;margin:0 0 .4em;color:#444;font-weight:600}
.prompt{color:#666;font-size:.9em;margin-bottom:.4em;white-space:pre-wrap}
.resp{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:18px;line-height:2.1;white-space:pre-wrap;word-break:break-all}
.tok{border-radius:2px;padding:1px 0;cursor:help}
.tok.kept{outline:2px solid #1a56db;outline-offset:-1px;font-weight:700;box-shadow:inset 0 -3px 0 #1a56db}
"""


def one_per_prompt(n_sequences: int, group: int, count: int) -> list[int]:
    """``count`` sequence indices, first sample of each prompt first (rows are grouped ``group``
    samples per prompt), then the second samples, ...: the page shows different prompts."""
    order = sorted(range(n_sequences), key=lambda j: (j % group, j // group))
    return order[:count]


def render_page(view: TokenView, header: Header, show: list[int] | None = None,
                prompts: list[str] | None = None) -> str:
    """A self-contained HTML page: the sequences ``show`` (default the first 4), each valid response
    token once, shaded by the square root of its min-max scaled score (over the batch's valid
    positions), kept tokens outlined, the numbers in each token's hover title. ``prompts``:
    optional text per sequence (B)."""
    B = view.valid.shape[0]
    show = list(range(min(4, B))) if show is None else list(show)
    if not show or any(not 0 <= j < B for j in show):
        raise TAInputError(f"show={show} must name at least one sequence index in [0, {B})")
    if prompts is not None and len(prompts) != view.valid.shape[0]:
        raise TAInputError(f"prompts has {len(prompts)} entries; the batch has {view.valid.shape[0]} sequences")
    if not view.valid.any():
        raise TAInputError("the batch has no valid response position to show")
    vals = view.score[view.valid]
    lo, span = float(vals.min()), max(float(vals.max() - vals.min()), 1e-12)  # a constant score: no division by 0
    esc = lambda s: html.escape(str(s), quote=True)  # noqa: E731
    n_valid, n_kept = int(view.valid.sum()), int(view.kept.sum())
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>TA-OPD kept tokens, step {header.step}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>TA-OPD kept tokens · step {header.step}{' · ' + esc(header.title) if header.title else ''}</h1>",
             f'<p class="meta">selector <b>{esc(header.selector)}</b> · ρ = {header.rho:g} · kept ratio '
             f"<b>{header.kept_ratio:.3f}</b> ({n_kept} of {n_valid} positions in the batch) · score range "
             f"{_fmt(lo)} … {_fmt(float(vals.max()))}</p>",
             '<p class="meta legend"><span style="background:rgba(230,120,0,.06)">low score</span>'
             '<span style="background:rgba(230,120,0,.9)">high score</span>'
             '<span class="tok kept">kept</span> hover a token for D, C, H, score and advantage '
             f"(log π_T − log π_old at the sampled token) · {len(show)} of {B} sequences shown</p>"]
    for b in show:
        pos = np.nonzero(view.valid[b])[0]
        parts.append(f'<div class="rollout"><h2>sequence {b}: {len(pos)} tokens, {int(view.kept[b].sum())} kept</h2>')
        if prompts is not None:
            parts.append(f'<div class="prompt">{esc(prompts[b])}</div>')
        parts.append('<div class="resp">' + "".join(_token_span(view, b, int(t), lo, span) for t in pos) + "</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)
