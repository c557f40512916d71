"""The one tokenizer loader used by preprocessing, training and checkpoint conversion.

`load_tokenizer(path)` accepts
- a registered name: `NAME/`, `NAME.model` or `NAME.json` in the folder of named tokenizers,
  `$FORGE_TOKENIZERS` when set, else `tokenizers/` in the working directory (run from a
  checkout's root, its `tokenizers/` folder: `train_hf_bpe.py --output-dir tokenizers/web`
  registers `web`),
- a SentencePiece model file (`*.model`),
- a Hugging Face `tokenizer.json` file,
- a directory holding `tokenizer.json` (preferred, as `transformers` does) or `tokenizer.model`,
  e.g. a Hugging Face model directory; its `tokenizer_config.json` names the special tokens.

The result subclasses megatron-core's `MegatronTokenizerBase`, which is what
`GPTDatasetConfig(tokenizer=...)` takes in megatron-core 0.16, and has the attributes mcore's
datasets read: `vocab_size`, `eod`, `pad`, `eos`, `bos`, `vocab`, `inv_vocab`,
`unique_identifiers`.

Conventions (the same for both backends):
- `tokenize(text)` never adds BOS or EOS. Documents are separated by the EOD token, which
  `tokenize_documents(texts, append_eod=True)` appends (what `tools/preprocess_data.py
  --append-eod` and `tools/make_webdataset.py --append-eod` use), as in Megatron-LM's GPT
  pretraining.
- `eod` is the EOS token. A tokenizer without one cannot mark document ends: reading `eod`
  then raises `MissingSpecialTokenError`.
- Tokenizers that cannot be loaded raise `TokenizerLoadError`; both are `DataError`s.
- `bos` / `eos` are None when the tokenizer has no such token.
- `pad` is the tokenizer's pad token, else -1: megatron-core's own "no pad" value, an id that
  never occurs in data, so no real token is masked out of the loss by mistake.

Special tokens typed in text (`<s>`, `</s>`, `<|endoftext|>`) are plain text for both
backends, in training and in the Hugging Face export (`split_special_tokens`): a document
cannot inject a control token.

Bulk encoding (`tokenize_flat`, what tools/preprocess_data.py uses) returns all documents' ids
back to back in one numpy array. After `use_fast_backend()`, it runs on the optional
`gigatoken` package (Rust, single-threaded per process) with the same ids, for SentencePiece
BPE models with byte fallback and any normalization (`gigatoken_for_sentencepiece`) and for
Hugging Face tokenizer.json BPE tokenizers (`gigatoken_for_tokenizer_json`): a probe set is
compared at load, and documents where the two are known to differ are left to the
tokenizer's own library (see `GigatokenEncoder`).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from tokenizers import AddedToken, decoders, normalizers
from tokenizers import Tokenizer as HFTokenizerModel
from tokenizers.models import BPE, Unigram

from megatron_forge.data.indexed import append_eod_tokens
from megatron_forge.errors import DataError

MCORE_BASE_MODULE = "megatron.core.tokenizers.base_tokenizer"


def megatron_tokenizer_base() -> type:
    """megatron-core's `MegatronTokenizerBase`, without importing `megatron.core`.

    `import megatron.core` imports torch and most of megatron-core: about 7 s and 400 MB, which
    every preprocessing worker would pay for one abstract class. Its module is a plain ABC with
    no imports, so unless megatron.core is already loaded it is executed from its file under
    its own name; a later `import megatron.core` finds it in `sys.modules` and uses the same
    class, so `isinstance(tok, MegatronTokenizerBase)` holds either way.
    """
    if MCORE_BASE_MODULE not in sys.modules and "megatron.core" not in sys.modules:
        spec = importlib.util.find_spec("megatron")  # a namespace package: imports nothing
        roots = spec.submodule_search_locations if spec else None
        for root in roots or []:
            path = Path(root) / "core" / "tokenizers" / "base_tokenizer.py"
            if path.is_file():
                file_spec = importlib.util.spec_from_file_location(MCORE_BASE_MODULE, path)
                module = importlib.util.module_from_spec(file_spec)
                sys.modules[MCORE_BASE_MODULE] = module
                try:
                    file_spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[MCORE_BASE_MODULE]
                    raise
                break
    if MCORE_BASE_MODULE in sys.modules:
        return sys.modules[MCORE_BASE_MODULE].MegatronTokenizerBase
    from megatron.core.tokenizers import MegatronTokenizerBase  # another layout: the slow way

    return MegatronTokenizerBase


MegatronTokenizerBase = megatron_tokenizer_base()

TOKENIZERS_ENV = "FORGE_TOKENIZERS"
DEFAULT_TOKENIZERS_DIR = "tokenizers"  # relative to the working directory
NO_PAD_ID = -1  # megatron.core.datasets.megatron_dataset._PAD_TOKEN_ID
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
# Used for a bare tokenizer.json with no tokenizer_config.json beside it.
SPECIAL_TOKEN_GUESSES = {
    "bos_token": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
    "eos_token": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
    "pad_token": ("<pad>", "<|pad|>", "[PAD]", "<|padding|>"),
    "unk_token": ("<unk>", "<|unk|>", "[UNK]"),
}
# sentencepiece_model.proto ModelProto.SentencePiece.Type
SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_UNUSED, SPM_BYTE = 1, 2, 3, 4, 5, 6


class TokenizerLoadError(DataError):
    """A tokenizer path is missing or holds no tokenizer we can read."""


class MissingSpecialTokenError(DataError, NotImplementedError):
    """The tokenizer lacks a special token that was asked for.

    Also a NotImplementedError because megatron-core probes optional token ids (`eos`, `eod`)
    inside `except (AttributeError, NotImplementedError)`.
    """


class Tokenizer(MegatronTokenizerBase):
    """Base of the SentencePiece and Hugging Face tokenizers; build one with load_tokenizer."""

    library = "none"

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), {"library": self.library})
        self._ids: dict[str, int] = {}  # "bos_token"/"eos_token"/"pad_token"/"unk_token" -> id
        self._vocab: dict[str, int] | None = None
        self._inv_vocab: dict[int, str] | None = None
        self.fast_backend_error: str | None = None  # why use_fast_backend() found none
        self._fast: GigatokenEncoder | None = None  # set by use_fast_backend()

    # Backend interface ---------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Return the token ids of `text`, without BOS or EOS."""
        raise NotImplementedError

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Return `tokenize(text)` for each text, in one call into the backend (faster)."""
        return [self.tokenize(text) for text in texts]

    def tokenize_flat(self, texts: Any) -> tuple[np.ndarray, np.ndarray]:
        """`tokenize_batch(texts)` as two arrays: every text's ids back to back, and each
        text's number of ids. Backends that can skip the Python lists do. `texts` is a list
        of str, or a pyarrow string array (read without Python strings where `takes_arrow`).
        """
        if self._fast is not None:
            return self._fast.encode_flat(texts)
        if not isinstance(texts, list):
            texts = texts.to_pylist()
        ids = self.tokenize_batch(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(
            itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum())
        )
        return flat, lengths

    def tokenize_documents(
        self, texts: Any, append_eod: bool = False, dtype: Any = np.int64
    ) -> tuple[np.ndarray, np.ndarray]:
        """`tokenize_flat(texts)` as `dtype`, each document followed by the EOD token when
        `append_eod` (raises MissingSpecialTokenError if there is none): the documents' ids
        back to back and each one's length, EOD included."""
        flat, lengths = self.tokenize_flat(texts)
        flat = flat.astype(dtype, copy=False)
        if append_eod:
            return append_eod_tokens(flat, lengths, self.eod)
        return flat, lengths

    def _fast_encoder(self) -> GigatokenEncoder:
        """The faster encoder of this tokenizer; FastBackendUnavailable says why there is none."""
        raise FastBackendUnavailable(f"no faster library for {type(self).__name__}")

    def use_fast_backend(self) -> str | None:
        """Switch `tokenize_flat` to a faster library encoding the same ids, if there is one
        for this tokenizer; return its name, or None (`fast_backend_error` says why)."""
        if self._fast is None:
            try:
                self._fast = self._fast_encoder()
            except FastBackendUnavailable as e:
                self.fast_backend_error = str(e)
                return None
        return self.batch_backend

    @property
    def batch_backend(self) -> str:
        """The library `tokenize_flat` runs on."""
        return self.library if self._fast is None else "gigatoken"

    @property
    def takes_arrow(self) -> bool:
        """Whether `tokenize_flat` reads pyarrow string arrays without making Python strings."""
        return self._fast is not None and self._fast.takes_arrow

    def detokenize(self, ids: Any) -> str:
        """Return the text of `ids` (a list or a numpy array); special tokens are dropped."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special and added tokens included (before any padding)."""
        raise NotImplementedError

    def token_to_id(self, token: str) -> int | None:
        """Return the id of a vocabulary entry, or None."""
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str | None:
        """Return the vocabulary entry of an id."""
        raise NotImplementedError

    def save_pretrained_files(self, out_dir: str | Path) -> list[Path]:
        """Write files `transformers.AutoTokenizer.from_pretrained(out_dir)` loads; return them."""
        raise NotImplementedError

    # Shared --------------------------------------------------------------------------------
    @property
    def vocab(self) -> dict[str, int]:
        """Token string -> id."""
        if self._vocab is None:
            tokens = ((self.id_to_token(i), i) for i in range(self.vocab_size))
            self._vocab = {token: i for token, i in tokens if token is not None}
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Id -> token string."""
        if self._inv_vocab is None:
            self._inv_vocab = {i: t for t, i in self.vocab.items()}
        return self._inv_vocab

    @property
    def eod(self) -> int:
        """End-of-document id: the EOS token."""
        if self.eos is None:
            raise MissingSpecialTokenError(
                f"tokenizer {self.path} has no EOS token to end documents with; use a tokenizer "
                "with one (SentencePiece: eos_id, Hugging Face: eos_token in tokenizer_config.json)"
            )
        return self.eos

    @property
    def bos(self) -> int | None:
        """Beginning-of-sequence id, or None. Never added by `tokenize`."""
        return self._ids.get("bos_token")

    @property
    def eos(self) -> int | None:
        """End-of-sequence id, or None."""
        return self._ids.get("eos_token")

    @property
    def unk(self) -> int | None:
        """Unknown-token id, or None."""
        return self._ids.get("unk_token")

    @property
    def pad(self) -> int:
        """Pad id, or -1 (NO_PAD_ID, megatron-core's own fallback) when there is none."""
        pad = self._ids.get("pad_token")
        return NO_PAD_ID if pad is None else pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What identifies this tokenizer in megatron-core's dataset cache hashes."""
        return OrderedDict(
            [("class", type(self).__name__), ("tokenizer_path", self.path)],
            vocab_size=self.vocab_size,
        )

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} is a pretraining tokenizer: no chat")

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        # Backends hold C++ objects; reload from disk in the other process instead.
        return load_tokenizer, (self.path,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model` file."""

    library = "sentencepiece"

    def __init__(self, path: Path, model_file: Path) -> None:
        super().__init__(path)
        self.model_file = model_file
        self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        ids = {
            "bos_token": self._sp.bos_id(),
            "eos_token": self._sp.eos_id(),
            "pad_token": self._sp.pad_id(),
            "unk_token": self._sp.unk_id(),
        }
        self._ids = {name: i for name, i in ids.items() if i >= 0}  # spm: -1 means disabled

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: preprocessing parallelizes with processes, one per core.
        return self._sp.encode(texts, num_threads=1)

    def _fast_encoder(self) -> GigatokenEncoder:
        return gigatoken_for_sentencepiece(self.model_file, self._sp)

    def detokenize(self, ids: Any) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def id_to_token(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)

    def token_to_id(self, token: str) -> int | None:
        token_id = self._sp.piece_to_id(token)  # the unk id when absent
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def save_pretrained_files(self, out_dir: str | Path) -> list[Path]:
        """Write tokenizer.json (converted), tokenizer.model (copied), tokenizer_config.json.

        transformers loads tokenizer.json as-is (no sentencepiece needed) and encodes like
        `tokenize`. No BOS is added: the config sets add_bos_token false and the converted
        tokenizer has no post-processor, because the model was trained on documents without
        BOS, so prompts at serving time are encoded the same way. `split_special_tokens`
        makes transformers read control tokens typed in text (`<s>`, `</s>`) as plain text,
        as sentencepiece did in training.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sp_model = spm_to_hf_tokenizer(self.model_file)
        sp_model.save(str(out / "tokenizer.json"))
        shutil.copyfile(self.model_file, out / "tokenizer.model")
        names = {k: self.id_to_token(v) for k, v in self._ids.items()}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **names,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": True,
        }
        write_json(out / "tokenizer_config.json", config)
        return [out / "tokenizer.json", out / "tokenizer.model", out / "tokenizer_config.json"]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (tokenizers library), with its tokenizer_config.json.

    Special tokens typed in text (`<|endoftext|>`, `<|im_start|>`) are encoded as the plain
    text they are (`encode_special_tokens`), like sentencepiece does with `<s>`: a document
    cannot inject an end-of-document or chat marker into the training data. Added tokens
    that are not special (user-defined symbols) are still matched in text.
    """

    library = "huggingface"

    def __init__(self, path: Path, tokenizer_file: Path) -> None:
        super().__init__(path)
        self.tokenizer_file = tokenizer_file
        self._tok = HFTokenizerModel.from_file(str(tokenizer_file))
        self._tok.encode_special_tokens = True
        config_file = tokenizer_file.parent / "tokenizer_config.json"
        self._config = read_json(config_file) if config_file.is_file() else None
        self._ids = self._find_special_ids()

    def _find_special_ids(self) -> dict[str, int]:
        """Special tokens named by tokenizer_config.json, else the first known name present."""
        ids = {}
        for name, guesses in SPECIAL_TOKEN_GUESSES.items():
            if self._config is None:
                candidates = guesses
            else:
                named = self._config.get(name)
                candidates = (named.get("content") if isinstance(named, dict) else named,)
            for token in candidates:
                token_id = self._tok.token_to_id(token) if isinstance(token, str) else None
                if token_id is not None:
                    ids[name] = token_id
                    break
        return ids

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        # encode_batch_fast skips offsets; threads follow TOKENIZERS_PARALLELISM.
        encodings = self._tok.encode_batch_fast(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def _fast_encoder(self) -> GigatokenEncoder:
        return gigatoken_for_tokenizer_json(self._tok)

    def detokenize(self, ids: Any) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save_pretrained_files(self, out_dir: str | Path) -> list[Path]:
        """Copy the tokenizer files; write a tokenizer_config.json if there was none.

        A copied tokenizer_config.json / tokenizer.json keeps its own BOS rule (Llama 3's
        post-processor adds <|begin_of_text|>, for example), while `tokenize` adds nothing.
        The config gets `split_special_tokens: true`, so transformers encodes special tokens
        typed in text as plain text, as training did (the post-processor still adds BOS/EOS),
        unless the tokenizer has a chat template: transformers renders a chat to text with
        its control tokens typed in and encodes that with the same setting, so there it is
        left as the source has it (texts typed with special-token strings then encode
        differently from training; transformers' `sanitize_control_tokens` covers user input).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        src = self.tokenizer_file.parent
        names = ["tokenizer.json"] if Path(self.path).is_file() else list(HF_TOKENIZER_FILES)
        names = [n for n in names if n != "tokenizer_config.json"]
        written = []
        for name in names:
            source = self.tokenizer_file if name == "tokenizer.json" else src / name
            if source.is_file():
                shutil.copyfile(source, out / name)
                written.append(out / name)
        if self._config is None:  # a bare tokenizer.json: say what our loader guessed
            tokens = {k: self.id_to_token(v) for k, v in self._ids.items()}
            config = {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **tokens,
                "add_bos_token": False,
            }
        else:
            config = dict(self._config)
        if not ("chat_template" in config or (out / "chat_template.jinja").is_file()):
            config["split_special_tokens"] = True
        write_json(out / "tokenizer_config.json", config)
        written.append(out / "tokenizer_config.json")
        return written


class FastBackendUnavailable(RuntimeError):
    """No faster library encodes this tokenizer exactly; the message says why."""


# Texts every fast backend must encode exactly like the tokenizer's own library before it is
# used: leading, repeated and trailing whitespace, tabs, newlines, digits, punctuation runs,
# contractions, characters that only byte fallback covers, code indentation, and what a
# normalizer changes (NFKC compatibility forms, combining marks, control characters).
FAST_BACKEND_PROBES = (
    "",
    " ",
    "Hello world.",
    "  two leading spaces,   three inside, and trailing   ",
    "\tTabs\tand\nnew\n\nlines\r\n",
    "def f(x):\n    return x ** 2  # 12345 67890, 3.14159",
    "***  ---  ===  ...  !!!  ???  <<>>  {[()]}  @#$%^&",
    "it's we've they'll I'm you'd don't 'quoted' \"double\" 1,234,567.89 2024-01-31",
    "naïve café, Ærøskøbing, straße, İstanbul, ΑΒΓ αβγ, Привет",
    "汉字かなカナ한국어 ひらがな",
    "emoji 😀👍🏽 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, zero\u200bwidth, nbsp\u00a0here",
    "\x00 control \x7f chars \u2028 separators",
    "ﬁ ﬂ ① ² ½ ｆｕｌｌｗｉｄｔｈ　ideographic space ㍿ Ⅻ ℌ ™ …",
    "e\u0301 a\u0308 e\u0301\u0302 n\u0303o\u0308 \u0301lone combining \u1100\u1161\u11a8",
    "\x01\x02\x08\x0b\x0c\x0e\x1f\x7f\x85\u200d\u2060\ufeff mixed\u3000\u3000spaces",
    " \t \n leading whitespace and a trailing tab\t",
)


class GigatokenEncoder:
    """Batch encoding in gigatoken (Rust, optional: `pip install gigatoken`) of a tokenizer it
    reproduces exactly, checked at load on probe texts against the tokenizer's own library.

    `config` is the tokenizer.json gigatoken loads; `exact(text)` is the reference encoding.
    Documents that contain one of `literals` (added tokens that are matched in text) are
    encoded by `exact`, because gigatoken may treat the text around them differently.
    `normalize`, when given, turns a list of texts into what `config` encodes (the
    tokenizer's own normalizer, run in its library); without it texts may be pyarrow
    string arrays, read without Python strings. `ascii_config`, when given with `normalize`,
    is a tokenizer.json that encodes ASCII-only texts without any of `ascii_excluded`
    exactly, normalizer included (in Rust): those texts skip `normalize`.

    Memory: gigatoken's byte-level BPE keeps a cache of every distinct pretoken (word) it has
    encoded, across calls (measured: RSS +530 MB over 8M distinct words), so when this
    process has grown by more than `max_growth_bytes` since gigatoken was loaded, it is
    loaded again from its configuration (0.2 s for a 32k vocabulary), which drops that cache:
    memory stays bounded whatever the corpus.
    """

    max_growth_bytes = 512 << 20

    def __init__(
        self,
        config: dict[str, Any],
        exact: Any,
        literals: tuple[str, ...] = (),
        probes: tuple[str, ...] = FAST_BACKEND_PROBES,
        normalize: Any = None,
        ascii_config: dict[str, Any] | None = None,
        ascii_excluded: str = "",
    ) -> None:
        try:
            import awkward  # gigatoken's result type
            import gigatoken
        except ImportError:
            raise FastBackendUnavailable("gigatoken is not installed") from None
        self._ak, self._exact, self._normalize = awkward, exact, normalize
        self.literals = tuple(literals)
        self._config = json.dumps(config)
        self._ascii_config = json.dumps(ascii_config) if ascii_config and normalize else None
        excluded = "".join(f"\\x{ord(c):02x}" for c in sorted(ascii_excluded))
        self._ascii_excluded = f"[{excluded}]" if excluded else None  # RE2 and Python syntax
        self._load = gigatoken.Tokenizer.from_json
        self._tok = self._ascii_tok = None
        try:
            self._load_backends()
        except Exception as e:  # gigatoken raises ValueError and others for what it lacks
            raise FastBackendUnavailable(f"gigatoken cannot load it ({e})") from None
        self.loads = 1
        probes = [p for p in probes if not any(literal in p for literal in self.literals)]
        flat, lengths = self._encode(probes)
        for text, ids in zip(probes, np.split(flat, np.cumsum(lengths)[:-1]), strict=True):
            if ids.tolist() != list(exact(text)):
                raise FastBackendUnavailable(f"gigatoken encodes {text!r} differently")

    @property
    def takes_arrow(self) -> bool:
        return self._normalize is None or self._ascii_config is not None

    def _load_backends(self) -> None:
        self._tok = self._ascii_tok = None  # drops gigatoken's pretoken caches first
        self._tok = self._load(self._config).backend
        if self._ascii_config is not None:
            try:
                self._ascii_tok = self._load(self._ascii_config).backend
            except Exception:  # a normalizer gigatoken lacks: `normalize` takes every text
                self._ascii_config = None
        self._base_rss = _rss_bytes()

    def _encode(self, texts: Any) -> tuple[np.ndarray, np.ndarray]:
        if _rss_bytes() - self._base_rss > self.max_growth_bytes:
            self._load_backends()
            self.loads += 1
        if self._normalize is None:
            return self._run(self._tok, texts)
        if self._ascii_tok is None:
            return self._run(self._tok, self._normalized(texts))
        ascii_ = self._ascii_mask(texts)
        if ascii_.all():
            return self._run(self._ascii_tok, texts)
        if not ascii_.any():
            return self._run(self._tok, self._normalized(texts))
        ascii_ids = self._run(self._ascii_tok, _select(texts, ascii_))
        other_ids = self._run(self._tok, self._normalized(_select(texts, ~ascii_)))
        return _in_document_order(ascii_, ascii_ids, other_ids)

    def _ascii_mask(self, texts: Any) -> np.ndarray:
        """Which texts `ascii_config` encodes: ASCII, and none of `ascii_excluded`."""
        if isinstance(texts, list):
            ascii_ = np.fromiter(map(str.isascii, texts), bool, len(texts))
            if self._ascii_excluded is not None:
                import re

                excluded = re.compile(self._ascii_excluded).search
                ascii_ &= np.fromiter((not excluded(t) for t in texts), bool, len(texts))
            return ascii_
        import pyarrow.compute as pc

        ascii_ = pc.string_is_ascii(texts)
        if self._ascii_excluded is not None:
            hit = pc.match_substring_regex(texts, self._ascii_excluded)
            ascii_ = pc.and_(ascii_, pc.invert(hit))
        return ascii_.to_numpy(zero_copy_only=False)

    def _normalized(self, texts: Any) -> list[str]:
        if not isinstance(texts, list):
            texts = texts.to_pylist()
        return self._normalize(texts) if texts else texts

    def _run(self, tok: Any, texts: Any) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(texts, list):
            texts = self._awkward_strings(texts)
        # parallel=False: one thread; preprocessing parallelizes with processes.
        rows = tok.encode_batch(texts, parallel=False)
        flat = self._ak.flatten(rows).to_numpy()
        return flat, self._ak.num(rows, axis=1).to_numpy().astype(np.int64)

    def _awkward_strings(self, texts: Any) -> Any:
        """A pyarrow string array as an awkward array of strings on the same UTF-8 buffer."""
        import pyarrow as pa

        texts = texts.cast(pa.large_string())  # int64 offsets, which gigatoken takes
        _, offsets, data = texts.buffers()
        offsets = np.frombuffer(offsets, np.int64)[texts.offset : texts.offset + len(texts) + 1]
        chars = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
        ak = self._ak
        layout = ak.contents.ListOffsetArray(
            ak.index.Index64(offsets),
            ak.contents.NumpyArray(chars, parameters={"__array__": "char"}),
            parameters={"__array__": "string"},
        )
        return ak.Array(layout)

    def encode_flat(self, texts: Any) -> tuple[np.ndarray, np.ndarray]:
        """Every text's ids back to back (uint32) and each text's number of ids; `texts` is a
        list of str or a pyarrow string array."""
        slow = self._documents_with_literals(texts)
        if not slow:
            return self._encode(texts)
        if isinstance(texts, list):
            flat, lengths = self._encode([("" if i in slow else t) for i, t in enumerate(texts)])
        else:
            import pyarrow.compute as pc

            mask = np.zeros(len(texts), bool)
            mask[list(slow)] = True
            flat, lengths = self._encode(pc.if_else(mask, "", texts))
        starts = np.concatenate([[0], np.cumsum(lengths)])
        pieces, done = [], 0
        for i in sorted(slow):  # their rows are empty: insert the exact ids there
            text = texts[i] if isinstance(texts, list) else texts[i].as_py()
            ids = np.asarray(self._exact(text), dtype=flat.dtype)
            pieces += [flat[done : starts[i]], ids]
            lengths[i], done = len(ids), starts[i]
        pieces.append(flat[done:])
        return np.concatenate(pieces), lengths

    def _documents_with_literals(self, texts: Any) -> set[int]:
        """Indices of the texts that contain one of `literals`."""
        if not self.literals or not len(texts):
            return set()
        if not isinstance(texts, list):
            import pyarrow.compute as pc

            hit = pc.match_substring(texts, self.literals[0])
            for literal in self.literals[1:]:
                hit = pc.or_(hit, pc.match_substring(texts, literal))
            return set(np.flatnonzero(hit.to_numpy(zero_copy_only=False)).tolist())
        joined = "\x00".join(texts)  # one scan per literal instead of one per document
        hits = []
        for literal in self.literals:
            at = joined.find(literal)
            while at >= 0:
                hits.append(at)
                at = joined.find(literal, at + 1)
        if not hits:
            return set()
        ends = np.cumsum(np.fromiter(map(len, texts), np.int64, len(texts)) + 1)
        return set(np.searchsorted(ends, hits, side="right").tolist())


def _in_document_order(
    mask: np.ndarray, chosen: tuple[np.ndarray, np.ndarray], others: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """The ids and lengths of documents encoded in two groups, those where `mask` is true
    (`chosen`: their ids back to back, and lengths) and the others, back in document order.

    Copied run by run (a run: consecutive documents of one group), one slice per run, rather
    than token by token through index arrays (several passes over every token)."""
    lengths = np.empty(len(mask), np.int64)
    lengths[mask], lengths[~mask] = chosen[1], others[1]
    cuts = np.flatnonzero(mask[1:] != mask[:-1]) + 1
    ends = {True: np.cumsum(chosen[1]), False: np.cumsum(others[1])}  # a group's token ends
    done = {True: np.cumsum(mask), False: np.cumsum(~mask)}  # its documents up to each one
    pieces = []
    for start, stop in zip([0, *cuts.tolist()], [*cuts.tolist(), len(mask)]):
        group = bool(mask[start])
        first, last = int(done[group][start]) - 1, int(done[group][stop - 1]) - 1
        begin = int(ends[group][first - 1]) if first else 0
        pieces.append((chosen if group else others)[0][begin : int(ends[group][last])])
    dtype = np.result_type(chosen[0], others[0])
    return (
        np.concatenate(pieces).astype(dtype, copy=False) if pieces else np.zeros(0, dtype)
    ), lengths


def _select(texts: Any, mask: np.ndarray) -> Any:
    """The texts where `mask` is true, as a list or a pyarrow array like `texts`."""
    if isinstance(texts, list):
        return [text for text, keep in zip(texts, mask.tolist(), strict=True) if keep]
    import pyarrow as pa

    return texts.filter(pa.array(mask))


def _rss_bytes() -> int:
    """This process's resident memory."""
    import psutil

    return psutil.Process().memory_info().rss


def gigatoken_for_sentencepiece(
    model_file: Path, sp: spm.SentencePieceProcessor
) -> GigatokenEncoder:
    """gigatoken for a SentencePiece BPE model with byte fallback, with sentencepiece's ids.

    Models without normalization (tokenizers/train_sentencepiece.py) are encoded wholly in
    Rust from Arrow arrays, with the tokenizer.json `spm_to_hf_tokenizer` writes. Any other
    normalization (`nmt_nfkc`, SentencePiece's default and most published models', with its
    precompiled charsmap and extra-whitespace removal) is run by sentencepiece itself
    (`normalize`, exact by construction, about 3x faster than its encode), and gigatoken
    encodes the normalized text with the same vocabulary and merges and no normalizer.

    Control and unknown pieces are left out of gigatoken's added tokens: sentencepiece never
    matches `<s>` or `<unk>` typed in text, and neither does gigatoken then. User-defined
    pieces stay added tokens (sentencepiece matches those in text), but gigatoken restarts
    the dummy-prefix space after one, so documents containing one are encoded by
    sentencepiece. The probe texts, plus every control and unknown piece typed literally,
    are compared at load; any difference refuses gigatoken for this model.
    """
    proto = spm_proto(model_file)
    from sentencepiece import sentencepiece_model_pb2

    bpe = proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    if not (bpe and proto.trainer_spec.byte_fallback):
        raise FastBackendUnavailable(
            "gigatoken encodes SentencePiece BPE models with byte fallback only"
        )
    pieces = [(p.piece, p.type) for p in proto.pieces]
    literals = tuple(p for p, kind in pieces if kind == SPM_USER_DEFINED)
    not_text = {p for p, kind in pieces if kind in (SPM_CONTROL, SPM_UNKNOWN)}
    prenormalize = spm_normalizes(proto)
    try:
        config = json.loads(spm_to_hf_tokenizer(model_file, pre_normalized=prenormalize).to_str())
    except TokenizerLoadError as e:
        raise FastBackendUnavailable(str(e)) from None
    config["added_tokens"] = [t for t in config["added_tokens"] if t["content"] not in not_text]
    probes = (*FAST_BACKEND_PROBES, *(f"a {p} b {p}" for p in sorted(not_text)))
    normalize = sp.normalize if prenormalize else None
    ascii_config, excluded = None, ""
    if prenormalize and (ascii_rules := spm_ascii_normalizer(proto)) is not None:
        ascii_config, excluded = {**config, "normalizer": ascii_rules[0]}, ascii_rules[1]
    return GigatokenEncoder(config, sp.encode, literals, probes, normalize, ascii_config, excluded)


def gigatoken_for_tokenizer_json(tok: HFTokenizerModel) -> GigatokenEncoder:
    """gigatoken for a Hugging Face tokenizer.json (byte-level BPE: GPT-2, Llama 3, Qwen),
    with `tok`'s ids, special tokens typed in text encoded as text (`encode_special_tokens`).

    Special added tokens are left out of gigatoken's configuration, so they are never
    matched in text; documents that contain another added token are encoded by `tok`.
    """
    config = json.loads(tok.to_str())
    added = config.get("added_tokens") or []
    specials = sorted(t["content"] for t in added if t.get("special"))
    config["added_tokens"] = [t for t in added if not t.get("special")]
    literals = tuple(t["content"] for t in config["added_tokens"])
    probes = (*FAST_BACKEND_PROBES, *(f"a {p} b{p}c" for p in specials))

    def exact(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return GigatokenEncoder(config, exact, literals, probes)


def spm_proto(model_file: Path) -> Any:
    """The parsed ModelProto of a SentencePiece model file."""
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def spm_normalizes(proto: Any) -> bool:
    """Whether a SentencePiece model changes text before encoding it beyond turning spaces
    into "▁" and adding the dummy prefix (a charsmap, or extra-whitespace removal)."""
    norm = proto.normalizer_spec
    return bool(
        norm.name not in ("identity", "")
        or norm.precompiled_charsmap
        or norm.remove_extra_whitespaces
    )


def spm_ascii_normalizer(proto: Any) -> tuple[dict[str, Any], str] | None:
    """A tokenizer.json normalizer that normalizes ASCII-only text without the characters
    returned with it exactly as the SentencePiece model does, or None where that cannot be
    shown from its charsmap.

    On ASCII text a charsmap can only apply its rules for single ASCII characters (checked:
    no rule for two or more ASCII characters); nmt_nfkc maps tab, newline, form feed and
    carriage return to a space and drops the other control characters. The rules for tab,
    newline and carriage return are in the normalizer (one pass each); texts with another
    character that has a rule (rare control characters) are left out. Then
    `remove_extra_whitespaces` removes leading and trailing spaces and collapses runs, the
    dummy prefix is added, and spaces become "▁". Models that keep extra whitespace are left
    to sentencepiece's own normalizer (it adds the dummy prefix even to text its rules
    delete, which a tokenizer.json cannot express).
    """
    spec = proto.normalizer_spec
    if not (spec.remove_extra_whitespaces and spec.escape_whitespaces):
        return None
    if proto.trainer_spec.treat_whitespace_as_suffix:
        return None
    rules = charsmap_ascii_rules(spec.precompiled_charsmap) if spec.precompiled_charsmap else {}
    if rules is None:
        return None
    for target in rules.values():
        # applied once, as sentencepiece does: no replacement may be replaced again
        if not target.isascii() or "  " in target or any(c in rules for c in target):
            return None
    common = {c: target for c, target in rules.items() if c in "\t\n\r"}
    kept = {chr(i) for i in range(128)} - set(rules)
    left = kept | {c for target in common.values() for c in target}
    if any(c.isspace() and c != " " for c in left):  # Strip would take them too
        return None
    steps: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": source}, "content": target}
        for source, target in sorted(common.items())
    ]
    steps.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
    steps.append({"type": "Strip", "strip_left": True, "strip_right": True})
    if spec.add_dummy_prefix:
        steps.append({"type": "Prepend", "prepend": "▁"})
    steps.append({"type": "Replace", "pattern": {"String": " "}, "content": "▁"})
    return {"type": "Sequence", "normalizers": steps}, "".join(sorted(set(rules) - set(common)))


def charsmap_ascii_rules(blob: bytes) -> dict[str, str] | None:
    """What a SentencePiece precompiled charsmap maps each ASCII character to (those it
    changes), or None if it has a rule for a sequence of two or more ASCII characters.

    The charsmap is a darts-clone double array over the UTF-8 bytes of the rules' sources
    (each unit: label, offset, has_leaf; a leaf's value is an offset into the
    null-terminated targets that follow the array).
    """
    import struct

    (trie_bytes,) = struct.unpack_from("<I", blob, 0)
    units = np.frombuffer(blob, "<u4", trie_bytes // 4, 4).astype(np.int64)
    targets = blob[4 + trie_bytes :]

    def offset(pos: int) -> int:
        unit = int(units[pos])
        return (unit >> 10) << ((unit & (1 << 9)) >> 6)

    def child(base: int, byte: int) -> int | None:
        pos = base ^ byte
        ok = pos < len(units) and int(units[pos]) & ((1 << 31) | 0xFF) == byte
        return pos if ok else None

    rules = {}
    root = offset(0)
    for byte in range(1, 128):
        node = child(root, byte)
        if node is None:
            continue
        base = node ^ offset(node)
        if any(child(base, second) is not None for second in range(1, 128)):
            return None
        if (int(units[node]) >> 8) & 1:  # has_leaf: the rule for this one character
            start = int(units[base]) & ((1 << 31) - 1)
            rules[chr(byte)] = targets[start : targets.index(b"\x00", start)].decode("utf-8")
    return rules


def spm_piece_types(model_file: Path) -> list[tuple[str, int]]:
    """(piece, SPM_* type) of every piece of a SentencePiece model, in id order."""
    return [(p.piece, p.type) for p in spm_proto(model_file).pieces]


def tokenizers_dir() -> Path:
    """The folder of named tokenizers, absolute: $FORGE_TOKENIZERS, else ./tokenizers."""
    return Path(os.environ.get(TOKENIZERS_ENV) or DEFAULT_TOKENIZERS_DIR).expanduser().absolute()


def registered_tokenizer(name: str) -> Path | None:
    """The file or directory a bare name refers to in `tokenizers_dir()`, or None."""
    if not name or "/" in name or name.startswith("."):
        return None
    for candidate in (name, f"{name}.model", f"{name}.json"):
        path = tokenizers_dir() / candidate
        if path.is_file() and path.suffix in (".model", ".json"):
            return path
        if path.is_dir() and (
            (path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()
        ):
            return path
    return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a SentencePiece `.model`, a `tokenizer.json`, a directory holding either, or a
    registered name (`NAME/`, `NAME.model`, `NAME.json` in `tokenizers_dir()`)."""
    expected = (
        "a SentencePiece .model file, a tokenizer.json file, a directory with either, or a "
        f"name registered in {tokenizers_dir()} (set {TOKENIZERS_ENV} to use "
        "another folder of named tokenizers)"
    )
    if not Path(path).expanduser().exists():
        path = registered_tokenizer(str(path)) or path
    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerLoadError(f"tokenizer path {path} does not exist; expected {expected}")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer(path, path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            return SentencePieceTokenizer(path, path / "tokenizer.model")
        raise TokenizerLoadError(
            f"tokenizer directory {path} has neither tokenizer.json nor tokenizer.model; "
            f"expected {expected}"
        )
    if path.suffix == ".json":
        try:
            return HFTokenizer(path, path)
        except Exception as e:  # the tokenizers library raises plain Exception on bad json
            raise TokenizerLoadError(f"{path} is not a Hugging Face tokenizer.json: {e}") from e
    try:
        return SentencePieceTokenizer(path, path)
    except (RuntimeError, OSError) as e:
        raise TokenizerLoadError(f"{path} is not a SentencePiece model; expected {expected}") from e


# SentencePiece -> tokenizers conversion ----------------------------------------------------
def spm_to_hf_tokenizer(model_file: Path, pre_normalized: bool = False) -> HFTokenizerModel:
    """Build a `tokenizers` Tokenizer that encodes like the SentencePiece model.

    With `pre_normalized`, the tokenizer has no normalizer: it encodes text that the model's
    own normalizer has already turned into "▁"-separated pieces (`SentencePieceProcessor.
    normalize`), for a model with any normalization.

    For models trained by tokenizers/train_sentencepiece.py (identity normalization, byte
    fallback) the ids are the same: every document of the sample corpus with BPE; unigram
    differs where two segmentations score exactly the same (a run of '*', say; 18
    documents). Control tokens (<s>, </s>, <pad>) are special added tokens: encoded with
    `encode_special_tokens` (what HFTokenizer and transformers' `split_special_tokens` set),
    typed in text they are plain characters, as in SentencePiece. Known difference, shared
    with transformers' own Llama conversion: right after a user-defined symbol, a space gets
    its own "▁" token here (the dummy prefix is added again to the text that follows an
    added token); the symbol itself is one token on both sides.
    Without `pre_normalized`, models trained with another normalization (NFKC, extra
    whitespace removal) are refused rather than converted approximately.
    """
    from sentencepiece import sentencepiece_model_pb2  # needs protobuf; only export needs it

    proto = spm_proto(model_file)
    norm = proto.normalizer_spec
    if not pre_normalized and spm_normalizes(proto):
        raise TokenizerLoadError(
            f"{model_file}: normalization {norm.name!r} (remove_extra_whitespaces="
            f"{norm.remove_extra_whitespaces}) has no exact tokenizer.json equivalent; retrain "
            "with tokenizers/train_sentencepiece.py (identity, whitespace kept)"
        )
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    byte_fallback = proto.trainer_spec.byte_fallback
    if proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        vocab = [(piece, score) for piece, score, _ in pieces]
        model = Unigram(vocab, unk_id=proto.trainer_spec.unk_id, byte_fallback=byte_fallback)
    elif proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        unk = proto.trainer_spec.unk_piece
        model = BPE(
            vocab, spm_bpe_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback
        )
    else:
        raise TokenizerLoadError(f"{model_file}: only BPE and unigram SentencePiece models convert")
    tok = HFTokenizerModel(model)
    # SentencePiece prepends "▁" once to the whole text and turns every space into "▁".
    steps = [normalizers.Replace(" ", "▁")]
    if norm.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    if not pre_normalized:
        tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(dec)
    # normalized=False: matched in the raw text wherever they occur. normalized=True would
    # match the normalized content, "▁<|x|>", so only after a space, and swallow that space.
    tok.add_tokens(
        [
            AddedToken(p, normalized=False, special=False)
            for p, _, t in pieces
            if t == SPM_USER_DEFINED
        ]
    )
    specials = [p for p, _, t in pieces if t in (SPM_CONTROL, SPM_UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, normalized=False, special=True) for p in specials])
    return tok


def spm_bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """Merges reproducing SentencePiece BPE: a pair ranks by the id of the piece it forms.

    spm merges the adjacent pair whose union has the best score, and BPE scores fall with
    the id, so ranking merges by result id (then by the ids of the parts) gives the same
    order. Byte, control and user-defined pieces never take part in merges.
    """
    ids = {p: i for i, (p, _, t) in enumerate(pieces) if t in (SPM_NORMAL, SPM_UNUSED)}
    merges = []
    for piece, piece_id in ids.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((piece_id, ids[left], ids[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TokenizerLoadError(f"{path}: not valid JSON ({e})") from e


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
