#!/bin/bash
# Tiny Llama pretraining on CPUs: 1 node, 2 tasks, tensor parallel 2 over gloo. For tests
# and laptops (a one-node Slurm: sudo tools/local_slurm.sh start); same code path as the
# GPU scripts, only the sizes differ.
#
#   sbatch slurm/pretrain_tiny.sh                       # from the repo root
#   sbatch slurm/pretrain_tiny.sh train.train_iters=20  # section.key=value overrides pass through
#
# Each job writes runs/<job name>-<job id>/ (metrics.jsonl, checkpoints/); set RUN_DIR to
# choose another directory. Needs data/sample (bash tools/make_sample_data.sh) unless
# data.blend and data.tokenizer are overridden.
#
#SBATCH --job-name=forge-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=00:20:00
# Slurm sends USR2 to every task 120 s before the time limit (NCCL uses USR1, hence USR2,
# as in submitit); the trainer then finishes its step, saves a checkpoint on every rank
# and requeues the job, which resumes from that checkpoint.
#SBATCH --signal=USR2@120
#SBATCH --requeue
# Output by job name and id; appended to, so a requeued job keeps the log of its first run.
# Slurm does not create the directory: mkdir -p logs once.
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
# Optional: run inside a container with pyxis/enroot (remove one '#' to enable).
##SBATCH --container-image=nvcr.io/nvidia/pytorch:25.01-py3
set -euo pipefail

# Refusing to run outside Slurm and working from the repo root: slurm/common.sh, shared
# with the GPU scripts (found where sbatch was called: sbatch runs a spool copy of this file).
FORGE_SLURM_COMMON="${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}/slurm/common.sh"
if [[ ! -f "$FORGE_SLURM_COMMON" ]]; then
    echo "pretrain_tiny.sh: no $FORGE_SLURM_COMMON; sbatch from the megatron-forge repo root" >&2
    exit 2
fi
source "$FORGE_SLURM_COMMON"
forge_enter_job pretrain_tiny.sh

# The repo's virtual environment when there is one; FORGE_PYTHON overrides.
if [[ -n "${FORGE_PYTHON:-}" ]]; then
    PYTHON="$FORGE_PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PYTHON=.venv/bin/python
else
    PYTHON=python
fi

# One thread per task: the tasks share the node's cores.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"

# Checkpoints are saved to and loaded from the same directory, so a requeued job (same
# job id, same RUN_DIR) resumes from its last save; the first run starts fresh.
RUN_DIR="${RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
mkdir -p "$RUN_DIR"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: run dir $RUN_DIR"

srun "$PYTHON" -m megatron_forge.train --config configs/tiny.yaml \
    parallel.tensor=2 \
    precision.params_dtype=fp32 \
    logging.dir="$RUN_DIR" \
    checkpoint.save="$RUN_DIR/checkpoints" \
    checkpoint.load="$RUN_DIR/checkpoints" \
    "$@"
