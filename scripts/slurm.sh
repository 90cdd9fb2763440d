#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, rendezvous on the first node (c10d).
#   sbatch --nodes=4 scripts/slurm.sh configs/7b.yaml [section.key=value ...]   (e.g. train.tp=8: TP in a node)
# The global batch stays what the config says; gradient accumulation follows from the world size
# (train.py prints the arithmetic). A requeued or resubmitted job resumes from train.out_dir/latest,
# which must be on storage every node sees.
#
# Stopping without losing work (RELIABILITY.md):
# - 300 s before the time limit SLURM sends SIGUSR1 to this script (--signal=B:USR1@300). It passes the signal
#   on through srun and torchrun to every worker; they finish the current step, write a checkpoint and exit 0,
#   and the script requeues the job, which resumes from that checkpoint.
# - On preemption SLURM sends SIGTERM to every process of the job, then SIGKILL after the partition's
#   GraceTime: the workers save the same way, and SLURM requeues the job itself (--requeue, PreemptMode=REQUEUE).
# - Past the grace time, or on a node failure, the job resumes from its last complete checkpoint.
#SBATCH --job-name=gptrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=%x-%j.out
set -uo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch [--nodes=N] scripts/slurm.sh CONFIG.yaml [overrides]" >&2; exit 2; }
cd "${SLURM_SUBMIT_DIR:-.}"

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# NCCL over InfiniBand/RoCE is picked automatically; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA here if your
# cluster needs them, and NCCL_DEBUG=WARN to see why a collective failed.

# train.tp=N (tensor parallel) keeps each group of N ranks inside one node, over NVLink; FSDP2 spans the nodes.
# The overrides reach train.py as given; a degree that does not divide a node's GPUs stops here, before srun.
for arg in "$@"; do
  case "$arg" in
    train.tp=*)
      tp=${arg#train.tp=}
      if ! [ "$tp" -ge 1 ] 2>/dev/null || [ $((gpus_per_node % tp)) -ne 0 ]; then
        echo "error: $arg: a tensor-parallel group must fit inside a node, so train.tp must divide the" \
             "$gpus_per_node GPUs per node" >&2
        exit 2
      fi
      echo "tensor parallel: groups of $tp GPUs inside each node, FSDP2 over $((SLURM_NNODES * gpus_per_node / tp)) groups" ;;
  esac
done

requeue=0
on_usr1() {
  echo "$(date '+%F %T') SIGUSR1: time limit near; workers save a checkpoint, then the job is requeued"
  requeue=1
  kill -USR1 "$srun_pid" 2>/dev/null
}
trap on_usr1 USR1
trap 'echo "$(date "+%F %T") SIGTERM: workers save a checkpoint and exit"' TERM  # outlive srun, do not die first

# torchrun forwards SIGTERM and SIGUSR1 to its workers and gives them --shutdown-timeout seconds (not 30) to
# write the checkpoint before it kills them. torchrun of torch 2.11 has no --shutdown-timeout: its workers get 30 s.
grace=(--shutdown-timeout="${SHUTDOWN_TIMEOUT_S:-270}")
if ! torchrun --help 2>/dev/null | grep -q -- --shutdown-timeout; then
  echo "warning: this torchrun has no --shutdown-timeout; workers get its fixed 30 s to save after a signal"
  grace=()
fi
srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" --nproc_per_node="$gpus_per_node" \
  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$head_node:${MASTER_PORT:-29500}" \
  --signals-to-handle=SIGTERM,SIGINT,SIGUSR1 "${grace[@]}" \
  train.py "$@" &
srun_pid=$!
wait "$srun_pid"
status=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait again
  wait "$srun_pid"
  status=$?
done
if [ "$requeue" = 1 ]; then
  echo "$(date '+%F %T') requeueing job $SLURM_JOB_ID (srun exited $status)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$status"
