"""Train a SentencePiece tokenizer on a jsonl corpus.

The model is Llama-style: BPE with byte fallback (no text is ever <unk>), digits split one by
one, whitespace kept as it is (no NFKC, runs of spaces preserved: code indentation survives),
and fixed special ids: <unk>=0, <s>=1 (bos), </s>=2 (eos, also the end-of-document token),
<pad>=3. Those settings are what `megatron_forge.data.tokenizer` exports to Hugging Face
losslessly. Training reads one sentence per line of each document, samples at most
`--input-sentence-size` of them with a fixed seed, and is deterministic for a given input.

`--normalization nmt_nfkc` (or nfkc, nmt_nfkc_cf, nfkc_cf) trains with one of SentencePiece's
own normalizations instead, with its default whitespace handling (leading, trailing and
repeated spaces removed), as most published SentencePiece models are: what
tools/bench_preprocess.py measures. Such models tokenize exactly in training and
preprocessing, but have no exact tokenizer.json for a Hugging Face export.

Usage:
    python tokenizers/train_sentencepiece.py --input corpus.jsonl --model-prefix out/spm
    python tokenizers/train_sentencepiece.py --input corpus.jsonl --model-prefix out/spm \\
        --vocab-size 4096 --model-type unigram --user-defined-symbols "<|im_start|>,<|im_end|>"

Writes PREFIX.model and PREFIX.vocab (each under its final name only once complete).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
SEED = 1234


def iter_sentences(path: Path, json_key: str) -> Iterator[str]:
    """Yield the non-blank lines of `record[json_key]` for every record of a jsonl file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[json_key]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object with {json_key!r}: {e!r}"
                ) from e
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: {json_key!r} is not a string")
            for sentence in text.split("\n"):
                if sentence.strip():
                    yield sentence


def trainer_options(args: argparse.Namespace) -> dict[str, object]:
    """Return the SentencePieceTrainer keyword arguments for the parsed command line."""
    symbols = [s for s in (args.user_defined_symbols or "").split(",") if s]
    identity = args.normalization == "identity"
    return dict(
        model_type=args.model_type,
        vocab_size=args.vocab_size,
        byte_fallback=args.byte_fallback,
        character_coverage=args.character_coverage,
        user_defined_symbols=symbols,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        pad_piece="<pad>",
        # Identity normalization + kept whitespace: what Llama does, and what a Hugging Face
        # `tokenizer.json` reproduces exactly (NFKC would need spm's precompiled charsmap).
        normalization_rule_name=args.normalization,
        remove_extra_whitespaces=not identity,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        input_sentence_size=args.input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=16384,
        num_threads=args.num_threads,
        minloglevel=1,  # spm logs every step at 0; warnings and errors are enough
    )


def train(args: argparse.Namespace) -> tuple[Path, Path]:
    """Train and write PREFIX.model / PREFIX.vocab; return their paths."""
    prefix = Path(args.model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # No pid in the name: spm stores the prefix in the model, and reruns must be byte-identical.
    tmp_prefix = prefix.with_name(f".{prefix.name}.partial")
    spm.set_random_generator_seed(SEED)
    outputs = []
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter_sentences(Path(args.input), args.json_key),
            model_prefix=str(tmp_prefix),
            **trainer_options(args),
        )
        for suffix in (".vocab", ".model"):  # .model last: its presence means both are done
            final = Path(f"{prefix}{suffix}")
            os.replace(f"{tmp_prefix}{suffix}", final)
            outputs.append(final)
    finally:
        for suffix in (".vocab", ".model"):
            Path(f"{tmp_prefix}{suffix}").unlink(missing_ok=True)
    return outputs[1], outputs[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, help="jsonl file, one document per line")
    parser.add_argument("--json-key", default="text", help="record key holding the text")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model, PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe", help="algorithm")
    parser.add_argument(
        "--normalization",
        choices=["identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf"],
        default="identity",
        help="SentencePiece normalization rule (default identity: text kept as it is; others "
        "also remove extra whitespace, as SentencePiece does by default)",
    )
    parser.add_argument(
        "--byte-fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode unseen characters as UTF-8 byte tokens instead of <unk> (default on)",
    )
    parser.add_argument(
        "--user-defined-symbols",
        default="",
        help="comma-separated strings always kept as single tokens, e.g. '<|im_start|>,<tool>'",
    )
    parser.add_argument(
        "--character-coverage",
        type=float,
        default=0.9995,
        help="share of characters covered by the vocabulary; rarer ones use byte fallback",
    )
    parser.add_argument(
        "--input-sentence-size",
        type=int,
        default=200_000,
        help="sample at most this many lines (seeded), which bounds training time",
    )
    parser.add_argument(
        "--num-threads", type=int, default=os.cpu_count() or 1, help="trainer threads"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.input).is_file():
        sys.exit(f"error: --input {args.input} is not a file")
    start = time.monotonic()
    try:
        model, vocab = train(args)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    size = spm.SentencePieceProcessor(model_file=str(model)).get_piece_size()
    print(f"wrote {model} and {vocab}: vocab {size}, {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
