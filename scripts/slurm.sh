#!/usr/bin/env bash
# Multi-node training under SLURM: one torchrun per node, rendezvous on the first node (c10d).
#   sbatch --nodes=4 scripts/slurm.sh configs/7b.yaml [section.key=value ...]
# The global batch stays what the config says; gradient accumulation follows from the world size
# (train.py prints the arithmetic). A requeued or resubmitted job resumes from train.out_dir/latest,
# which must be on storage every node sees.
#SBATCH --job-name=gptrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=TERM@300
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch [--nodes=N] scripts/slurm.sh CONFIG.yaml [overrides]" >&2; exit 2; }
cd "${SLURM_SUBMIT_DIR:-.}"
mkdir -p logs

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# NCCL over InfiniBand/RoCE is picked automatically; set NCCL_SOCKET_IFNAME / NCCL_IB_HCA here if your
# cluster needs them, and NCCL_DEBUG=WARN to see why a collective failed.

# SIGTERM (sent by --signal 300 s before the time limit, or on preemption) reaches every torchrun, which
# passes it to the workers: they finish the step, write a checkpoint and exit. A preempted job is requeued by
# SLURM (--requeue); after the time limit, submitting the same command again resumes the run.
srun --kill-on-bad-exit=1 torchrun \
  --nnodes="$SLURM_NNODES" --nproc_per_node="$gpus_per_node" \
  --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$head_node:29500" \
  train.py "$@"
