"""Training-data preparation (recipe.ta_opd.reproduce.data) on a small local fixture in DAPO-Math-17k's schema."""

import json

import pandas as pd
import pytest

from recipe.ta_opd.reproduce import data as D
from ta_opd.errors import TAConfigError, TAInputError

WRAP = ("Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\n"
        "Remember to put your answer on its own line after \"Answer:\".")
AIME = "Find the number of ordered pairs $(x,y)$ of integers with $x^2+y^2=25$."


def dapo_fixture(path, n_plain=20):
    problems = [(f"What is {i} plus {i + 7}?", str(2 * i + 7)) for i in range(n_plain)]
    problems += [("What is 0 plus 7?", "7"),                          # exact duplicate of row 0
                 ("What  is 0 plus\n7 ?", "7"),                        # duplicate after normalization
                 ("Find the number of ordered pairs (x, y) of integers with x^2 + y^2 = 25", "12")]  # = AIME
    rows = [{"data_source": "math_dapo", "prompt": [{"content": WRAP.format(p), "role": "user"}], "ability": "MATH",
             "reward_model": {"ground_truth": a, "style": "rule-lighteval/MATH_v2"},
             "extra_info": {"index": f"id-{k}"}} for k, (p, a) in enumerate(problems)]
    pd.DataFrame(rows).to_parquet(path)
    return problems


def test_prepare_dapo_layout_split_dedup(tmp_path):
    src = tmp_path / "dapo.parquet"
    dapo_fixture(src)
    aime = tmp_path / "aime24.jsonl"
    aime.write_text(json.dumps({"problem": AIME, "answer": "12"}) + "\n")
    m = D.prepare_dapo(str(src), tmp_path / "out", val_size=4, seed=1, dedup=[f"aime24={aime}"])
    assert m["rows_in_source"] == 23 and m["unique_problems"] == 21 and m["duplicates_dropped"] == 2
    assert m["benchmark_overlap_dropped"] == {"aime24": 1}
    assert (m["train"], m["val"]) == (16, 4) and m["without_dapo_wrapper"] == 0
    train, val = pd.read_parquet(tmp_path / "out/train.parquet"), pd.read_parquet(tmp_path / "out/val.parquet")
    assert set(train.columns) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert not set(train["extra_info"].map(lambda e: e["index"])) & set(val["extra_info"].map(lambda e: e["index"]))
    row = train[train["extra_info"].map(lambda e: e["index"]) == "id-3"].iloc[0]
    msgs = list(row["prompt"])
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    # the wrapper's "Answer:" instruction is replaced by the boxed-answer instruction, the problem kept verbatim
    assert msgs[0]["content"] == "What is 3 plus 10?\nPlease reason step by step, and put your final answer within \\boxed{}."
    assert row["reward_model"]["ground_truth"] == "13" and row["data_source"] == "math_dapo"
    assert row["extra_info"]["split"] == "train" and row["extra_info"]["problem"] == "What is 3 plus 10?"
    all_problems = pd.concat([train, val])["extra_info"].map(lambda e: e["problem"]).tolist()
    assert not any("ordered pairs" in p for p in all_problems)
    # the recipe's own verl-layout loader reads it (chat template: applied by verl / the tokenizer at load time)
    from recipe.ta_opd.cpu.data import load_rows

    assert len(load_rows(tmp_path / "out/train.parquet")) == 16
    # same seed, same split
    m2 = D.prepare_dapo(str(src), tmp_path / "out2", val_size=4, seed=1, dedup=[f"aime24={aime}"])
    assert pd.read_parquet(tmp_path / "out2/val.parquet").equals(val) and m2["val"] == 4


def test_normalization_and_wrapper():
    assert D.normalize_problem("Find $\\dfrac{1}{2}$ of  10.") == D.normalize_problem("find \\frac{1}{2} of 10")
    assert D.normalize_problem("x = 1") != D.normalize_problem("x = 2")
    assert D.extract_problem(WRAP.format("Line one.\n\nLine two?")) == ("Line one.\n\nLine two?", True)
    assert D.extract_problem("Plain problem?") == ("Plain problem?", False)


def test_flat_jsonl_source(tmp_path):
    src = tmp_path / "flat.jsonl"
    src.write_text("".join(json.dumps({"problem": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(6)))
    m = D.prepare_dapo(str(src), tmp_path / "o", val_size=2, no_dedup=True)
    assert (m["train"], m["val"], m["without_dapo_wrapper"], m["dedup_checked"]) == (4, 2, 6, [])


def test_bad_inputs_named(tmp_path, capsys):
    src = tmp_path / "dapo.parquet"
    dapo_fixture(src, n_plain=3)
    with pytest.raises(TAConfigError, match="--no-dedup"):
        D.prepare_dapo(str(src), tmp_path / "o", val_size=1)
    with pytest.raises(FileNotFoundError, match="pass --hub"):
        D.prepare_dapo("BytedTsinghua-SIA/DAPO-Math-17k", tmp_path / "o", no_dedup=True)
    with pytest.raises(TAConfigError, match="--val-size=10 leaves no training prompts"):
        D.prepare_dapo(str(src), tmp_path / "o", val_size=10, no_dedup=True)
    with pytest.raises(TAConfigError, match="'aime24'.*NAME=FILE"):
        D.prepare_dapo(str(src), tmp_path / "o", val_size=1, dedup=["aime24"])
    pd.DataFrame({"text": ["a"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(TAInputError, match=r"columns \['text'\]"):
        D.prepare_dapo(str(tmp_path / "bad.parquet"), tmp_path / "o", no_dedup=True)
    assert D.main(["dapo", "--source", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o"), "--no-dedup"]) == 2
    assert "nope.parquet" in capsys.readouterr().err
