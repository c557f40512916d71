"""tools/make_sample_corpus.py: valid jsonl, size cap, identical output on every run."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType


def test_small_corpus_is_valid_and_deterministic(corpus_tool: ModuleType, tmp_path: Path) -> None:
    first, second = tmp_path / "a" / "corpus.jsonl", tmp_path / "b.jsonl"
    for path in (first, second):
        assert corpus_tool.main(["--output", str(path), "--max-bytes", "60000"]) == 0
    data = first.read_bytes()
    assert data == second.read_bytes()
    assert 50_000 < len(data) <= 60_000
    texts = [json.loads(line)["text"] for line in data.decode("utf-8").splitlines()]
    assert len(texts) > 20 and all(isinstance(t, str) and t.strip() for t in texts)
    assert texts[0].startswith("__future__\n\n")  # sorted walk: the first stdlib module
    assert not list(tmp_path.glob("**/.*tmp*"))  # the temporary file was renamed


def test_skips_tests_and_unparsable_files(corpus_tool: ModuleType, tmp_path: Path) -> None:
    stdlib = tmp_path / "lib"
    (stdlib / "pkg").mkdir(parents=True)
    (stdlib / "test").mkdir()
    doc = '"""A module docstring that is long enough to keep."""\n'
    (stdlib / "pkg" / "__init__.py").write_text(
        doc + 'def f():\n    """Function docstring, also long enough to keep."""\n'
    )
    (stdlib / "test" / "test_x.py").write_text(doc)
    (stdlib / "broken.py").write_text("def (:\n")
    out = tmp_path / "out.jsonl"
    assert corpus_tool.main(["--output", str(out), "--stdlib-dir", str(stdlib)]) == 0
    texts = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert texts == [
        "pkg\n\nA module docstring that is long enough to keep.",
        "pkg.f\n\nFunction docstring, also long enough to keep.",
    ]
