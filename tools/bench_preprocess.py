"""Benchmark tools/preprocess_data.py against Megatron-LM's two preprocessing strategies.

Builds a corpus of at least `--size-mb` MB (10^6 bytes) by replicating the sample corpus of
tools/make_sample_corpus.py (or takes `--input`, one uncompressed jsonl file), trains the
`--tokenizers` kinds on the sample (or takes one `--tokenizer`), then tokenizes the corpus
with every tokenizer, every method and every `--workers` count, each run in its own
subprocess, and prints one table row per run: wall seconds (start-up included), input MB/s,
output tokens/s, peak RSS (summed over the run's processes, sampled every 50 ms; pages
shared by forked workers count once per process), CPU seconds (user + system, all
processes) and the speedup over the Megatron-LM-style baseline with the same tokenizer and
worker count. With `--repeat R` every run is made R times, round-robin, and the table shows
the run of median time. Every run appends EOD to each document, and every output is compared
with ours at the first worker count for the same tokenizer: byte-identical .bin/.idx, or how
many documents' tokens differ.

Tokenizers (`--tokenizers`), each trained on the sample corpus in the benchmark:
  spm          SentencePiece BPE, `--vocab-size` (4k), no normalization, whitespace kept
               (tokenizers/train_sentencepiece.py's default).
  spm-nfkc     the same with SentencePiece's default normalization, nmt_nfkc (precompiled
               charsmap, extra whitespace removed), as most published SentencePiece models.
  bpe          a byte-level BPE tokenizer.json (GPT-2 / Llama 3 / Qwen kind) of
               `--bpe-vocab-size` (32k) entries, tokenizers/train_hf_bpe.py. The stdlib
               sample alone has too few distinct words for 32k merges, so its training text
               adds up to `--bpe-extra-mb` MB of docstrings of the installed packages (the
               same tool over site-packages).

Methods (`--methods`):
  ours         tools/preprocess_data.py --workers N (default `--tokenizer-backend auto`).
  ours-native  the same with `--tokenizer-backend native` (the tokenizer's own library).
  megatron     re-implementation, for comparison, of the documented strategy of Megatron-LM's
               tools/preprocess_data.py (not its code): multiprocessing.Pool(N).imap over the
               input's lines with chunksize 32 (a pool even for N=1), each worker parsing one
               json line and encoding one document per tokenizer call (our loader's
               `tokenize`: sentencepiece's encode), the main process writing each document's
               id list through megatron-core's IndexedDatasetBuilder.add_document.
  gigatoken    re-implementation of the strategy of Megatron-LM's newer
               tools/preprocess_data_fast.py: the whole file tokenized in Rust by gigatoken
               (`encode_files` on a `JsonlFileSource`, RAYON_NUM_THREADS=N), then written at
               once. Written to be as fast as that strategy allows: no torch import, vectorized
               .bin/.idx writing (megatron_forge.data.indexed). Needs `pip install gigatoken`
               and a tokenizer it can load (SentencePiece BPE with byte fallback, or a
               tokenizer.json); otherwise `hf-batch` runs in its place.
  hf-batch     the `tokenizers` library's Rust batch encoding (`encode_batch_fast`, N threads)
               on chunks of 8192 documents, for tokenizers gigatoken cannot load.

A replicated corpus repeats every word, which favours tokenizers that cache word encodings
(gigatoken does, within each call; sentencepiece does not), so pass `--input` with real data
for figures that transfer.

Usage:
    python tools/bench_preprocess.py                        # 200 MB, 3 tokenizers, 1 and 2
    python tools/bench_preprocess.py --size-mb 20 --tokenizers spm-nfkc bpe --methods ours megatron
    python tools/bench_preprocess.py --size-mb 20 --workers 1 2 4 --methods ours megatron
    python tools/bench_preprocess.py --repeat 3 --methods ours gigatoken --work-dir /tmp/b
    python tools/bench_preprocess.py --input web.jsonl --tokenizer /models/llama/tokenizer.model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megatron_forge.data.indexed import (
    HEADER_BYTES,
    IndexedDatasetWriter,
    append_eod_tokens,
    optimal_dtype,
    read_index_header,
)

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
REPO = Path(__file__).resolve().parents[1]  # the sample corpus and tokenizer scripts

MB = 1_000_000
DEFAULT_METHODS = ["megatron", "ours", "gigatoken"]
TOKENIZER_KINDS = ["spm", "spm-nfkc", "bpe"]
ALL_METHODS = ["megatron", "ours", "ours-native", "gigatoken", "hf-batch"]
LABELS = {
    "megatron": "Megatron-LM-style",
    "ours": "ours",
    "ours-native": "ours (native tok.)",
    "gigatoken": "gigatoken whole-file",
    "hf-batch": "tokenizers batch",
}
MEGATRON_CHUNKSIZE = 32  # Megatron-LM's Pool.imap chunksize
HF_BATCH_DOCS = 8192
POLL_SECONDS = 0.05


# Child processes: one method, one worker count --------------------------------------------
class MegatronStyleEncoder:
    """One json line -> one document's ids, one tokenizer call per document (Megatron-LM's
    documented strategy). The tokenizer is loaded once per worker by `initializer`."""

    tokenizer = None

    def __init__(self, tokenizer_path: str, json_key: str) -> None:
        self.tokenizer_path = tokenizer_path
        self.json_key = json_key

    def initializer(self) -> None:
        from megatron_forge.data.tokenizer import load_tokenizer

        MegatronStyleEncoder.tokenizer = load_tokenizer(self.tokenizer_path)

    def encode(self, json_line: str) -> tuple[list[int], list[int], int]:
        text = json.loads(json_line)[self.json_key]
        ids = MegatronStyleEncoder.tokenizer.tokenize(text)
        if ids:
            ids.append(MegatronStyleEncoder.tokenizer.eod)
        return ids, [len(ids)], len(json_line)


def run_megatron_style(args: argparse.Namespace) -> None:
    import multiprocessing

    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_forge.data.tokenizer import load_tokenizer

    encoder = MegatronStyleEncoder(args.tokenizer, args.json_key)
    vocab_size = load_tokenizer(args.tokenizer).vocab_size
    builder = IndexedDatasetBuilder(args.output + ".bin", dtype=DType.optimal_dtype(vocab_size))
    with (
        open(args.input, encoding="utf-8") as fin,
        multiprocessing.Pool(args.workers, initializer=encoder.initializer) as pool,
    ):
        for ids, lengths, _ in pool.imap(encoder.encode, fin, MEGATRON_CHUNKSIZE):
            builder.add_document(ids, lengths)  # a list, as Megatron-LM passes it
    builder.finalize(args.output + ".idx")


def load_gigatoken(tokenizer_path: str):  # noqa: ANN201 - gigatoken.Tokenizer
    """gigatoken's tokenizer for a SentencePiece .model, a tokenizer.json or a directory."""
    import gigatoken

    path = Path(tokenizer_path)
    if path.is_dir():
        path = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else path
        path = path / "tokenizer.model" if path.is_dir() else path
    if path.suffix == ".json":
        return gigatoken.Tokenizer(str(path))
    return gigatoken.Tokenizer.from_sentencepiece(path)


def write_flat(args: argparse.Namespace, flat: np.ndarray, lengths: np.ndarray) -> None:
    """Write documents given back to back, appending EOD to each non-empty one."""
    dtype = np.dtype(args.dtype)
    lengths = np.asarray(lengths, dtype=np.int64)
    flat, lengths = append_eod_tokens(flat.astype(dtype, copy=False), lengths, args.eod, True)
    writer = IndexedDatasetWriter(args.output + ".bin", dtype)
    writer.add_documents(flat, lengths)
    writer.finalize(args.output + ".idx")


def run_gigatoken(args: argparse.Namespace) -> None:
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # before gigatoken starts its pool
    import awkward as ak
    import gigatoken

    tokenizer = load_gigatoken(args.tokenizer)
    rows = tokenizer.backend.encode_files(
        gigatoken.JsonlFileSource([args.input], field=args.json_key), parallel=True
    )
    write_flat(args, ak.flatten(rows).to_numpy(), ak.num(rows, axis=1).to_numpy())


def run_hf_batch(args: argparse.Namespace) -> None:
    os.environ["RAYON_RS_NUM_CPUS"] = str(args.workers)  # the tokenizers library's threads
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    from tokenizers import Tokenizer

    path = Path(args.tokenizer)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.suffix == ".json":
        hf = Tokenizer.from_file(str(path))
    else:
        from megatron_forge.data.tokenizer import spm_to_hf_tokenizer

        hf = spm_to_hf_tokenizer(path / "tokenizer.model" if path.is_dir() else path)
    dtype = np.dtype(args.dtype)
    writer = IndexedDatasetWriter(args.output + ".bin", dtype)

    def flush(texts: list[str]) -> None:
        ids = [e.ids for e in hf.encode_batch_fast(texts, add_special_tokens=False)]
        lengths = np.fromiter(map(len, ids), np.int64, len(ids))
        flat = np.fromiter((i for doc in ids for i in doc), dtype, int(lengths.sum()))
        writer.add_documents(*append_eod_tokens(flat, lengths, args.eod, skip_empty=True))

    texts: list[str] = []
    with open(args.input, encoding="utf-8") as fin:
        for line in fin:
            texts.append(json.loads(line)[args.json_key])
            if len(texts) == HF_BATCH_DOCS:
                flush(texts)
                texts = []
    if texts:
        flush(texts)
    writer.finalize(args.output + ".idx")


CHILDREN = {"megatron": run_megatron_style, "gigatoken": run_gigatoken, "hf-batch": run_hf_batch}


# Parent: corpus, tokenizer, runs, checks, table --------------------------------------------
@dataclass
class Run:
    method: str
    workers: int
    tokenizer: str = ""  # the --tokenizers kind, or "given"
    seconds: float = 0.0
    mb_per_s: float = 0.0
    tokens: int = 0
    tokens_per_s: float = 0.0
    peak_rss_mb: float = 0.0
    cpu_seconds: float = 0.0
    speedup: float | None = None  # over the Megatron-LM-style run with as many workers
    check: str = ""
    error: str = ""
    output: str = ""


def build_corpus(work: Path, size_mb: float) -> Path:
    """The sample corpus, replicated whole until it holds at least `size_mb` MB."""
    target = int(size_mb * MB)
    sample = work / "sample.jsonl"
    tool = REPO / "tools/make_sample_corpus.py"
    max_bytes = min(4_000_000, max(target, 100_000))
    run_checked([sys.executable, str(tool), "--output", str(sample), "--max-bytes", str(max_bytes)])
    data = sample.read_bytes()
    copies = max(1, math.ceil(target / len(data)))
    corpus = work / "corpus.jsonl"
    with open(corpus, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return corpus


def train_tokenizers(args: argparse.Namespace, work: Path, sample: Path) -> dict[str, str]:
    """Train each `--tokenizers` kind on the sample; return kind -> tokenizer path."""
    paths = {}
    for kind in args.tokenizers:
        if kind == "bpe":
            paths[kind] = str(train_bpe(work, sample, args.bpe_vocab_size, args.bpe_extra_mb))
            continue
        prefix = work / f"{kind}{args.vocab_size}"
        trainer = REPO / "tokenizers/train_sentencepiece.py"
        normalization = "nmt_nfkc" if kind == "spm-nfkc" else "identity"
        run_checked(
            [sys.executable, str(trainer), "--input", str(sample), "--model-prefix", str(prefix)]
            + ["--vocab-size", str(args.vocab_size), "--normalization", normalization]
        )
        paths[kind] = str(prefix.with_suffix(".model"))
    return paths


def train_bpe(work: Path, sample: Path, vocab_size: int, extra_mb: float) -> Path:
    """A byte-level BPE tokenizer.json trained on the sample plus up to `extra_mb` MB of the
    installed packages' docstrings (the stdlib sample alone stops short of 32k merges)."""
    import sysconfig

    text = sample
    if extra_mb > 0:
        extra = work / "bpe_extra.jsonl"
        run_checked(
            [sys.executable, str(REPO / "tools/make_sample_corpus.py"), "--output", str(extra)]
            + ["--max-bytes", str(int(extra_mb * MB))]
            + ["--stdlib-dir", sysconfig.get_paths()["purelib"]]
        )
        text = work / "bpe_train.jsonl"
        text.write_bytes(sample.read_bytes() + extra.read_bytes())
    out = work / f"bpe{vocab_size}"
    run_checked(
        [sys.executable, str(REPO / "tokenizers/train_hf_bpe.py"), "--input", str(text)]
        + ["--output-dir", str(out), "--vocab-size", str(vocab_size), "--overwrite"]
    )
    return out


def run_checked(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{result.stderr.strip()}")


def tree_rss(proc) -> int:  # noqa: ANN001 - psutil.Process
    """Resident bytes of a process and all its descendants."""
    import psutil

    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, int, float, int]:
    """Run `cmd`; return (wall seconds, peak tree RSS bytes, CPU seconds, exit code)."""
    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        peak = 0
        try:
            handle = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak = max(peak, tree_rss(handle))
                time.sleep(POLL_SECONDS)
        except psutil.NoSuchProcess:
            pass
        proc.wait()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, peak, cpu, proc.returncode


def command(
    method: str, args: argparse.Namespace, tokenizer: str, workers: int, prefix: Path, extra: dict
) -> list:
    """The command line of one run, writing `output_path(prefix)`.bin/.idx."""
    output = str(output_path(prefix, args.json_key))
    if method in ("ours", "ours-native"):
        backend = "auto" if method == "ours" else "native"
        return [
            sys.executable,
            str(REPO / "tools/preprocess_data.py"),
            *("--input", str(args.input), "--output-prefix", str(prefix)),
            *("--tokenizer", tokenizer, "--json-keys", args.json_key, "--append-eod"),
            *("--workers", str(workers), "--tokenizer-backend", backend, "--overwrite"),
        ]
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        *("--child", method, "--input", str(args.input), "--output", output),
        *("--tokenizer", tokenizer, "--json-key", args.json_key),
        *("--workers", str(workers), "--eod", str(extra["eod"]), "--dtype", extra["dtype"]),
    ]


def output_path(prefix: Path, json_key: str) -> Path:
    """Megatron-LM's name for the dataset of one json key, as preprocess_data.py writes it."""
    return prefix.with_name(f"{prefix.name}_{json_key}_document")


def read_index(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of the .bin, per-document lengths) of a one-sequence-per-document dataset."""
    header = read_index_header(prefix + ".idx")
    dtype, num_seq = header.dtype, header.num_sequences
    lengths = np.memmap(prefix + ".idx", np.int32, "r", HEADER_BYTES, (num_seq,))
    tokens = np.memmap(prefix + ".bin", dtype, "r") if os.path.getsize(prefix + ".bin") else []
    return np.asarray(tokens), np.asarray(lengths, dtype=np.int64)


def compare_outputs(reference: str, other: str, block: int = 4096) -> str:
    """`identical` (same .bin and .idx bytes), or how many documents' tokens differ."""
    if all(_same_file(reference + ext, other + ext) for ext in (".bin", ".idx")):
        return "identical"
    tokens_a, lengths_a = read_index(reference)
    tokens_b, lengths_b = read_index(other)
    if len(lengths_a) != len(lengths_b):
        return f"{len(lengths_b)} documents, reference has {len(lengths_a)}"
    starts_a = np.concatenate([[0], np.cumsum(lengths_a)])
    starts_b = np.concatenate([[0], np.cumsum(lengths_b)])
    differ = 0
    for lo in range(0, len(lengths_a), block):
        hi = min(lo + block, len(lengths_a))
        if np.array_equal(lengths_a[lo:hi], lengths_b[lo:hi]) and np.array_equal(
            tokens_a[starts_a[lo] : starts_a[hi]], tokens_b[starts_b[lo] : starts_b[hi]]
        ):
            continue
        for i in range(lo, hi):
            a = tokens_a[starts_a[i] : starts_a[i + 1]]
            differ += not np.array_equal(a, tokens_b[starts_b[i] : starts_b[i + 1]])
    if differ == 0:
        return "same tokens (index bytes differ)"
    return f"{differ} of {len(lengths_a)} documents differ"


def _same_file(a: str, b: str, size: int = 1 << 24) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while chunk := fa.read(size):
            if chunk != fb.read(size):
                return False
    return True


def gigatoken_problem(tokenizer: str) -> str | None:
    """Why gigatoken cannot tokenize with `tokenizer`, or None if it can."""
    try:
        load_gigatoken(tokenizer)
    except ImportError:
        return "gigatoken is not installed (pip install gigatoken)"
    except Exception as e:  # gigatoken raises ValueError and others for unsupported models
        return f"gigatoken cannot load {tokenizer}: {e}"
    return None


def run_all(args: argparse.Namespace, work: Path, tokenizers: dict[str, str]) -> list[Run]:
    """Every tokenizer, method and worker count, `--repeat` times round-robin; per
    tokenizer, method and worker count, the run of median time is kept (its RSS and CPU time
    with it)."""
    from megatron_forge.data.tokenizer import load_tokenizer

    trials: dict[tuple[str, str, int], list[Run]] = {}
    commands = {}
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    size = os.path.getsize(args.input)
    (work / "out").mkdir(exist_ok=True)
    for kind, path in tokenizers.items():
        tok = load_tokenizer(path)
        extra = {"eod": tok.eod, "dtype": np.dtype(optimal_dtype(tok.vocab_size)).name}
        methods = list(args.methods)
        if "gigatoken" in methods and (problem := gigatoken_problem(path)):
            print(
                f"note: {kind}: {problem}; comparing with the tokenizers library's batch encoding"
            )
            methods = [m for m in methods if m != "gigatoken"]
            methods += [] if "hf-batch" in methods else ["hf-batch"]
        for method in methods:
            for workers in args.workers:
                prefix = work / "out" / f"{kind}_{method}_w{workers}"
                trials[(kind, method, workers)] = []
                commands[(kind, method, workers)] = (
                    command(method, args, path, workers, prefix, extra),
                    prefix,
                )
    for trial in range(args.repeat):
        for (kind, method, workers), runs in trials.items():
            cmd, prefix = commands[(kind, method, workers)]
            run = Run(method, workers, kind, output=str(output_path(prefix, args.json_key)))
            print(
                f"running {kind}: {LABELS[method]}, {workers} worker(s), "
                f"trial {trial + 1}/{args.repeat}",
                file=sys.stderr,
                flush=True,
            )
            run.seconds, peak, run.cpu_seconds, code = measure(cmd, env, prefix.with_suffix(".log"))
            run.peak_rss_mb = peak / 2**20
            if code != 0:
                log = prefix.with_suffix(".log").read_text(errors="replace").strip()
                run.error = f"exit {code}: " + log[-2000:]
                print(run.error, file=sys.stderr)
            else:
                run.tokens = int(read_index(run.output)[1].sum())
                run.mb_per_s = size / MB / run.seconds
                run.tokens_per_s = run.tokens / run.seconds
            runs.append(run)
    runs = []
    for trial_runs in trials.values():
        failed = [r for r in trial_runs if r.error]
        by_time = sorted(trial_runs, key=lambda r: r.seconds)
        runs.append(failed[0] if failed else by_time[(len(by_time) - 1) // 2])
    for kind in tokenizers:
        done = [r for r in runs if not r.error and r.tokenizer == kind]
        reference = next((r for r in done if r.method == "ours"), done[0] if done else None)
        for run in done:
            run.check = (
                "reference" if run is reference else compare_outputs(reference.output, run.output)
            )
            base = next(
                (b for b in done if b.method == "megatron" and b.workers == run.workers), None
            )
            run.speedup = base.seconds / run.seconds if base else None
    return runs


def format_table(runs: list[Run]) -> str:
    header = (
        f"{'tokenizer':<9} {'method':<20} {'workers':>7} {'seconds':>8} {'MB/s':>7} "
        f"{'tokens/s':>11} {'peak RSS MB':>11} {'CPU s':>7} {'vs Megatron-LM':>14}  tokens"
    )
    lines = [header, "-" * len(header)]
    for r in runs:
        if r.error:
            lines.append(
                f"{r.tokenizer:<9} {LABELS[r.method]:<20} {r.workers:>7}  "
                f"failed: {r.error.splitlines()[0]}"
            )
            continue
        speedup = f"{r.speedup:.1f}x" if r.speedup is not None else "-"
        lines.append(
            f"{r.tokenizer:<9} {LABELS[r.method]:<20} {r.workers:>7} {r.seconds:>8.1f} "
            f"{r.mb_per_s:>7.1f} "
            f"{r.tokens_per_s:>11,.0f} {r.peak_rss_mb:>11.0f} {r.cpu_seconds:>7.1f} "
            f"{speedup:>14}  {r.check}"
        )
    return "\n".join(lines)


def verdict(runs: list[Run]) -> list[str]:
    """One line per tokenizer and worker count: ours against the Megatron-LM-style and Rust
    runs."""
    lines = []
    by_key = {(r.tokenizer, r.method, r.workers): r for r in runs if not r.error}
    for kind in dict.fromkeys(r.tokenizer for r in runs):
        for workers in sorted({r.workers for r in runs}):
            ours = by_key.get((kind, "ours", workers))
            if ours is None:
                continue
            parts = [f"{kind}, {workers} worker(s): ours {ours.mb_per_s:.1f} MB/s"]
            if base := by_key.get((kind, "megatron", workers)):
                parts.append(
                    f"{base.seconds / ours.seconds:.1f}x Megatron-LM-style "
                    f"({base.cpu_seconds / ours.cpu_seconds:.1f}x in CPU time)"
                )
            for fast in ("gigatoken", "hf-batch"):
                if other := by_key.get((kind, fast, workers)):
                    parts.append(f"{other.seconds / ours.seconds:.2f}x {LABELS[fast]}")
            lines.append(", ".join(parts))
    return lines


def describe(kind: str, path: str) -> str:
    """`kind` (library, vocabulary size, normalization): path."""
    from megatron_forge.data.tokenizer import SentencePieceTokenizer, load_tokenizer, spm_proto

    tok = load_tokenizer(path)
    what = f"{tok.library}, {tok.vocab_size} entries"
    if isinstance(tok, SentencePieceTokenizer):
        what += f", {spm_proto(tok.model_file).normalizer_spec.name or 'identity'}"
    return f"{kind} ({what}): {path}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, help="jsonl file (default: the sample, replicated)")
    parser.add_argument("--size-mb", type=float, default=200, help="corpus size to build (10^6 B)")
    parser.add_argument(
        "--tokenizer", help="one tokenizer to use instead of training the --tokenizers kinds"
    )
    parser.add_argument(
        "--tokenizers",
        nargs="+",
        choices=TOKENIZER_KINDS,
        default=TOKENIZER_KINDS,
        help="tokenizers to train on the sample and run (see above)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=4096, help="of the trained SentencePiece models"
    )
    parser.add_argument(
        "--bpe-vocab-size", type=int, default=32768, help="of the trained byte-level BPE"
    )
    parser.add_argument(
        "--bpe-extra-mb",
        type=float,
        default=6,
        help="MB of installed packages' docstrings added to the BPE training text (0: none)",
    )
    parser.add_argument("--json-key", default="text", help="record key holding the text")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts")
    parser.add_argument(
        "--methods", nargs="+", choices=ALL_METHODS, default=DEFAULT_METHODS, help="what to run"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each; the table shows the median one"
    )
    parser.add_argument("--work-dir", type=Path, help="keep corpus, tokenizer and outputs here")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    # Internal: run one method in this process (the parent measures it).
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--eod", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(w < 1 for w in args.workers):
        parser.error("--workers must be >= 1")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.input is not None and not args.input.is_file():
        parser.error(f"--input {args.input} is not a file")
    if args.input is not None and not args.input.name.endswith((".jsonl", ".json")):
        parser.error(f"--input {args.input}: the baselines read one uncompressed jsonl file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        args.workers = args.workers[0]
        CHILDREN[args.child](args)
        return 0
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        if args.input is None:
            args.input = build_corpus(work, args.size_mb)
        if args.tokenizer is None:
            sample = work / "sample.jsonl" if (work / "sample.jsonl").exists() else args.input
            tokenizers = train_tokenizers(args, work, sample)
        else:
            tokenizers = {"given": str(args.tokenizer)}
        setup = time.perf_counter() - start
        runs = run_all(args, work, tokenizers)
        size = os.path.getsize(args.input)
        print(f"corpus: {args.input} ({size / MB:.1f} MB)")
        print("tokenizers: " + "; ".join(describe(k, p) for k, p in tokenizers.items()))
        print(f"setup (corpus, tokenizer): {setup:.1f}s; machine: {os.cpu_count()} CPUs")
        print(format_table(runs))
        for line in verdict(runs):
            print(line)
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
        return 1 if any(r.error for r in runs) else 0
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
