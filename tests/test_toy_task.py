"""The toy task: correct solutions, the student's carry slips, the answer checker."""

import random

import pytest

from ta_opd.tools.toy import task


def test_solution_is_correct_and_checked():
    p = task.Problem(47, 85)
    assert task.solution(p) == "7+5+0=12 4+8+1=13 A:132"
    assert task.solution(p, ";", "R=") == "7+5+0=12;4+8+1=13;R=132"
    assert task.is_correct(task.solution(p), 132) and task.is_correct(task.solution(p, ";", "R="), "132")
    for q in task.make_split(200, seed=5):
        assert task.extract_answer(task.solution(q)) == q.answer


def test_slipped_solution_drops_the_carry_consistently():
    p = task.Problem(47, 85)  # the tens column (4 + 8 >= 5) receives a carry
    always = task.slipped_solution(p, random.Random(0), slip=1.0, slip_other=0.0)
    assert always == "7+5+0=12;4+8+0=12;R=122"  # the answer follows the dropped carry
    assert not task.is_correct(always, p.answer)
    never = task.slipped_solution(p, random.Random(0), slip=0.0, slip_other=0.0)
    assert never == task.solution(p, ";", "R=")
    # a carry into a column whose digits sum to < 5 uses slip_other
    q = task.Problem(19, 21)  # 9 + 1 = 10 carries into 1 + 2 = 3 < 5
    assert task.slipped_solution(q, random.Random(0), slip=1.0, slip_other=0.0) == task.solution(q, ";", "R=")
    assert task.slipped_solution(q, random.Random(0), slip=0.0, slip_other=1.0) == "9+1+0=10;1+2+0=3;R=30"
    # no carry, nothing to slip
    r = task.Problem(12, 34)
    assert task.slipped_solution(r, random.Random(0), slip=1.0, slip_other=1.0) == task.solution(r, ";", "R=")


def test_slip_rate_matches_the_probability():
    rng, probs = random.Random(1), task.make_split(2000, seed=2, min_digits=2, max_digits=2)
    eligible = [p for p in probs if (p.a % 10 + p.b % 10) >= 10 and (p.a // 10 % 10 + p.b // 10 % 10) >= 5]
    wrong = sum(not task.is_correct(task.slipped_solution(p, rng, slip=0.6, slip_other=0.0), p.answer) for p in eligible)
    assert len(eligible) > 300 and abs(wrong / len(eligible) - 0.6) < 0.06


@pytest.mark.parametrize("bad", [dict(slip=1.5, slip_other=0.0), dict(slip=0.5, slip_other=-0.1)])
def test_slip_probabilities_are_validated(bad):
    with pytest.raises(ValueError, match="probability in \\[0, 1\\]"):
        task.slipped_solution(task.Problem(47, 85), random.Random(0), **bad)
