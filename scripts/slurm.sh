#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, rendezvous on the first node (c10d).
#   sbatch --nodes=4 scripts/slurm.sh configs/7b.yaml [section.key=value ...]   (e.g. train.tp=8: TP in a node)
#   sbatch --nodes=32 scripts/slurm.sh configs/34b.yaml train.tp=2 train.pp=2   (pipeline stages across nodes)
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
# train.pp=P (pipeline parallel) cuts the model into stages across nodes (or NVLink islands): tp x pp ranks hold one
# copy of the model, so tp x pp must divide all the GPUs (nodes x GPUs per node). The overrides reach train.py as
# given; a layout that does not divide stops here, before srun (values set only in the YAML are checked by train.py).
tp=1
pp=1
for arg in "$@"; do
  case "$arg" in
    train.tp=*)
      tp=${arg#train.tp=}
      if ! [ "$tp" -ge 1 ] 2>/dev/null || [ $((gpus_per_node % tp)) -ne 0 ]; then
        echo "error: $arg: a tensor-parallel group must fit inside a node, so train.tp must divide the" \
             "$gpus_per_node GPUs per node" >&2
        exit 2
      fi ;;
    train.pp=*)
      pp=${arg#train.pp=}
      if ! [ "$pp" -ge 1 ] 2>/dev/null; then
        echo "error: $arg: train.pp must be a whole number of pipeline stages' ranks (1: off)" >&2
        exit 2
      fi ;;
  esac
done
gpus=$((SLURM_NNODES * gpus_per_node))
if [ $((gpus % (tp * pp))) -ne 0 ]; then
  echo "error: train.tp x train.pp = $tp x $pp = $((tp * pp)) must divide the $gpus GPUs" \
       "($SLURM_NNODES nodes x $gpus_per_node GPUs per node)" >&2
  exit 2
fi
[ "$tp" -gt 1 ] && echo "tensor parallel: groups of $tp GPUs inside each node, FSDP2 over $((gpus / tp / pp)) groups"
[ "$pp" -gt 1 ] && echo "pipeline parallel: $pp stages' ranks, each stage over $((gpus / tp / pp)) data-parallel ranks"

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
