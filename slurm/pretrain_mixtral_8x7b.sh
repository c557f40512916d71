#!/bin/bash
# Mixtral 8x7B pretraining: 16 nodes x 8 GPUs, PP 4 x DP 32, experts EP 8
# (configs/mixtral_8x7b.yaml; its comment gives the layout's source and the memory per
# GPU, ~32 GB of 80).
#
#   mkdir -p logs && sbatch slurm/pretrain_mixtral_8x7b.sh  # from the repo root
#   sbatch --nodes=32 slurm/pretrain_mixtral_8x7b.sh train.lr=2e-4  # more data parallelism
#   sbatch slurm/pretrain_mixtral_8x7b.sh checkpoint.save=/ckpt/run2 checkpoint.load=/ckpt/run2
#
# Arguments are section.key=value overrides of the config. Edit the #SBATCH lines for
# your cluster: add --partition/--account/--qos, change --time.
#
#SBATCH --job-name=mixtral_8x7b
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

# The steps all GPU scripts share live in slurm/common.sh: refuse to run outside Slurm,
# work from the repo root, NCCL/CUDA settings, rendezvous. sbatch runs a copy of this file
# from its spool directory, so common.sh is found where sbatch was called.
FORGE_SLURM_COMMON="${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/common.sh"
if [[ ! -f "$FORGE_SLURM_COMMON" ]]; then
    echo "pretrain_mixtral_8x7b.sh: no $FORGE_SLURM_COMMON; sbatch from the megatron-forge repo root" >&2
    exit 2
fi
source "$FORGE_SLURM_COMMON"
forge_enter_job pretrain_mixtral_8x7b.sh
forge_gpu_env # sets PYTHON: FORGE_PYTHON, else python

# One process per GPU; extra arguments are config overrides.
srun "$PYTHON" -m megatron_forge.train --config configs/mixtral_8x7b.yaml "$@"
