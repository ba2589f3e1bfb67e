#!/usr/bin/env bash
# Qwen2.5-Math-7B RL^V, overlapped and disaggregated (recipes/math_7b.py --config-name math_7b_disagg): one
# node, 4 trainer ranks (TP=2 x DP=2) on GPUs 0-3 and their 2 vLLM engines (TP=2) on GPUs 4-7.
#   RLV_MODEL_DIR=/models/Qwen2.5-Math-7B RLV_DATA_DIR=/data sbatch slurm/math_7b_disagg.sh [overrides...]
#SBATCH --job-name=rlv-math-7b-disagg
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
source "${RLV_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"

ENGINE_GPUS=4 launch_torchrun recipes/math_7b.py --config-name math_7b_disagg "$@"
