"""torch_dist checkpoint (any TP/PP/EP layout) -> Hugging Face directory: config.json,
generation_config.json, sharded safetensors with their index, tokenizer files.

vLLM, SGLang and TensorRT-LLM 1.x (PyTorch backend) load the result directly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from megatron_forge.config import ConfigError, ExportConfig, ModelConfig
from megatron_forge.config.schema import TOKEN_ID_FIELDS
from megatron_forge.convert.files import (
    HF_DTYPE_NAMES,
    ShardedSafetensorsWriter,
    TensorSpec,
    check_output,
    release_freed_memory,
    staged_output,
    write_json,
)
from megatron_forge.convert.reader import MegatronCheckpoint
from megatron_forge.data.tokenizer import Tokenizer, TokenizerLoadError, load_tokenizer
from megatron_forge.errors import ConvertError
from megatron_forge.models import ModelFamily, get_family
from megatron_forge.models.mapping import Rule, stacked_shapes
from megatron_forge.utils import DTYPES

EMBEDDING = "embedding.word_embeddings.weight"
DEFAULT_MAX_SHARD = "5GB"


def open_tokenizer(ckpt: MegatronCheckpoint, path: Optional[str]) -> Tokenizer:
    """--tokenizer, else the data.tokenizer of the run that saved the checkpoint."""
    path = path or ckpt.tokenizer_path
    if path is None:
        raise ConvertError(
            f"{ckpt.path} names no tokenizer (its data.tokenizer is unset); pass --tokenizer "
            "PATH (a SentencePiece .model, a tokenizer.json, or a directory holding one)"
        )
    try:
        return load_tokenizer(path)
    except TokenizerLoadError as err:
        raise ConvertError(f"{err}; pass --tokenizer PATH to use another") from None


def export_vocab_size(model: ModelConfig, tokenizer: Tokenizer) -> int:
    """Rows the export keeps: model.vocab_size when set (as training used), else the
    tokenizer's vocabulary; megatron's padding rows beyond it are dropped."""
    if model.vocab_size is not None and model.vocab_size < tokenizer.vocab_size:
        raise ConvertError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens; pass the tokenizer the model was trained with"
        )
    return model.vocab_size or tokenizer.vocab_size


def checked_rules(ckpt: MegatronCheckpoint, vocab_size: int) -> list[Rule]:
    """The family's rules for this checkpoint, after checking every tensor's shape against
    the stored config and that no model tensor would be left out."""
    model = ckpt.model
    if not ckpt.has(EMBEDDING):
        raise ConvertError(f"{ckpt.path} has no {EMBEDDING}: not a GPT checkpoint")
    padded = ckpt.shape(EMBEDDING)[0]
    if padded < vocab_size:
        raise ConvertError(
            f"{ckpt.path}: {EMBEDDING} has {padded} rows, fewer than the vocabulary "
            f"({vocab_size}); the checkpoint does not match its tokenizer/config"
        )
    rules = get_family(model.family).weight_rules(model, vocab_size, padded)
    problems = []
    for key, shape in stacked_shapes(rules, model).items():
        if not ckpt.has(key):
            problems.append(f"missing {key}")
        elif ckpt.shape(key) != shape:
            problems.append(f"{key} is {list(ckpt.shape(key))}, the config implies {list(shape)}")
    used = {ckpt.resolve(k) for r in rules for k in r.megatron if ckpt.has(k)}
    unused = sorted(k for k in ckpt.tensors if k not in used and "_extra_state" not in k)
    if unused:
        problems.append(f"tensors the {model.family} mapping does not convert: {unused[:8]}")
    if problems:
        raise ConvertError(
            f"{ckpt.path} does not match its stored config ({_describe(model)}): "
            + "; ".join(problems[:10])
        )
    return rules


def _describe(model: ModelConfig) -> str:
    text = (
        f"family={model.family} num_layers={model.num_layers} hidden_size={model.hidden_size} "
        f"heads={model.num_attention_heads} query_groups={model.num_query_groups} "
        f"ffn={model.ffn_hidden_size}"
    )
    return text + (f" experts={model.num_experts}" if model.num_experts else "")


def hf_config_json(
    model: ModelConfig, vocab_size: int, ids: dict[str, Any], dtype: torch.dtype
) -> dict[str, Any]:
    config = get_family(model.family).hf_config(model, vocab_size)
    config.update(ids)
    config.update(torch_dtype=HF_DTYPE_NAMES[dtype], dtype=HF_DTYPE_NAMES[dtype])
    return config


def token_ids(tok: Tokenizer, export: ExportConfig) -> dict[str, Any]:
    """bos/eos/pad ids of config.json: the checkpoint's export section where set (from-hf
    keeps the source model's, an eos list included), else the tokenizer's."""
    ids: dict[str, Any] = {"bos_token_id": tok.bos, "eos_token_id": tok.eos}
    if tok.pad is not None and tok.pad >= 0:
        ids["pad_token_id"] = tok.pad
    for name in TOKEN_ID_FIELDS:
        if getattr(export, name) is not None:
            ids[name] = getattr(export, name)
    return ids


def generation_config_json(export: ExportConfig, ids: dict[str, Any]) -> dict[str, Any]:
    """The stored generation_config.json (sampling settings included) when the checkpoint
    has one, else one that repeats config.json's token ids."""
    if export.generation is not None:
        return dict(export.generation)
    return {"_from_model_config": True, **ids}


def export_metadata(ckpt: MegatronCheckpoint, vocab_size: int) -> ExportConfig:
    """The checkpoint's export section, its token ids checked against the export's
    vocabulary."""
    export = ckpt.export
    try:
        export.check_vocabulary(vocab_size, "the export's vocab_size")
    except ConfigError as err:
        raise ConvertError(f"{ckpt.path}: {err}") from None
    return export


def iter_hf_tensors(
    ckpt: MegatronCheckpoint, rules: list[Rule], dtype_of: Callable[[str], torch.dtype]
):
    """Yield (name, tensor) in rule order, reading one rule's megatron tensors at a time;
    each tensor in ``dtype_of(name)``."""
    for rule in rules:
        release_freed_memory()
        tensors = {key: ckpt.read(key, rule.index) for key in rule.megatron}
        converted = rule.to_hf(tensors)
        del tensors
        for name in rule.hf:
            yield name, converted.pop(name).to(dtype_of(name))


def export_dtypes(family: ModelFamily, dtype: torch.dtype) -> Callable[[str], torch.dtype]:
    """The dtype of each exported weight: ``dtype``, but never narrower than fp32 for the
    weights the Hugging Face model keeps in fp32 (``family.hf_fp32_modules``)."""
    keep = dtype.is_floating_point and torch.finfo(dtype).bits < 32

    def dtype_of(name: str) -> torch.dtype:
        return torch.float32 if keep and family.keeps_fp32(name) else dtype

    return dtype_of


def check_finite(ckpt: MegatronCheckpoint, name: str, tensor: torch.Tensor) -> None:
    """Refuse to export a NaN or inf (a diverged or damaged checkpoint, or an overflow of
    --dtype fp16): no server could use the result."""
    if not bool(torch.isfinite(tensor).all()):
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        raise ConvertError(
            f"{ckpt.path}: {name} would hold {nan} NaN and {inf} inf values of "
            f"{tensor.numel()} (in the checkpoint, or out of --dtype's range); export an "
            "earlier iteration with --iteration N, or a wider --dtype"
        )


def export_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    iteration: Optional[int] = None,
    dtype: Optional[str] = None,
    tokenizer: Optional[str] = None,
    overwrite: bool = False,
    max_shard_size: int = 5 * 10**9,
) -> Path:
    """Convert one iteration of a checkpoint to a Hugging Face directory; return it."""
    check_output(out_dir, ckpt_dir, overwrite)  # before any work
    ckpt = MegatronCheckpoint(ckpt_dir, iteration)
    model = ckpt.model
    tok = open_tokenizer(ckpt, tokenizer)
    vocab_size = export_vocab_size(model, tok)
    rules = checked_rules(ckpt, vocab_size)
    export = export_metadata(ckpt, vocab_size)
    ids = token_ids(tok, export)
    out_dtype = DTYPES[dtype] if dtype else ckpt.dtype(EMBEDDING)
    dtype_of = export_dtypes(get_family(model.family), out_dtype)
    specs = [TensorSpec(n, s, dtype_of(n)) for r in rules for n, s in r.hf.items()]
    with staged_output(out_dir, overwrite) as staging:
        writer = ShardedSafetensorsWriter(staging, specs, max_shard_size)
        total = sum(s.num_bytes for s in specs)
        with tqdm(total=total, desc="to-hf", unit="B", unit_scale=True, file=sys.stderr) as bar:
            for name, tensor in iter_hf_tensors(ckpt, rules, dtype_of):
                check_finite(ckpt, name, tensor)
                writer.write(name, tensor)
                bar.update(tensor.numel() * tensor.element_size())
                del tensor
        writer.close()
        write_json(staging / "config.json", hf_config_json(model, vocab_size, ids, out_dtype))
        write_json(staging / "generation_config.json", generation_config_json(export, ids))
        tok.save_pretrained_files(staging)
    return Path(out_dir)
