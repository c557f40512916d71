#!/usr/bin/env bash
# The embedded default, end to end on one machine (no GPU needed):
#   1. set up .venv (tools/setup_env.sh),
#   2. build the sample corpus, its SentencePiece tokenizer and megatron's indexed dataset
#      in data/sample/ (tools/make_sample_data.sh),
#   3. pretrain configs/tiny.yaml on 2 CPU ranks through launch/submit.py --local: the
#      same launcher, entry point and training loop as a cluster run.
# Extra arguments are config overrides, e.g. `bash tools/run_default.sh train.train_iters=20`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/setup_env.sh
bash tools/make_sample_data.sh data/sample
.venv/bin/python launch/submit.py --local --nodes 1 --gpus-per-node 2 \
    --config configs/tiny.yaml --wait "$@"
echo "[default] metrics: runs/tiny/metrics.jsonl, checkpoints: runs/tiny/checkpoints/"
