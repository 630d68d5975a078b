"""The metric names each backend logs to its trackers (W&B, metrics.csv, verl's console/file).

The selection, loss and advantage names come from the core itself (its functions run once on a
tiny synthetic batch), so a metric renamed there is renamed here; the few names a backend adds
around the core are listed below. The W&B read-back tests (``tests/test_wandb_offline.py`` for the
CPU backend, ``tests/verl/test_fit_shipped.py`` for verl's ``fit()``) hold each backend's logged
run to :func:`step_metrics` exactly, and the dashboard (``recipe/ta_opd/dashboard.py``) may only
name metrics found here.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from ta_opd.config import TAConfig

BACKENDS = ("cpu", "verl")

# logged by the recipe around the core, every training step
CPU_STEP = ("ta_opd/kl/sampled_mean", "ta_opd/timing/rollout_s", "ta_opd/timing/teacher_and_scoring_s",
            "ta_opd/timing/update_s", "ta_opd/timing/step_cpu_s", "ta_opd/timing/step_s", "rollout/accuracy",
            "rollout/response_length", "actor/grad_norm", "ta_opd/grading/extraction_rate")
VERL_STEP = ("ta_opd/invalid_sampled_fraction", "ta_opd/timing/teacher_s", "ta_opd/timing/stats_forward_s",
             "ta_opd/timing/select_s")
VERL_VLLM_TEACHER = ("ta_opd/teacher/sampled_missing_fraction",)  # ta_opd.teacher.backend=vllm only
# the CPU backend's evaluations (before training, every test_freq steps, at the end): accuracy, and
# the held-out KL names of cpu/evaluate.py (cpu_eval_names())
CPU_ACCURACY = ("val/student_accuracy", "ta_opd/grading/val_extraction_rate")
# W&B only: the score histogram every step, the kept-token page every test_freq steps and at the end
SCORE_HIST, KEPT_TOKENS = "ta_opd/score_hist", "ta_opd/kept_tokens"
# verl's own names (verl/trainer/ppo/metric_utils.py, ray_trainer.py) the dashboard shows; val-core/*
# carries the data source: a pattern
VERL_OWN = ("actor/grad_norm", "critic/score/mean", "timing_s/step", "timing_s/gen", "timing_s/old_log_prob",
            "timing_s/update_actor")
VERL_VAL_ACCURACY = r"val-core/.+/(acc|reward)/mean@[0-9]+"  # acc when the scorer reports it, else reward


def _tiny_stats(B: int = 2, R: int = 4):
    from ta_opd.stats import PositionStats

    g = torch.Generator().manual_seed(0)
    u = lambda: torch.rand(B, R, generator=g)  # noqa: E731
    C = u()
    return PositionStats.from_scalars({"D": u(), "C": C, "C_low": C, "C_high": C, "C_hat": C * 0.5, "H": u(),
                                       "D_spread": torch.zeros(B, R), "missing": torch.zeros(B, R)})


@lru_cache(maxsize=None)
def selection_names(ta: TAConfig = TAConfig()) -> tuple[str, ...]:
    """``ta_opd/*`` names of one step's selection (``ta_opd/select.py``) under ``ta``."""
    from ta_opd.select import select_positions

    stats = _tiny_stats()
    return tuple(sorted(select_positions(stats, torch.ones_like(stats.D, dtype=torch.bool), ta, step=0).metrics))


@lru_cache(maxsize=None)
def loss_names(loss: str) -> tuple[str, ...]:
    """``ta_opd/loss/*`` names the registered loss ``loss`` reports (``ta_opd/losses.py``)."""
    from ta_opd.losses import LossInputs, get_loss, loss_needs

    B, R, K = 1, 2, 2
    lp = torch.log(torch.full((B, R), 0.4))
    fields = {"log_prob": lp, "old_log_prob": lp, "teacher_log_prob": lp - 0.1,
              "student_topk_logp": torch.log(torch.full((B, R, K), 0.3)),
              "teacher_topk_logp": torch.log(torch.full((B, R, K), 0.2)),
              "student_rest_logp": torch.log(torch.full((B, R), 0.4))}
    inp = LossInputs(mask=torch.ones(B, R, dtype=torch.bool), **{n: fields[n] for n in loss_needs(loss)})
    return tuple(sorted(get_loss(loss)(inp).metrics))


def advantage_names() -> tuple[str, ...]:
    """The kept-advantage sign names (``ta_opd/metrics.py``, CPU backend)."""
    from ta_opd.metrics import kept_advantage_metrics

    ones = torch.ones(1, 2, dtype=torch.bool)
    return tuple(sorted(kept_advantage_metrics(torch.zeros(1, 2), ones, ones)))


@lru_cache(maxsize=None)
def cpu_eval_names() -> tuple[str, ...]:
    """What each CPU-backend evaluation logs: accuracy and the held-out KL (``cpu/evaluate.py``)."""
    from recipe.ta_opd.cpu.evaluate import heldout_metrics

    return tuple(sorted({*CPU_ACCURACY, *heldout_metrics({"kl": [0.1, 0.2], "kl_sampled": [0.1, 0.2],
                                                          "tokens": [1.0, 1.0]}, seed=0)}))


def step_metrics(backend: str, ta: TAConfig = TAConfig(), teacher_backend: str = "fsdp") -> tuple[str, ...]:
    """Every scalar a training step of ``backend`` logs under ``ta`` (the verl backend logs the
    loss's names under verl's ``actor/`` prefix, as it does every actor metric)."""
    if backend == "cpu":
        names = {*selection_names(ta), *loss_names(ta.loss), *advantage_names(), *CPU_STEP}
    elif backend == "verl":
        names = {*selection_names(ta), *(f"actor/{n}" for n in loss_names(ta.loss)), *VERL_STEP,
                 *(VERL_VLLM_TEACHER if teacher_backend == "vllm" else ())}
    else:
        raise ValueError(f"backend {backend!r} is unknown; backends: {', '.join(BACKENDS)}")
    return tuple(sorted(names))


def every_metric() -> frozenset[str]:
    """Every name some backend logs under some registered loss (media and verl's own included)."""
    from ta_opd.losses import per_token_losses, available_losses

    names = {*cpu_eval_names(), SCORE_HIST, KEPT_TOKENS, *VERL_OWN, *VERL_VLLM_TEACHER}
    for loss in available_losses():
        names |= set(step_metrics("cpu", TAConfig(loss=loss)))
    for loss in per_token_losses():  # the verl backend runs the per-token losses
        names |= set(step_metrics("verl", TAConfig(loss=loss)))
    for compat in ("exact", "lower_bound"):
        names |= set(selection_names(TAConfig(compatibility=compat)))
    return frozenset(names)
