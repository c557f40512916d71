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
    FAST_BACKEND_PROBES,
    NO_PAD_ID,
    HFTokenizer,
    MissingSpecialTokenError,
    SentencePieceTokenizer,
    TokenizerLoadError,
    _in_document_order,
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


# Special-token strings typed in text: training encodes them as plain text (no document can
# inject a control token), and so must the exported tokenizer.
INJECTION_TEXTS = [
    "<s>",
    "</s>",
    "a literal <s> and </s> in text",
    "<unk><pad><s></s>",
    "<|endoftext|>",
    "end<|endoftext|>next <|pad|> <|begin_of_text|><|im_start|>user",
    "<<s>> </s/> <s >",
]


def assert_export_agrees(tok, export_dir: Path, texts: list[str]) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(export_dir)
    ours = tok.tokenize_batch(texts)
    for text, ids, theirs in zip(texts, ours, hf(texts)["input_ids"], strict=True):
        assert theirs == ids, text
    specials = {tok.bos, tok.eos, tok.pad, tok.unk} - {None}
    for text, ids in zip(texts, ours, strict=True):
        assert not specials & set(ids), text  # no control token comes from text


def test_sentencepiece_export_splits_special_tokens(spm_model: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(spm_model)
    tok.save_pretrained_files(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["split_special_tokens"] is True
    assert_export_agrees(tok, tmp_path / "hf", INJECTION_TEXTS + SENTENCES)
    assert_export_agrees(load_tokenizer(tmp_path / "hf"), tmp_path / "hf", INJECTION_TEXTS)
    # transformers' SentencePiece path (tokenizer.model through sentencepiece) agrees too.
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    slow = SentencePieceBackend.from_pretrained(tmp_path / "hf")
    for text in INJECTION_TEXTS + SENTENCES:
        assert slow(text)["input_ids"] == tok.tokenize(text), text


def test_hf_tokenizer_never_matches_special_tokens_in_text(
    hf_tokenizer_json: Path, tmp_path: Path
) -> None:
    """Training and export encode `<|endoftext|>` typed in text as text; the tokenizer's
    post-processor still adds its BOS in transformers."""
    from tokenizers import Tokenizer, processors

    tok = load_tokenizer(hf_tokenizer_json)
    assert tok.eod not in tok.tokenize("<|endoftext|>")
    assert tok.detokenize(tok.tokenize(INJECTION_TEXTS[5])) == INJECTION_TEXTS[5]
    tok.save_pretrained_files(tmp_path / "bare")
    assert_export_agrees(tok, tmp_path / "bare", INJECTION_TEXTS + SENTENCES)

    # A directory with its own tokenizer_config.json and a BOS-adding post-processor.
    src = tmp_path / "src"
    src.mkdir()
    rust = Tokenizer.from_file(str(hf_tokenizer_json))
    bos = rust.token_to_id("<|pad|>")  # stands in for a BOS token
    rust.post_processor = processors.TemplateProcessing(
        single="<|pad|> $A", special_tokens=[("<|pad|>", bos)]
    )
    rust.save(str(src / "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "bos_token": "<|pad|>", "model_max_length": 64}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(src)
    tok.save_pretrained_files(tmp_path / "dir")
    exported = json.loads((tmp_path / "dir" / "tokenizer_config.json").read_text())
    assert exported == {**config, "split_special_tokens": True}
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "dir")
    for text in INJECTION_TEXTS:
        assert hf(text)["input_ids"] == [bos] + tok.tokenize(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.tokenize(text)

    # With a chat template, transformers encodes the rendered chat (control tokens typed in)
    # with the same setting: the export keeps the source's, so the template still works.
    template = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    load_tokenizer(src).save_pretrained_files(tmp_path / "chat")
    assert "split_special_tokens" not in json.loads(
        (tmp_path / "chat" / "tokenizer_config.json").read_text()
    )
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "chat")
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], return_dict=True)
    assert chat["input_ids"] == [tok.eod, *tok.tokenize("hi")]


@pytest.mark.slow
def test_export_tokenizes_the_sample_corpus_like_training(sample_data: Path, tmp_path: Path):
    """Every document of the sample corpus: AutoTokenizer on the export gives training's ids
    (one of them holds a literal `<s>`)."""
    tok = load_tokenizer(sample_data / "tokenizer.model")
    tok.save_pretrained_files(tmp_path / "hf")
    lines = (sample_data / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    assert len(texts) > 7000 and any("<s>" in text for text in texts)
    assert_export_agrees(tok, tmp_path / "hf", texts)


# Text that normalizers, pre-tokenizers and byte fallback treat specially.
# fmt: off
ADVERSARIAL_PIECES = [
    *"aZ09.,;:!?'\"-_()[]{}<>/\\|@#$%^&*+=~`",
    " ", "  ", "   ", "\t", "\n", "\r\n", "\r", "\x00", "\x01", "\x0b", "\x0c", "\x1f", "\x7f",
    "\x85", "\u00a0", "\u2028", "\u3000", "\u200b", "\u200d", "\ufeff", "\u2581",
    "ﬁ", "①", "²", "½", "Ｈ", "ｅ", "ℌ", "™", "…", "㍿", "Ⅻ", "ǅ", "ß", "İ", "ﾊﾟ",
    "e\u0301", "\u0301", "\u0308", "\u0302", "a\u0308\u0301", "\u1100\u1161\u11a8", "가",
    "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "𝔘", "汉字", "한국어", "Привет", "ΑΒΓ",
    "it's", " we've", "12345", "3.14", "def", " return", "the", " of",
    "<s>", "</s>", "<unk>", "<pad>", "<|endoftext|>", "<|pad|>", "<|tool|>",
]
# fmt: on


def adversarial_texts(count: int = 400, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = list(FAST_BACKEND_PROBES) + INJECTION_TEXTS + SENTENCES + ADVERSARIAL_PIECES
    for _ in range(count):
        picks = rng.integers(0, len(ADVERSARIAL_PIECES), int(rng.integers(1, 40)))
        texts.append("".join(ADVERSARIAL_PIECES[i] for i in picks))
    ascii_ = " \t\n\r\x0b\x0c\x00\x01\x1f\x7f" + "abc XYZ 019 .,'!" * 3  # control-heavy ASCII
    for _ in range(count // 2):
        texts.append("".join(rng.choice(list(ascii_), int(rng.integers(1, 30)))))
    return texts


def with_added_token(tokenizer_json: Path, out_dir: Path) -> Path:
    """A copy of a tokenizer.json with a user-defined (not special) added token."""
    from tokenizers import AddedToken, Tokenizer

    rust = Tokenizer.from_file(str(tokenizer_json))
    rust.add_tokens([AddedToken("<|tool|>", special=False, normalized=False)])
    out_dir.mkdir()
    rust.save(str(out_dir / "tokenizer.json"))
    return out_dir / "tokenizer.json"


@pytest.mark.parametrize(
    "fixture", ["spm_model", "spm_nfkc_model", "hf_tokenizer_json", "hf_with_added_token"]
)
def test_fast_backend_is_exact_on_adversarial_text(
    fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """gigatoken takes every kind of real tokenizer: SentencePiece with no normalization or
    with nmt_nfkc (charsmap, whitespace removal), and byte-level BPE tokenizer.json; its ids
    are the tokenizer's own on NFKC-sensitive, control, whitespace, emoji and byte-fallback
    text, special-token strings and user-defined symbols included."""
    pytest.importorskip("gigatoken")
    if fixture == "hf_with_added_token":
        path = with_added_token(request.getfixturevalue("hf_tokenizer_json"), tmp_path / "hf")
    else:
        path = request.getfixturevalue(fixture)
    tok = load_tokenizer(path)
    texts = adversarial_texts()
    expected = [tok.tokenize(text) for text in texts]
    assert tok.use_fast_backend() == tok.batch_backend == "gigatoken", tok.fast_backend_error
    assert tok.takes_arrow
    for batch in (texts, pa.array(texts), pa.array(texts)[7:300]):
        flat, lengths = tok.tokenize_flat(batch)
        want = expected if isinstance(batch, list) else expected[batch.offset :][: len(batch)]
        assert lengths.tolist() == [len(ids) for ids in want]
        assert flat.tolist() == [i for ids in want for i in ids]
    if fixture == "spm_nfkc_model":  # the normalization is really there
        assert tok._fast._ascii_config is not None  # ASCII texts normalized in Rust
        assert tok.tokenize("ﬁ①") == tok.tokenize("fi1")
        assert tok.tokenize("  a \t b  ") == tok.tokenize("a b")


def test_fast_backend_reloads_to_bound_memory(hf_tokenizer_json: Path) -> None:
    """gigatoken's pretoken cache grows with every distinct word; past `max_growth_bytes` of
    growth the backend is loaded again (dropping it), with the same ids."""
    pytest.importorskip("gigatoken")
    tok = load_tokenizer(hf_tokenizer_json)
    assert tok.use_fast_backend() == "gigatoken"
    texts = adversarial_texts(50)
    first = tok.tokenize_flat(texts)
    assert tok._fast.loads == 1
    tok._fast.max_growth_bytes = -(1 << 40)  # reload before every batch
    for _ in range(2):
        again = tok.tokenize_flat(pa.array(texts))
        assert again[0].tolist() == first[0].tolist()
        assert again[1].tolist() == first[1].tolist()
    assert tok._fast.loads == 3


@pytest.mark.slow
def test_fast_backends_match_on_the_sample_corpus(
    sample_data: Path, spm_trainer, bpe_trainer, tmp_path: Path
) -> None:
    """Every document of the sample corpus: gigatoken's ids are the tokenizer's own for the
    sample's SentencePiece model, an nmt_nfkc SentencePiece model and a byte-level BPE."""
    pytest.importorskip("gigatoken")
    corpus = sample_data / "corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    args = ["--input", str(corpus), "--model-prefix", str(tmp_path / "nfkc")]
    nfkc, _ = spm_trainer.train(
        spm_trainer.parse_args([*args, "--vocab-size", "2048", "--normalization", "nmt_nfkc"])
    )
    args = ["--input", str(corpus), "--output-dir", str(tmp_path / "bpe"), "--vocab-size", "8192"]
    assert bpe_trainer.main(args) == 0
    for path in (sample_data / "tokenizer.model", nfkc, tmp_path / "bpe"):
        tok = load_tokenizer(path)
        expected = tok.tokenize_batch(texts)
        assert tok.use_fast_backend() == "gigatoken", tok.fast_backend_error
        flat, lengths = tok.tokenize_flat(pa.array(texts))
        assert lengths.tolist() == [len(ids) for ids in expected], path
        assert np.array_equal(flat, np.concatenate([np.asarray(ids) for ids in expected])), path


def test_two_groups_of_documents_merge_back_in_order() -> None:
    """_in_document_order puts the ids of documents encoded in two groups (nmt_nfkc: ASCII
    documents normalized in Rust, the others by sentencepiece) back in document order,
    empty documents and single-document runs included."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        count = int(rng.integers(1, 30))
        mask = rng.random(count) < rng.random()
        docs = [rng.integers(0, 1000, int(rng.integers(0, 5))).astype(np.uint32) for _ in mask]

        groups = []
        for keep in (True, False):
            chosen = [d for d, m in zip(docs, mask) if m == keep]
            flat = np.concatenate(chosen) if chosen else np.zeros(0, np.uint32)
            groups.append((flat, np.array([d.size for d in chosen], np.int64)))
        flat, lengths = _in_document_order(mask, *groups)
        assert lengths.tolist() == [d.size for d in docs]
        assert flat.dtype == np.uint32 and flat.tolist() == [i for d in docs for i in d]
