"""Procedural addition with written steps and its answer checker.

A problem is a + b (each ``min_digits``..``max_digits`` digits). The response writes the
column additions from the right, separated by ``sep``, then the answer after ``marker``:

    sep=" ", marker="A:"   ->  ``7+5+0=12 4+8+1=13 A:132``   (the teacher's answers)
    sep=";", marker="R="   ->  ``7+5+0=12;4+8+1=13;R=132``   (most of the student's)

The toy pair is trained so that the teacher writes either separator and mostly "A:" (it also
saw "R=", so it continues the student's answers correctly), while the student mostly writes ";"
and always "R=" (it never saw "A"), and makes one systematic mistake (:func:`slipped_solution`):
it often drops a carry into a column whose digits sum to 5 or more. The teacher's "+1" where the
student writes "+0" is then a large disagreement inside the student's top-K (learnable: the
student also saw the carry kept), while the teacher's preferred "A" after the last step is a
token the student gives almost no mass (incompatible). The checker accepts both markers.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ta_opd.tools.built_pair import verl_row

DATA_SOURCE = "ta_opd_toy_addition"
_ANSWER = re.compile(r"(?:A:|R=)(\d+)\s*$")


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}"

    @property
    def answer(self) -> int:
        return self.a + self.b


def sample_problem(rng: random.Random, min_digits: int = 2, max_digits: int = 3) -> Problem:
    def number() -> int:
        n = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (n - 1), 10**n - 1)

    return Problem(number(), number())


def _steps(p: Problem, slip=None) -> tuple[list[str], int]:
    """Column steps from the right and the final answer. ``slip(x, y) -> bool`` is asked at
    each column that receives a carry; True drops the carry there (the step writes +0 and the
    rest of the solution follows the dropped carry)."""
    da, db = str(p.a)[::-1], str(p.b)[::-1]
    carry, steps, digits = 0, [], []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        if carry and slip is not None and slip(x, y):
            carry = 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        digits.append(s % 10)
        carry = s // 10
    answer = int(("1" if carry else "") + "".join(str(d) for d in reversed(digits)))
    return steps, answer


def _written(p: Problem, sep: str, marker: str, slip=None) -> str:
    """The steps of :func:`_steps` joined by ``sep``, then ``marker`` and the answer."""
    if sep not in (" ", ";") or marker not in ("A:", "R="):
        raise ValueError(f"sep={sep!r} / marker={marker!r}: allowed separators ' ', ';' and markers 'A:', 'R='")
    steps, answer = _steps(p, slip)
    return sep.join(steps) + sep + f"{marker}{answer}"


def solution(p: Problem, sep: str = " ", marker: str = "A:") -> str:
    """The correct written solution."""
    return _written(p, sep, marker)


def slipped_solution(p: Problem, rng: random.Random, sep: str = ";", marker: str = "R=", *, slip: float,
                     slip_other: float) -> str:
    """A solution with the student's systematic mistake: a carry into a column whose digits sum to
    5 or more is dropped with probability ``slip`` (``slip_other`` into any other column); the
    remaining steps and the answer follow the dropped carry, so a slip makes a consistent, wrong
    solution. E.g. 47+85 -> ``7+5+0=12;4+8+0=12;R=122``."""
    for name, v in (("slip", slip), ("slip_other", slip_other)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}={v}: a probability in [0, 1] is required")
    return _written(p, sep, marker, lambda x, y: rng.random() < (slip if x + y >= 5 else slip_other))


def extract_answer(text: str) -> int | None:
    m = _ANSWER.search(text.strip())
    return int(m.group(1)) if m else None


def is_correct(text: str, ground_truth: int | str) -> bool:
    """The final answer equals the ground truth (compared as text: a non-integer ground truth is
    simply never matched, not an error)."""
    got = extract_answer(text)
    return got is not None and str(got) == str(ground_truth).strip()


def make_split(n: int, seed: int, *, exclude: set[str] | frozenset = frozenset(), **kw) -> list[Problem]:
    """n distinct problems from a fixed seed, none of whose prompts is in ``exclude``."""
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:
        p = sample_problem(rng, **kw)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def to_rows(problems: list[Problem], split: str) -> list[dict]:
    """verl's dataset layout: chat-message prompt, data_source, rule-based ground truth."""
    return [verl_row(DATA_SOURCE, p.prompt, p.answer, split, i, a=p.a, b=p.b) for i, p in enumerate(problems)]
