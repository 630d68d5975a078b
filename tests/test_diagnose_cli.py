"""The diagnostic end to end on the tiny toy pair, batch invariance of bank scoring, bad input."""

import numpy as np
import pandas as pd
import pytest

from ta_opd.tools.diagnose import bank
from ta_opd.tools.diagnose.__main__ import cli
from ta_opd.tools.diagnose.scoring import score_bank
from tests.test_cpu_backend import run_config


@pytest.fixture(scope="module")
def trained(tiny_pair, tmp_path_factory):
    """A 2-step CPU run that writes its rollouts as a context bank."""
    from recipe.ta_opd.cpu.trainer import CPUTrainer

    _, pair = tiny_pair
    out = tmp_path_factory.mktemp("run")
    CPUTrainer(run_config(pair, out, total_steps=2, rollout_dir=str(out / "rollouts")), log=lambda *_: None).fit()
    return pair, out


def test_cli_end_to_end_on_cpu_run_bank(trained, tmp_path):
    pair, run = trained
    bk = bank.load(run / "rollouts")  # a folder of per-step files
    assert len(bk) == 2 * 4 * 2 and set(bank.COLUMNS) <= set(bk.columns)
    rc = cli(["--theta0", str(pair.student), "--theta-tau", str(run / "checkpoints/global_step_2/actor"),
              "--teacher", str(pair.teacher), "--bank", str(run / "rollouts"), "--out", str(tmp_path),
              "--ks", "4", "8", "--n-boot", "50", "--max-tokens", "12"])
    assert rc == 0
    for name in ("positions.parquet", "regression.csv", "q3_contrasts.csv", "buckets.csv", "selectors.csv",
                 "summary.md", "plane.png", "coefficients.png", "buckets.png"):
        assert (tmp_path / name).exists(), name
    pos = pd.read_parquet(tmp_path / "positions.parquet")
    assert len(pos) == sum(min(len(r), 12) for r in bk["response_ids"])
    reg = pd.read_csv(tmp_path / "regression.csv")
    assert set(reg.spec) == {"base", "base+C", "decomposed"} and set(reg.K) == {4, 8}
    assert {"DL", "DI", "DL-DI"} <= set(reg[reg.spec == "decomposed"].predictor)
    sel = pd.read_csv(tmp_path / "selectors.csv")
    n = len(pos)
    assert (sel[sel.selector == "teachability"].kept.to_numpy() == [np.ceil(b * n - 1e-9) for b in (0.03, 0.05, 0.10)]).all()


def test_scoring_in_batches_equals_single_pass(trained):
    from transformers import AutoModelForCausalLM

    pair, run = trained
    bk = bank.load(run / "rollouts")
    s0 = AutoModelForCausalLM.from_pretrained(pair.student)
    st = AutoModelForCausalLM.from_pretrained(run / "checkpoints/global_step_2/actor")
    t = AutoModelForCausalLM.from_pretrained(pair.teacher)
    one = score_bank(bk, s0, st, t, ks=(4,), batch_size=64)
    many = score_bank(bk, s0, st, t, ks=(4,), batch_size=3, chunk_size=2)
    for col in one.columns:
        if one[col].dtype.kind == "f":
            np.testing.assert_allclose(one[col], many[col], rtol=1e-4, atol=1e-5, err_msg=col)
        else:
            assert (one[col].to_numpy() == many[col].to_numpy()).all(), col


def test_bad_inputs(trained, tmp_path, capsys):
    pair, run = trained
    base = ["--theta0", str(pair.student), "--teacher", str(pair.teacher), "--out", str(tmp_path), "--n-boot", "10"]
    assert cli([*base, "--theta-tau", "/no/such/ckpt", "--bank", str(run / "rollouts")]) == 2
    assert "--theta-tau=/no/such/ckpt does not exist" in capsys.readouterr().err
    bk = bank.load(run / "rollouts")
    bk.iloc[:0].to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="is empty"):
        bank.load(tmp_path / "empty.parquet")
    bk.drop(columns=["prompt_ids"]).to_parquet(tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['prompt_ids'\]"):
        bank.load(tmp_path / "nocol.parquet")
    big = bk.copy()
    big.at[0, "response_ids"] = [5000]
    from transformers import AutoModelForCausalLM

    s0 = AutoModelForCausalLM.from_pretrained(pair.student)
    with pytest.raises(ValueError, match="different vocabularies"):
        score_bank(big, s0, s0, s0, ks=(4,))
    from ta_opd.tools.toy.models import STUDENT_ARCH, build_model
    from ta_opd.tools.toy.tokenizer import build_tokenizer

    other = build_model(build_tokenizer(), STUDENT_ARCH, 0)
    other.resize_token_embeddings(500)
    with pytest.raises(ValueError, match="different vocabularies"):
        score_bank(bk, s0, other, s0, ks=(4,))
