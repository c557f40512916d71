"""Hugging Face directory -> torch_dist checkpoint (weights only, iteration 0) that
``python -m megatron_forge.train --config CKPT/config.yaml`` loads under any layout to
continue pretraining.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from megatron_forge.checkpointing import TRACKER, iteration_dir
from megatron_forge.config import Config, ConfigError, ParallelConfig, from_dict
from megatron_forge.config.schema import TOKEN_ID_FIELDS
from megatron_forge.convert.files import (
    SafetensorsReader,
    check_output,
    read_json,
    release_freed_memory,
    staged_output,
)
from megatron_forge.convert.reader import KEY_ALIASES
from megatron_forge.convert.writer import Chunk, megatron_layout, write_torch_dist
from megatron_forge.errors import ConvertError
from megatron_forge.models import (
    ModelFamily,
    check_model_config,
    family_for_architecture,
    padded_vocab_size,
)
from megatron_forge.models.mapping import Rule, stacked_shapes
from megatron_forge.utils import DTYPES

# HF tensors that carry no weights of the model.
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)
CANONICAL_KEY = {alias: key for key, aliases in KEY_ALIASES.items() for alias in aliases}


def generation_metadata(hf_dir: Path, hf: dict[str, Any]) -> dict[str, Any]:
    """The export section for ``hf_dir``: config.json's token ids (an eos_token_id list
    stays a list) and generation_config.json as it is (less transformers_version, which
    names the writer), checked against the vocabulary; to-hf writes them back."""
    section: dict[str, Any] = {name: hf.get(name) for name in TOKEN_ID_FIELDS}
    if (hf_dir / "generation_config.json").is_file():
        generation = read_json(hf_dir / "generation_config.json")
        generation.pop("transformers_version", None)
        section["generation"] = generation
    section["converted_from"] = str(hf_dir)
    try:
        export = from_dict({"export": section}).export
        if isinstance(hf.get("vocab_size"), int):
            export.check_vocabulary(hf["vocab_size"], "config.json vocab_size")
    except ConfigError as err:
        # Name the files the values came from, not the config keys they are stored under.
        text = str(err).replace("export.generation.", "generation_config.json ")
        raise ConvertError(f"{hf_dir}: {text.replace('export.', 'config.json ')}") from None
    return section


def config_from_hf(
    hf_dir: Path, hf: dict[str, Any], tp: int, pp: int, ep: int, dtype: torch.dtype
) -> tuple[Config, ModelFamily]:
    """Our Config for the HF model (model section from config.json, export section from
    its token ids and generation_config.json), validated for the TP/PP/EP layout the user
    plans to train with."""
    architectures = hf.get("architectures") or []
    if len(architectures) != 1:
        raise ConvertError(f"{hf_dir}/config.json must name one architecture, has {architectures}")
    family = family_for_architecture(architectures[0])
    has_tokenizer = any((hf_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    dtype_name = next(name for name, d in DTYPES.items() if d == dtype)
    export = generation_metadata(hf_dir, hf)
    try:
        fields = family.model_fields(hf)
        # megatron-core trains MoE layers under TP only with sequence parallelism; the
        # checkpoint's layout does not depend on it.
        sequence_parallel = tp > 1 and bool(fields.get("num_experts"))
        cfg = from_dict(
            {
                "model": fields,
                "parallel": {
                    "tensor": tp,
                    "pipeline": pp,
                    "expert": ep,
                    "sequence_parallel": sequence_parallel,
                },
                "data": {"tokenizer": str(hf_dir) if has_tokenizer else None},
                "precision": {"params_dtype": dtype_name},
                "checkpoint": {"load_mode": "finetune"},
                "export": export,
            }
        )
        # The layout's arithmetic only (world = TP x PP x EP, one data-parallel group per
        # expert group); hardware checks belong to the training run.
        cfg.validate(tp * pp * ep, cuda_available=True, te_available=True)
        check_model_config(cfg.model)
    except ConfigError as err:
        raise ConvertError(f"{hf_dir}: {err}") from None
    return cfg, family


def check_hf_tensors(reader: SafetensorsReader, rules: list[Rule], cfg: Config) -> None:
    """Every tensor the rules need exists with the shape config.json implies, and no HF
    tensor is left unconverted (a silently dropped weight is a wrong model)."""
    wanted = {name: shape for rule in rules for name, shape in rule.hf.items()}
    problems = []
    for name, shape in wanted.items():
        if name not in reader:
            problems.append(f"missing {name}")
        elif reader.shape(name) != shape:
            problems.append(f"{name} has shape {list(reader.shape(name))}, expected {list(shape)}")
    tied = not cfg.model.untie_embeddings
    extra = [
        n
        for n in reader.entries
        if n not in wanted
        and not n.endswith(IGNORABLE_SUFFIXES)
        and not (tied and n == "lm_head.weight")
    ]
    if extra:
        problems.append(f"tensors the {cfg.model.family} mapping does not convert: {extra[:8]}")
    if problems:
        raise ConvertError(
            f"{reader.directory} does not match its config.json: " + "; ".join(problems[:10])
        )


def ordered_chunks(chunks: list[Chunk], rules: list[Rule], cfg: Config) -> list[Chunk]:
    """megatron's chunks checked against the rules and sorted by rule, so each rule's
    source tensors are read once."""
    position = {(key, rule.index): i for i, rule in enumerate(rules) for key in rule.megatron}
    expected = stacked_shapes(rules, cfg.model)
    for c in chunks:
        key = CANONICAL_KEY.get(c.key, c.key)
        if (key, c.index) not in position or expected[key] != c.global_shape:
            raise ConvertError(
                f"megatron-core's layout has {c.key}{list(c.global_shape)} at {c.index}, which "
                f"the {cfg.model.family} mapping does not produce (expected shapes: {expected})"
            )
    covered = {(CANONICAL_KEY.get(c.key, c.key), c.index) for c in chunks}
    missing = [k for k in position if k not in covered]
    if missing:
        raise ConvertError(f"megatron-core's layout lacks {missing[:5]} that the mapping writes")
    return sorted(chunks, key=lambda c: position[(CANONICAL_KEY.get(c.key, c.key), c.index)])


def import_hf(
    hf_dir: str | Path,
    ckpt_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    dtype: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write ``ckpt_dir`` (iter_0000000/, the tracker, config.yaml) from ``hf_dir``."""
    check_output(ckpt_dir, hf_dir, overwrite, "Hugging Face model")  # before any work
    hf_dir, ckpt_dir = Path(hf_dir).resolve(), Path(ckpt_dir).resolve()
    if not hf_dir.is_dir():
        raise ConvertError(f"Hugging Face directory {hf_dir} does not exist")
    hf = read_json(hf_dir / "config.json")
    reader = SafetensorsReader(hf_dir)
    source_dtype = (
        reader.dtype("model.embed_tokens.weight")
        if ("model.embed_tokens.weight" in reader)
        else torch.float32
    )
    out_dtype = DTYPES[dtype] if dtype else source_dtype
    cfg, family = config_from_hf(hf_dir, hf, tp, pp, ep, out_dtype)
    model = cfg.model
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    rules = family.weight_rules(model, model.vocab_size, padded)
    check_hf_tensors(reader, rules, cfg)

    # The layout model: one rank, the vocabulary padded as the TP=tp run will pad it.
    layout_cfg = copy.deepcopy(cfg)
    layout_cfg.model.make_vocab_size_divisible_by = model.make_vocab_size_divisible_by * tp
    layout_cfg.parallel = ParallelConfig()
    chunks, objects = megatron_layout(layout_cfg, model.vocab_size)
    chunks = ordered_chunks(chunks, rules, cfg)

    rule_of = {(key, r.index): r for r in rules for key in r.megatron}
    cache: dict[str, Any] = {"rule": None, "tensors": {}}
    progress = tqdm(total=len(chunks), desc="from-hf", unit="chunk", file=sys.stderr)

    def produce(key: str, index: tuple[int, ...]) -> torch.Tensor:
        key = CANONICAL_KEY.get(key, key)
        rule = rule_of[(key, index)]
        if cache["rule"] is not rule:
            cache["tensors"] = {}  # drop the previous rule's tensors before reading
            release_freed_memory()
            cache["tensors"] = rule.to_megatron({n: reader.read(n) for n in rule.hf})
            cache["rule"] = rule
        progress.update()
        return cache["tensors"][key]

    common = {
        "iteration": 0,
        "consumed_samples": 0,
        "has_optimizer": False,
        "config": cfg.to_dict(),
        "checkpoint_version": 3.0,
        "converted_from": str(hf_dir),
    }
    with staged_output(ckpt_dir, overwrite) as staging:
        write_torch_dist(iteration_dir(staging, 0), chunks, objects, common, out_dtype, produce)
        progress.close()
        (staging / TRACKER).write_text("0\n")
        cfg.checkpoint.load = str(ckpt_dir)
        (staging / "config.yaml").write_text(
            f"# Converted from {hf_dir} by forge-convert from-hf. Add data.blend and\n"
            "# checkpoint.save; on CPU set precision.params_dtype=fp32.\n" + cfg.to_yaml()
        )
    return ckpt_dir
