"""megatron_forge.data.tokenizer: loading, special ids, megatron-core fit, HF export."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from megatron_forge.data.tokenizer import (
    NO_PAD_ID,
    HFTokenizer,
    MissingSpecialTokenError,
    SentencePieceTokenizer,
    TokenizerLoadError,
    load_tokenizer,
)
from megatron_forge.errors import DataError

SENTENCES = [
    "Return the number of items in a container.",
    "  indented code:\n    x = f(1, 2)  # comment\n\ttab",
    "Unicode: héllo wörld, naïve café, 日本語, emoji 🎉",
    "digits 1234567890 and tabs\t\tend ",
    "",
]


def test_sentencepiece_special_ids_and_round_trip(spm_model: Path, spm_vocab_size: int) -> None:
    tok = load_tokenizer(spm_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == spm_vocab_size
    assert (tok.unk, tok.bos, tok.eos, tok.pad, tok.eod) == (0, 1, 2, 3, 2)
    for text in SENTENCES:
        ids = tok.tokenize(text)
        assert all(isinstance(i, int) for i in ids)
        assert tok.bos not in ids and tok.eos not in ids
        assert tok.detokenize(ids) == text  # byte fallback + kept whitespace: lossless
    piece = tok.id_to_token(100)
    assert tok.vocab[piece] == 100 and tok.inv_vocab[100] == piece
    assert tok.tokenize("<|tool|>")[1:] == [tok.token_to_id("<|tool|>")]  # after the "▁" prefix


def test_directory_with_tokenizer_model(spm_model: Path, tmp_path: Path) -> None:
    shutil.copyfile(spm_model, tmp_path / "tokenizer.model")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.tokenize(SENTENCES[0]) == load_tokenizer(spm_model).tokenize(SENTENCES[0])


def test_hf_tokenizer_json_guesses_special_tokens(hf_tokenizer_json: Path) -> None:
    tok = load_tokenizer(hf_tokenizer_json)
    assert isinstance(tok, HFTokenizer)
    assert tok.eod == tok.eos == tok.token_to_id("<|endoftext|>")
    assert tok.pad == tok.token_to_id("<|pad|>")
    assert tok.bos is None
    for text in SENTENCES:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_hf_directory_reads_tokenizer_config(hf_tokenizer_json: Path, tmp_path: Path) -> None:
    shutil.copyfile(hf_tokenizer_json, tmp_path / "tokenizer.json")
    config = {"eos_token": {"content": "<|pad|>"}, "bos_token": "<|endoftext|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.eod == tok.token_to_id("<|pad|>")
    assert tok.bos == tok.token_to_id("<|endoftext|>")
    assert tok.pad == NO_PAD_ID  # the config names none, and no guessing when a config exists


def test_missing_eos_is_a_clear_error(hf_tokenizer_json: Path, tmp_path: Path) -> None:
    shutil.copyfile(hf_tokenizer_json, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    tok = load_tokenizer(tmp_path)
    with pytest.raises(MissingSpecialTokenError, match="no EOS token"):
        tok.eod  # noqa: B018


def test_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerLoadError, match=f"{missing} does not exist.*expected"):
        load_tokenizer(missing)
    with pytest.raises(TokenizerLoadError, match=f"directory {tmp_path} has neither"):
        load_tokenizer(tmp_path)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00not a model")
    with pytest.raises(TokenizerLoadError, match=f"{garbage} is not a SentencePiece model"):
        load_tokenizer(garbage)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{")
    with pytest.raises(TokenizerLoadError, match=f"{bad_json} is not a Hugging Face"):
        load_tokenizer(bad_json)
    assert issubclass(TokenizerLoadError, DataError)
    assert issubclass(MissingSpecialTokenError, DataError)  # and NotImplementedError, for mcore
    assert issubclass(MissingSpecialTokenError, NotImplementedError)


def test_tokenize_documents_appends_eod(spm_model: Path) -> None:
    """The one tokenize-and-end-with-EOD path of preprocess_data.py and make_webdataset.py."""
    tok = load_tokenizer(spm_model)
    texts = ["Return the value.", "x", "Unicode: héllo"]
    flat, lengths = tok.tokenize_documents(texts, append_eod=True, dtype=np.uint16)
    expected = [tok.tokenize(text) + [tok.eod] for text in texts]
    assert flat.dtype == np.uint16 and flat.tolist() == sum(expected, [])
    assert lengths.tolist() == [len(ids) for ids in expected]
    flat, lengths = tok.tokenize_documents(texts)
    assert flat.tolist() == sum((tok.tokenize(t) for t in texts), [])
    assert lengths.tolist() == [len(tok.tokenize(t)) for t in texts]


def test_fits_megatron_core(spm_model: Path) -> None:
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
    from megatron.core.tokenizers import MegatronTokenizerBase

    tok = load_tokenizer(spm_model)
    assert isinstance(tok, MegatronTokenizerBase)
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=16,
        blend=None,
        blend_per_split=None,
        split="1,0,0",
        tokenizer=tok,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    assert config.token_dtype_code == 8  # uint16
    # MegatronDataset hashes its config, tokenizer included, through unique_identifiers.
    assert json.loads(json.dumps(tok.unique_identifiers))["tokenizer_path"] == str(spm_model)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.tokenize(SENTENCES[1]) == tok.tokenize(SENTENCES[1])


@pytest.mark.parametrize("model_fixture", ["spm_model", "spm_unigram_model"])
def test_sentencepiece_export_loads_in_transformers(
    model_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(request.getfixturevalue(model_fixture))
    written = tok.save_pretrained_files(tmp_path / "hf")
    assert {p.name for p in written} == {
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    }
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SENTENCES:
        ids = tok.tokenize(text)
        assert hf(text)["input_ids"] == ids  # no BOS on either side
        assert hf.decode(ids) == text
    assert hf.eos_token_id == tok.eos and hf.pad_token_id == tok.pad and hf.bos_token_id == tok.bos
    # A user-defined symbol stays one token (the spaces around it may differ: see converter).
    assert tok.token_to_id("<|tool|>") in hf("call <|tool|> now")["input_ids"]
    # Our loader reads the exported directory back (through tokenizer.json) unchanged.
    assert load_tokenizer(tmp_path / "hf").tokenize(SENTENCES[2]) == tok.tokenize(SENTENCES[2])


def test_hf_export_loads_in_transformers(hf_tokenizer_json: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok = load_tokenizer(hf_tokenizer_json)
    tok.save_pretrained_files(tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SENTENCES:
        assert hf(text)["input_ids"] == tok.tokenize(text)
    assert hf.eos_token_id == tok.eod


@pytest.mark.parametrize("model_fixture", ["spm_model", "spm_unigram_model"])
def test_tokenize_flat_equals_tokenize(model_fixture: str, request: pytest.FixtureRequest) -> None:
    """Bulk encoding gives tokenize()'s ids with the fast backend (gigatoken, BPE only) or
    without, literal special and user-defined tokens included."""
    tok = load_tokenizer(request.getfixturevalue(model_fixture))
    texts = SENTENCES + [
        "a literal <s> and </s> in text, <pad> and <unk> too",
        "user-defined <|tool|> call(x) <|tool|>",
        "plain again",
    ]
    expected = [tok.tokenize(t) for t in texts]
    flat, lengths = tok.tokenize_flat(texts)
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert flat.tolist() == [i for ids in expected for i in ids]

    backend = tok.use_fast_backend()
    try:
        import gigatoken  # noqa: F401
    except ImportError:
        assert backend is None and "not installed" in tok.fast_backend_error
    else:
        if model_fixture == "spm_model":
            assert backend == tok.batch_backend == "gigatoken"
        else:  # gigatoken encodes BPE models only
            assert backend is None and "BPE" in tok.fast_backend_error
    arrow = pa.array(texts)
    for batch in (texts, texts[-3:], texts[:2], arrow, arrow[-3:], arrow[1:4], arrow[:0]):
        flat, lengths = tok.tokenize_flat(batch)  # lists, and Arrow arrays (sliced too)
        batch = batch if isinstance(batch, list) else batch.to_pylist()
        assert lengths.tolist() == [len(tok.tokenize(t)) for t in batch]
        assert flat.tolist() == [i for t in batch for i in tok.tokenize(t)]
