#!/usr/bin/env bash
# Qwen2.5-Math-7B RL^V with overlapped rollouts (recipes/math_7b.py --config-name math_7b_overlap): one
# torchrun per node, 8 GPUs each; TP=2 x DP=4 per node, engine and trainer at once on every GPU.
#   RLV_MODEL_DIR=/models/Qwen2.5-Math-7B RLV_DATA_DIR=/data sbatch slurm/math_7b_overlap.sh [overrides...]
#   RLV_CONTAINER_IMAGE=/images/rlv-megatron.sqsh sbatch slurm/math_7b_overlap.sh     # inside the image (pyxis)
#SBATCH --job-name=rlv-math-7b-overlap
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
source "${RLV_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"

launch_torchrun recipes/math_7b.py --config-name math_7b_overlap "$@"
