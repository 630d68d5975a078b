"""Validation scores on the verl backend. TA-OPD trains on no task reward (``use_task_rewards``
is false); verl still scores rollouts for its validation metrics. ``compute_score`` is the one
grader of both backends (``recipe/ta_opd/grading.py``): the toy addition task, every other data
source through verl's default scorer. This file is the path verl loads it from:
``reward.custom_reward_function.path=<this file> reward.custom_reward_function.name=compute_score``.
"""

from __future__ import annotations

from recipe.ta_opd.grading import compute_score

__all__ = ["compute_score"]
