#!/usr/bin/env bash
# The test command (README, .ci/run): installs what the suite needs on a fresh machine,
# then lints and runs every test.
#
#   bash tools/run_tests.sh                 # everything
#   bash tools/run_tests.sh tests/test_config.py -k world   # extra args go to pytest
#
# Installs: .venv with megatron-forge[test] (tools/setup_env.sh) and, when root, Debian's
# slurm-wlm and munge (apt-get) for the Slurm tests, which start and stop a one-node
# cluster themselves (tools/local_slurm.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/setup_env.sh
if [[ $EUID -eq 0 ]]; then
    bash tools/local_slurm.sh install
else
    echo "[tests] not root: Slurm tests will be skipped unless slurm-wlm is already set up"
fi

PY=.venv/bin/python
"$PY" -m ruff check .
"$PY" -m ruff format --check .
start=$SECONDS
"$PY" -m pytest -ra --durations=15 "$@"
echo "[tests] suite wall time: $((SECONDS - start))s on $(nproc) cores"
