"""Build a small sample pretraining corpus from the documentation in Python's standard library.

Every machine with Python has this text, so the embedded default (a tiny model pretrained on
CPU) needs no download. Files are visited in sorted order and parsed with `ast` (nothing is
imported), so the corpus is byte-identical on every machine with the same Python version.

Each output line is one JSON record `{"text": ...}`: one docstring (module, class or
function) preceded by the dotted name of what it documents, or one section of the language
reference that `help()` shows (the strings of `pydoc_data/topics.py`). With Python 3.11 that is
about 2.6 MB in all; `--max-bytes` cuts it shorter.

Usage:
    python tools/make_sample_corpus.py --output /tmp/forge_sample/corpus.jsonl
    python tools/make_sample_corpus.py --output small.jsonl --max-bytes 200000
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MAX_BYTES = 4_000_000
# Docstrings shorter than this are mostly "Return x." one-liners: little signal per record.
MIN_DOC_CHARS = 32
# Directory names never walked: tests are noisy (and some are deliberately unparsable), and
# third-party packages would make the corpus depend on what is installed.
HELP_TOPICS_MODULE = "pydoc_data.topics"
SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "_bundled"}
)


def iter_stdlib_files(stdlib_dir: Path) -> Iterator[Path]:
    """Yield the .py files under `stdlib_dir` in a machine-independent (sorted) order."""
    for root, dirs, files in os.walk(stdlib_dir):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(root) / name


def module_name(path: Path, stdlib_dir: Path) -> str:
    """Return the dotted module name of `path` relative to the stdlib directory."""
    parts = list(path.relative_to(stdlib_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def iter_docstrings(tree: ast.Module, prefix: str) -> Iterator[tuple[str, str]]:
    """Yield (dotted name, cleaned docstring) for a module and its classes and functions."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield prefix, doc
    stack: list[tuple[ast.AST, str]] = [(tree, prefix)]
    while stack:
        node, name = stack.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                child_name = f"{name}.{child.name}"
                child_doc = ast.get_docstring(child, clean=True)
                if child_doc:
                    yield child_name, child_doc
                stack.append((child, child_name))


def iter_help_topics(tree: ast.Module) -> Iterator[tuple[str, str]]:
    """Yield (topic, text) from pydoc_data/topics.py, a module-level dict of str literals."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Constant):
                    if isinstance(value.value, str):
                        yield str(key.value), value.value.strip()


def iter_records(stdlib_dir: Path) -> Iterator[dict[str, str]]:
    """Yield `{"text": ...}` records for every usable docstring and help topic, in order."""
    for path in iter_stdlib_files(stdlib_dir):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are templates or deliberately invalid
        name = module_name(path, stdlib_dir)
        texts = (
            iter_help_topics(tree) if name == HELP_TOPICS_MODULE else iter_docstrings(tree, name)
        )
        for title, text in texts:
            if len(text) >= MIN_DOC_CHARS:
                yield {"text": f"{title}\n\n{text}"}


def write_corpus(output: Path, max_bytes: int, stdlib_dir: Path) -> tuple[int, int]:
    """Write records until the next would pass `max_bytes`; return (documents, bytes).

    The file appears under its final name only when complete.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    num_docs = num_bytes = 0
    try:
        with open(tmp, "wb") as f:
            for record in iter_records(stdlib_dir):
                line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
                if num_bytes + len(line) > max_bytes:
                    break
                f.write(line)
                num_docs += 1
                num_bytes += len(line)
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return num_docs, num_bytes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="jsonl file to write")
    parser.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"stop before the file would exceed this size (default {DEFAULT_MAX_BYTES})",
    )
    parser.add_argument(
        "--stdlib-dir",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="standard library directory to read (default: this Python's)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.stdlib_dir.is_dir():
        sys.exit(f"error: --stdlib-dir {args.stdlib_dir} is not a directory")
    num_docs, num_bytes = write_corpus(args.output, args.max_bytes, args.stdlib_dir)
    if num_docs == 0:
        sys.exit(f"error: no documents written to {args.output} (--max-bytes too small?)")
    print(f"wrote {args.output}: {num_docs} documents, {num_bytes} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
