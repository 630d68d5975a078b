"""The paper's Table 3 / Table 4 from benchmark result files: ``python -m recipe.ta_opd.reproduce.results DIR``.

    python -m recipe.ta_opd.reproduce.results EVAL_DIR [--out DIR] [--benchmarks aime24 ...] [--seeds 5]

Reads every result record written by ``python -m recipe.ta_opd.reproduce.evaluate`` under EVAL_DIR (one
JSON file per (run, benchmark, seed), schema ``ta_opd.eval/v1``) and writes to ``--out``
(default ``EVAL_DIR/aggregate``):

- ``table3.md`` / ``table3.csv``: every setting, method × benchmark at ρ = 10 % (Base and Full OPD
  at their own budget), mean ± std over evaluation seeds, Avg. = mean of the benchmark means;
- ``table4.md`` / ``table4.csv``: the budget sweep (ρ × budgeted selector) for every setting with
  budgeted runs at more than one ρ (the paper: the two Qwen3-4B student settings);
- ``budget_curve.png``: Avg. vs ρ per selector, one panel per Table-4 setting;
- ``results_long.csv``: every record, tidy.

The paper's published numbers (``recipe/ta_opd/reproduce/paper_results.csv``) stand in a "paper Avg." column
where the setting, method and budget match. A cell without results is shown as missing ("—" in
markdown, empty in CSV), never as 0; Avg. is missing unless every benchmark has a mean.
std is the sample standard deviation (ddof = 1) over seeds; the paper does not say which.

Run names (``trainer.experiment_name`` of a training run, see ``run_name``) carry the cell and the
training seed: ``<setting>__<method>__rho<budget>__seed<s>`` for budgeted selectors,
``<setting>__full__seed<s>`` and ``<setting>__base`` (the untrained student); names without
``__seed<s>`` (older runs) still parse. Pure pandas / numpy / matplotlib: no verl here.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from ta_opd.errors import TAConfigError, TAInputError

SCHEMA = "ta_opd.eval/v1"

# the paper's six benchmarks (EvalScope dataset names), in Table 3's column order
PAPER_BENCHMARKS = ("aime24", "aime25", "gpqa_diamond", "humaneval", "ifeval", "math_500")
# the toy pair's held-out addition task: the CPU route of the same evaluation command
TOY_BENCHMARK = "toy_addition"
BENCHMARK_TITLES = {"aime24": "AIME24", "aime25": "AIME25", "gpqa_diamond": "GPQA-D", "humaneval": "HumanEval",
                    "ifeval": "IFEval", "math_500": "MATH-500", TOY_BENCHMARK: "Toy addition"}
KNOWN_BENCHMARKS = tuple(BENCHMARK_TITLES)

# the four teacher->student settings (recipe/ta_opd/config/experiment/<name>.yaml), in the paper's order
SETTINGS = {
    "qwen3_4b_to_qwen3_1p7b": "Qwen3-4B → Qwen3-1.7B",
    "qwen3_8b_grpo_to_qwen3_4b": "Qwen3-8B-GRPO → Qwen3-4B",
    "qwen3_14b_to_qwen3_4b": "Qwen3-14B → Qwen3-4B",
    "r1_distill_qwen14b_to_qwen2p5_3b": "DeepSeek-R1-Distill-Qwen-14B → Qwen2.5-3B",
}
# Table 3's rows. "random" is not named in the paper's text; we run it as a control.
METHODS = ("base", "full", "random", "entropy", "tip", "teachability", "teachability_entropy")
METHOD_TITLES = {"base": "Base", "full": "Full OPD", "random": "Random", "entropy": "Entropy", "tip": "TIP",
                 "teachability": "TA-OPD", "teachability_entropy": "TA-OPD+Ent."}
UNBUDGETED = ("base", "full")  # no supervised-token budget: the untrained student, and OPD on every token
TABLE3_BUDGET = 0.10
TABLE4_BUDGETS = (0.05, 0.10, 0.30, 0.50)
TABLE4_SETTINGS = ("qwen3_8b_grpo_to_qwen3_4b", "qwen3_14b_to_qwen3_4b")
TABLE4_METHODS = ("entropy", "tip", "teachability", "teachability_entropy")
# record keys that must agree across one table (the evaluation protocol)
PROTOCOL_KEYS = ("harness", "chat_template", "answer_format", "generation")
MISSING = "—"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class RunId:
    """The Table cell a training run fills: setting, method, budget (None for base / full), and the
    training seed (None for base, and for names written before the seed was part of them)."""

    setting: str
    method: str
    budget: float | None
    seed: int | None = None

    def __post_init__(self):
        for key in ("setting", "method"):
            v = getattr(self, key)
            if not isinstance(v, str) or not _NAME.match(v) or "__" in v:
                raise TAConfigError(f"{key}={v!r} is not allowed in a run name: use letters, digits, '_', '.', '-' "
                                    "and no double underscore")
        if self.method in UNBUDGETED:
            if self.budget is not None:
                raise TAConfigError(f"method {self.method!r} has no budget; got budget={self.budget!r}")
        elif self.budget is None or not (0.0 < float(self.budget) <= 1.0):
            raise TAConfigError(f"budget={self.budget!r} is not allowed for method {self.method!r}; it must be in (0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            raise TAConfigError(f"seed={self.seed!r} is not allowed in a run name; it must be an integer >= 0")
        if self.method == "base" and self.seed is not None:
            raise TAConfigError(f"method 'base' (the untrained student) has no training seed; got seed={self.seed!r}")

    @property
    def name(self) -> str:
        parts = [self.setting, self.method]
        if self.budget is not None:
            parts.append(f"rho{_fmt_budget(self.budget)}")
        if self.seed is not None:
            parts.append(f"seed{self.seed}")
        return "__".join(parts)


def _fmt_budget(b: float) -> str:
    return f"{float(b):.2f}"


def run_name(setting: str, method: str, budget: float | None = None, seed: int | None = None) -> str:
    """``trainer.experiment_name`` for a cell and training seed, e.g.
    ``qwen3_4b_to_qwen3_1p7b__teachability__rho0.10__seed0`` (``<setting>__full__seed0``; ``<setting>__base``)."""
    return RunId(setting, method, budget, seed).name


def parse_run_name(name: str) -> RunId:
    """The inverse of :func:`run_name`; a name without ``__seed<s>`` (written before the seed was
    part of run names) parses with seed None."""
    parts = str(name).split("__")
    seed = None
    if len(parts) >= 3 and parts[-1].startswith("seed") and parts[-1][4:].isdigit():
        seed = int(parts.pop()[4:])
    if len(parts) == 2 and parts[1] in UNBUDGETED:
        return RunId(parts[0], parts[1], None, seed)
    if len(parts) == 3 and parts[2].startswith("rho"):
        try:
            budget = float(parts[2][3:])
        except ValueError:
            budget = None
        if budget is not None:
            return RunId(parts[0], parts[1], budget, seed)
    raise TAInputError(f"run name {name!r} does not follow <setting>__<method>__rho<budget>__seed<s> (budgeted "
                       f"selectors), <setting>__full__seed<s> or <setting>__base; e.g. "
                       f"{run_name('qwen3_4b_to_qwen3_1p7b', 'teachability', 0.1, 0)}")


def check_benchmarks(names) -> tuple[str, ...]:
    names = tuple(names)
    bad = [b for b in names if b not in KNOWN_BENCHMARKS]
    if bad:
        raise TAConfigError(f"benchmark {bad[0]!r} is unknown; known benchmarks: {', '.join(KNOWN_BENCHMARKS)}")
    if len(set(names)) != len(names) or not names:
        raise TAConfigError(f"benchmarks {list(names)} must be a non-empty list without repeats")
    return names


# ---------------------------------------------------------------- loading


def load_records(root: str | Path) -> pd.DataFrame:
    """Every result record (schema ``ta_opd.eval/v1``) under ``root``, one row each. Other JSON
    files (e.g. the harness's own outputs) are not records and are skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {str(root)!r} does not exist")
    rows = []
    for f in sorted(root.rglob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
            rows.append({**rec, "file": str(f)})
    if not rows:
        raise TAInputError(f"no result files (JSON records with schema {SCHEMA!r}) under {str(root)!r}; "
                           "write them with python -m recipe.ta_opd.reproduce.evaluate")
    return records_frame(rows)


def records_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    need = ("run", "benchmark", "seed", "score")
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise TAInputError(f"result records lack field(s) {missing}; each needs {list(need)}")
    for b in df["benchmark"].unique():
        if b not in KNOWN_BENCHMARKS:
            files = df.loc[df["benchmark"] == b, "file"].tolist() if "file" in df else []
            raise TAInputError(f"benchmark {b!r} (in {files[:1] or 'a record'}) is unknown; known benchmarks: "
                               f"{', '.join(KNOWN_BENCHMARKS)}")
    ids = [parse_run_name(r) for r in df["run"]]
    df["setting"] = [i.setting for i in ids]
    df["method"] = [i.method for i in ids]
    df["budget"] = [np.nan if i.budget is None else round(float(i.budget), 6) for i in ids]
    df["score"] = df["score"].astype(float)
    bad = df[~np.isfinite(df["score"]) | (df["score"] < 0) | (df["score"] > 100)]
    if len(bad):
        r = bad.iloc[0]
        raise TAInputError(f"score={r['score']!r} of run {r['run']!r} / {r['benchmark']} / seed {r['seed']} is not a "
                           "percentage in [0, 100]")
    dup = df[df.duplicated(["run", "benchmark", "seed"], keep=False)]
    if len(dup):
        r = dup.iloc[0]
        raise TAInputError(f"run {r['run']!r}, benchmark {r['benchmark']!r}, seed {r['seed']} has "
                           f"{int(((df['run'] == r['run']) & (df['benchmark'] == r['benchmark']) & (df['seed'] == r['seed'])).sum())} "
                           "result records; keep one per (run, benchmark, seed)")
    cell = df.groupby(["setting", "method", "budget"], dropna=False)["run"].unique()
    for key, runs in cell.items():
        if len(runs) > 1:
            raise TAInputError(f"runs {sorted(runs)} all fill the cell setting={key[0]}, method={key[1]}, "
                               f"budget={key[2]} (training seeds are aggregated one at a time); keep one run per cell")
    return df


def check_protocol(df: pd.DataFrame, table: str) -> None:
    """One table, one evaluation protocol: raise naming the key whose values differ."""
    for key in PROTOCOL_KEYS:
        if key not in df.columns:
            continue
        vals = df[key].map(lambda v: json.dumps(v, sort_keys=True, default=str))
        if vals.nunique() > 1:
            groups = {v: sorted(df.loc[vals == v, "run"].unique()) for v in vals.unique()}
            desc = "; ".join(f"{v} (runs {', '.join(r[:3])}{' ...' if len(r) > 3 else ''})" for v, r in groups.items())
            raise TAInputError(f"{table} mixes evaluation settings: {key} differs between runs: {desc}. "
                               "Evaluate every run of a table with the same settings, or aggregate them separately.")


# ---------------------------------------------------------------- tables


def cell_stats(df: pd.DataFrame, benchmarks: tuple[str, ...]) -> pd.DataFrame:
    """(setting, method, budget) × benchmark: mean, std (ddof 1), n over seeds; Avg. = mean of the
    benchmark means, NaN unless all benchmarks have one."""
    keyed = df.assign(budget=df["budget"].fillna(-1.0))  # -1: no budget (base / full); NaN keys get dropped
    g = keyed.groupby(["setting", "method", "budget", "benchmark"])["score"]
    s = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1), "n": g.count()})
    wide = s.unstack("benchmark")  # columns (stat, benchmark); absent pairs are NaN
    out = pd.DataFrame(index=wide.index)
    for b in benchmarks:
        for stat in ("mean", "std", "n"):
            out[f"{b}_{stat}"] = wide[(stat, b)] if (stat, b) in wide.columns else np.nan
    means = out[[f"{b}_mean" for b in benchmarks]]
    out["avg"] = means.mean(axis=1, skipna=False)  # a missing benchmark makes Avg. missing, never 0
    out = out.reset_index()
    out["budget"] = out["budget"].where(out["budget"] >= 0)
    return out


def paper_results() -> pd.DataFrame:
    with resources.files("recipe.ta_opd.reproduce").joinpath("paper_results.csv").open() as f:
        return pd.read_csv(f)


def _paper_avg(paper: pd.DataFrame, table: int, setting: str, method: str, budget) -> float:
    m = paper[(paper["table"] == table) & (paper["setting"] == setting) & (paper["method"] == method)
              & (paper["benchmark"] == "avg")]
    if method in UNBUDGETED:
        return float(m["mean"].iloc[0]) if len(m) else np.nan
    m = m[np.isclose(m["budget"].astype(float), float(budget))]
    return float(m["mean"].iloc[0]) if len(m) else np.nan


def _order(values, first) -> list:
    values = list(dict.fromkeys(values))
    return [v for v in first if v in values] + sorted(v for v in values if v not in first)


def table3(df: pd.DataFrame, benchmarks=PAPER_BENCHMARKS, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every setting × the seven methods at ρ = 10 %; rows without results stay (as missing)."""
    sel = df[df["method"].isin(UNBUDGETED) | np.isclose(df["budget"].fillna(-1), TABLE3_BUDGET)]
    if sel.empty:
        raise TAInputError(f"no results for Table 3 (base, full, or a selector at rho={TABLE3_BUDGET})")
    check_protocol(sel, "Table 3")
    stats = cell_stats(sel, benchmarks).set_index(["setting", "method"])
    paper = paper_results() if paper is None else paper
    rows = []
    for setting in _order(sel["setting"], tuple(SETTINGS)):
        for method in _order(list(METHODS) + sel.loc[sel["setting"] == setting, "method"].tolist(), METHODS):
            budget = None if method in UNBUDGETED else TABLE3_BUDGET
            row = {"setting": setting, "method": method, "budget": np.nan if budget is None else budget}
            if (setting, method) in stats.index:
                row.update(stats.loc[(setting, method)].drop("budget").to_dict())
            row["paper_avg"] = _paper_avg(paper, 3, setting, method, budget)
            rows.append(row)
    return _complete(pd.DataFrame(rows), benchmarks)


def table4(df: pd.DataFrame, benchmarks=PAPER_BENCHMARKS, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """ρ × budgeted selector for each setting with budgeted runs at more than one ρ (the paper's
    four budgets always listed), plus Base / Full OPD as reference rows."""
    budgeted = df[~df["method"].isin(UNBUDGETED)]
    settings = [s for s, g in budgeted.groupby("setting") if g["budget"].nunique() > 1 or s in TABLE4_SETTINGS]
    if not settings:
        raise TAInputError("no results for Table 4 (a setting with budgeted runs at more than one rho)")
    sel = df[df["setting"].isin(settings)]
    check_protocol(sel, "Table 4")
    stats = cell_stats(sel, benchmarks).set_index(["setting", "method", "budget"])
    paper = paper_results() if paper is None else paper
    rows = []
    for setting in _order(settings, TABLE4_SETTINGS):
        here = sel[sel["setting"] == setting]
        methods = _order(list(TABLE4_METHODS) + here.loc[~here["method"].isin(UNBUDGETED), "method"].tolist(),
                         TABLE4_METHODS)
        budgets = sorted(set(TABLE4_BUDGETS) | set(here["budget"].dropna().round(6)))
        cells = [(m, None) for m in UNBUDGETED] + [(m, b) for b in budgets for m in methods]
        for method, budget in cells:
            key = (setting, method, np.nan if budget is None else budget)
            row = {"setting": setting, "method": method, "budget": key[2]}
            hit = [k for k in stats.index if k[0] == setting and k[1] == method
                   and ((budget is None and pd.isna(k[2])) or (budget is not None and np.isclose(k[2], budget)))]
            if hit:
                row.update(stats.loc[hit[0]].to_dict())
            row["paper_avg"] = _paper_avg(paper, 4, setting, method, budget)
            rows.append(row)
    return _complete(pd.DataFrame(rows), benchmarks)


def _complete(t: pd.DataFrame, benchmarks) -> pd.DataFrame:
    cols = ["setting", "method", "budget"] + [f"{b}_{s}" for b in benchmarks for s in ("mean", "std", "n")] + ["avg", "paper_avg"]
    for c in cols:
        if c not in t.columns:
            t[c] = np.nan
    return t[cols]


def _cell(mean, std, n, seeds: int) -> str:
    if pd.isna(mean):
        return MISSING
    s = f"{mean:.2f}" + (f" ± {std:.2f}" if not pd.isna(std) else "")
    return s if pd.isna(n) or int(n) == seeds else s + f" (n={int(n)})"


def _num(x) -> str:
    return MISSING if pd.isna(x) else f"{x:.2f}"


def to_markdown(t: pd.DataFrame, benchmarks, seeds: int, title: str, with_budget: bool) -> str:
    head = ["Method"] + (["ρ"] if with_budget else []) + [BENCHMARK_TITLES[b] for b in benchmarks] + ["Avg.", "Paper Avg."]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, g in t.groupby("setting", sort=False):
        lines.append(f"| *{SETTINGS.get(setting, setting)}* |" + " |" * (len(head) - 1))
        for _, r in g.iterrows():
            cells = [METHOD_TITLES.get(r["method"], r["method"])]
            if with_budget:
                budget = {"full": "100 %", "base": "n/a"}.get(r["method"], MISSING)
                cells.append(budget if pd.isna(r["budget"]) else f"{100 * r['budget']:g} %")
            cells += [_cell(r[f"{b}_mean"], r[f"{b}_std"], r[f"{b}_n"], seeds) for b in benchmarks]
            cells += [_num(r["avg"]), _num(r["paper_avg"])]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Entries: mean ± std (ddof 1) over evaluation seeds, in %; (n=k) marks a cell with k ≠ {seeds} seeds. "
              f"Avg. = mean of the {len(benchmarks)} benchmark means ({MISSING} unless all are present). "
              f"{MISSING} = no result. Paper Avg.: published numbers (recipe/ta_opd/reproduce/paper_results.csv, with sources)."]
    return "\n".join(lines) + "\n"


def budget_curve(t4: pd.DataFrame, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(t4["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        g = t4[t4["setting"] == setting]
        for i, (method, m) in enumerate(g[~g["method"].isin(UNBUDGETED)].groupby("method", sort=False)):
            m = m.sort_values("budget")
            color = f"C{i}"
            ax.plot(100 * m["budget"], m["avg"], "o-", color=color, label=METHOD_TITLES.get(method, method))
            ax.plot(100 * m["budget"], m["paper_avg"], "o", mfc="none", color=color, ms=9)
        for method, style in (("full", "--"), ("base", ":")):
            v = g.loc[g["method"] == method, "avg"]
            if len(v) and not pd.isna(v.iloc[0]):
                ax.axhline(v.iloc[0], ls=style, color="gray", label=METHOD_TITLES[method])
        ax.set_xscale("log")
        ticks = sorted(g["budget"].dropna().unique())
        ax.set_xticks([100 * b for b in ticks], [f"{100 * b:g}" for b in ticks])
        ax.set_xlabel("supervised-token budget ρ (%)")
        ax.set_ylabel("Avg. (%)")
        ax.set_title(SETTINGS.get(setting, setting) + "\n(hollow: paper)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def aggregate(root: str | Path, out: str | Path | None = None, benchmarks=PAPER_BENCHMARKS, seeds: int = 5) -> dict:
    """Write the tables, the long CSV and the budget curve; return {name: path}."""
    benchmarks = check_benchmarks(benchmarks)
    df = load_records(root)
    other = sorted(set(df["benchmark"]) - set(benchmarks))
    if other:
        print(f"[ta-opd] results: not in --benchmarks, left out of the tables: {', '.join(other)}")
        df = df[df["benchmark"].isin(benchmarks)]
        if df.empty:
            raise TAInputError(f"no records for benchmarks {list(benchmarks)} under {str(root)!r}")
    out = Path(out) if out is not None else Path(root) / "aggregate"
    out.mkdir(parents=True, exist_ok=True)
    written = {"results_long": out / "results_long.csv"}
    df.drop(columns=["file"], errors="ignore").to_csv(written["results_long"], index=False)
    t3 = table3(df, benchmarks)
    t3.to_csv(out / "table3.csv", index=False)
    (out / "table3.md").write_text(to_markdown(t3, benchmarks, seeds, f"Table 3: ρ = {TABLE3_BUDGET:.0%}", False))
    written.update(table3_csv=out / "table3.csv", table3_md=out / "table3.md")
    budgeted = df[~df["method"].isin(UNBUDGETED)]
    if any(g["budget"].nunique() > 1 or s in TABLE4_SETTINGS for s, g in budgeted.groupby("setting")):
        t4 = table4(df, benchmarks)
        t4.to_csv(out / "table4.csv", index=False)
        (out / "table4.md").write_text(to_markdown(t4, benchmarks, seeds, "Table 4: budget sweep", True))
        budget_curve(t4, out / "budget_curve.png")
        written.update(table4_csv=out / "table4.csv", table4_md=out / "table4.md", budget_curve=out / "budget_curve.png")
    else:
        print("[ta-opd] results: no setting has budgeted runs at more than one rho; Table 4 not written")
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Table 3 / Table 4 of the paper from result files")
    p.add_argument("root", help="folder with result records (the --out of python -m recipe.ta_opd.reproduce.evaluate)")
    p.add_argument("--out", help="output folder (default ROOT/aggregate)")
    p.add_argument("--benchmarks", nargs="+", default=list(PAPER_BENCHMARKS),
                   help=f"table columns (default the paper's: {' '.join(PAPER_BENCHMARKS)})")
    p.add_argument("--seeds", type=int, default=5, help="expected evaluation seeds per cell (others are marked)")
    a = p.parse_args(argv)
    try:
        written = aggregate(a.root, a.out, a.benchmarks, a.seeds)
    except (TAConfigError, TAInputError, FileNotFoundError) as e:
        print(f"[ta-opd] error: {e}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"[ta-opd] wrote {name}: {path}")
    md = Path(written["table3_md"]).read_text()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
