"""Training prompts for the paper's settings: ``python -m recipe.ta_opd.reproduce.data dapo --out data/dapo``.

    python -m recipe.ta_opd.reproduce.data dapo --source FILE.parquet|FILE.jsonl --out data/dapo \\
        --dedup aime24=aime24.jsonl aime25=aime25.jsonl math_500=math500.jsonl
    python -m recipe.ta_opd.reproduce.data dapo --hub --out data/dapo     # BytedTsinghua-SIA/DAPO-Math-17k + the
                                                                  # three math benchmarks from the hub

Reads DAPO-Math-17k (verl's RL layout: ``data_source``, ``prompt`` = [{role, content}], ``ability``,
``reward_model`` = {ground_truth, style}, ``extra_info`` = {index}; or a flat file with ``problem``
and ``answer`` columns), recovers each problem from DAPO's "Answer: $Answer" wrapper, and writes
``OUT/train.parquet``, ``OUT/val.parquet`` (held-out split) and ``OUT/manifest.json`` (every count,
the prompt template, the dedup sources) in verl's RL layout:

- ``prompt``: ONE user message, ``{problem}`` + the answer instruction with ``\\boxed{}`` (EvalScope's
  MATH-500 prompt, the format the students are evaluated with). No chat template is applied here:
  verl applies the student tokenizer's chat template to chat-list prompts itself
  (``verl/utils/dataset/rl_dataset.py``: ``tokenizer.apply_chat_template(prompt,
  add_generation_prompt=True)`` for length filtering, and the agent loop before rollout), so one
  file serves every student; ``data.apply_chat_template_kwargs`` passes template options.
- ``data_source`` ``math_dapo`` (verl's scorer for it reads "Answer:" and falls back to ``\\boxed{}``),
  ``ability`` ``MATH``, ``reward_model.ground_truth`` the answer, ``extra_info`` the source index, the
  raw problem and the split.

Problems are deduplicated by normalized text (DAPO's hub file repeats each problem many times) and
every problem that also appears in an evaluation benchmark (``--dedup NAME=FILE``; with ``--hub``
the AIME24, AIME25 and MATH-500 hub files) is dropped; the manifest counts both. GPQA-Diamond,
HumanEval and IFEval share no problems with a math prompt set and are not checked.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from ta_opd.errors import TAConfigError, TAInputError

DAPO_HUB_ID = "BytedTsinghua-SIA/DAPO-Math-17k"
# the math benchmarks whose problems could also be training prompts: hub id, split, problem column
DEDUP_HUB = {"aime24": ("math-ai/aime24", "test", "problem"), "aime25": ("math-ai/aime25", "test", "problem"),
             "math_500": ("HuggingFaceH4/MATH-500", "test", "problem")}
DATA_SOURCE = "math_dapo"
# EvalScope's MATH-500 prompt: the answer format the students are evaluated with
PROMPT_TEMPLATE = "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
_DAPO_WRAPPER = re.compile(
    r"^\s*Solve the following math problem step by step\..*?\n\n(?P<problem>.*)\n\n"
    r"Remember to put your answer on its own line after \"Answer:\"\.?\s*$", re.S)
_PROBLEM_COLUMNS = ("problem", "question", "Problem", "Question")


def normalize_problem(text: str) -> str:
    """Text key for dedup: NFKC, lower case, no whitespace, no math delimiters / sizing commands,
    no trailing punctuation. Two problems match when their keys are equal."""
    t = unicodedata.normalize("NFKC", str(text)).lower()
    t = re.sub(r"\\(left|right|displaystyle|,|;|!|quad|qquad)", "", t)
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("$", "")
    t = re.sub(r"\s+", "", t)
    return t.rstrip(".?!:")


def extract_problem(content: str) -> tuple[str, bool]:
    """The problem inside DAPO's prompt wrapper; (content, False) when there is no wrapper."""
    m = _DAPO_WRAPPER.match(content)
    return (m.group("problem").strip(), True) if m else (content.strip(), False)


def read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl")
    raise TAInputError(f"{str(path)!r}: unsupported file type {suffix!r}; use .parquet, .jsonl or .json")


def load_source(source: str, hub: bool, split: str = "train") -> pd.DataFrame:
    p = Path(source).expanduser()
    if p.exists():
        return read_table(p)
    if not hub:
        raise FileNotFoundError(f"--source {source!r} is not a local file; give a parquet/jsonl file, or pass --hub "
                                f"to load it from the Hugging Face hub (default {DAPO_HUB_ID})")
    from datasets import load_dataset  # only when asked: nothing is downloaded otherwise

    return load_dataset(source, split=split).to_pandas()


def dapo_rows(df: pd.DataFrame) -> pd.DataFrame:
    """(problem, answer, index, wrapped) from DAPO's verl layout or a flat problem/answer file."""
    if "prompt" in df.columns and "reward_model" in df.columns:
        problems, wrapped = [], []
        for i, msgs in enumerate(df["prompt"]):
            msgs = list(msgs) if not isinstance(msgs, str) else None
            users = [dict(m)["content"] for m in msgs or [] if dict(m).get("role") == "user"]
            if len(users) != 1:
                raise TAInputError(f"row {i}: prompt must be a chat list with exactly one user message; got {msgs!r:.200}")
            prob, ok = extract_problem(users[0])
            problems.append(prob)
            wrapped.append(ok)
        answers = [dict(r).get("ground_truth") for r in df["reward_model"]]
        index = [dict(e).get("index", i) if e is not None else i for i, e in
                 enumerate(df["extra_info"] if "extra_info" in df.columns else [None] * len(df))]
    elif "problem" in df.columns and "answer" in df.columns:
        problems, answers = df["problem"].astype(str).tolist(), df["answer"].tolist()
        wrapped, index = [False] * len(df), list(range(len(df)))
    else:
        raise TAInputError(f"source columns {list(df.columns)} are neither DAPO's verl layout (prompt, reward_model, ...) "
                           "nor a flat file with problem and answer columns")
    out = pd.DataFrame({"problem": problems, "answer": answers, "index": [str(x) for x in index], "wrapped": wrapped})
    bad = out[out["answer"].isna() | (out["answer"].astype(str).str.strip() == "") | (out["problem"] == "")]
    if len(bad):
        raise TAInputError(f"row {int(bad.index[0])} has an empty problem or ground truth (index {bad['index'].iloc[0]!r})")
    out["answer"] = out["answer"].astype(str).str.strip()
    return out


def benchmark_problems(spec: str, hub: bool) -> tuple[str, set[str]]:
    """NAME=FILE (a parquet/jsonl with a problem/question column) -> (NAME, normalized problems)."""
    name, sep, path = spec.partition("=")
    if not sep:
        if not hub or spec not in DEDUP_HUB:
            raise TAConfigError(f"--dedup {spec!r}: use NAME=FILE (e.g. aime24=aime24.jsonl); a bare name loads the hub "
                                f"copy and needs --hub (names: {', '.join(DEDUP_HUB)})")
        from datasets import load_dataset

        hub_id, split, col = DEDUP_HUB[spec]
        return spec, {normalize_problem(t) for t in load_dataset(hub_id, split=split)[col]}
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"--dedup {spec!r}: {path} does not exist")
    df = read_table(p)
    col = next((c for c in _PROBLEM_COLUMNS if c in df.columns), None)
    if col is None:
        raise TAInputError(f"--dedup {spec!r}: no problem column (one of {list(_PROBLEM_COLUMNS)}) in {list(df.columns)}")
    return name, {normalize_problem(t) for t in df[col]}


def to_verl(rows: pd.DataFrame, split: str, source: str) -> pd.DataFrame:
    return pd.DataFrame({
        "data_source": DATA_SOURCE,
        "prompt": [[{"role": "user", "content": PROMPT_TEMPLATE.format(problem=p)}] for p in rows["problem"]],
        "ability": "MATH",
        "reward_model": [{"ground_truth": a, "style": "rule"} for a in rows["answer"]],
        "extra_info": [{"index": i, "problem": p, "split": split, "source": source}
                       for i, p in zip(rows["index"], rows["problem"])],
    })


def prepare_dapo(source: str, out: str | Path, *, val_size: int = 500, seed: int = 0, dedup: list[str] = (),
                 hub: bool = False, no_dedup: bool = False, max_prompts: int | None = None) -> dict:
    if not dedup and not hub and not no_dedup:
        raise TAConfigError("give the evaluation benchmarks to deduplicate against (--dedup aime24=FILE ...), or --hub "
                            "to load them, or --no-dedup to skip the check explicitly")
    if val_size < 1:
        raise TAConfigError(f"--val-size={val_size} is not allowed; the held-out split needs >= 1 prompt")
    rows = dapo_rows(load_source(source, hub))
    n_source = len(rows)
    rows["key"] = rows["problem"].map(normalize_problem)
    conflict = rows.groupby("key")["answer"].nunique()
    n_conflicting = int((conflict > 1).sum())  # same problem, different answers: the first one is kept
    rows = rows.drop_duplicates("key", keep="first")
    n_unique = len(rows)
    specs = list(dedup) or (list(DEDUP_HUB) if hub and not no_dedup else [])
    overlap = {}
    for spec in specs:
        name, keys = benchmark_problems(spec, hub)
        hit = rows["key"].isin(keys)
        overlap[name] = int(hit.sum())
        rows = rows[~hit]
    if max_prompts is not None:
        rows = rows.iloc[:max_prompts]
    if len(rows) <= val_size:
        raise TAConfigError(f"--val-size={val_size} leaves no training prompts: {len(rows)} remain after dedup")
    order = np.random.default_rng(seed).permutation(len(rows))
    val, train = rows.iloc[np.sort(order[:val_size])], rows.iloc[np.sort(order[val_size:])]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    to_verl(train, "train", source).to_parquet(out / "train.parquet", index=False)
    to_verl(val, "val", source).to_parquet(out / "val.parquet", index=False)
    manifest = {"source": source, "rows_in_source": n_source, "unique_problems": n_unique,
                "duplicates_dropped": n_source - n_unique, "problems_with_conflicting_answers": n_conflicting,
                "without_dapo_wrapper": int((~rows["wrapped"]).sum()), "benchmark_overlap_dropped": overlap,
                "dedup_checked": sorted(overlap), "train": len(train), "val": len(val), "seed": seed,
                "prompt_template": PROMPT_TEMPLATE, "data_source": DATA_SOURCE,
                "chat_template": "applied by verl at load time (tokenizer.apply_chat_template)"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="training prompts in verl's RL parquet layout")
    sub = p.add_subparsers(dest="dataset", required=True)
    d = sub.add_parser("dapo", help="DAPO-Math-17k (the paper's training prompts)")
    d.add_argument("--source", default=DAPO_HUB_ID, help=f"parquet/jsonl file, or a hub id with --hub [{DAPO_HUB_ID}]")
    d.add_argument("--hub", action="store_true", help="allow loading --source and the dedup benchmarks from the hub")
    d.add_argument("--out", required=True, help="output folder: train.parquet, val.parquet, manifest.json")
    d.add_argument("--val-size", type=int, default=500, help="held-out prompts [500]")
    d.add_argument("--seed", type=int, default=0, help="seed of the held-out split [0]")
    d.add_argument("--dedup", nargs="+", default=[], metavar="NAME=FILE",
                   help="evaluation benchmark files whose problems are dropped (problem/question column)")
    d.add_argument("--no-dedup", action="store_true", help="skip the benchmark overlap check (explicitly)")
    d.add_argument("--max-prompts", type=int, default=None, help="keep at most this many prompts (after dedup)")
    a = p.parse_args(argv)
    try:
        m = prepare_dapo(a.source, a.out, val_size=a.val_size, seed=a.seed, dedup=a.dedup, hub=a.hub,
                         no_dedup=a.no_dedup, max_prompts=a.max_prompts)
    except (TAConfigError, TAInputError, FileNotFoundError) as e:
        print(f"[ta-opd] error: {e}", file=sys.stderr)
        return 2
    print(f"[ta-opd] data: {m['rows_in_source']} rows, {m['unique_problems']} unique problems, "
          f"benchmark overlap dropped {m['benchmark_overlap_dropped']}; wrote {m['train']} train / {m['val']} val "
          f"prompts to {a.out}")
    if m["problems_with_conflicting_answers"]:
        print(f"[ta-opd] note: {m['problems_with_conflicting_answers']} problems appear with different answers; the first "
              "answer was kept (manifest.json)")
    if m["without_dapo_wrapper"]:
        print(f"[ta-opd] note: {m['without_dapo_wrapper']} prompts had no DAPO 'Answer:' wrapper; their whole user "
              "message was taken as the problem")
    return 0


if __name__ == "__main__":
    sys.exit(main())
