#!/usr/bin/env bash
# 1-GPU smoke run of the verl backend on tiny models built from config (no model download).
# Checks what CPU tests cannot: vLLM rollout, the FSDP engines with CUDA/NCCL, the teacher worker
# group on a GPU, the statistics hook inside verl's real actor forward, a checkpoint and a resume.
#
#   bash launch/smoke_1gpu.sh [extra Hydra overrides]
#
# Variables (environment):
#   SMOKE_DIR   tiny pair, data and run outputs                  [/tmp/ta_opd_smoke]
#   PYTHON      interpreter with ta-opd[gpu] (verl[vllm,fsdp]) installed         [python]
#   STEPS       training steps                                  [4]
# Arguments are appended as Hydra overrides; `ta_opd.dry_run=true` validates without a GPU.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SMOKE_DIR="${SMOKE_DIR:-/tmp/ta_opd_smoke}"
PYTHON="${PYTHON:-python}"
STEPS="${STEPS:-4}"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" launch/make_smoke_pair.py "$SMOKE_DIR"

"$PYTHON" -m recipe.ta_opd.main \
  ta_opd.backend=verl \
  actor_rollout_ref.model.path="$SMOKE_DIR/student" \
  ta_opd.teacher_model_path="$SMOKE_DIR/teacher" \
  data.train_files="$SMOKE_DIR/data/train.parquet" \
  data.val_files="$SMOKE_DIR/data/val.parquet" \
  data.train_batch_size=8 data.max_prompt_length=48 data.max_response_length=32 \
  actor_rollout_ref.rollout.n=2 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.3 \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.actor.optim.lr=1e-4 \
  ta_opd.teacher.colocate=true ta_opd.teacher.micro_batch_size=8 \
  ta_opd.topk=16 ta_opd.teacher_topk=64 ta_opd.budget=0.1 \
  reward.custom_reward_function.path="$REPO/recipe/ta_opd/verl_backend/reward.py" \
  reward.custom_reward_function.name=compute_score \
  trainer.nnodes=1 trainer.n_gpus_per_node=1 \
  trainer.total_training_steps="$STEPS" trainer.save_freq=2 trainer.test_freq=2 \
  trainer.logger=[console] \
  trainer.default_local_dir="$SMOKE_DIR/run" \
  "$@"
