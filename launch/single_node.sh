#!/usr/bin/env bash
# TA-OPD on one multi-GPU node (verl backend; Ray is started in-process by the entry point).
#
#   bash launch/single_node.sh [extra Hydra overrides]
#
# Variables (environment):
#   EXPERIMENT     recipe/ta_opd/config/experiment/<name>.yaml                      [qwen3_4b_to_qwen3_1p7b]
#   NODE_GPUS      GPUs of the node used by the run (the allocation)   [8]
#   TEACHER_GPUS   of those, GPUs for the teacher pool                 [2]
#   PYTHON         interpreter with ta-opd[gpu] installed              [python]
#   STUDENT_MODEL TEACHER_MODEL TRAIN_FILES VAL_FILES CKPT_DIR WANDB_API_KEY are read by the config.
# The trainer pool (rollout + training) gets NODE_GPUS - TEACHER_GPUS GPUs; NODE_GPUS must not
# exceed the GPUs visible (CUDA_VISIBLE_DEVICES). Startup validation checks that the batch
# (data.train_batch_size x rollout.n) divides evenly over the trainer GPUs and names a fix if not.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXPERIMENT="${EXPERIMENT:-qwen3_4b_to_qwen3_1p7b}"
NODE_GPUS="${NODE_GPUS:-8}"
TEACHER_GPUS="${TEACHER_GPUS:-2}"
PYTHON="${PYTHON:-python}"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" -m recipe.ta_opd.main +experiment="$EXPERIMENT" \
  trainer.nnodes=1 trainer.n_gpus_per_node="$NODE_GPUS" \
  ta_opd.teacher.nnodes=1 ta_opd.teacher.n_gpus_per_node="$TEACHER_GPUS" \
  "$@"
