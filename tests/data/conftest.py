"""Shared fixtures for the data pipeline tests: the tools as modules, tiny trained tokenizers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SPM_VOCAB_SIZE = 384  # the smallest round size above 256 bytes + 4 specials + the characters


def load_script(relpath: str) -> ModuleType:
    """Import a script from tools/ or tokenizers/ (folders that are not packages)."""
    path = REPO / relpath
    name = f"forge_script_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def spm_vocab_size() -> int:
    return SPM_VOCAB_SIZE


@pytest.fixture(scope="session")
def corpus_tool() -> ModuleType:
    return load_script("tools/make_sample_corpus.py")


@pytest.fixture(scope="session")
def preprocess_tool() -> ModuleType:
    return load_script("tools/preprocess_data.py")


@pytest.fixture(scope="session")
def spm_trainer() -> ModuleType:
    return load_script("tokenizers/train_sentencepiece.py")


@pytest.fixture(scope="session")
def bpe_trainer() -> ModuleType:
    return load_script("tokenizers/train_hf_bpe.py")


@pytest.fixture(scope="session")
def webdataset_tool() -> ModuleType:
    return load_script("tools/make_webdataset.py")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory, corpus_tool: ModuleType) -> Path:
    """About 150 kB of stdlib docstrings as jsonl."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    corpus_tool.main(["--output", str(path), "--max-bytes", "150000"])
    return path


def train_tiny_spm(
    trainer: ModuleType, corpus: Path, prefix: Path, model_type: str, *extra: str
) -> Path:
    args = trainer.parse_args(
        ["--input", str(corpus), "--model-prefix", str(prefix)]
        + ["--vocab-size", str(SPM_VOCAB_SIZE), "--model-type", model_type]
        + ["--user-defined-symbols", "<|tool|>", *extra]
    )
    model, _ = trainer.train(args)
    return model


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory: pytest.TempPathFactory, spm_trainer, tiny_corpus) -> Path:
    """A tiny BPE SentencePiece model trained by tokenizers/train_sentencepiece.py."""
    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    return train_tiny_spm(spm_trainer, tiny_corpus, prefix, "bpe")


@pytest.fixture(scope="session")
def spm_nfkc_model(tmp_path_factory: pytest.TempPathFactory, spm_trainer, tiny_corpus) -> Path:
    """A tiny BPE SentencePiece model with SentencePiece's default normalization, nmt_nfkc
    (precompiled charsmap, extra whitespace removed), as most published models have."""
    prefix = tmp_path_factory.mktemp("spm_nfkc") / "tiny"
    return train_tiny_spm(spm_trainer, tiny_corpus, prefix, "bpe", "--normalization", "nmt_nfkc")


@pytest.fixture(scope="session")
def spm_unigram_model(tmp_path_factory: pytest.TempPathFactory, spm_trainer, tiny_corpus) -> Path:
    prefix = tmp_path_factory.mktemp("spm_unigram") / "tiny"
    return train_tiny_spm(spm_trainer, tiny_corpus, prefix, "unigram")


@pytest.fixture(scope="session")
def hf_tokenizer_json(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A byte-level BPE tokenizer.json trained with the `tokenizers` library (GPT-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(tiny_corpus)], trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def process_group(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A one-process gloo group: megatron-core's BlendedDataset asks for the rank."""
    import torch.distributed as dist

    if not dist.is_initialized():
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
