"""Task grading by ``data_source``, as verl does it, for both backends.

The score of a response is ``compute_score(data_source, solution_str, ground_truth, extra_info)``:
verl's ``default_compute_score`` (GSM8K ``openai/gsm8k``, MATH, DAPO math, AIME, ...), with the
toy addition task registered as one more data source. ``reward.custom_reward_function.path`` /
``.name`` replace it exactly as in verl (``verl.trainer.ppo.reward.get_custom_reward_fn``,
``reward_kwargs`` merged in). TA-OPD trains on no task reward: scores only feed the accuracy
metrics.

A data source nobody can score (verl raises ``NotImplementedError``) is reported once, as
"no scorer for data_source X", and its responses are left out of the accuracy; with no scorable
response at all the accuracy is ``None`` (null in summary.json and metrics.csv, never 0.0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ta_opd.tools.toy.task import DATA_SOURCE as TOY_DATA_SOURCE
from ta_opd.tools.toy.task import is_correct as toy_is_correct

ScoreFn = Callable[..., object]


def _toy_score(solution_str: str, ground_truth) -> float:
    return 1.0 if toy_is_correct(solution_str, ground_truth) else 0.0


# data sources this recipe scores itself, before verl's dispatch
RECIPE_SCORERS: dict[str, Callable[[str, object], float]] = {TOY_DATA_SOURCE: _toy_score}


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """verl's signature: the toy task here, every other data source through verl's default scorer
    (which raises NotImplementedError for a source it does not know). Usable as
    ``reward.custom_reward_function`` on the verl backend."""
    if data_source in RECIPE_SCORERS:
        return RECIPE_SCORERS[data_source](solution_str, ground_truth)
    from verl.utils.reward_score import default_compute_score

    return default_compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)


def resolve_score_fn(reward_cfg=None) -> tuple[ScoreFn, str]:
    """The scoring function and a description: ``reward.custom_reward_function`` when its path is
    set (loaded by verl's own loader), else :func:`compute_score`."""
    path = None
    if reward_cfg is not None:
        custom = reward_cfg.get("custom_reward_function") or {}
        path = custom.get("path")
    if not path:
        return compute_score, "verl's default_compute_score by data_source (+ the toy task)"
    from omegaconf import OmegaConf

    from verl.trainer.ppo.reward import get_custom_reward_fn

    fn = get_custom_reward_fn(OmegaConf.create({"reward": OmegaConf.to_container(reward_cfg, resolve=True)}))
    return fn, f"reward.custom_reward_function {path}:{reward_cfg.custom_reward_function.get('name')}"


def _as_float(score) -> float:
    if isinstance(score, dict):  # verl scorers may return {"score": ..., "acc": ...}
        score = score["acc"] if "acc" in score else score["score"]
    return float(score)


class Grader:
    """Scores responses of verl-layout rows; reports each unscorable data source once."""

    def __init__(self, score_fn: ScoreFn = compute_score, log=print):
        self.score_fn, self.log = score_fn, log
        self.unscorable: set[str] = set()

    def scores(self, rows: Sequence[dict], texts: Sequence[str]) -> list[float | None]:
        """One score per (row, response text); None where the row's data source has no scorer."""
        if len(rows) != len(texts):
            raise ValueError(f"{len(rows)} rows but {len(texts)} responses")
        out: list[float | None] = []
        for r, text in zip(rows, texts):
            source = str(r.get("data_source"))
            if source in self.unscorable:
                out.append(None)
                continue
            rm = r.get("reward_model") or {}
            try:
                out.append(_as_float(self.score_fn(source, text, rm.get("ground_truth"), r.get("extra_info"))))
            except NotImplementedError:
                self.unscorable.add(source)
                self.log(f"[ta-opd] no scorer for data_source {source!r}: its accuracy fields are null; "
                         "set reward.custom_reward_function.path/name to score it (training goes on)")
                out.append(None)
        return out

    def accuracy(self, rows: Sequence[dict], texts: Sequence[str]) -> float | None:
        """Mean score over the scorable responses (the accuracy for 0/1 scorers); None if none is."""
        got = [s for s in self.scores(rows, texts) if s is not None]
        return sum(got) / len(got) if got else None
