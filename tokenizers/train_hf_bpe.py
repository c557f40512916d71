"""Train a byte-level BPE tokenizer (GPT-2 / Llama 3 style) with the `tokenizers` library.

Byte-level: text is mapped to 256 byte symbols first, so every string encodes without
<unk> and decodes back exactly. Pre-tokenization is GPT-2's regex (words, numbers,
punctuation, runs of spaces kept apart) with no prefix space. Special tokens come first in
the vocabulary: `<|endoftext|>` (id 0: end of document, the EOS that
`tools/preprocess_data.py --append-eod` appends), `<|pad|>` (id 1), then any
`--special-tokens`. BOS is not used (pretraining documents are separated by EOS only).
Special tokens typed in a document are encoded as the text they are, never as the token
(`split_special_tokens` in tokenizer_config.json, as in training).

Writes OUTPUT_DIR/tokenizer.json, tokenizer_config.json and special_tokens_map.json: a
directory that `megatron_forge.data.tokenizer.load_tokenizer` (data.tokenizer) and
`transformers.AutoTokenizer.from_pretrained` both load, with the same ids. The directory
appears under its final name only when complete.

Usage:
    python tokenizers/train_hf_bpe.py --input corpus.jsonl --output-dir out/bpe --vocab-size 8192
    python tokenizers/train_hf_bpe.py --input 'data/*.parquet' --output-dir tokenizers/web \\
        --vocab-size 32000 --special-tokens '<|im_start|>' '<|im_end|>'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_forge.data.corpus import iter_texts, resolve_inputs
from megatron_forge.errors import DataError

EOS, PAD = "<|endoftext|>", "<|pad|>"


def build_trainer(args: argparse.Namespace) -> tuple[Tokenizer, trainers.BpeTrainer]:
    """An empty byte-level BPE tokenizer and the trainer that fills it."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [EOS, PAD] + [t for t in args.special_tokens if t not in (EOS, PAD)]
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tokenizer, trainer


def hf_config_files(args: argparse.Namespace) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json: what transformers reads."""
    extra = [t for t in args.special_tokens if t not in (EOS, PAD)]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": PAD,
        "bos_token": None,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": args.model_max_length,
        # Special tokens typed in text are text, in transformers as in training.
        "split_special_tokens": True,
    }
    if extra:
        config["additional_special_tokens"] = extra
    special_map = {"eos_token": EOS, "pad_token": PAD}
    if extra:
        special_map["additional_special_tokens"] = extra
    return {"tokenizer_config.json": config, "special_tokens_map.json": special_map}


def train(args: argparse.Namespace) -> Path:
    """Train on every document of the inputs and write the output directory."""
    files = resolve_inputs(args.input)
    out = Path(args.output_dir)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    tokenizer, trainer = build_trainer(args)
    tokenizer.train_from_iterator(iter_texts(files, args.json_key), trainer)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, content in hf_config_files(args).items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", required=True, help="jsonl/jsonl.gz/jsonl.zst/parquet, dir, glob"
    )
    parser.add_argument("--json-key", default="text", help="record key (parquet column) to read")
    parser.add_argument("--output-dir", required=True, help="directory to write")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size")
    parser.add_argument(
        "--special-tokens",
        nargs="*",
        default=[],
        help=f"extra special tokens after {EOS} (0) and {PAD} (1), e.g. '<|im_start|>'",
    )
    parser.add_argument("--min-frequency", type=int, default=2, help="least count of a merge")
    parser.add_argument(
        "--model-max-length", type=int, default=4096, help="model_max_length for transformers"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    args = parser.parse_args(argv)
    if args.vocab_size < 256 + 2 + len(args.special_tokens):
        parser.error(f"--vocab-size={args.vocab_size} must hold the 256 bytes + special tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    try:
        out = train(args)
    except (DataError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    print(f"wrote {out}: byte-level BPE, vocab {vocab}, {time.monotonic() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
