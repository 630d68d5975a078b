"""TAConfig validation: every bad value names itself and what is allowed."""

import pytest

from ta_opd import TAConfig, TAConfigError


def test_defaults_follow_the_paper():
    cfg = TAConfig()
    assert (cfg.selector, cfg.budget, cfg.topk, cfg.teacher_topk) == ("teachability", 0.10, 16, 64)
    assert (cfg.q_low, cfg.q_high, cfg.eps) == (0.05, 0.95, 1e-8)
    assert (cfg.clip_low, cfg.clip_high, cfg.loss, cfg.loss_agg) == (0.2, 0.28, "pg_opd", "token-mean")
    assert (cfg.compatibility, cfg.entropy, cfg.min_keep_per_sequence) == ("exact", "full", 0)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(budget=0), r"budget=0 .*\(0, 1\]"),
    (dict(budget=1.5), r"budget=1.5 .*\(0, 1\]"),
    (dict(budget=-0.1), r"budget=-0.1"),
    (dict(budget="0.1"), r"budget='0.1'"),
    (dict(budget=float("nan")), r"budget=nan"),
    (dict(topk=0), r"topk=0 .*>= 1"),
    (dict(topk=2.0), r"topk=2.0"),
    (dict(topk=16, teacher_topk=8), r"teacher_topk=8 .*>= topk \(K=16\)"),
    (dict(q_low=0.5, q_high=0.5), r"q_low=0.5 >= q_high=0.5"),
    (dict(q_low=0.9, q_high=0.1), r"q_low=0.9 >= q_high=0.1"),
    (dict(q_high=1.5), r"q_high=1.5 .*\[0, 1\]"),
    (dict(eps=0), r"eps=0"),
    (dict(selector="tip2"), r"selector='tip2' is unknown; valid selectors: full"),
    (dict(compatibility="approx"), r"compatibility='approx' .*exact, lower_bound"),
    (dict(entropy="topk", topk=1, teacher_topk=1), r"entropy='topk' needs topk >= 2"),
    (dict(entropy="renyi"), r"entropy='renyi' .*full, topk"),
    (dict(loss_agg="sum"), r"loss_agg='sum' .*token-mean, seq-mean-token-mean"),
    (dict(loss="kl"), r"loss='kl' is unknown; valid losses: pg_opd"),
    (dict(min_keep_per_sequence=-1), r"min_keep_per_sequence=-1"),
    (dict(seed=-3), r"seed=-3"),
    (dict(clip_low=1.0), r"clip_low=1.0"),
    (dict(clip_high=-0.1), r"clip_high=-0.1"),
    (dict(chunk_size=0), r"chunk_size=0"),
])
def test_bad_values_raise(kwargs, pattern):
    with pytest.raises(TAConfigError, match=pattern):
        TAConfig(**kwargs)


def test_vocab_checks():
    TAConfig(topk=16, teacher_topk=64).check_vocab(151936)
    with pytest.raises(TAConfigError, match="topk=16 .*vocabulary of 16; K must be below V"):
        TAConfig(topk=16, teacher_topk=16).check_vocab(16)
    with pytest.raises(TAConfigError, match="teacher_topk=64 exceeds the vocabulary size 32"):
        TAConfig(topk=16, teacher_topk=64).check_vocab(32)


def test_frozen_and_from_mapping():
    cfg = TAConfig.from_mapping({"selector": "entropy", "budget": 0.05, "topk": 8})
    assert cfg.selector == "entropy" and cfg.to_dict()["topk"] == 8
    with pytest.raises(Exception):
        cfg.budget = 0.2
    with pytest.raises(TAConfigError, match=r"unknown TA-OPD key\(s\) \['budgett'\]"):
        TAConfig.from_mapping({"budgett": 0.1})
