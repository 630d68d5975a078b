"""Table 3 / Table 4 aggregation (recipe.ta_opd.reproduce.results) on a fixture of result files with a hand-computed table."""

import json
import math

import pandas as pd
import pytest

from recipe.ta_opd.reproduce import results as R
from ta_opd.errors import TAConfigError, TAInputError

S1 = "qwen3_4b_to_qwen3_1p7b"
S2 = "qwen3_14b_to_qwen3_4b"
GEN = {"temperature": 0.6, "top_p": 0.95, "max_tokens": 8192}


def write(root, run, bench, seed, score, **extra):
    rec = {"schema": R.SCHEMA, "run": run, "benchmark": bench, "seed": seed, "score": score, "harness": "evalscope",
           "chat_template": True, "answer_format": "boxed", "generation": GEN, **extra}
    p = root / run / bench / f"seed{seed}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(rec))


@pytest.fixture
def fixture_dir(tmp_path):
    ta = R.run_name(S1, "teachability", 0.10)
    for seed, s in enumerate([10.0, 20.0, 30.0, 40.0, 50.0]):  # aime24: mean 30, std sqrt(250)
        write(tmp_path, ta, "aime24", seed, s)
        for b in R.PAPER_BENCHMARKS[1:]:
            write(tmp_path, ta, b, seed, 40.0)
    full = R.run_name(S1, "full")
    for seed, s in enumerate([50.0, 60.0]):  # 2 seeds only: marked (n=2)
        for b in R.PAPER_BENCHMARKS:
            write(tmp_path, full, b, seed, s)
    base = R.run_name(S1, "base")
    for b in R.PAPER_BENCHMARKS:
        if b != "humaneval":  # a missing benchmark: its cell and Avg. are missing, never 0
            write(tmp_path, base, b, 0, 5.0)
    for budget, score in ((0.05, 20.0), (0.10, 30.0)):
        for b in R.PAPER_BENCHMARKS:
            write(tmp_path, R.run_name(S2, "teachability", budget), b, 0, score)
    (tmp_path / "not_a_record.json").write_text(json.dumps({"score": 1}))  # harness output: skipped
    return tmp_path


def test_run_names_round_trip():
    assert R.run_name(S1, "teachability", 0.1) == "qwen3_4b_to_qwen3_1p7b__teachability__rho0.10"
    assert R.parse_run_name("qwen3_4b_to_qwen3_1p7b__teachability__rho0.10") == R.RunId(S1, "teachability", 0.1)
    assert R.parse_run_name(f"{S1}__full") == R.RunId(S1, "full", None)
    with pytest.raises(TAInputError, match="does not follow"):
        R.parse_run_name("qwen3_4b_to_1p7b_teachability_rho0.1_k16")
    with pytest.raises(TAConfigError, match="budget"):
        R.run_name(S1, "full", 0.1)
    # the training seed is part of the name; names written before it was still parse (seed None)
    assert R.run_name(S1, "teachability", 0.1, 3) == "qwen3_4b_to_qwen3_1p7b__teachability__rho0.10__seed3"
    assert R.parse_run_name(f"{S1}__teachability__rho0.10__seed3") == R.RunId(S1, "teachability", 0.1, 3)
    assert R.run_name(S1, "full", seed=0) == f"{S1}__full__seed0"
    assert R.parse_run_name(f"{S1}__full__seed0") == R.RunId(S1, "full", None, 0)
    with pytest.raises(TAConfigError, match="no training seed"):
        R.run_name(S1, "base", seed=0)
    with pytest.raises(TAConfigError, match="seed"):
        R.run_name(S1, "tip", 0.1, -1)


def test_table3_hand_computed(fixture_dir):
    df = R.load_records(fixture_dir)
    t3_all = R.table3(df)
    t3 = t3_all[t3_all["setting"] == S1].set_index("method")
    ta = t3.loc["teachability"]
    assert ta["aime24_mean"] == pytest.approx(30.0)
    assert ta["aime24_std"] == pytest.approx(math.sqrt(250.0))
    assert ta["aime24_n"] == 5
    assert ta["avg"] == pytest.approx((30 + 5 * 40) / 6)
    assert ta["paper_avg"] == pytest.approx(44.89)
    assert t3.loc["full", "avg"] == pytest.approx(55.0)
    assert t3.loc["full", "math_500_std"] == pytest.approx(math.sqrt(50.0))
    assert t3.loc["full", "paper_avg"] == pytest.approx(42.37)
    assert math.isnan(t3.loc["base", "humaneval_mean"]) and math.isnan(t3.loc["base", "avg"])
    assert t3.loc["base", "aime24_mean"] == pytest.approx(5.0)
    # rows of the seven methods are there even without results, all missing
    assert list(t3.index) == list(R.METHODS)
    assert t3.loc["entropy", [f"{b}_mean" for b in R.PAPER_BENCHMARKS] + ["avg"]].isna().all()
    # the 14B setting has only rho 0.05 / 0.10 teachability runs: its Table-3 row is the 0.10 one
    row = t3_all[(t3_all["setting"] == S2) & (t3_all["method"] == "teachability")].iloc[0]
    assert row["avg"] == pytest.approx(30.0)


def test_markdown_and_files(fixture_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("agg")
    written = R.aggregate(fixture_dir, out)
    md = (out / "table3.md").read_text()
    assert "| TA-OPD | 30.00 ± 15.81 | 40.00 ± 0.00 |" in md
    assert "| 38.33 | 44.89 |" in md
    assert "| Full OPD | 55.00 ± 7.07 (n=2) |" in md
    assert "| Entropy | — | — | — | — | — | — | — | — |" in md
    base = next(line for line in md.splitlines() if line.startswith("| Base |"))
    assert base.split(" | ")[4] == "—" and base.rstrip(" |").endswith("— | —")
    csv = pd.read_csv(out / "table3.csv")
    ent = csv[(csv["setting"] == S1) & (csv["method"] == "entropy")].iloc[0]
    assert pd.isna(ent["avg"]) and pd.isna(ent["aime24_mean"])  # empty in CSV, not 0
    t4 = pd.read_csv(out / "table4.csv")
    assert set(t4["setting"]) == {S2}  # S1 has a budgeted run at one rho only
    r = t4[(t4["method"] == "teachability") & (t4["budget"] == 0.05)].iloc[0]
    assert r["avg"] == pytest.approx(20.0) and pd.isna(r["paper_avg"])
    r = t4[(t4["method"] == "teachability_entropy") & (t4["budget"] == 0.05)].iloc[0]
    assert pd.isna(r["avg"]) and r["paper_avg"] == pytest.approx(54.47)
    assert sorted(t4.loc[t4["method"] == "tip", "budget"]) == [0.05, 0.1, 0.3, 0.5]
    assert (out / "budget_curve.png").stat().st_size > 1000
    assert len(pd.read_csv(written["results_long"])) == 5 * 6 + 2 * 6 + 5 + 2 * 6


def test_unknown_benchmark_named(fixture_dir, tmp_path):
    write(fixture_dir, R.run_name(S1, "tip", 0.1), "gsm8k", 0, 50.0)
    with pytest.raises(TAInputError, match="benchmark 'gsm8k'.*unknown"):
        R.load_records(fixture_dir)
    with pytest.raises(TAConfigError, match="benchmark 'aime2024' is unknown"):
        R.aggregate(fixture_dir, tmp_path / "o", benchmarks=["aime2024"])


def test_mixed_generation_settings_rejected(fixture_dir):
    tip = R.run_name(S1, "tip", 0.1)
    for b in R.PAPER_BENCHMARKS:
        write(fixture_dir, tip, b, 0, 50.0, generation={**GEN, "temperature": 1.0})
    with pytest.raises(TAInputError, match="Table 3 mixes evaluation settings: generation differs.*" + tip):
        R.table3(R.load_records(fixture_dir))


def test_two_runs_one_cell_rejected(fixture_dir):
    write(fixture_dir, f"{S1}__teachability__rho0.1", "aime24", 0, 10.0)
    with pytest.raises(TAInputError, match="fill the cell"):
        R.load_records(fixture_dir)


def test_duplicate_record_rejected(tmp_path):
    run = R.run_name(S1, "tip", 0.1)
    write(tmp_path, run, "aime24", 0, 10.0)
    p = tmp_path / "copy" / "seed0.json"
    p.parent.mkdir()
    p.write_text((tmp_path / run / "aime24" / "seed0.json").read_text())
    with pytest.raises(TAInputError, match="2 result records"):
        R.load_records(tmp_path)


def test_cli_errors_exit_2(tmp_path, capsys):
    assert R.main([str(tmp_path)]) == 2
    assert "no result files" in capsys.readouterr().err


def test_paper_csv_transcription():
    p = R.paper_results()
    assert set(p["benchmark"]) == {"avg"} and p["source"].notna().all()
    assert set(p["setting"]) <= set(R.SETTINGS) and set(p["method"]) <= set(R.METHODS)
    t3 = p[p["table"] == 3].set_index(["setting", "method"])["mean"]
    assert t3[(S1, "teachability")] == 44.89 and t3[("r1_distill_qwen14b_to_qwen2p5_3b", "full")] == 28.76
