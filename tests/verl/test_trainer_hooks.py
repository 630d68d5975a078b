"""The trainer's overridden hooks on CPU: ``_compute_old_log_prob`` (teacher worker group, then the
statistics forward) and ``_update_actor`` (whole-batch selection, mask ANDed into response_mask,
verl's update, mask restored, TA metrics). The worker groups are stand-ins that run the same
registered loss through verl's batch plumbing (``engine_sim``) on local tiny models, because verl's
FSDP engine needs CUDA; everything on the driver side is the real trainer code."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from verl import DataProto
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass

from recipe.ta_opd.main import ta_config
from recipe.ta_opd.verl_backend import fields as F
from recipe.ta_opd.verl_backend.losses import make_actor_loss, update_flags
from recipe.ta_opd.verl_backend.teacher import TeacherWorkerConfig, compute_teacher_fields
from recipe.ta_opd.verl_backend.trainer import TAOPDRayTrainer, VerlSettings
from recipe.ta_opd.verl_backend.validate import plan
from ta_opd.losses import LossInputs, compute_loss
from ta_opd.stats import PositionStats
from tests.verl.engine_sim import forward_backward
from tests.verl.helpers import VOCAB, rollout_batch
from tests.verl.test_configs import RECIPE_DIR


class FakeTeacherGroup:
    def __init__(self, model, cfg):
        self.model, self.cfg = model, cfg

    def compute_teacher(self, data: DataProto) -> DataProto:
        return DataProto.from_dict(tensors=compute_teacher_fields(self.model, dict(data.batch.items()), self.cfg))


class FakeActorGroup:
    """Runs what ActorRolloutRefWorker runs per call, with our loss wrapper installed."""

    def __init__(self, model, loss_fn, loss_mode):
        self.model, self.loss_fn, self.loss_mode, self.seen = model, loss_fn, loss_mode, {}

    def compute_log_prob(self, td):
        tu.assign_non_tensor(td, use_dynamic_bsz=False, micro_batch_size_per_gpu=2)
        out, _ = forward_backward(self.model, td, self.loss_fn, forward_only=True)
        return tu.get_tensordict(tensor_dict=out["model_output"], non_tensor_dict={"metrics": {"mfu": 0.0}})

    def update_actor(self, td):
        tu.assign_non_tensor(td, **update_flags(self.loss_mode))  # as TAOPDActorRolloutRefWorker.update_actor
        self.seen["response_mask"] = td["response_mask"].clone()
        self.seen["keys"] = set(td.keys())
        tu.assign_non_tensor(td, use_dynamic_bsz=False, micro_batch_size_per_gpu=2)
        self.model.zero_grad()
        _, loss = forward_backward(self.model, td, self.loss_fn, forward_only=False)
        self.seen["loss"] = loss
        return tu.get_tensordict(tensor_dict={}, non_tensor_dict={"metrics": {"mfu": 0.0, "loss": float(loss)}})


def teacher_cfg(models, p) -> TeacherWorkerConfig:
    return TeacherWorkerConfig(**{**p.teacher_worker, "model_path": models["teacher_path"], "param_dtype": "float32"})


def make_trainer(models, *overrides):
    with initialize_config_dir(config_dir=RECIPE_DIR, version_base=None):
        cfg = compose("ta_opd_trainer", overrides=["ta_opd.teacher_topk=12", "ta_opd.topk=4", "data.train_batch_size=2",
                                                   "actor_rollout_ref.rollout.n=4", "trainer.n_gpus_per_node=4",
                                                   "ta_opd.teacher.n_gpus_per_node=2",
                                                   *overrides])
    ta = ta_config(cfg.ta_opd)
    p = plan(cfg, ta, student_path="s", teacher_path="t", vocab_size=VOCAB)
    trainer = object.__new__(TAOPDRayTrainer)  # the hooks only; init_workers needs GPUs
    trainer.config, trainer.ta_cfg, trainer.global_steps, trainer._ta_metrics = cfg, ta, 7, {}
    trainer.ta = VerlSettings(teacher_backend=p.teacher_backend, vocab_size=VOCAB, teacher_worker=p.teacher_worker,
                              loss_mode=p.loss_mode, wandb_histogram=False)
    if p.teacher_backend == "fsdp":
        trainer.distillation_config = None  # verl's global switch is off: no vLLM teacher
        trainer.ta_teacher_wg = FakeTeacherGroup(models["teacher"], teacher_cfg(models, p))
        dist = omega_conf_to_dataclass(OmegaConf.create(p.actor_distillation))
    else:  # verl's vLLM teacher: the distillation config is verl's own, built by its trainer
        trainer.distillation_config = dist = omega_conf_to_dataclass(cfg.distillation)
        trainer.ta_teacher_wg = None
    actor_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    trainer.actor_rollout_wg = FakeActorGroup(models["student"], make_actor_loss(actor_cfg, dist, ta, VOCAB), p.loss_mode)
    return trainer, p


def test_hooks_run_the_step_and_restore_the_mask(models):
    trainer, _ = make_trainer(models, "ta_opd.budget=0.25")
    batch = DataProto.from_dict(tensors=rollout_batch(B=8, P=5, R=7, seed=4))
    old, _ = trainer._compute_old_log_prob(batch)
    for k in ("old_log_probs", "entropys", *(F.stat_key(n) for n in PositionStats.SCALARS)):
        assert k in old.batch.keys(), k
    assert F.TEACHER_LOGP in batch.batch.keys()  # the teacher group's fields joined the batch
    batch = batch.union(old)
    full = batch.batch["response_mask"].clone()
    out = trainer._update_actor(batch)
    seen = trainer.actor_rollout_wg.seen
    kept = seen["response_mask"].bool()
    n_valid, n_kept = int(full.sum()), int(kept.sum())
    assert n_kept == -(-n_valid // 4)  # ceil(0.25 |I|) positions, over the whole batch
    assert bool((kept <= full.bool()).all())
    assert torch.equal(batch.batch["response_mask"], full)  # restored for verl's later metrics
    assert F.TEACHER_IDS not in seen["keys"] and F.stat_key("D") not in seen["keys"]  # not shipped to the update
    m = out.meta_info["metrics"]
    assert m["ta_opd/kept_count"] == n_kept and m["ta_opd/valid_count"] == n_valid
    for key in ("ta_opd/timing/teacher_s", "ta_opd/timing/stats_forward_s", "ta_opd/timing/select_s",
                "ta_opd/DL/kept_mean", "ta_opd/DI/dropped_mean", "ta_opd/q3/fraction", "ta_opd/missing/fraction",
                "ta_opd/C_bound/max_width", "ta_opd/D/p50", "actor/loss"):
        assert key in m, key
    # the update's loss is ta_opd's pg_opd over exactly the kept positions (on-policy: log π = log π_old)
    b = batch.batch
    inp = LossInputs(mask=kept, log_prob=b["old_log_probs"], old_log_prob=b["old_log_probs"],
                     teacher_log_prob=b[F.TEACHER_LOGP])
    want = compute_loss("pg_opd", inp, clip_low=0.2, clip_high=0.28).loss
    torch.testing.assert_close(seen["loss"], want, atol=1e-5, rtol=1e-4)


def test_rollouts_are_written_as_a_context_bank(models, tmp_path):
    from recipe.ta_opd.verl_backend.bank import bank_records
    from ta_opd.tools.diagnose import bank

    trainer, _ = make_trainer(models)
    raw = rollout_batch(B=4, P=5, R=7, seed=5)
    batch = DataProto.from_dict(tensors=raw, non_tensors={
        "extra_info": [{"index": i // 2} for i in range(4)], "reward_model": [{"ground_truth": "42"}] * 4})
    old, _ = trainer._compute_old_log_prob(batch)
    batch = batch.union(old)
    bank.write_step(tmp_path, 7, bank_records(batch, lambda ids: " ".join(map(str, ids)), 7))
    df = bank.load(tmp_path)
    assert list(df.prompt_id) == ["0", "0", "1", "1"] and set(df.label) == {"42"}
    for j, r in df.iterrows():
        keep = raw["attention_mask"][j, :5].bool()
        n = int(raw["response_mask"][j].sum())
        assert list(r.prompt_ids) == raw["prompts"][j][keep].tolist() and r.prompt_len == int(keep.sum())
        assert list(r.response_ids) == raw["responses"][j, :n].tolist()
        assert list(r.sampled_logp) == batch.batch["old_log_probs"][j, :n].tolist()


def test_wandb_histogram_of_scores_when_a_run_is_active(monkeypatch):
    import sys
    import types

    from recipe.ta_opd.verl_backend.trainer import log_score_histogram

    logged = []
    fake = types.SimpleNamespace(run=None, Histogram=lambda values: ("hist", list(values)),
                                 log=lambda data, step, commit: logged.append((data, step, commit)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log_score_histogram(torch.tensor([0.5, 0.25]), step=3)
    assert logged == []  # W&B off: nothing
    fake.run = object()
    log_score_histogram(torch.tensor([0.5, 0.25]), step=3)
    assert logged == [({"ta_opd/score_hist": ("hist", [0.5, 0.25])}, 3, False)]


def test_vllm_teacher_backend_step(models):
    """teacher.backend=vllm: the top-K' arrives with the rollout (verl's agent loop); the driver
    derives log π_T(y_t), the statistics pass and verl's update (global distillation switch on, a
    top-K loss mode, so verl alone would skip the log-probs the PG loss needs) run the PG loss."""
    trainer, p = make_trainer(models, "ta_opd.teacher.backend=vllm", "ta_opd.budget=0.5")
    assert p.loss_mode == "ta_opd_pg_opd_topk"
    raw = rollout_batch(B=8, P=5, R=7, seed=6)
    shipped = compute_teacher_fields(models["teacher"], raw, teacher_cfg(models, p))
    batch = DataProto.from_dict(tensors={**raw, F.TEACHER_IDS: shipped[F.TEACHER_IDS],
                                         F.TEACHER_LOGPROBS: shipped[F.TEACHER_LOGPROBS]})
    old, _ = trainer._compute_old_log_prob(batch)
    assert "ta_opd/teacher/sampled_missing_fraction" in trainer._ta_metrics
    batch = batch.union(old)
    out = trainer._update_actor(batch)
    seen = trainer.actor_rollout_wg.seen
    kept = seen["response_mask"].bool()
    inp = LossInputs(mask=kept, log_prob=batch.batch["old_log_probs"], old_log_prob=batch.batch["old_log_probs"],
                     teacher_log_prob=batch.batch[F.TEACHER_LOGP])
    torch.testing.assert_close(seen["loss"], compute_loss("pg_opd", inp).loss, atol=1e-5, rtol=1e-4)
    assert out.meta_info["metrics"]["ta_opd/kept_ratio"] == pytest.approx(0.5, abs=0.05)


def test_kept_token_page_from_the_driver_every_test_freq_steps(models, tmp_path):
    """The driver writes ta_opd/tools/kept_tokens.py's page at selection time: the kept marks are the
    mask the update saw, the hover numbers are the actor's statistics and log π_T - log π_old."""
    import re
    from dataclasses import replace
    from html import unescape

    from tests.test_kept_tokens import parse

    trainer, _ = make_trainer(models, "ta_opd.budget=0.25", "trainer.test_freq=7", f"trainer.default_local_dir={tmp_path}",
                              "trainer.experiment_name=hooks")
    trainer.ta = replace(trainer.ta, token_export=True)  # as runner.py builds it from ta_opd.token_export
    trainer.tokenizer = type("Tok", (), {"decode": staticmethod(
        lambda ids, skip_special_tokens: "".join(f"<t{i}>" for i in ids))})()
    raw = rollout_batch(B=8, P=5, R=7, seed=4)
    batch = DataProto.from_dict(tensors=raw)
    old, _ = trainer._compute_old_log_prob(batch)
    batch = batch.union(old)
    stats = {n: batch.batch[F.stat_key(n)].clone() for n in ("D", "C", "H")}
    trainer._update_actor(batch)  # global step 7 = test_freq: the page is due
    kept = trainer.actor_rollout_wg.seen["response_mask"].bool()
    page = (tmp_path / "kept_tokens" / "step_7.html").read_text(encoding="utf-8")
    assert "step 7 · hooks" in page and "ρ = 0.25" in page
    spans = parse(page).spans
    shown = [0, 4, 1, 5]  # one sample per prompt first (rollout.n = 4)
    want = [(j, t) for j in shown for t in range(int(raw["response_mask"][j].sum()))]
    assert len(spans) == len(want)
    adv = batch.batch[F.TEACHER_LOGP] - batch.batch["old_log_probs"]
    for (classes, title, text), (j, t) in zip(spans, want):
        assert text == f"<t{int(raw['responses'][j, t])}>"  # escaped in the page, the token's text here
        assert ("kept" in classes) == bool(kept[j, t])
        got = dict(re.findall(r"(\w+)=(-?[\d.]+)", unescape(title)))
        for name, ref in (("D", stats["D"]), ("C", stats["C"]), ("H", stats["H"]), ("advantage", adv)):
            assert float(got[name]) == pytest.approx(float(ref[j, t]), abs=1e-3), (name, j, t)
    trainer.global_steps = 8  # not a test_freq step and not the last: no page
    batch = DataProto.from_dict(tensors=rollout_batch(B=8, P=5, R=7, seed=4))
    batch = batch.union(trainer._compute_old_log_prob(batch)[0])
    trainer._update_actor(batch)
    assert sorted(p.name for p in (tmp_path / "kept_tokens").iterdir()) == ["step_7.html"]
    # the opt-in token export: every step, one row per valid position
    import pandas as pd

    for step in (7, 8):
        tok = pd.read_parquet(tmp_path / "tokens" / f"step_{step}.parquet")
        assert len(tok) == int(raw["response_mask"].sum()) and set(tok["step"]) == {step}
        assert int(tok["kept"].sum()) == -(-len(tok) // 4)  # ceil(0.25 |I|)
    first = pd.read_parquet(tmp_path / "tokens" / "step_7.parquet")
    assert torch.equal(torch.tensor(first["kept"].to_numpy()), kept[raw["response_mask"].bool()])
    assert list(first["token"][:2]) == [f"<t{int(raw['responses'][0, t])}>" for t in range(2)]
