#!/usr/bin/env bash
# Create (or reuse) .venv with megatron-forge and its test and mlflow extras installed.
#
#   bash tools/setup_env.sh            # CPU machine: torch==2.13.0 CPU wheel
#   FORGE_TORCH="torch" bash tools/setup_env.sh   # a cluster: your CUDA build of torch
#
# torch is installed first and pinned: a bare `torch` requirement resolved by pip on a
# CPU-only machine would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${FORGE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${FORGE_TORCH:-torch==2.13.0}"

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
# The stamp skips reinstalling when pyproject.toml has not changed since the last setup.
stamp="$VENV/.forge-installed"
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then
    echo "[setup] $VENV is up to date"
    exit 0
fi
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH_SPEC"
# mlflow: the MLflow logger is optional for users, but CI runs its tests
"$VENV/bin/pip" install -q -e ".[test,mlflow]"
touch "$stamp"
echo "[setup] installed: $("$VENV/bin/python" -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)' 2>/dev/null)"
