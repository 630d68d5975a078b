"""Every shipped YAML composes against the installed verl and validates; Hydra overrides of rho and
K reach the config; startup validation rejects bad input with clear errors."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from verl.utils.config import omega_conf_to_dataclass

from recipe.ta_opd.main import ta_config
from recipe.ta_opd.verl_backend.validate import model_vocab, plan
from ta_opd.errors import TAConfigError

ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = str(ROOT / "recipe" / "ta_opd" / "config")
CONFIGS = sorted(p.stem for p in (ROOT / "recipe" / "ta_opd" / "config" / "experiment").glob("*.yaml") if p.stem != "paper_base")
QWEN_V = 151936


def compose_from(config_dir, name, *overrides):
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(name, overrides=list(overrides))


def build_verl_dataclasses(cfg, p):
    """What verl builds from the config on the cluster: the actor, the rollout, the distillation
    config seen by the actor and (vLLM teacher) by the trainer."""
    omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    dist = p.actor_distillation if p.actor_distillation is not None else cfg.distillation
    d = omega_conf_to_dataclass(OmegaConf.create(dist) if isinstance(dist, dict) else dist)
    assert d.enabled and d.distillation_loss.loss_mode == p.loss_mode
    assert not d.distillation_loss.use_task_rewards and not d.distillation_loss.use_policy_gradient
    return d


def test_there_are_four_paper_settings():
    assert len(CONFIGS) == 4


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_composes_validates_and_takes_overrides(name, monkeypatch):
    monkeypatch.setenv("TRAIN_FILES", "/data/train.parquet")
    monkeypatch.setenv("VAL_FILES", "/data/val.parquet")
    monkeypatch.setenv("TEACHER_MODEL", "/models/teacher")
    monkeypatch.setenv("STUDENT_MODEL", "/models/student")
    cfg = compose_from(RECIPE_DIR, "ta_opd_trainer", f"+experiment={name}", "ta_opd.budget=0.05", "ta_opd.topk=8")
    ta = ta_config(cfg.ta_opd)
    assert (ta.budget, ta.topk, ta.teacher_topk) == (0.05, 8, 64)
    assert cfg.ta_opd.backend == "verl" and cfg.ta_opd.teacher_model_path == "/models/teacher"
    assert cfg.actor_rollout_ref.model.path == "/models/student"
    actor = cfg.actor_rollout_ref.actor
    assert actor.optim.lr == 1e-6 and actor.optim.lr_scheduler_type == "constant"
    assert actor.ppo_epochs == 1 and actor.ppo_mini_batch_size == cfg.data.train_batch_size  # one step per rollout
    assert cfg.actor_rollout_ref.rollout.temperature == 1.0
    p = plan(cfg, ta, student_path="/models/student", teacher_path="/models/teacher", vocab_size=QWEN_V)
    d = build_verl_dataclasses(cfg, p)
    assert d.distillation_loss.clip_ratio_low == 0.2 and d.distillation_loss.clip_ratio_high == 0.28


@pytest.mark.parametrize("backend", ["fsdp", "vllm"])
def test_recipe_config_plans_both_teacher_backends(backend):
    cfg = compose_from(RECIPE_DIR, "ta_opd_trainer", f"ta_opd.teacher.backend={backend}",
                       "ta_opd.teacher.n_gpus_per_node=4")
    p = plan(cfg, ta_config(cfg.ta_opd), student_path="s", teacher_path="t", vocab_size=QWEN_V)
    d = build_verl_dataclasses(cfg, p)
    assert cfg.distillation.enabled == (backend == "vllm")  # verl's own teacher servers only for vllm
    assert p.loss_mode == {"fsdp": "ta_opd_pg_opd", "vllm": "ta_opd_pg_opd_topk"}[backend]
    assert d.distillation_loss.topk == 64
    assert p.teacher_pool == [4] and p.teacher_worker["vocab_size"] == QWEN_V


@pytest.mark.parametrize("overrides, message", [
    (["ta_opd.teacher.backend=tpu"], "ta_opd.teacher.backend='tpu' is not allowed; choose one of: fsdp, vllm"),
    (["ta_opd.teacher_topk=8"], "teacher_topk=8 is not allowed; K' must be an integer >= topk (K=16)"),
    (["ta_opd.teacher.nnodes=0"], "ta_opd.teacher.nnodes=0 is not allowed; it must be an integer >= 1"),
    (["actor_rollout_ref.model.use_fused_kernels=true"], "use_fused_kernels=true is not supported"),
    (["actor_rollout_ref.model.use_remove_padding=false"], "use_remove_padding=false is not supported"),
    (["actor_rollout_ref.actor.ulysses_sequence_parallel_size=2"], "ulysses_sequence_parallel_size=2 is not supported"),
    (["algorithm.adv_estimator=gae"], "adv_estimator=gae would start a critic"),
    (["ta_opd.teacher.param_dtype=int8"], "ta_opd.teacher.param_dtype='int8' is not allowed"),
    (["ta_opd.teacher.backend=vllm", "ta_opd.teacher.n_gpus_per_node=3"], "is not a multiple of one vLLM teacher replica"),
    (["ta_opd.vocab_mismatch_ok_ids=[-1]"], "ta_opd.vocab_mismatch_ok_ids=[-1] is not allowed"),
])
def test_bad_settings_fail_at_startup_naming_the_value(overrides, message):
    cfg = compose_from(RECIPE_DIR, "ta_opd_trainer", *overrides)
    with pytest.raises(TAConfigError, match=re.escape(message)):
        plan(cfg, ta_config(cfg.ta_opd), student_path="s", teacher_path="t", vocab_size=QWEN_V)


def test_k_must_be_below_the_shared_vocabulary():
    cfg = compose_from(RECIPE_DIR, "ta_opd_trainer", "ta_opd.topk=16", "ta_opd.teacher_topk=16")
    with pytest.raises(TAConfigError, match="topk=16 is not allowed for a vocabulary of 16; K must be below V"):
        plan(cfg, ta_config(cfg.ta_opd), student_path="s", teacher_path="t", vocab_size=16)


def _model_dir(path: Path, logit_rows: int, rename: dict[str, str] | None = None) -> str:
    from transformers import Qwen3Config

    from ta_opd.tools.toy.tokenizer import build_tokenizer

    build_tokenizer().save_pretrained(path)
    if rename:  # edit the saved vocabulary: the same id now maps to another token string
        f = path / "tokenizer.json"
        spec = json.loads(f.read_text())
        vocab = spec["model"]["vocab"]
        for old, new in rename.items():
            vocab[new] = vocab.pop(old)
        f.write_text(json.dumps(spec))
    Qwen3Config(vocab_size=logit_rows, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                num_key_value_heads=1, head_dim=8, intermediate_size=8).save_pretrained(path)
    return str(path)


def test_tokenizer_check_accepts_padding_rows_and_names_a_real_mismatch(tmp_path):
    student = _model_dir(tmp_path / "s", 399)
    teacher = _model_dir(tmp_path / "t", 416)  # 17 padding logit rows
    assert model_vocab(student, teacher) == 399
    other = _model_dir(tmp_path / "o", 399, rename={"<|unused_5|>": "<|other|>"})
    with pytest.raises(TAConfigError, match=r"differ at 1 id\(s\); first: id \d+: student '<\|unused_5\|>' vs teacher '<\|other\|>'"):
        model_vocab(student, other)
    from transformers import AutoTokenizer

    bad_id = AutoTokenizer.from_pretrained(other).convert_tokens_to_ids("<|other|>")
    assert model_vocab(student, other, [bad_id]) == 399  # explicitly accepted by the user


def test_verls_own_config_checks_run_at_startup():
    cfg = compose_from(RECIPE_DIR, "ta_opd_trainer", "actor_rollout_ref.actor.ppo_micro_batch_size=2")
    with pytest.raises(TAConfigError, match=r"verl rejects the configuration: .*ppo_micro_batch_size"):
        plan(cfg, ta_config(cfg.ta_opd), student_path="s", teacher_path="t", vocab_size=QWEN_V)
