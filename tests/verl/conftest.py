import pytest
import torch

from tests.verl.helpers import VOCAB, rollout_batch, tiny_qwen3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("verl_models")
    teacher = tiny_qwen3(root / "teacher", seed=1)
    student = tiny_qwen3(root / "student", seed=2)
    return {"student": student, "teacher": teacher, "teacher_path": str(root / "teacher"),
            "student_path": str(root / "student")}


@pytest.fixture()
def rollout(models):
    """A rollout batch with the FSDP teacher's fields (fp32 model, K'=12)."""
    from recipe.ta_opd.verl_backend.teacher import TeacherWorkerConfig, compute_teacher_fields

    batch = rollout_batch(B=8, P=5, R=7, seed=3)
    cfg = TeacherWorkerConfig(model_path=models["teacher_path"], vocab_size=VOCAB, teacher_topk=12, micro_batch_size=4,
                              chunk_size=5, param_dtype="float32")
    batch.update(compute_teacher_fields(models["teacher"], batch, cfg))
    return batch


def pytest_configure(config):
    torch.set_num_threads(2)


@pytest.fixture
def ray_cpu():
    """A local Ray cluster started the way run_verl starts it: the loss-registration setup hook
    and this repository on PYTHONPATH; 16 logical CPUs (TransferQueue and pools need more than 2).
    Started on first use and kept for the session; started again when a test that needs a Ray of
    its own (tests/verl/test_fit_placement.py's cluster) has shut it down in between — a Ray API
    call after a shutdown would otherwise start a bare local Ray without the setup hook."""
    ray = pytest.importorskip("ray")
    from recipe.ta_opd.verl_backend.runner import REPO_ROOT, SETUP_HOOK

    if not ray.is_initialized():
        ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False,
                 runtime_env={"worker_process_setup_hook": SETUP_HOOK, "env_vars": {"PYTHONPATH": REPO_ROOT}})
    yield ray
