#!/usr/bin/env bash
# Qwen2.5-Math-7B RL^V (recipes/math_7b.py): one torchrun per node, 8 GPUs each; TP=2 x DP=4 per node.
#   RLV_MODEL_DIR=/models/Qwen2.5-Math-7B RLV_DATA_DIR=/data sbatch slurm/math_7b.sh [overrides...]
#   RLV_CONTAINER_IMAGE=/images/rlv-megatron.sqsh sbatch slurm/math_7b.sh     # inside the image (pyxis)
#SBATCH --job-name=rlv-math-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
source "${RLV_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"

launch_torchrun recipes/math_7b.py "$@"
