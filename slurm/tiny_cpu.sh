#!/usr/bin/env bash
# The CPU default under Slurm: 2 tasks on one node, ranks from Slurm's variables (no torchrun), data
# parallel (one vLLM engine per replica). CI runs it on a one-node cluster (tests/test_slurm.py).
#   sbatch slurm/tiny_cpu.sh [overrides...]        e.g. sbatch --wait slurm/tiny_cpu.sh train.steps=10
#SBATCH --job-name=rlv-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
source "${RLV_HOME:-$SLURM_SUBMIT_DIR}/slurm/common.sh"

PYTHON=${RLV_PYTHON:-$RLV_HOME/.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
launch "$PYTHON" recipes/tiny_cpu.py train.out_dir="$RUN_DIR" "$@"
