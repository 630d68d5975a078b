"""The TA-OPD W&B workspace, as code.

    python -m recipe.ta_opd.dashboard --entity E --project P [--name N] [--save]

Builds the workspace with W&B's own library (``wandb_workspaces.workspaces``): one section per
question a user asks of a run (:data:`SECTIONS`), every panel naming only metrics a backend logs
(``recipe/ta_opd/logged.py``), and the runs grouped by selector and ρ (``ta_opd.selector``,
``ta_opd.budget`` of the logged config), so the seeds of one sweep cell aggregate into one line.
Without ``--save`` it prints what it built and touches no network; ``--save`` creates the view in
the project (needs network and a W&B API key: ``wandb login`` or ``$WANDB_API_KEY``).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from ta_opd.errors import TAConfigError

from recipe.ta_opd import logged as L

GROUP_BY = ("ta_opd.selector", "ta_opd.budget")  # config keys; a sweep's runs grouped by these


@dataclass(frozen=True)
class Line:
    """A line plot of ``metrics`` against step (a histogram key plots as its distribution over steps);
    ``pattern``: a regular expression over metric names instead (verl's per-data-source names)."""

    title: str
    metrics: tuple[str, ...] = ()
    pattern: str | None = None


@dataclass(frozen=True)
class Media:
    """The logged HTML pages of ``key``, browsable by step."""

    title: str
    key: str


@dataclass(frozen=True)
class Section:
    name: str
    shows: str  # one line for the summary and docs/wandb.md
    panels: tuple


SECTIONS = (
    Section("Kept ratio and budget", "how much TA-OPD kept against its budget ρ, and the score it kept by", (
        Line("kept ratio", ("ta_opd/kept_ratio",)),
        Line("kept vs target (positions)", ("ta_opd/kept_count", "ta_opd/budget/target", "ta_opd/valid_count")),
        Line("budget shortfall and min-keep extra", ("ta_opd/budget/shortfall", "ta_opd/budget/min_keep_extra")),
        Line("selector score (histogram)", (L.SCORE_HIST,)),
        Line("score of the kept positions", ("ta_opd/score/kept_mean",)),
        Line("Q3 (high D, low H) share: all vs kept", ("ta_opd/q3/fraction", "ta_opd/q3/kept_fraction")))),
    Section("D, C, H quantiles", "the raw statistics over valid positions: 5th, 50th, 95th percentile and mean", (
        Line("D (disagreement)", ("ta_opd/D/p05", "ta_opd/D/p50", "ta_opd/D/p95", "ta_opd/D/mean")),
        Line("C (compatibility)", ("ta_opd/C/p05", "ta_opd/C/p50", "ta_opd/C/p95", "ta_opd/C/mean")),
        Line("H (student entropy)", ("ta_opd/H/p05", "ta_opd/H/p50", "ta_opd/H/p95", "ta_opd/H/mean")),
        Line("teacher probabilities not shipped", ("ta_opd/missing/fraction", "ta_opd/C_bound/mean_width",
                                                   "ta_opd/D_spread/max")))),
    Section("Kept vs dropped D^L / D^I", "learnable (D·C) and incompatible (D·(1-C)) disagreement, kept vs dropped", (
        Line("D^L = D·C", ("ta_opd/DL/kept_mean", "ta_opd/DL/dropped_mean")),
        Line("D^I = D·(1-C)", ("ta_opd/DI/kept_mean", "ta_opd/DI/dropped_mean")))),
    Section("Held-out KL", "teacher–student KL on held-out prompts (CPU backend) and on the training rollouts", (
        Line("held-out KL(p_T‖p_θ), full vocabulary", ("ta_opd/heldout/kl",)),
        Line("held-out sampled-token KL", ("ta_opd/heldout/kl_sampled",)),
        Line("training rollouts: sampled-token KL", ("ta_opd/kl/sampled_mean", "ta_opd/loss/sampled_kl",
                                                     "actor/ta_opd/loss/sampled_kl")))),
    Section("Accuracy", "task accuracy graded by data_source: validation and training rollouts", (
        Line("validation accuracy (CPU backend)", ("val/student_accuracy",)),
        Line("validation accuracy (verl, per data source)", pattern=L.VERL_VAL_ACCURACY),
        Line("training rollouts", ("rollout/accuracy", "critic/score/mean")))),
    Section("Loss and clip", "the loss on the kept positions, PPO clipping, advantage sign, gradient norm", (
        Line("PG-OPD loss", ("ta_opd/loss/pg_opd", "actor/ta_opd/loss/pg_opd")),
        Line("top-K KL losses", ("ta_opd/loss/topk_forward_kl", "actor/ta_opd/loss/topk_forward_kl",
                                 "ta_opd/loss/topk_reverse_kl", "actor/ta_opd/loss/topk_reverse_kl")),
        Line("clip fraction", ("ta_opd/loss/clipfrac", "actor/ta_opd/loss/clipfrac")),
        Line("PPO KL (old vs current)", ("ta_opd/loss/ppo_kl", "actor/ta_opd/loss/ppo_kl")),
        Line("kept tokens with a negative advantage", ("ta_opd/kept/neg_adv_fraction", "ta_opd/valid/neg_adv_fraction")),
        Line("gradient norm", ("actor/grad_norm",)))),
    Section("Timing", "seconds per phase of a step (ta_opd/timing/*; verl's own timing_s/*)", (
        Line("CPU backend", ("ta_opd/timing/rollout_s", "ta_opd/timing/teacher_and_scoring_s",
                             "ta_opd/timing/update_s", "ta_opd/timing/step_cpu_s")),
        Line("verl backend: TA-OPD phases", ("ta_opd/timing/teacher_s", "ta_opd/timing/stats_forward_s",
                                             "ta_opd/timing/select_s")),
        Line("verl backend: step", ("timing_s/step", "timing_s/gen", "timing_s/old_log_prob",
                                    "timing_s/update_actor")))),
    Section("What was kept", "the kept-token page: sampled responses shaded by score, kept tokens outlined", (
        Media("kept tokens", L.KEPT_TOKENS),)),
)


def metrics_named() -> list[str]:
    """Every metric a panel of :data:`SECTIONS` names (patterns excluded), in order."""
    out = []
    for s in SECTIONS:
        for p in s.panels:
            out += list(p.metrics) if isinstance(p, Line) else [p.key]
    return out


def _panel(p):
    import wandb_workspaces.reports.v2 as wr

    if isinstance(p, Media):
        return wr.MediaBrowser(title=p.title, media_keys=[p.key])
    if p.pattern is not None:
        return wr.LinePlot(title=p.title, metric_regex=p.pattern)
    return wr.LinePlot(title=p.title, y=list(p.metrics))


def build(entity: str, project: str, name: str = "TA-OPD"):
    """The workspace object (``wandb_workspaces.workspaces.Workspace``); nothing is sent anywhere."""
    import wandb_workspaces.workspaces as ws

    for key, value in (("--entity", entity), ("--project", project), ("--name", name)):
        if not isinstance(value, str) or not value.strip():
            raise TAConfigError(f"{key}={value!r} is not allowed; give a non-empty name")
    return ws.Workspace(
        entity=entity, project=project, name=name,
        sections=[ws.Section(name=s.name, panels=[_panel(p) for p in s.panels], is_open=True) for s in SECTIONS],
        runset_settings=ws.RunsetSettings(groupby=[ws.Config(k) for k in GROUP_BY]))


def summary(workspace) -> str:
    lines = [f"TA-OPD workspace {workspace.name!r} for {workspace.entity}/{workspace.project}: "
             f"{len(workspace.sections)} sections, runs grouped by {', '.join(GROUP_BY)}"]
    for s, spec in zip(workspace.sections, SECTIONS):
        lines.append(f"- {s.name} ({len(s.panels)} panels): {spec.shows}")
    return "\n".join(lines)


def save(workspace) -> str:
    """Create the view in W&B; returns its URL. Needs a W&B API key and the network."""
    import wandb

    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        raise TAConfigError(f"--save needs W&B online, but WANDB_MODE={os.environ['WANDB_MODE']}; unset it")
    try:
        wandb.Api()  # raises without an API key (`wandb login` or $WANDB_API_KEY), or when W&B can't verify it
    except wandb.errors.UsageError as e:
        raise TAConfigError(f"--save needs a W&B API key: run `wandb login` or set WANDB_API_KEY ({e})") from e
    except wandb.errors.Error as e:
        raise TAConfigError(f"--save could not reach W&B to check the API key: {e}") from e
    try:
        workspace.save()
    except Exception as e:  # noqa: BLE001 -- network, permissions, unknown entity/project: one line, exit 2
        raise TAConfigError(f"W&B refused or could not be reached saving the workspace to "
                            f"{workspace.entity}/{workspace.project}: {type(e).__name__}: {e}") from e
    return workspace.url


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m recipe.ta_opd.dashboard", description=__doc__.splitlines()[0])
    p.add_argument("--entity", required=True, help="W&B entity (user or team)")
    p.add_argument("--project", required=True, help="W&B project the runs log to (trainer.project_name)")
    p.add_argument("--name", default="TA-OPD", help="the workspace's name [TA-OPD]")
    p.add_argument("--save", action="store_true", help="create the workspace in W&B (network + API key)")
    a = p.parse_args(argv)
    try:
        workspace = build(a.entity, a.project, a.name)
        print(summary(workspace))
        if a.save:
            print(f"[ta-opd] saved: {save(workspace)}")
        else:
            print("[ta-opd] not saved (add --save to create it in W&B)")
    except TAConfigError as e:
        print(f"[ta-opd] error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
