"""Validation scores on the verl backend. TA-OPD trains on no task reward (``use_task_rewards``
is false); verl still scores rollouts for its validation metrics. ``compute_score`` grades the
toy addition task (the smoke run) and defers every other data source to verl's default scorer.
Use it with ``reward.custom_reward_function.path=<this file> reward.custom_reward_function.name=compute_score``.
"""

from __future__ import annotations

from ta_opd.toy.task import DATA_SOURCE, is_correct


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    if data_source == DATA_SOURCE:
        return 1.0 if is_correct(solution_str, ground_truth) else 0.0
    from verl.utils.reward_score import default_compute_score

    return default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)
