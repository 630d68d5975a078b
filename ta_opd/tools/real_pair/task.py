"""Multi-step arithmetic word problems generated in code, their fixed chain-of-thought solution and
the answer checker (the real-LM pair's task).

A problem is a start count and 2–3 operations on it (add, give away, double/triple), e.g.

    question: "Mia has 14 marbles. She finds 6 more. She gives away 9. How many marbles does Mia have now?"
    solution: "14 + 6 = 20. 20 - 9 = 11. Answer: 11"

Every intermediate count stays in [1, MAX_COUNT], so each step is small-number arithmetic a
135M model can learn. The prompt is the question followed by :data:`INSTRUCTION`, which states the
answer format, so the published model (never trained on this task) is asked the same thing the
teacher learned to do.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ta_opd.tools.built_pair import verl_row

DATA_SOURCE = "ta_opd_real_arith"
INSTRUCTION = "Solve it step by step and end with 'Answer: <number>'."
MAX_COUNT = 99
NAMES = ("Mia", "Tom", "Ana", "Leo", "Sara", "Ben", "Lily", "Omar", "Zoe", "Max")
ITEMS = ("marbles", "apples", "stickers", "coins", "books", "pencils", "cards", "shells")
_NUMBER = re.compile(r"-?\d+")
_ANSWER = re.compile(r"Answer:\s*(-?\d+)")


@dataclass(frozen=True)
class Problem:
    name: str
    item: str
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+", n) finds n more, ("-", n) gives away n, ("*", 2|3) doubles/triples

    def counts(self) -> list[int]:
        """The count before and after each operation."""
        out = [self.start]
        for op, n in self.ops:
            out.append({"+": out[-1] + n, "-": out[-1] - n, "*": out[-1] * n}[op])
        return out

    @property
    def answer(self) -> int:
        return self.counts()[-1]

    @property
    def question(self) -> str:
        parts = [f"{self.name} has {self.start} {self.item}."]
        for op, n in self.ops:
            if op == "+":
                parts.append(f"Then {self.name} finds {n} more.")
            elif op == "-":
                parts.append(f"Then {self.name} gives away {n}.")
            else:
                parts.append(f"Then the {self.item} {'double' if n == 2 else 'triple'}.")
        return " ".join(parts) + f" How many {self.item} does {self.name} have now?"

    @property
    def prompt(self) -> str:
        return f"{self.question} {INSTRUCTION}"


def solution(p: Problem) -> str:
    """The fixed chain-of-thought format: one ``a op n = b.`` per operation, then ``Answer: <n>``."""
    c = p.counts()
    steps = [f"{c[i]} {op} {n} = {c[i + 1]}." for i, (op, n) in enumerate(p.ops)]
    return " ".join(steps) + f" Answer: {c[-1]}"


def sample_problem(rng: random.Random, min_ops: int = 2, max_ops: int = 3) -> Problem:
    """A problem whose every count stays in [1, MAX_COUNT]; doubling/tripling only of counts <= 20."""
    count = rng.randint(2, 20)
    start, ops = count, []
    for _ in range(rng.randint(min_ops, max_ops)):
        choices = ["+"] + (["-"] if count > 2 else []) + (["*"] if count <= 20 else [])
        op = rng.choice(choices)
        if op == "+":
            n = rng.randint(2, min(15, MAX_COUNT - count))
        elif op == "-":
            n = rng.randint(1, count - 1)
        else:
            n = rng.choice((2, 3))
        ops.append((op, n))
        count = {"+": count + n, "-": count - n, "*": count * n}[op]
    return Problem(rng.choice(NAMES), rng.choice(ITEMS), start, tuple(ops))


def make_split(n: int, seed: int, *, exclude: set[str] | frozenset = frozenset()) -> list[Problem]:
    """n problems with distinct prompts from a fixed seed, none of whose prompts is in ``exclude``."""
    if n < 1:
        raise ValueError(f"n={n}: a split needs at least one problem")
    rng = random.Random(seed)
    seen, out = set(exclude), []
    while len(out) < n:
        p = sample_problem(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def extract_answer(text: str) -> int | None:
    """The number after the last ``Answer:``; without that marker, the last number of the text (the
    published model is asked for the marker but not trained on it: a right final number counts)."""
    marked = _ANSWER.findall(text)
    if marked:
        return int(marked[-1])
    numbers = _NUMBER.findall(text)
    return int(numbers[-1]) if numbers else None


def is_correct(text: str, ground_truth: int | str) -> bool:
    """The extracted answer equals the ground truth (compared as text)."""
    got = extract_answer(text)
    return got is not None and str(got) == str(ground_truth).strip()


def to_rows(problems: list[Problem], split: str) -> list[dict]:
    """verl's dataset layout: chat-message prompt, data_source, rule-based ground truth."""
    return [verl_row(DATA_SOURCE, p.prompt, p.answer, split, i, solution=solution(p))
            for i, p in enumerate(problems)]
