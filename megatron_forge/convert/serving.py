"""check-serving: does a directory hold what vLLM and TensorRT-LLM need to serve it?

For a Hugging Face directory: an architecture both know, the config fields they read, every
weight with the shape and dtype the config implies (headers only, no weights loaded), and
a tokenizer that transformers loads. For a TensorRT-LLM checkpoint: the config fields
trtllm-build reads and one rank file per rank with the expected tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megatron_forge.config import ConfigError, ModelConfig, from_dict
from megatron_forge.convert.files import (
    HF_DTYPE_NAMES,
    SafetensorsReader,
    read_json,
    read_safetensors_header,
)
from megatron_forge.errors import ConvertError
from megatron_forge.models import ModelFamily, check_model_config, families

REQUIRED_HF_FIELDS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "torch_dtype",
    "eos_token_id",
)
REQUIRED_TRT_FIELDS = (
    "architecture",
    "dtype",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "position_embedding_type",
    "rotary_base",
    "norm_epsilon",
    "mapping",
    "quantization",
)


class Report:
    """Collects check results; ``ok`` is False once any check failed."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ok = True

    def check(self, passed: bool, what: str, fix: str = "") -> bool:
        self.lines.append(
            f"  [{'ok' if passed else 'FAIL'}] {what}" + ("" if passed else f": {fix}")
        )
        self.ok &= passed
        return passed


def servable_families() -> dict[str, ModelFamily]:
    """Architecture -> family, for the families whose Hugging Face export vLLM or
    TensorRT-LLM's PyTorch backend serves."""
    return {f.hf_architecture: f for f in families() if f.serving.vllm or f.serving.trtllm}


def _model_from_hf(family: ModelFamily, hf: dict[str, Any]) -> ModelConfig:
    try:
        model = from_dict({"model": family.model_fields(hf)}).model
        check_model_config(model)
    except ConfigError as err:
        raise ConvertError(str(err)) from None
    return model


def check_hf_weights(out: Path, hf: dict[str, Any], family: ModelFamily, report: Report) -> None:
    try:
        model = _model_from_hf(family, hf)
    except ConvertError as err:
        report.check(False, "config.json describes a supported model", str(err))
        return
    rules = family.weight_rules(model, hf["vocab_size"], hf["vocab_size"])
    expected = {name: shape for rule in rules for name, shape in rule.hf.items()}
    try:
        reader = SafetensorsReader(out)
    except ConvertError as err:
        report.check(False, "safetensors weights", str(err))
        return
    missing = [n for n in expected if n not in reader]
    wrong = [n for n in expected if n in reader and reader.shape(n) != expected[n]]
    extra = [n for n in reader.entries if n not in expected]
    dtypes = {HF_DTYPE_NAMES.get(reader.dtype(n), str(reader.dtype(n))) for n in reader.entries}
    report.check(not missing, f"{len(expected)} weights present", f"missing {missing[:5]}")
    report.check(not wrong, "weight shapes match config.json", f"wrong shapes: {wrong[:5]}")
    report.check(not extra, "no unexpected weights", f"unexpected {extra[:5]}")
    report.check(
        dtypes == {hf.get("torch_dtype")},
        f"weights stored as {sorted(dtypes)}",
        f"config.json says torch_dtype={hf.get('torch_dtype')}",
    )


def check_tokenizer(out: Path, hf: dict[str, Any], report: Report) -> None:
    has_files = any((out / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    if not report.check(has_files, "tokenizer files", "no tokenizer.json or tokenizer.model"):
        return
    try:
        from transformers import AutoTokenizer
    except ImportError:
        report.lines.append("  [skip] transformers not installed: tokenizer not loaded")
        return
    try:
        tok = AutoTokenizer.from_pretrained(str(out))
    except Exception as err:  # any failure here is what a server would hit
        report.check(False, "AutoTokenizer loads", f"{type(err).__name__}: {err}")
        return
    report.check(True, f"AutoTokenizer loads ({len(tok)} tokens)")
    report.check(
        len(tok) <= hf["vocab_size"],
        "tokenizer fits the embedding",
        f"{len(tok)} tokens > vocab_size={hf['vocab_size']}",
    )
    report.check(
        tok.eos_token_id == hf.get("eos_token_id"),
        "eos_token_id matches the tokenizer",
        f"tokenizer eos={tok.eos_token_id}, config eos_token_id={hf.get('eos_token_id')}",
    )


def check_hf_dir(out: Path, report: Report) -> list[str]:
    hf = read_json(out / "config.json")
    missing = [f for f in REQUIRED_HF_FIELDS if f not in hf]
    report.check(not missing, "config.json fields", f"missing {missing}")
    arch = (hf.get("architectures") or ["?"])[0]
    servable = servable_families()
    family = servable.get(arch)
    report.check(family is not None, f"architecture {arch}", f"not one of {sorted(servable)}")
    report.check(
        "rope_theta" in hf or "rope_theta" in (hf.get("rope_parameters") or {}),
        "RoPE base (rope_theta)",
        "set rope_theta",
    )
    report.check(
        hf.get("torch_dtype") in ("bfloat16", "float16", "float32"),
        f"torch_dtype {hf.get('torch_dtype')}",
        "must be bfloat16, float16 or float32",
    )
    report.check((out / "generation_config.json").is_file(), "generation_config.json", "missing")
    if family is not None and not missing:
        check_hf_weights(out, hf, family, report)
    check_tokenizer(out, hf, report)
    heads, groups = hf.get("num_attention_heads", 1), hf.get("num_key_value_heads", 1)
    tp = max(t for t in (1, 2, 4, 8) if heads % t == 0 and groups % t == 0)
    commands = []
    if family is not None and family.serving.vllm:
        commands.append(f"vllm serve {out} --tensor-parallel-size {tp}")
    if family is not None and family.serving.trtllm:
        commands.append(f"trtllm-serve {out} --backend pytorch --tp_size {tp}")
    return commands


def check_trtllm_dir(out: Path, config: dict[str, Any], report: Report) -> list[str]:
    missing = [f for f in REQUIRED_TRT_FIELDS if f not in config]
    report.check(not missing, "TensorRT-LLM config.json fields", f"missing {missing}")
    mapping = config.get("mapping", {})
    tp, pp = mapping.get("tp_size", 1), mapping.get("pp_size", 1)
    world = mapping.get("world_size", tp * pp)
    report.check(world == tp * pp, f"mapping tp={tp} pp={pp}", f"world_size={world} != tp x pp")
    known = sorted(f.hf_architecture for f in families() if f.serving.trtllm_checkpoint)
    report.check(
        config.get("architecture") in known,
        f"architecture {config.get('architecture')}",
        f"not one of {known}",
    )
    for rank in range(world):
        path = out / f"rank{rank}.safetensors"
        if not report.check(path.is_file(), f"rank{rank}.safetensors", "missing"):
            continue
        names = set(read_safetensors_header(path))
        needs = {"transformer.layers.0.attention.qkv.weight"}
        if rank < tp:
            needs.add("transformer.vocab_embedding.weight")
        if rank >= world - tp:
            needs |= {"lm_head.weight", "transformer.ln_f.weight"}
        report.check(needs <= names, f"rank{rank} tensors", f"missing {sorted(needs - names)}")
    from megatron_forge.convert.trtllm import build_command

    return [build_command(out, tp, pp)]


def check_serving(out_dir: str | Path) -> tuple[bool, str]:
    """(passed, report text with the serve/build commands) for ``out_dir``."""
    out = Path(out_dir)
    report = Report()
    if not (out / "config.json").is_file():
        raise ConvertError(f"{out} has no config.json: not a Hugging Face or TensorRT-LLM export")
    config = read_json(out / "config.json")
    if "architecture" in config and "mapping" in config:
        kind, commands = "TensorRT-LLM checkpoint", check_trtllm_dir(out, config, report)
    else:
        kind, commands = "Hugging Face directory", check_hf_dir(out, report)
    ready = "ready to build an engine" if kind.startswith("TensorRT") else "ready to serve"
    verdict = ready if report.ok else "NOT ready: fix the FAIL lines"
    text = "\n".join([f"{out}: {kind}", *report.lines, verdict])
    if report.ok:
        text += "\n" + "\n".join(f"  {c}" for c in commands)
    return report.ok, text
