# The steps slurm/pretrain_*.sh share. Sourced, not submitted: it only defines functions.
#
# Each script keeps what a reader needs on its own: the #SBATCH resources, the config it
# runs and its srun line; they call these functions for the rest. sbatch runs a copy of
# the batch script from Slurm's spool directory, so the scripts find this file under
# $SLURM_SUBMIT_DIR (where sbatch was called: the repo root), or next to themselves when
# run by hand outside Slurm.

# forge_enter_job NAME: outside Slurm, say how to submit slurm/NAME and exit 2. Under
# Slurm, work from the submit directory, which must be the repo root: the scripts name
# configs/*.yaml relative to it, and relative paths in the config mean it too.
forge_enter_job() {
    local name="$1"
    if [[ -z "${SLURM_JOB_ID:-}" ]]; then
        echo "$name: not running under Slurm; submit it: sbatch slurm/$name" >&2
        exit 2
    fi
    cd "${SLURM_SUBMIT_DIR:?}"
    if [[ ! -d megatron_forge ]]; then
        echo "$name: $PWD is not a megatron-forge checkout; sbatch from the repo root" >&2
        exit 2
    fi
}

# forge_gpu_env: the environment of a multi-node GPU job (NCCL and CUDA settings, CPU
# threads per rank, the rendezvous address) and PYTHON, the interpreter srun starts.
forge_gpu_env() {
    PYTHON="${FORGE_PYTHON:-python}" # e.g. FORGE_PYTHON=$PWD/.venv/bin/python

    # --- NCCL / CUDA ------------------------------------------------------------------
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
    # (sed reads every line: 'head -n 1' could end scontrol with SIGPIPE, fatal under pipefail)
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"
    MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
    export MASTER_ADDR MASTER_PORT
    echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $SLURM_NNODES nodes," \
        "$SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT"
}
