#!/usr/bin/env bash
# R1-Distill-Qwen-32B RL^V with 32k-token chains of thought, overlapped and partial rollouts
# (recipes/r1_32b.py --config-name r1_32b_overlap): 2 nodes x 8 GPUs, one torchrun per node;
# TP=8 inside a node, DP=2 across nodes, one vLLM engine (TP=8) per node beside the trainer.
#   RLV_MODEL_DIR=/models/DeepSeek-R1-Distill-Qwen-32B RLV_DATA_DIR=/data sbatch slurm/rlv_r1_32b_overlap.sh
#   sbatch --nodes=4 slurm/rlv_r1_32b_overlap.sh parallel.pp=2       # TP=8 x PP=2 x DP=2
#SBATCH --job-name=rlv-r1-32b-overlap
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
source "${RLV_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"

launch_torchrun recipes/r1_32b.py --config-name r1_32b_overlap "$@"
