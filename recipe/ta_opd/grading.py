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

Answer extraction: a scorer that finds no final answer in a response scores it 0.0, silently
(verl's ``openai/gsm8k`` scorer reads only ``#### N``). For the data sources whose answer format
is known (:data:`ANSWER_FORMATS`: the toy, GSM8K, MATH, DAPO/AIME) the grader also counts the
responses with an extractable answer; :func:`low_extraction` turns a share below
:data:`MIN_EXTRACTION_RATE` into a one-line warning (training) — the same threshold the benchmark
evaluation (``reproduce/evaluate.py``) fails on with exit 3. A custom scorer's format is unknown:
its extraction rate is ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ta_opd.tools.toy.task import DATA_SOURCE as TOY_DATA_SOURCE
from ta_opd.tools.toy.task import is_correct as toy_is_correct
from ta_opd.tools.real_pair.task import DATA_SOURCE as REAL_ARITH_DATA_SOURCE
from ta_opd.tools.real_pair.task import extract_answer as real_arith_answer
from ta_opd.tools.real_pair.task import is_correct as real_arith_is_correct

ScoreFn = Callable[..., object]
Extract = Callable[[str], object]  # a response -> its final answer, None when it has none

# below this share of responses with an extractable final answer, an accuracy measures the answer
# format, not the model: training warns, the benchmark evaluation fails (exit 3)
MIN_EXTRACTION_RATE = 0.5


def _toy_score(solution_str: str, ground_truth) -> float:
    return 1.0 if toy_is_correct(solution_str, ground_truth) else 0.0


def _real_arith_score(solution_str: str, ground_truth) -> float:
    return 1.0 if real_arith_is_correct(solution_str, ground_truth) else 0.0


# data sources this recipe scores itself, before verl's dispatch (the toy; the real-LM pair's arithmetic)
RECIPE_SCORERS: dict[str, Callable[[str, object], float]] = {TOY_DATA_SOURCE: _toy_score,
                                                             REAL_ARITH_DATA_SOURCE: _real_arith_score}


def _gsm8k_answer(text: str):
    from verl.utils.reward_score.gsm8k import extract_solution

    return extract_solution(text, method="strict")  # what verl's gsm8k scorer compares


def _boxed_answer(text: str):
    from verl.utils.reward_score.math_reward import last_boxed_only_string

    return last_boxed_only_string(text)


def _dapo_answer(text: str):
    """verl's math_dapo: a Minerva ``Answer: ...`` line first, else the last ``\\boxed{}``."""
    import re

    return re.findall(r"(?i)Answer\s*:\s*([^\n]+)", text) or _boxed_answer(text)


def _toy_answer(text: str):
    from ta_opd.tools.toy.task import extract_answer

    return extract_answer(text)


# data source -> (the answer format, as a person writes it; its extractor), for compute_score's scorers
ANSWER_FORMATS: dict[str, tuple[str, Extract]] = {
    TOY_DATA_SOURCE: ("'R=N' or 'A:N' at the end", _toy_answer),
    REAL_ARITH_DATA_SOURCE: ("'Answer: N', else the last number", real_arith_answer),
    "openai/gsm8k": ("'#### N'", _gsm8k_answer),
    **{s: ("'\\boxed{...}'", _boxed_answer) for s in ("lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval",
                                                       "HuggingFaceH4/MATH-500")},
    **{s: ("'Answer: ...' or '\\boxed{...}'", _dapo_answer) for s in ("math_dapo", "math", "math_dapo_reasoning")},
}


def answer_format(data_source: str) -> tuple[str, Extract] | None:
    """(format, extractor) of a data source compute_score grades; None when the format is unknown."""
    if data_source.startswith("aime") and data_source not in ANSWER_FORMATS:  # verl routes aime* to math_dapo
        return ANSWER_FORMATS["math_dapo"]
    return ANSWER_FORMATS.get(data_source)


def share_extracted(extract: Extract, texts: Sequence[str]) -> float | None:
    """The share of ``texts`` with an extractable final answer (None for no texts)."""
    return sum(extract(t) is not None for t in texts) / len(texts) if texts else None


def low_extraction(rate: float | None, what: str, formats: str, threshold: float = MIN_EXTRACTION_RATE) -> str | None:
    """The one-line warning for an extraction rate below ``threshold`` (None when it is not low)."""
    if rate is None or rate >= threshold:
        return None
    return (f"[ta-opd] warning: only {rate:.0%} of {what} have a final answer the scorer can extract ({formats}), "
            f"below {threshold:.0%}: the accuracy measures the answer format, not the model (check the prompt's answer "
            "instruction and data.max_response_length, or set reward.custom_reward_function)")


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
        self.warned: set[str] = set()  # what a low extraction rate was warned about (once each)

    def scorable(self, rows: Sequence[dict]) -> bool:
        """Whether any row's data source has a scorer (one probe per source, with an empty response):
        an evaluation of rows that are all unscorable could only give null, so it is skipped."""
        for source in dict.fromkeys(str(r.get("data_source")) for r in rows):
            row = next(r for r in rows if str(r.get("data_source")) == source)
            try:
                if source not in self.unscorable and self.scores([row], [""]) != [None]:
                    return True
            except Exception:  # noqa: BLE001 - a scorer that exists but rejects an empty response scores
                return True
        return False

    def extraction_rate(self, rows: Sequence[dict], texts: Sequence[str]) -> tuple[float | None, str]:
        """(share of the scorable responses with an extractable final answer, their formats); None
        when no response's format is known (a custom scorer, a source without an ANSWER_FORMATS row)."""
        if self.score_fn is not compute_score:
            return None, ""
        found = [(answer_format(str(r.get("data_source"))), t) for r, t in zip(rows, texts)
                 if str(r.get("data_source")) not in self.unscorable]
        found = [(f, t) for f, t in found if f is not None]
        formats = ", ".join(dict.fromkeys(f[0] for f, _ in found))
        return (sum(f[1](t) is not None for f, t in found) / len(found) if found else None), formats

    def check_extraction(self, rows: Sequence[dict], texts: Sequence[str], what: str) -> float | None:
        """The extraction rate of these responses; a one-line warning the first time ``what`` is low."""
        rate, formats = self.extraction_rate(rows, texts)
        warning = low_extraction(rate, what, formats)
        if warning and what not in self.warned:
            self.warned.add(what)
            self.log(warning)
        return rate

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
