"""verl's own ``RayPPOTrainer.fit()`` with the TA-OPD trainer, on a CPU Ray cluster (issue 9 §2).

``python -m recipe.ta_opd.main ta_opd.backend=verl`` runs on the toy pair for 3 steps: 2 actor
data-parallel ranks (verl's ``ActorRolloutRefWorker`` on its FSDP2 engine, gloo), the 2-rank FSDP
teacher group on its own pool, verl's agent loop and reward loop, verl's batch balancing,
cross-rank metric aggregation and checkpoint manager — all verl's code. The CPU pieces are test
support (``tests/verl/cpu_fit``, docs/verl_cpu_fit.md): a platform (device cpu, gloo, Ray
resource CPU), a rollout replica that samples with a Hugging Face model and takes the actor's
weights after every update. (Resume = uninterrupted is checked on the shipped configuration's run,
``test_fit_shipped.py``, in bf16 under dynamic batching; this run is the exact fp32 reference.)
The budget (rho = 5 %) leaves some ranks' micro-batches with no kept position.

Recorders (``tests/verl/cpu_fit/record.py``) save what each step selected and what the actor
ranks received and computed; the tests below assert on them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from recipe.ta_opd.verl_backend import fields as F
from tests.verl.cpu_fit.pair import verl_ready_copy
from tests.verl.cpu_fit.setup import HOOK, RECORD_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
RHO = 0.05
STEPS = 3
MICRO = 2  # sequences per actor micro-batch (per rank)
RUN_TIMEOUT_S = 1100  # one run on 2 loaded cores takes ~2-4 min; this only stops a hang


def command(student: str, teacher: str, data: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "recipe.ta_opd.main", "ta_opd.backend=verl",
        f"actor_rollout_ref.model.path={student}", f"ta_opd.teacher_model_path={teacher}",
        f"data.train_files={data / 'train.parquet'}", f"data.val_files={data / 'val.parquet'}",
        "data.train_batch_size=4", "data.max_prompt_length=32", "data.max_response_length=16",
        "data.dataloader_num_workers=0",
        # rollout: the CPU replica (tests/verl/cpu_fit/rollout.py), one replica over both actor ranks,
        # request ids "det-<i>" (full_determinism) so samples are reproducible across runs
        "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.rollout.name=ta_opd_hf_cpu",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=2", "actor_rollout_ref.rollout.full_determinism=true",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={MICRO}",
        # actor: verl's FSDP2 engine in fp32, plain torch attention (no flash-attn on a CPU)
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={MICRO}",
        "actor_rollout_ref.actor.use_dynamic_bsz=false",
        "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.actor.fsdp_config.use_torch_compile=false",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        # the FSDP teacher group: 2 ranks on its own pool
        "ta_opd.teacher.nnodes=1", "ta_opd.teacher.n_gpus_per_node=2", "ta_opd.teacher.param_dtype=float32",
        "ta_opd.teacher.micro_batch_size=2", f"ta_opd.budget={RHO}",
        "reward.num_workers=1", f"reward.custom_reward_function.path={ROOT / 'recipe/ta_opd/verl_backend/reward.py'}",
        "reward.custom_reward_function.name=compute_score",
        # 4 "GPUs" in all = 2 trainer + 2 teacher ranks; Ray is told it has 4 logical GPUs only so that
        # the pool checks (verl's counts GPU/NPU) pass: no worker asks for one (the platform maps to CPU)
        "trainer.nnodes=1", "trainer.n_gpus_per_node=4", "trainer.device=cpu",
        f"trainer.total_training_steps={STEPS}", "trainer.save_freq=2", "trainer.test_freq=-1",
        "trainer.val_before_train=false", "trainer.logger=[console,file]", f"trainer.default_local_dir={out / 'ckpt'}",
        # address=local: always a fresh cluster of this run's own, never one that is already running
        "ray_kwargs.ray_init.num_cpus=16", "+ray_kwargs.ray_init.num_gpus=4", "+ray_kwargs.ray_init.address=local",
        "+ray_kwargs.ray_init.include_dashboard=false",
    ]


def run(cmd: list[str], out: Path) -> None:
    """One run in its own process group (Ray's processes included), killed whole on a hang."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join someone else's cluster
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TA_OPD_WORKER_SETUP_HOOK=HOOK,
               VERL_FILE_LOGGER_PATH=str(out / "metrics.jsonl"), **{RECORD_ENV: str(out / "record")})
    log = out / "log.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
            proc.wait()
    tail = "".join(log.read_text().splitlines(keepends=True)[-60:])
    assert code == 0, f"run {'timed out' if code is None else f'exited {code}'}; log tail:\n{tail}"


@dataclass
class Runs:
    full: Path  # 3 uninterrupted steps
    resumed: Path | None  # from the full run's step-2 checkpoint (test_fit_shipped.py), None here
    student: str
    teacher: str

    @staticmethod
    def step(run: Path, k: int) -> dict:
        return torch.load(run / "record" / f"step_{k}.pt", weights_only=False)

    @staticmethod
    def logged(run: Path) -> dict[int, dict]:
        """What verl's fit() logged per step (its ``file`` tracker)."""
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return {row["step"]: row["data"] for row in map(json.loads, lines)}

    @staticmethod
    def actor(run: Path, rank: int, call: int) -> dict:
        return torch.load(run / "record" / f"actor_rank{rank}_call{call}.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tiny_pair, tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("cpu_fit")
    _, pair = tiny_pair
    student = verl_ready_copy(pair.student, root / "student")
    teacher = verl_ready_copy(pair.teacher, root / "teacher")
    data = Path(pair.train_file).parent
    full = root / "full"
    full.mkdir()
    run(command(student, teacher, data, full), full)
    return Runs(full, None, student, teacher)


def test_verl_fit_runs_every_step_and_checkpoints(runs):
    logged = Runs.logged(runs.full)
    assert sorted(logged) == list(range(1, STEPS + 1))
    for k, m in logged.items():
        for key in ("ta_opd/kept_count", "ta_opd/timing/teacher_s", "actor/ta_opd/loss/sampled_kl", "actor/grad_norm",
                    "global_seqlen/balanced_max", "training/rollout_probs_diff_max"):
            assert key in m, (k, key)  # TA metrics, verl's cross-rank actor metrics, batch balancing
        # the rollout server samples with the weights the actor has (verl's own rollout-vs-actor check)
        assert m["training/rollout_probs_diff_max"] < 1e-4
    for k in (2, 3):
        for rank in (0, 1):
            assert (runs.full / "ckpt" / f"global_step_{k}" / "actor" / f"model_world_size_2_rank_{rank}.pt").exists()
    # test_freq=-1: the driver's kept-token page only at the last step (ta_opd/tools/kept_tokens.py)
    assert sorted(p.name for p in (runs.full / "ckpt" / "kept_tokens").iterdir()) == [f"step_{STEPS}.html"]
    page = (runs.full / "ckpt" / "kept_tokens" / f"step_{STEPS}.html").read_text(encoding="utf-8")
    assert f"step {STEPS}" in page and 'class="tok kept"' in page


def test_kept_count_is_exactly_ceil_rho_I(runs):
    for k in range(1, STEPS + 1):
        r = Runs.step(runs.full, k)
        valid = r["batch"]["response_mask"].bool()  # I: valid positions after invalid-id exclusion
        kept = r["kept"].bool()
        assert bool((kept <= valid).all())
        assert int(kept.sum()) == math.ceil(RHO * int(valid.sum())) == int(r["metrics"]["ta_opd/kept_count"])


def test_cross_rank_loss_metrics_are_global_token_means(runs):
    """verl gathers the per-micro-batch metrics of both ranks (``Metric.aggregate_dp``); what it logs
    is the mean over ALL kept positions of the step, empty micro-batches included."""
    logged = Runs.logged(runs.full)
    for k in range(1, STEPS + 1):
        b, kept = Runs.step(runs.full, k)["batch"], Runs.step(runs.full, k)["kept"].bool()
        want = (b["old_log_probs"] - b[F.TEACHER_LOGP])[kept].mean()  # sampled KL estimate (on-policy)
        assert logged[k]["actor/ta_opd/loss/sampled_kl"] == pytest.approx(float(want), rel=1e-5), k
        assert logged[k]["actor/ta_opd/loss/clipfrac"] == 0.0  # one update per rollout: ratio 1


def test_a_rank_gets_micro_batches_with_no_kept_position(runs):
    """What each rank received is its contiguous share of verl's balanced batch, micro-batched by
    verl's engine; some micro-batches keep nothing and the ranks differ in how many keep something
    (the case where per-micro-batch metrics must still line up across ranks)."""
    empty_seen, counts_differ = False, False
    logged = Runs.logged(runs.full)
    for k in range(1, STEPS + 1):
        r = Runs.step(runs.full, k)
        kept = r["kept"].bool()
        B = kept.shape[0]
        # the order the ranks received is verl's balanced partition (its logged token counts per rank)
        tokens = [int(r["batch"]["attention_mask"][rank * B // 2 : (rank + 1) * B // 2].sum()) for rank in (0, 1)]
        assert (min(tokens), max(tokens)) == (logged[k]["global_seqlen/balanced_min"],
                                              logged[k]["global_seqlen/balanced_max"])
        nonempty = []
        for rank in (0, 1):
            a = Runs.actor(runs.full, rank, k)
            share = kept[rank * B // 2 : (rank + 1) * B // 2].sum(-1).tolist()
            assert a["kept_per_sequence"] == share
            micro = [sum(share[i : i + MICRO]) for i in range(0, len(share), MICRO)]
            assert a["kept_per_micro_batch"] == micro
            empty_seen |= 0 in micro
            nonempty.append(sum(m > 0 for m in micro))
        counts_differ |= nonempty[0] != nonempty[1]
    assert empty_seen and counts_differ


def _student_logp(model, batch: dict) -> torch.Tensor:
    """(B, R) log π(y_t) of each response token, one unpadded sequence at a time."""
    B, S = batch["input_ids"].shape
    R = batch["responses"].shape[1]
    P = S - R
    rows = []
    for i in range(B):
        keep = batch["attention_mask"][i].bool()
        n_p, n_r = int(keep[:P].sum()), int(keep[P:].sum())
        logits = model(input_ids=batch["input_ids"][i][keep].unsqueeze(0)).logits[0].float()
        lp = torch.log_softmax(logits[n_p - 1 : n_p - 1 + n_r], -1).gather(-1, batch["responses"][i, :n_r, None])
        rows.append(torch.cat([lp.squeeze(-1), lp.new_zeros(R - n_r)]))
    return torch.stack(rows)


def test_masked_pg_opd_gradient_matches_ta_opd(runs):
    """Step 1: the gradient verl's FSDP2 engine formed over both ranks (before clipping) equals the
    gradient of ta_opd's PG-OPD loss (Eq. 6-7, token-mean over the kept positions) on the same batch."""
    from transformers import AutoModelForCausalLM

    from ta_opd.losses import LossInputs, compute_loss

    r = Runs.step(runs.full, 1)
    b, kept = r["batch"], r["kept"].bool()
    model = AutoModelForCausalLM.from_pretrained(runs.student, dtype=torch.float32, attn_implementation="sdpa")
    logp = _student_logp(model, b)
    torch.testing.assert_close(logp.detach()[b["response_mask"].bool()], b["old_log_probs"][b["response_mask"].bool()],
                               atol=1e-5, rtol=0)  # verl's packed forward = per-sequence forward
    loss = compute_loss("pg_opd", LossInputs(mask=kept, log_prob=logp, old_log_prob=b["old_log_probs"],
                                             teacher_log_prob=b[F.TEACHER_LOGP]), clip_low=0.2, clip_high=0.28).loss
    loss.backward()
    got = Runs.actor(runs.full, 0, 1)["grads"]
    assert set(got) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-4, msg=name)
    assert Runs.logged(runs.full)[1]["actor/loss"] == pytest.approx(float(loss.detach()), rel=1e-5)


def test_teacher_fields_line_up_with_responses(runs):
    """The teacher group's fields of every step are the teacher's outputs for exactly the response
    tokens verl's rollout produced (full-sequence rows P-1+t for the top-K', response grid for the rest)."""
    from recipe.ta_opd.verl_backend.teacher import load_teacher
    from ta_opd.teacher_outputs import teacher_outputs

    model = load_teacher(runs.teacher, torch.float32)
    K = Runs.step(runs.full, 1)["batch"][F.TEACHER_IDS].shape[-1]
    for k in range(1, STEPS + 1):
        b = Runs.step(runs.full, k)["batch"]
        S, R = b["input_ids"].shape[1], b["responses"].shape[1]
        P = S - R
        for i in range(b["input_ids"].shape[0]):
            keep = b["attention_mask"][i].bool()
            n_p, n_r = int(keep[:P].sum()), int(b["response_mask"][i].sum())
            logits = model(input_ids=b["input_ids"][i][keep].unsqueeze(0)).logits[0, :, : model.config.vocab_size]
            want = teacher_outputs(logits[n_p - 1 : n_p - 1 + n_r], b["responses"][i, :n_r], teacher_topk=K)
            assert torch.equal(b[F.TEACHER_IDS][i, P - 1 : P - 1 + n_r].long(), want.topk_ids.long())
            torch.testing.assert_close(b[F.TEACHER_LOGPROBS][i, P - 1 : P - 1 + n_r].float(), want.topk_logp.float(),
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(b[F.TEACHER_LOGP][i, :n_r], want.sampled_logp.float(), atol=1e-5, rtol=0)
            assert b[F.TEACHER_LOGP][i, n_r:].abs().sum() == 0
