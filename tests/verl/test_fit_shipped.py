"""The shipped configuration, executed (issue 22 §1-2): verl's ``fit()`` on CPU with
``recipe/ta_opd/config/experiment/paper_base.yaml``, on a two-node Ray cluster.

The run is ``python -m recipe.ta_opd.main +experiment=paper_base`` plus the overrides below, which
only scale sizes down (:data:`SIZE`), make the substitutions a CPU forces (:data:`CPU`) and point
the run at the test's files, cluster and loggers (in :func:`command`). Everything else comes from the
shipped file, so a change there is tested here: bf16 mixed precision of the actor and of the FSDP
teacher, gradient checkpointing, ``torch.compile`` of verl's entropy,
dynamic batching with token budgets, validation before training and every ``test_freq`` steps,
the teacher on whole nodes out of ``trainer.nnodes`` (ALL nodes), vLLM-sized rollout replicas
(tensor parallel 2), PG-OPD, AdamW at lr 1e-6. :func:`test_differences_from_shipped_are_documented`
composes both configurations and holds every remaining difference to the table in
docs/verl_cpu_fit.md.

The cluster is Ray's own multi-node test facility (``ray.cluster_utils.Cluster``): two nodes of
2 logical GPUs each; verl places the trainer pool (actor ranks + rollout replica and its server)
on one and the teacher pool on the other, with its GPU placement (bundles of 1 GPU + 3 CPUs,
tests/verl/cpu_fit/platform.py). A second run on the same cluster resumes from the step-2
checkpoint; its step 3 equals the uninterrupted step 3.
"""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from recipe.ta_opd.verl_backend import fields as F
from recipe.ta_opd.verl_backend.validate import CPUS_PER_BUNDLE
from tests.verl.cpu_fit.pair import verl_ready_copy
from tests.verl.cpu_fit.setup import RECORD_ENV
from tests.verl.test_fit_cpu import ROOT, Runs, run
from tests.wandb_offline import ENV as WANDB_ENV
from tests.wandb_offline import check_run, read_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

SHIPPED = "paper_base"
STEPS = 3
TEST_FREQ = 2
RHO = 0.05
NODES, GPUS_PER_NODE = 2, 2  # the allocation: trainer.nnodes counts ALL nodes (teacher's included)
TOKEN_BUDGET = 48  # = max_prompt_length + max_response_length: the smallest budget plan() accepts
CPUS_PER_NODE = 8  # >= what check_cluster asks (3 per GPU bundle)
WANDB_GROUP = "fit_shipped_sweep"

# sizes only: models (the toy pair, set in command()), lengths, batch, token budgets, step counts,
# pools, process counts
SIZE = {
    "data.train_batch_size": 4,
    "data.max_prompt_length": 32,
    "data.max_response_length": 16,
    "data.dataloader_num_workers": 0,
    "actor_rollout_ref.rollout.n": 4,
    "actor_rollout_ref.actor.ppo_max_token_len_per_gpu": TOKEN_BUDGET,
    "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu": TOKEN_BUDGET,
    "actor_rollout_ref.rollout.agent.num_workers": 2,
    "reward.num_workers": 1,
    "ta_opd.teacher.nnodes": 1,
    "ta_opd.teacher.n_gpus_per_node": GPUS_PER_NODE,
    "trainer.nnodes": NODES,
    "trainer.n_gpus_per_node": GPUS_PER_NODE,
    "trainer.total_training_steps": STEPS,
    "trainer.save_freq": 2,
    "trainer.test_freq": TEST_FREQ,
    # the budget (5 %): with these sizes some micro-batches keep nothing
    "ta_opd.budget": RHO,
}
# what a CPU forces (docs/verl_cpu_fit.md, "Where verl 0.9.1 stops on a CPU")
CPU = {
    "actor_rollout_ref.rollout.name": "ta_opd_hf_cpu",
    "+actor_rollout_ref.model.override_config.attn_implementation": "sdpa",
    # verl builds FSDP1 with sync_module_states=True (transformer_impl.py:444), which torch refuses for
    # CPU parameters (torch/distributed/fsdp/_init_utils.py:1170-1180)
    "actor_rollout_ref.actor.strategy": "fsdp2",
}


def command(student: str, teacher: str, data: Path, out: Path, address: str) -> list[str]:
    test = {  # the test's own files, loggers and cluster
        "actor_rollout_ref.model.path": student,
        "ta_opd.teacher_model_path": teacher,
        "data.train_files": data / "train.parquet",
        "data.val_files": data / "val.parquet",
        # the CPU rollout seeds each request by its id: "det-<i>" makes resume = uninterrupted
        "actor_rollout_ref.rollout.full_determinism": "true",
        # W&B in offline mode (read back by test_wandb_offline_run), beside verl's file tracker
        "trainer.logger": "[console,file,wandb]",
        "ta_opd.wandb_group": WANDB_GROUP,
        "trainer.default_local_dir": out / "ckpt",
        "+ray_kwargs.ray_init.address": address,
        # the cluster was started by the test: its workers see the recorders' and W&B's settings only
        # through this
        "+ray_kwargs.ray_init.runtime_env.env_vars":
            f"{{{RECORD_ENV}:'{out / 'record'}',VERL_FILE_LOGGER_PATH:'{out / 'metrics.jsonl'}',"
            + "".join(f"{k}:'{v}'," for k, v in WANDB_ENV.items()) + f"WANDB_DIR:'{out}'}}",
    }
    return [sys.executable, "-m", "recipe.ta_opd.main", f"+experiment={SHIPPED}"] + [
        f"{k}={v}" for k, v in {**SIZE, **CPU, **test}.items()]


def compose(overrides: list[str]):
    """The configuration ``python -m recipe.ta_opd.main <overrides>`` composes (unresolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "recipe/ta_opd/config"), version_base=None):
            return hydra_compose("ta_opd_trainer", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _flat(node, prefix: str = "") -> dict:
    from omegaconf import OmegaConf

    out = {}
    for key in node:
        value = node._get_node(key)
        path = f"{prefix}{key}"
        if OmegaConf.is_dict(value):
            out.update(_flat(value, path + "."))
        else:
            out[path] = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value._value()
    return out


def documented_differences() -> dict[str, str]:
    """The table of docs/verl_cpu_fit.md's section on the shipped run: key (a trailing ``.*`` covers
    the keys below it) -> reason."""
    text = (ROOT / "docs/verl_cpu_fit.md").read_text()
    section = text.split("## Differences from the shipped configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 4:
            rows[cells[0].strip("`")] = cells[-1]
    return rows


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes on this machine, 2 logical GPUs each (Ray's own multi-node test facility)."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False,
                head_node_args=dict(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE, include_dashboard=False))
    try:
        c.add_node(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
        c.wait_for_nodes()
        yield c
    finally:
        c.shutdown()


@pytest.fixture(scope="module")
def runs(tiny_pair, tmp_path_factory, cluster) -> Runs:
    root = tmp_path_factory.mktemp("cpu_fit_shipped")
    _, pair = tiny_pair
    student = verl_ready_copy(pair.student, root / "student")
    teacher = verl_ready_copy(pair.teacher, root / "teacher")
    data = Path(pair.train_file).parent
    full, resumed = root / "full", root / "resumed"
    full.mkdir()
    run(command(student, teacher, data, full, cluster.address), full)
    (resumed / "ckpt").mkdir(parents=True)
    shutil.copytree(full / "ckpt" / "global_step_2", resumed / "ckpt" / "global_step_2")
    (resumed / "ckpt" / "latest_checkpointed_iteration.txt").write_text("2")
    run(command(student, teacher, data, resumed, cluster.address), resumed)
    return Runs(full, resumed, student, teacher)


def test_placement_two_nodes(runs):
    """Trainer pool (both actor ranks and the rollout server) on one node, teacher pool on the other."""
    p = Runs.step(runs.full, 1)["placement"]
    assert len(p["cluster"]) == NODES
    assert len(p["actor"]) == len(p["teacher"]) == GPUS_PER_NODE and len(p["servers"]) == 1
    assert len(set(p["actor"])) == 1 and len(set(p["teacher"])) == 1
    assert set(p["actor"]) != set(p["teacher"])
    assert p["servers"] == p["actor"][:1]  # the replica's server sits on its workers' node
    assert all(res.get("GPU") == GPUS_PER_NODE and res.get("CPU") == CPUS_PER_NODE for res in p["cluster"].values())
    # CPUs held as verl places its actors (what check_cluster counts): 3 per GPU bundle (each rank holds
    # one, num_gpus=1/3); the task runner (plain ray.remote, as verl's), rollout server, agent-loop and
    # reward workers hold none
    free = p["available"]
    assert sum(f["GPU"] for f in free.values()) == 0
    held = NODES * CPUS_PER_BUNDLE * GPUS_PER_NODE
    assert sum(f["CPU"] for f in free.values()) == NODES * CPUS_PER_NODE - held


def test_shipped_engine_settings_ran(runs):
    """verl's FSDP engine (FSDP2: FSDP1 cannot run on CPU, docs/verl_cpu_fit.md) with bf16 autocast,
    gradient checkpointing and compiled entropy."""
    for rank in (0, 1):
        e = Runs.actor(runs.full, rank, 1)["engine"]
        assert not e["fsdp1"] and e["autocast_dtype"] == "torch.bfloat16" and e["gradient_checkpointing"]
        assert e["param_dtypes"] == ["torch.float32"]  # fp32 master weights, bf16 compute
        assert e["entropy_compiled"]  # use_torch_compile: verl's entropy through torch.compile (inductor on CPU)


def test_validation_before_training_and_at_test_freq(runs):
    logged = Runs.logged(runs.full)
    val_steps = sorted(k for k, m in logged.items() if any(key.startswith("val-core/") for key in m))
    assert val_steps == [0, TEST_FREQ, STEPS]  # before training, every test_freq, and the last step
    assert sorted(k for k in logged if k > 0) == list(range(1, STEPS + 1))


def test_dynamic_micro_batches_of_unequal_token_counts(runs):
    """Every rank's update ran in several verl micro-batches under the token budget that together
    hold exactly the rank's share (kept positions included); in every step some rank's micro-batches
    differ in token count, and every rank's do in some step."""
    unequal = {0: False, 1: False}
    for k in range(1, STEPS + 1):
        step_unequal = False
        for rank in (0, 1):
            a = Runs.actor(runs.full, rank, k)
            toks = a["tokens_per_micro_batch"]
            assert len(toks) >= 2 and max(toks) <= TOKEN_BUDGET and sum(toks) == a["tokens"], toks
            assert sum(a["kept_per_micro_batch"]) == sum(a["kept_per_sequence"])
            step_unequal |= len(set(toks)) > 1
            unequal[rank] |= len(set(toks)) > 1
        assert step_unequal, k
    assert all(unequal.values())


def test_kept_count_and_empty_micro_batches(runs):
    empty = False
    for k in range(1, STEPS + 1):
        r = Runs.step(runs.full, k)
        valid, kept = r["batch"]["response_mask"].bool(), r["kept"].bool()
        assert bool((kept <= valid).all())
        assert int(kept.sum()) == math.ceil(RHO * int(valid.sum())) == int(r["metrics"]["ta_opd/kept_count"])
        assert kept.shape[0] == SIZE["data.train_batch_size"] * SIZE["actor_rollout_ref.rollout.n"]
        empty |= any(0 in Runs.actor(runs.full, rank, k)["kept_per_micro_batch"] for rank in (0, 1))
    assert empty


def test_steps_logged_and_rollout_matches_actor(runs):
    logged = Runs.logged(runs.full)
    for k in range(1, STEPS + 1):
        m = logged[k]
        for key in ("ta_opd/kept_count", "actor/ta_opd/loss/sampled_kl", "actor/grad_norm",
                    "global_seqlen/balanced_max"):
            assert key in m, (k, key)
        # the server samples with the actor's weights; the actor scores in bf16 (the rollout in fp32)
        assert m["training/rollout_probs_diff_max"] < 1e-2
        assert math.isfinite(m["actor/grad_norm"]) and m["actor/grad_norm"] > 0
    for k in (2, 3):
        assert (runs.full / "ckpt" / f"global_step_{k}" / "actor").is_dir()
    trained = sorted(k for k, m in Runs.logged(runs.resumed).items() if "actor/loss" in m)
    assert trained == [3]  # the resumed run validated at step 2 (val_before_train), then trained step 3


def test_resumed_run_equals_uninterrupted(runs):
    a, b = Runs.step(runs.full, 3), Runs.step(runs.resumed, 3)
    assert torch.equal(a["batch"]["responses"], b["batch"]["responses"])
    assert torch.equal(a["kept"], b["kept"])
    for key in ("old_log_probs", F.TEACHER_LOGP, F.stat_key("D")):
        torch.testing.assert_close(a["batch"][key], b["batch"][key], atol=1e-6, rtol=0, msg=key)
    la, lb = Runs.logged(runs.full)[3], Runs.logged(runs.resumed)[3]
    for key in ("actor/loss", "actor/grad_norm", "actor/ta_opd/loss/sampled_kl", "ta_opd/D/mean"):
        assert la[key] == pytest.approx(lb[key], rel=1e-5, abs=1e-7), key
    ga, gb = Runs.actor(runs.full, 0, 3)["grads"], Runs.actor(runs.resumed, 0, 1)["grads"]
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=1e-6, rtol=1e-4, msg=name)


def _wandb_run(runs):
    """The full run's offline W&B run, its composed config and TAConfig."""
    from recipe.ta_opd.main import ta_config

    wb = read_run(runs.full)
    data = Path(wb.config["data"]["train_files"]).parent  # the run's data: part of its default name
    cfg = compose(command(runs.student, runs.teacher, data, runs.full, "127.0.0.1:1")[3:])
    return wb, cfg, ta_config(cfg.ta_opd)


def test_wandb_offline_run(runs):
    """verl's ``Tracking`` with ``trainer.logger=[...,wandb]`` in W&B offline mode, read back: named after
    the experiment, in the ``ta_opd.wandb_group`` group, the config with ρ, K and the pair; every
    training step before the last exactly the ``ta_opd/*`` names ``recipe/ta_opd/logged.py`` lists for
    the verl backend (the same list the CPU backend's test uses, built from the same core), equal to
    what verl's file tracker logged, the score histogram, the kept-token page at test_freq, verl's own
    metrics the dashboard shows. (The last step: :func:`test_wandb_offline_run_last_step_and_finish`.)"""
    import re

    from recipe.ta_opd import logged
    from recipe.ta_opd.naming import run_name

    wb, cfg, ta = _wandb_run(runs)
    assert (wb.run.project, wb.run.run_group) == (cfg.trainer.project_name, WANDB_GROUP)
    assert wb.run.display_name == wb.config["trainer"]["experiment_name"] == run_name(cfg, ta)
    conf = wb.config
    assert conf["ta_opd"]["budget"] == RHO and conf["ta_opd"]["topk"] == ta.topk
    assert (conf["actor_rollout_ref"]["model"]["path"], conf["ta_opd"]["teacher_model_path"]) == (runs.student,
                                                                                                 runs.teacher)
    expected = logged.step_metrics("verl", ta, teacher_backend=cfg.ta_opd.teacher.backend)
    steps = list(range(1, STEPS))
    check_run(wb, steps=steps, expected=expected, page_steps=[TEST_FREQ], finished=False)
    file_log = Runs.logged(runs.full)
    for k in steps:
        for key in expected:
            assert wb.history[k][key] == pytest.approx(file_log[k][key], rel=1e-6, abs=1e-9, nan_ok=True), (k, key)
        assert all(key in wb.history[k] for key in logged.VERL_OWN), (k, set(logged.VERL_OWN) - set(wb.history[k]))
    val = [k for k in wb.history[TEST_FREQ] if re.fullmatch(logged.VERL_VAL_ACCURACY, k)]
    assert val, sorted(wb.history[TEST_FREQ])  # the dashboard's verl accuracy panel finds its metric


def test_wandb_offline_run_last_step_and_finish(runs):
    from recipe.ta_opd import logged

    wb, cfg, ta = _wandb_run(runs)
    expected = logged.step_metrics("verl", ta, teacher_backend=cfg.ta_opd.teacher.backend)
    check_run(wb, steps=[STEPS], expected=expected, page_steps=[STEPS])


def test_differences_from_shipped_are_documented(tmp_path):
    """Composing the test's command and the shipped file alone: every key that differs is in the
    table of docs/verl_cpu_fit.md (with its reason), and every key in the table differs."""
    shipped = ["+experiment=" + SHIPPED]
    cmd = command("/student", "/teacher", tmp_path, tmp_path, "127.0.0.1:1")
    overrides = cmd[cmd.index(f"+experiment={SHIPPED}"):]
    base, ours = _flat(compose(shipped)), _flat(compose(overrides))
    differ = {k for k in base.keys() | ours.keys() if base.get(k, "<absent>") != ours.get(k, "<absent>")}
    doc = documented_differences()
    assert doc and all(reason for reason in doc.values())

    def documented(key: str) -> str | None:
        return next((d for d in doc if d == key or (d.endswith(".*") and key.startswith(d[:-1]))), None)

    assert sorted(k for k in differ if documented(k) is None) == []  # undocumented differences
    assert sorted(d for d in doc if not any(documented(k) == d for k in differ)) == []  # stale rows
    # what the run keeps from the shipped file (not overridden): spot checks of the list
    for key in ("actor_rollout_ref.model.enable_gradient_checkpointing", "actor_rollout_ref.actor.use_dynamic_bsz",
                "trainer.val_before_train", "actor_rollout_ref.actor.optim.lr", "ta_opd.teacher.param_dtype",
                "actor_rollout_ref.rollout.tensor_model_parallel_size", "ta_opd.selector", "ta_opd.loss"):
        assert key not in differ and ours[key] == base[key], key
    assert ours["actor_rollout_ref.actor.use_dynamic_bsz"] is True and ours["trainer.val_before_train"] is True
    assert ours["ta_opd.teacher.param_dtype"] == "bfloat16" and ours["actor_rollout_ref.rollout.n"] >= 4
    assert "actor_rollout_ref.actor.fsdp_config.mixed_precision" not in ours  # verl's default: bf16 params


def test_teacher_fields_come_from_the_bf16_fsdp_teacher(runs):
    """The teacher group ran in the shipped ``ta_opd.teacher.param_dtype`` (bfloat16): its fields
    equal those of the unsharded bf16 teacher on the same batch, and differ from the fp32 teacher's.
    Each teacher rank scored its own contiguous share of the batch (verl's DP_COMPUTE_PROTO split)
    and groups sequences into forwards within it, and in bf16 the grouping moves the last bits
    (whole batch at once: 2.4e-3), so the reference scores the same shares."""
    from recipe.ta_opd.verl_backend.teacher import TeacherWorkerConfig, compute_teacher_fields, load_teacher
    from recipe.ta_opd.verl_backend.validate import model_vocab

    t = compose(["+experiment=" + SHIPPED]).ta_opd
    b = Runs.step(runs.full, 1)["batch"]
    cfg = dict(model_path=runs.teacher, vocab_size=model_vocab(runs.student, runs.teacher),
               teacher_topk=b[F.TEACHER_IDS].shape[-1], micro_batch_size=t.teacher.micro_batch_size,
               chunk_size=t.teacher.chunk_size)
    for key in ("layout", "max_tokens_per_micro_batch"):
        if key in t.teacher:
            cfg[key] = t.teacher[key]
    inputs = {k: b[k] for k in F.TEACHER_INPUTS}
    shares = [{k: v[i] for k, v in inputs.items()}
              for i in torch.arange(len(b[F.TEACHER_LOGP])).chunk(SIZE["ta_opd.teacher.n_gpus_per_node"])]
    err = {}
    for dtype in ("bfloat16", "float32"):
        model, wcfg = load_teacher(runs.teacher, getattr(torch, dtype)), TeacherWorkerConfig(**cfg, param_dtype=dtype)
        logp = torch.cat([compute_teacher_fields(model, share, wcfg)[F.TEACHER_LOGP] for share in shares])
        err[dtype] = float((logp - b[F.TEACHER_LOGP]).abs().max())
    assert err["bfloat16"] < 1e-3 < err["float32"], err
