"""check-serving: does a directory hold a model vLLM and TensorRT-LLM can serve, and does it
compute what the checkpoint it came from computes?

For a Hugging Face directory, in order:

1. pre-flight (file headers only): an architecture both servers know, the config fields
   they read (``torch_dtype`` or transformers 5's ``dtype``), a config the model family
   understands (rope-scaled ones included), every weight with the shape and dtype the
   config implies, and a tokenizer that transformers loads;
2. the scan: every tensor is read, one at a time, and must hold no NaN or inf;
3. the forward: transformers loads the directory on CPU (fp32) with every weight and
   runs a short prompt, tokenized by the directory's own tokenizer; the logits must be
   finite. Needs 4 bytes of memory per parameter: skip it for models too big for the
   machine (``forward=False``);
4. with a reference checkpoint: the same token ids through the checkpoint's own model
   (:mod:`megatron_forge.convert.reference`); the largest logit difference must be within
   the tolerance, both printed. This is what catches a wrongly mapped weight (gate and up
   swapped, heads interleaved the wrong way) that shapes cannot show.

For a TensorRT-LLM checkpoint: the config fields trtllm-build reads, one rank file per rank
with the expected tensors, and the scan.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from megatron_forge.config import ConfigError, ModelConfig, from_dict
from megatron_forge.convert.files import (
    HF_DTYPE_NAMES,
    SafetensorsReader,
    read_json,
    read_safetensors_header,
    read_safetensors_tensor,
    release_freed_memory,
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
DEFAULT_PROMPT = "The capital of France is Paris. The capital of Italy is"
LOSSLESS_ATOL = 1e-4
"""Relative to max(1, max |logit|): the export holds the checkpoint's values exactly (same
dtype, or fp32) and both forwards run in fp32, so they differ only in the order of
floating-point operations (~1e-6 measured)."""
ROUNDED_ATOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3}
"""Relative tolerance when the export rounded the checkpoint's weights to this dtype."""


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

    def skip(self, what: str) -> None:
        self.lines.append(f"  [skip] {what}")


def servable_families() -> dict[str, ModelFamily]:
    """Architecture -> family, for the families whose Hugging Face export vLLM or
    TensorRT-LLM's PyTorch backend serves."""
    return {f.hf_architecture: f for f in families() if f.serving.vllm or f.serving.trtllm}


def hf_dtype_name(hf: dict[str, Any]) -> Optional[str]:
    """The weights' dtype config.json declares: ``torch_dtype`` (transformers 4) or
    ``dtype`` (transformers 5 writes only this one)."""
    return hf.get("torch_dtype") or hf.get("dtype")


def eos_ids(value: Any) -> list[Any]:
    """config.json's eos_token_id as a list (instruct models stop on several ids)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


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
    # the weights the model keeps in fp32 (family.hf_fp32_modules) may be fp32 whatever
    # the dtype; every other weight is stored in config.json's dtype
    dtypes = {
        HF_DTYPE_NAMES.get(reader.dtype(n), str(reader.dtype(n)))
        for n in reader.entries
        if not (family.keeps_fp32(n) and reader.dtype(n) == torch.float32)
    }
    report.check(not missing, f"{len(expected)} weights present", f"missing {missing[:5]}")
    report.check(not wrong, "weight shapes match config.json", f"wrong shapes: {wrong[:5]}")
    report.check(not extra, "no unexpected weights", f"unexpected {extra[:5]}")
    report.check(
        dtypes <= {hf_dtype_name(hf)},
        f"weights stored as {sorted(dtypes) or [hf_dtype_name(hf)]}"
        + (f" ({', '.join(family.hf_fp32_modules)} in float32)" if family.hf_fp32_modules else ""),
        f"config.json says dtype={hf_dtype_name(hf)}",
    )


def check_tokenizer(out: Path, hf: dict[str, Any], report: Report) -> None:
    has_files = any((out / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    if not report.check(has_files, "tokenizer files", "no tokenizer.json or tokenizer.model"):
        return
    try:
        from transformers import AutoTokenizer
    except ImportError:
        report.skip("transformers not installed: tokenizer not loaded")
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
    stops = eos_ids(hf.get("eos_token_id"))
    report.check(
        tok.eos_token_id in stops,
        "the tokenizer's eos token is one config.json stops on",
        f"tokenizer eos={tok.eos_token_id}, config eos_token_id={hf.get('eos_token_id')}",
    )


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.1f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


def check_finite(files: list[Path], report: Report) -> None:
    """Read every tensor of the safetensors ``files``, one at a time, and fail naming
    those that hold NaN or inf."""
    headers = {path: read_safetensors_header(path) for path in files}
    total = sum(
        e["data_offsets"][1] - e["data_offsets"][0] for h in headers.values() for e in h.values()
    )
    count, bad = sum(map(len, headers.values())), []
    with tqdm(total=total, desc="scan", unit="B", unit_scale=True, file=sys.stderr) as bar:
        for path, header in headers.items():
            for name, entry in header.items():
                tensor = read_safetensors_tensor(path, name, entry)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
                    where = f"{path.name}: " if len(files) > 1 else ""
                    bad.append(f"{where}{name} ({nan} NaN, {inf} inf of {tensor.numel()})")
                bar.update(tensor.numel() * tensor.element_size())
                del tensor
                release_freed_memory()
    report.check(
        not bad,
        f"all {count} tensors finite ({_size(total)} read)",
        "non-finite values in "
        + ", ".join(bad[:5])
        + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        + "; these weights are broken: export an earlier iteration of the checkpoint",
    )


def safetensors_files(out: Path, report: Report) -> list[Path]:
    """The weight files of a Hugging Face directory (as its index lists them)."""
    try:
        reader = SafetensorsReader(out)
    except ConvertError as err:
        report.check(False, "safetensors weights", str(err))
        return []
    return sorted({path for path, _ in reader.entries.values()})


def hf_forward(
    out: Path, prompt: str, report: Report
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """(token ids [1, n], fp32 logits [1, n, vocab]) of transformers' model loaded from
    ``out`` on ``prompt``, or None after reporting why there are none."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        report.skip("transformers not installed: no forward pass")
        return None
    try:
        tokens = AutoTokenizer.from_pretrained(str(out))(prompt, return_tensors="pt")["input_ids"]
        model, info = AutoModelForCausalLM.from_pretrained(
            str(out), dtype=torch.float32, output_loading_info=True
        )
    except Exception as err:  # what a server loading the directory would hit
        report.check(False, "transformers loads the model", f"{type(err).__name__}: {err}")
        return None
    # transformers initialises a weight it did not find at random and only warns.
    unloaded = {kind: sorted(map(str, keys))[:5] for kind, keys in info.items() if keys}
    if not report.check(not unloaded, "transformers loads every weight", str(unloaded)[:500]):
        return None
    if not report.check(tokens.shape[1] > 0, "prompt", f"{prompt!r} tokenizes to no tokens"):
        return None
    model.eval()
    with torch.no_grad():
        logits = model(tokens).logits.float()
    del model
    finite = bool(torch.isfinite(logits).all())
    report.check(
        finite,
        f"transformers forward on a {tokens.shape[1]}-token prompt: finite logits",
        "the logits hold NaN or inf",
    )
    return (tokens, logits) if finite else None


def tolerance(
    hf_dtype: torch.dtype, ckpt_dtype: torch.dtype, scale: float, atol: Optional[float]
) -> tuple[float, str]:
    """(max |logits difference| allowed, why that value)."""
    if atol is not None:
        return atol, "--atol"
    if hf_dtype in (ckpt_dtype, torch.float32) or hf_dtype not in ROUNDED_ATOL:
        rel, why = LOSSLESS_ATOL, "the export holds the checkpoint's values"
    else:
        rel = ROUNDED_ATOL[hf_dtype]
        why = f"the export rounded the checkpoint's {HF_DTYPE_NAMES.get(ckpt_dtype)} weights"
    return rel * scale, f"{rel:g} x max(1, max |logit|) = {rel:g} x {scale:.3g}: {why}"


def compare_with_reference(
    ckpt_dir: str | Path,
    iteration: Optional[int],
    tokens: torch.Tensor,
    logits: torch.Tensor,
    hf_dtype: torch.dtype,
    atol: Optional[float],
    report: Report,
) -> None:
    from megatron_forge.convert.reader import MegatronCheckpoint
    from megatron_forge.convert.reference import EMBEDDING, megatron_logits

    ckpt = MegatronCheckpoint(ckpt_dir, iteration)
    vocab = logits.shape[-1]
    rows = ckpt.shape(EMBEDDING)[0]
    if rows < vocab:
        report.check(
            False,
            f"reference {ckpt.path}",
            f"its embedding has {rows} rows, fewer than the export's vocab_size={vocab}: "
            "not the checkpoint this directory was exported from",
        )
        return
    reference = megatron_logits(ckpt.root, tokens, ckpt.iteration)[..., :vocab]
    scale = max(1.0, reference.abs().max().item())
    limit, why = tolerance(hf_dtype, ckpt.dtype(EMBEDDING), scale, atol)
    diff = (logits - reference).abs().max().item()
    report.check(
        diff <= limit,
        f"logits match {ckpt.path}'s forward: max |diff| = {diff:.2e}, tolerance "
        f"{limit:.2e} ({why})",
        "the export computes another function than the checkpoint (a weight mapped "
        "wrongly, or another checkpoint?)",
    )


def check_hf_dir(
    out: Path,
    report: Report,
    scan: bool = True,
    forward: bool = True,
    reference: Optional[str | Path] = None,
    iteration: Optional[int] = None,
    atol: Optional[float] = None,
    prompt: str = DEFAULT_PROMPT,
) -> list[str]:
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
    dtype_name = hf_dtype_name(hf)
    report.check(
        dtype_name in ("bfloat16", "float16", "float32"),
        f"dtype {dtype_name}",
        "config.json's dtype (or torch_dtype) must be bfloat16, float16 or float32",
    )
    report.check((out / "generation_config.json").is_file(), "generation_config.json", "missing")
    if family is not None and not missing:
        check_hf_weights(out, hf, family, report)
    check_tokenizer(out, hf, report)
    if scan:
        check_finite(safetensors_files(out, report), report)
    else:
        report.skip("tensor scan (to-hf checked each tensor finite as it wrote it)")
    if not forward:
        report.skip("transformers' forward not run (--no-forward)")
    elif not report.ok:
        report.skip("transformers' forward not run: fix the FAIL lines first")
    else:
        result = hf_forward(out, prompt, report)
        if result is not None and reference is not None:
            dtype = {name: d for d, name in HF_DTYPE_NAMES.items()}[dtype_name]
            compare_with_reference(reference, iteration, *result, dtype, atol, report)
    heads, groups = hf.get("num_attention_heads", 1), hf.get("num_key_value_heads", 1)
    tp = max(t for t in (1, 2, 4, 8) if heads % t == 0 and groups % t == 0)
    commands = []
    if family is not None and family.serving.vllm:
        commands.append(f"vllm serve {out} --tensor-parallel-size {tp}")
    if family is not None and family.serving.trtllm:
        commands.append(f"trtllm-serve {out} --backend pytorch --tp_size {tp}")
    return commands


def check_trtllm_dir(out: Path, config: dict[str, Any], report: Report, scan: bool) -> list[str]:
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
    if scan:
        check_finite(sorted(out.glob("rank*.safetensors")), report)
    from megatron_forge.convert.trtllm import build_command

    return [build_command(out, tp, pp)]


def _check_reference_usable(reference: str | Path, iteration: Optional[int], forward: bool) -> None:
    """Fail before any work when --reference cannot be compared."""
    from megatron_forge.convert.reader import MegatronCheckpoint

    if not forward:
        raise ConvertError("--reference compares transformers' forward pass; drop --no-forward")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConvertError(
            "--reference runs the export with transformers, which is not installed: "
            "pip install transformers"
        ) from None
    MegatronCheckpoint(reference, iteration)  # a missing or damaged one is named now


def check_serving(
    out_dir: str | Path,
    *,
    scan: bool = True,
    forward: bool = True,
    reference: Optional[str | Path] = None,
    iteration: Optional[int] = None,
    atol: Optional[float] = None,
    prompt: Optional[str] = None,
) -> tuple[bool, str]:
    """(passed, report text with the serve/build commands) for ``out_dir``.

    ``scan``: read every tensor for NaN/inf; ``forward``: load the Hugging Face directory
    with transformers and run ``prompt``; ``reference``: a checkpoint (``iteration`` of
    it, default the latest) whose forward the logits must match within ``atol`` (default:
    see :func:`tolerance`); ``prompt``: default DEFAULT_PROMPT."""
    out = Path(out_dir)
    if reference is not None:
        _check_reference_usable(reference, iteration, forward)
    if not (out / "config.json").is_file():
        raise ConvertError(f"{out} has no config.json: not a Hugging Face or TensorRT-LLM export")
    config = read_json(out / "config.json")
    report = Report()
    if "architecture" in config and "mapping" in config:
        if reference is not None:
            raise ConvertError(
                f"{out} is a TensorRT-LLM checkpoint: --reference compares Hugging Face "
                "exports only (build an engine to run it)"
            )
        kind, commands = "TensorRT-LLM checkpoint", check_trtllm_dir(out, config, report, scan)
    else:
        kind = "Hugging Face directory"
        commands = check_hf_dir(
            out, report, scan, forward, reference, iteration, atol, prompt or DEFAULT_PROMPT
        )
    ready = "ready to build an engine" if kind.startswith("TensorRT") else "ready to serve"
    verdict = ready if report.ok else "NOT ready: fix the FAIL lines"
    text = "\n".join([f"{out}: {kind}", *report.lines, verdict])
    if report.ok:
        text += "\n" + "\n".join(f"  {c}" for c in commands)
    return report.ok, text
