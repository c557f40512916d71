#!/bin/bash
# Llama-2-7B pretraining: 16 nodes x 8 GPUs, TP 8 x DP 16 (configs/llama_7b.yaml; its
# comment gives the memory per GPU, ~17 GB of 80).
#
#   mkdir -p logs && sbatch slurm/pretrain_7b.sh  # from the repo root
#   sbatch --nodes=32 slurm/pretrain_7b.sh train.lr=2e-4  # more data parallelism
#   sbatch slurm/pretrain_7b.sh checkpoint.save=/ckpt/run2 checkpoint.load=/ckpt/run2
#
# Arguments are section.key=value overrides of the config. Edit the #SBATCH lines for
# your cluster: add --partition/--account/--qos, change --time.
#
#SBATCH --job-name=llama_7b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
##SBATCH --partition=gpu
##SBATCH --account=myproject
# Slurm sends USR2 to every task 120 s before the time limit (NCCL uses USR1, hence USR2,
# as in submitit); the trainer then finishes its step, saves a checkpoint on every rank
# and requeues the job, which resumes from that checkpoint (checkpoint.load = .save).
# Preemption (SIGTERM) takes the same path.
#SBATCH --signal=USR2@120
#SBATCH --requeue
# Output by job name and id; appended to, so a requeued job keeps the log of its first run.
# Slurm does not create the directory: mkdir -p logs once.
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
# Optional: run inside a container with pyxis/enroot (remove one '#' to enable; the image
# needs megatron-core, and the repo must be mounted, e.g. --container-mounts=$PWD:$PWD).
##SBATCH --container-image=nvcr.io/nvidia/pytorch:25.01-py3
set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "pretrain_7b.sh: not running under Slurm; submit it: sbatch slurm/pretrain_7b.sh" >&2
    exit 2
fi
# Slurm runs a copy of this script from its spool dir: work from where sbatch was called.
cd "${SLURM_SUBMIT_DIR:?}"
if [[ ! -d megatron_forge ]]; then
    echo "pretrain_7b.sh: $PWD is not a megatron-forge checkout; sbatch from the repo root" >&2
    exit 2
fi
PYTHON="${FORGE_PYTHON:-python}"  # e.g. FORGE_PYTHON=$PWD/.venv/bin/python

# --- NCCL / CUDA ----------------------------------------------------------------------
# Fail a collective that a dead rank would hang forever, instead of hanging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# Megatron overlaps TP/SP communication with compute only if kernels queue in order.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# NCCL picks InfiniBand/RoCE and NVLink itself. Set these when it picks wrong:
#   NCCL_SOCKET_IFNAME=ib0,eth0 (bootstrap interface; set on clusters with several NICs)
#   NCCL_IB_HCA=mlx5            (which HCAs to use), NCCL_IB_DISABLE=1 (no InfiniBand)
#   NCCL_DEBUG=INFO             (print the topology and transports once, to check them)
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# CPU threads per rank for data loading and host work: the cores Slurm gave the task.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-8}"

# Rendezvous: the first node of the job, a port derived from the job id (megatron_forge
# computes the same when these are unset; set here so the log shows them).
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes," \
    "$SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT"

# One process per GPU; extra arguments are config overrides.
srun "$PYTHON" -m megatron_forge.train --config configs/llama_7b.yaml "$@"
