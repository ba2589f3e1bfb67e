# Sourced by the batch scripts (sbatch runs a spooled copy, so they find the repository through
# RLV_HOME or the submit directory). Sets RUN_DIR, MASTER_ADDR/PORT, the NCCL environment, the optional
# pyxis/enroot container flags (SRUN_CONTAINER), the requeue-on-preemption trap, and `launch`.
set -euo pipefail
RLV_HOME=${RLV_HOME:-$SLURM_SUBMIT_DIR}
cd "$RLV_HOME"
[ -f recipes/tiny_cpu.py ] || { echo "error: $RLV_HOME is not the rlv-megatron checkout (set RLV_HOME)" >&2; exit 2; }

# One directory per job name and id: a requeued job keeps its id, so it finds its checkpoints and resumes.
RUN_DIR=${RLV_RUN_DIR:-${RLV_RUN_ROOT:-$RLV_HOME/runs/slurm}/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
mkdir -p "$RUN_DIR/logs"
exec > >(tee -a "$RUN_DIR/logs/job-${SLURM_JOB_ID}.log") 2>&1
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: run dir $RUN_DIR"

# Rendezvous: the first node of the allocation, a port derived from the job id (stable across requeues).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

# GPU communication defaults; anything already set (site settings) wins.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron's TP/SP overlap needs 1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export UCX_TLS=${UCX_TLS:-rc,sm,self}  # InfiniBand RC + shared memory for NCCL's UCX plugin / vLLM
export VLLM_WORKER_MULTIPROC_METHOD=${VLLM_WORKER_MULTIPROC_METHOD:-spawn}

# pyxis/enroot: RLV_CONTAINER_IMAGE=nvcr.io#... (or a .sqsh) runs every task in the image, checkout mounted.
SRUN_CONTAINER=()
if [ -n "${RLV_CONTAINER_IMAGE:-}" ]; then
  SRUN_CONTAINER=(--container-image="$RLV_CONTAINER_IMAGE" --container-workdir="$RLV_HOME"
                  --container-mounts="$RLV_HOME:$RLV_HOME,$RUN_DIR:$RUN_DIR${RLV_CONTAINER_MOUNTS:+,$RLV_CONTAINER_MOUNTS}")
fi

# Preemption or the time limit: Slurm sends USR1 (#SBATCH --signal=B:USR1@...) to this script, which
# requeues the job; the next start resumes from RUN_DIR/checkpoints/latest (train.resume=true).
requeue() {
  echo "signal received: requeueing job $SLURM_JOB_ID to resume from its last checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
}
trap requeue USR1

# launch CMD...: run CMD under srun in the background and wait, so the trap fires while it runs.
launch() {
  srun --label --kill-on-bad-exit=1 "${SRUN_CONTAINER[@]}" "$@" &
  local pid=$!
  local rc=0
  wait "$pid" || rc=$?
  if [ "$rc" -gt 128 ]; then wait "$pid" || rc=$?; fi  # interrupted by the trap: the job step's own status
  echo "srun exited with $rc"
  return "$rc"
}

# launch_torchrun RECIPE [overrides...]: one torchrun per node (one srun task per node), all meeting at
# MASTER_ADDR:MASTER_PORT, with one rank per trainer GPU: GPUS_PER_NODE less ENGINE_GPUS (the GPUs of each
# node that run engines instead, passed on as rollout.engine_gpus; 0: engines share the trainer's GPUs).
launch_torchrun() {
  local recipe=$1
  shift
  local engine_gpus=${ENGINE_GPUS:-0}
  local ranks=$(( ${GPUS_PER_NODE:-8} - engine_gpus ))
  launch bash -c 'exec ${RLV_PYTHON:-python} -m torch.distributed.run --nnodes="$SLURM_NNODES" \
    --nproc-per-node="$0" --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR" \
    --master-port="$MASTER_PORT" "$@"' "$ranks" "$recipe" train.out_dir="$RUN_DIR" \
    rollout.engine_gpus="$engine_gpus" "$@"
}
