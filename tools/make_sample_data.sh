#!/usr/bin/env bash
# Build the embedded default's data: a sample corpus from the docstrings of Python's
# standard library, a SentencePiece tokenizer trained on it, and megatron's indexed
# dataset (.bin/.idx). Output: ${1:-data/sample}/. Skips steps whose output exists.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-data/sample}"
PY="${FORGE_VENV:-.venv}/bin/python"
mkdir -p "$OUT"
[[ -f "$OUT/corpus.jsonl" ]] || "$PY" tools/make_sample_corpus.py --output "$OUT/corpus.jsonl"
[[ -f "$OUT/tokenizer.model" ]] || "$PY" tokenizers/train_sentencepiece.py \
    --input "$OUT/corpus.jsonl" --model-prefix "$OUT/tokenizer" --vocab-size 2048
[[ -f "$OUT/corpus_text_document.idx" ]] || "$PY" tools/preprocess_data.py \
    --input "$OUT/corpus.jsonl" --output-prefix "$OUT/corpus" \
    --tokenizer "$OUT/tokenizer.model" --append-eod --workers 2
echo "[data] ready in $OUT"
