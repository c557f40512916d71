"""tokenizers/train_hf_bpe.py: a byte-level BPE that our loader and transformers both load,
with the same ids and special tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from megatron_forge.data.tokenizer import HFTokenizer, TokenizerLoadError, load_tokenizer
from tests.data.test_tokenizer import SENTENCES


@pytest.fixture(scope="module")
def bpe_dir(bpe_trainer: ModuleType, tiny_corpus: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bpe") / "tok"
    args = ["--input", str(tiny_corpus), "--output-dir", str(out), "--vocab-size", "600"]
    assert bpe_trainer.main([*args, "--special-tokens", "<|im_start|>", "<|im_end|>"]) == 0
    return out


def test_loads_in_our_loader_with_special_ids(bpe_dir: Path) -> None:
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 600
    assert (tok.eod, tok.eos, tok.pad, tok.bos) == (0, 0, 1, None)
    assert tok.token_to_id("<|im_start|>") == 2 and tok.token_to_id("<|im_end|>") == 3
    for text in SENTENCES:  # byte-level: every string round-trips, nothing is <unk>
        ids = tok.tokenize(text)
        assert tok.detokenize(ids) == text and tok.eos not in ids
    assert tok.tokenize_batch(SENTENCES) == [tok.tokenize(t) for t in SENTENCES]
    # A special token typed in a document is text: no document injects a chat marker or EOS.
    assert 2 not in tok.tokenize("a <|im_start|> b") and 0 not in tok.tokenize("<|endoftext|>")
    assert tok.detokenize(tok.tokenize("a <|im_start|> b")) == "a <|im_start|> b"


def test_loads_in_transformers_with_the_same_ids(bpe_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    tok = load_tokenizer(bpe_dir)
    for text in [*SENTENCES, "a <|im_start|> b<|im_end|>", "<|endoftext|><|pad|>"]:
        assert hf(text)["input_ids"] == tok.tokenize(text)
        assert hf.decode(hf(text)["input_ids"]) == text
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (0, 1, None)
    assert hf.convert_tokens_to_ids("<|im_end|>") == 3
    # The export path for checkpoints writes files transformers reads back the same way.
    tok.save_pretrained_files(tmp_path / "export")
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert again(SENTENCES[2])["input_ids"] == tok.tokenize(SENTENCES[2])


def test_deterministic_and_safe(
    bpe_trainer: ModuleType, bpe_dir: Path, tiny_corpus: Path, tmp_path: Path, capsys
) -> None:
    again = tmp_path / "again"
    args = ["--input", str(tiny_corpus), "--vocab-size", "600"]
    extra = ["--special-tokens", "<|im_start|>", "<|im_end|>"]
    assert bpe_trainer.main([*args, "--output-dir", str(again), *extra]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (bpe_dir / name).read_bytes()
    assert bpe_trainer.main([*args, "--output-dir", str(again)]) == 1
    assert (
        capsys.readouterr().err.strip() == f"error: {again} exists; pass --overwrite to replace it"
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    assert bpe_trainer.main(["--input", str(bad), "--output-dir", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.strip() == f"error: {bad}:2: missing key 'text' (has ['txt'])"
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial*"))
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["add_bos_token"] is False


def test_registered_name(bpe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare name resolves in $FORGE_TOKENIZERS, else in tokenizers/ of the working
    directory (a checkout's tokenizers/ folder when run from its root); never in the
    installed package."""
    from megatron_forge.data import tokenizer as module

    expected = load_tokenizer(bpe_dir).tokenize("hello")
    monkeypatch.setenv(module.TOKENIZERS_ENV, str(bpe_dir.parent))
    assert load_tokenizer("tok").tokenize("hello") == expected
    monkeypatch.delenv(module.TOKENIZERS_ENV)
    work = tmp_path / "work"
    shutil.copytree(bpe_dir, work / "tokenizers" / "mine")
    monkeypatch.chdir(work)
    assert load_tokenizer("mine").tokenize("hello") == expected
    with pytest.raises(TokenizerLoadError) as err:
        load_tokenizer("tok")
    message = str(err.value)
    assert "tokenizer path tok does not exist" in message
    assert f"name registered in {work / 'tokenizers'} (set FORGE_TOKENIZERS" in message
