"""``python -m ta_opd.tools.diagnose``: the fixed-context diagnostic on your teacher–student pair.

    python -m ta_opd.tools.diagnose --theta0 STUDENT --theta-tau CHECKPOINT --teacher TEACHER \\
        (--bank bank.parquet | --prompts prompts.parquet [--responses-per-prompt 1]) --out DIR

Writes DIR/positions.parquet, regression.csv, q3_contrasts.csv, buckets.csv, selectors.csv,
summary.md and plane.png, coefficients.png, q3.png, buckets.png (and bank.parquet when sampled).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def _model(path: str, flag: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{flag}={path} does not exist")
    if not (p / "config.json").is_file():
        raise ValueError(f"{flag}={path} is not a Hugging Face model folder: it has no config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:  # config.json not JSON, unknown model_type, missing weights
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{flag}={path} cannot be loaded as a Hugging Face model ({type(e).__name__}: {first})") from None
    return model.to(device).eval()


def check_tokenizers(tok, other_paths: dict[str, str], models: dict) -> int:
    """θτ's and the teacher's tokenizers must equal θ0's id by id (logit padding rows are fine:
    ``ta_opd.vocab.shared_vocab_size``); returns the shared vocabulary V. A folder without a
    tokenizer (e.g. a bare checkpoint) is compared by logit width only, and says so."""
    from transformers import AutoTokenizer

    from ta_opd.vocab import shared_vocab_size

    widths = {k: m.config.vocab_size for k, m in models.items()}
    V = len(tok)
    for flag, path in other_paths.items():
        try:
            other = AutoTokenizer.from_pretrained(Path(path).expanduser())
        except (OSError, ValueError):
            print(f"[ta-opd diagnose] {flag}={path} has no tokenizer: assuming --theta0's")
            continue
        V = shared_vocab_size(tok.get_vocab(), other.get_vocab(), student_logits=widths["--theta0"],
                              teacher_logits=widths[flag])
    for flag, w in widths.items():
        if w < V:
            raise ValueError(f"{flag} has {w} logits, fewer than the tokenizer's {V} tokens")
    return V


def check_args(a) -> None:
    """Numeric flags in range before any model is loaded (ValueError -> ``error:`` line, exit 2)."""
    for flag in ("responses_per_prompt", "max_responses", "max_tokens", "n_boot"):
        v = getattr(a, flag)
        if v < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={v} is not allowed; it must be an integer >= 1")
    if any(k < 1 for k in a.ks):
        raise ValueError(f"--ks={a.ks} is not allowed; every K must be an integer >= 1")
    if any(not (0 < b <= 1) for b in a.budgets):
        raise ValueError(f"--budgets={a.budgets} is not allowed; every budget must be in (0, 1]")
    if a.seed < 0:
        raise ValueError(f"--seed={a.seed} is not allowed; it must be an integer >= 0")
    if a.winsorize is not None and not (0 <= a.winsorize < 0.5):
        raise ValueError(f"--winsorize={a.winsorize} is not allowed; it must be in [0, 0.5)")


def main(argv=None) -> int:
    import pandas as pd
    from transformers import AutoTokenizer

    from ta_opd.tools.diagnose import analysis, bank, report
    from ta_opd.tools.diagnose.scoring import score_bank

    p = argparse.ArgumentParser(description="TA-OPD fixed-context diagnostic")
    p.add_argument("--theta0", required=True, help="initial student (Hugging Face folder)")
    p.add_argument("--theta-tau", required=True, help="trained student checkpoint (Hugging Face folder)")
    p.add_argument("--teacher", required=True, help="teacher (Hugging Face folder)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bank", help="context bank parquet (schema: ta_opd/tools/diagnose/bank.py)")
    src.add_argument("--prompts", help="verl-layout prompt parquet: sample a bank from θ0")
    p.add_argument("--responses-per-prompt", type=int, default=1)
    p.add_argument("--max-responses", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=192, help="response tokens scored per response")
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.03, 0.05, 0.10])
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--winsorize", type=float, default=None, help="clip the gain to its [q, 1-q] quantiles")
    p.add_argument("--relative-gain", action="store_true", help="use (KL0 - KLτ) / KL0 (the authors' variant)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    check_args(a)
    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    theta0 = _model(a.theta0, "--theta0", a.device)
    tau = _model(a.theta_tau, "--theta-tau", a.device)
    teacher = _model(a.teacher, "--teacher", a.device)
    tok = AutoTokenizer.from_pretrained(Path(a.theta0).expanduser())
    vocab_size = check_tokenizers(tok, {"--theta-tau": a.theta_tau, "--teacher": a.teacher},
                                  {"--theta0": theta0, "--theta-tau": tau, "--teacher": teacher})
    if a.bank:
        bk = bank.load(a.bank)
    else:
        src = Path(a.prompts).expanduser()
        if not src.exists():
            raise FileNotFoundError(f"--prompts={a.prompts} does not exist")
        rows = pd.read_parquet(src).to_dict("records")[: a.max_responses]
        if not rows or "prompt" not in rows[0]:
            raise ValueError(f"--prompts={a.prompts} must be a non-empty verl-layout parquet with a 'prompt' column")
        for r in rows:
            r["prompt"] = [dict(m) for m in r["prompt"]]
            r["extra_info"] = dict(r["extra_info"]) if r.get("extra_info") is not None else {}
            r["reward_model"] = dict(r["reward_model"]) if r.get("reward_model") is not None else {}
        bk = bank.sample_bank(theta0, tok, rows, responses_per_prompt=a.responses_per_prompt,
                              max_response_tokens=a.max_tokens, seed=a.seed)
        bk.to_parquet(out / "bank.parquet")
    df = score_bank(bk, theta0, tau, teacher, ks=tuple(a.ks), max_responses=a.max_responses,
                    max_tokens=a.max_tokens, pad_id=tok.pad_token_id or 0, device=a.device, vocab_size=vocab_size)
    if a.relative_gain:
        undefined = int(df["gain_rel"].isna().sum())
        if undefined:
            print(f"[ta-opd diagnose] --relative-gain: dropping {undefined} position(s) with KL(p_T||p_θ0) = 0, "
                  "where the relative gain is undefined")
            df = df[df["gain_rel"].notna()].reset_index(drop=True)
        df["gain"] = df["gain_rel"]
    df.to_parquet(out / "positions.parquet")
    reg = analysis.regressions(df, a.ks, n_boot=a.n_boot, seed=a.seed, winsor=a.winsorize)
    q3 = analysis.q3_contrasts(df, a.ks, n_boot=a.n_boot, seed=a.seed)
    k_main = 16 if 16 in a.ks else a.ks[0]
    bk_tab = analysis.buckets(df, k_main)
    sel = analysis.selector_check(df, k_main, tuple(a.budgets), seed=a.seed)
    for name, t in (("regression", reg), ("q3_contrasts", q3), ("buckets", bk_tab), ("selectors", sel)):
        t.to_csv(out / f"{name}.csv", index=False)
    report.plane(df, k_main, out / "plane.png")
    report.coefficients(reg, out / "coefficients.png")
    if len(q3):
        report.q3_bars(q3, out / "q3.png")
    report.bucket_lines(bk_tab, out / "buckets.png")
    md = report.markdown(reg, q3, sel, len(df), df["prompt_id"].nunique())
    (out / "summary.md").write_text(md)
    print(md)
    print(f"[ta-opd diagnose] wrote {out} in {time.time() - t0:.0f} s")
    return 0


def cli(argv=None) -> int:
    try:
        return main(argv)
    except (FileNotFoundError, ValueError) as e:
        import sys

        print(f"[ta-opd diagnose] error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(cli())
