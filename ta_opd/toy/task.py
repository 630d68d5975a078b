"""Procedural addition with written steps and its answer checker.

A problem is a + b (each ``min_digits``..``max_digits`` digits). The response writes the
column additions from the right, separated by ``sep``, then the answer after ``marker``:

    sep=" ", marker="A:"   ->  ``7+5+0=12 4+8+1=13 A:132``   (the teacher's answers)
    sep=";", marker="R="   ->  ``7+5+0=12;4+8+1=13;R=132``   (most of the student's)

The toy pair is trained so that the teacher writes either separator and mostly "A:" (it also
saw "R=", so it continues the student's answers correctly), while the student mostly writes ";"
and always "R=" (it never saw "A"). Corrections on digits and separators then fall inside the
student's top-K (learnable), while the teacher's preferred "A" after the last step is a token the
student gives almost no mass (incompatible). The checker accepts both markers.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

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


def solution(p: Problem, sep: str = " ", marker: str = "A:", corrupt: random.Random | None = None) -> str:
    """The written solution. With ``corrupt``, one step's sum is wrong half of the time (the
    noisy pre-training data of the student)."""
    if sep not in (" ", ";") or marker not in ("A:", "R="):
        raise ValueError(f"sep={sep!r} / marker={marker!r}: allowed separators ' ', ';' and markers 'A:', 'R='")
    da, db = str(p.a)[::-1], str(p.b)[::-1]
    carry, steps = 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    if corrupt is not None and corrupt.random() < 0.5:
        i = corrupt.randrange(len(steps))
        head, _, s = steps[i].rpartition("=")
        steps[i] = f"{head}={(int(s) + corrupt.choice([1, 9])) % 19}"
    return sep.join(steps) + sep + f"{marker}{p.answer}"


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
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": p.prompt}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(p.answer)},
            "extra_info": {"split": split, "index": i, "a": p.a, "b": p.b},
        }
        for i, p in enumerate(problems)
    ]
