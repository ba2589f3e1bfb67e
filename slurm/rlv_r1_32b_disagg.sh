#!/usr/bin/env bash
# R1-Distill-Qwen-32B RL^V with 32k-token chains of thought, overlapped, partial and disaggregated rollouts
# (recipes/r1_32b.py --config-name r1_32b_disagg): 4 nodes x 8 GPUs, one torchrun per node; on each node
# 4 trainer ranks (TP=4; DP=4 across the nodes) on GPUs 0-3 and one vLLM engine (TP=4) on GPUs 4-7.
#   RLV_MODEL_DIR=/models/DeepSeek-R1-Distill-Qwen-32B RLV_DATA_DIR=/data sbatch slurm/rlv_r1_32b_disagg.sh
#   sbatch --nodes=8 slurm/rlv_r1_32b_disagg.sh         # DP=8: 66 GiB on the trainer's GPUs instead of 77.5
#SBATCH --job-name=rlv-r1-32b-disagg
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
source "${RLV_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"

ENGINE_GPUS=4 launch_torchrun recipes/r1_32b.py --config-name r1_32b_disagg "$@"
