"""torch_dist checkpoint -> TensorRT-LLM checkpoint (config.json + rank{r}.safetensors),
the input of ``trtllm-build`` in TensorRT-LLM releases that still build engines.
TensorRT-LLM 1.x serves the Hugging Face export directly (PyTorch backend); this format
is for users of the engine path.

Per-rank tensors follow TensorRT-LLM's own HF converters (models/llama/convert.py,
models/qwen/convert.py), with rank = pp_rank * tp + tp_rank and layer names local to the
pipeline stage:

- ``attention.qkv`` = [Q_r; K_r; V_r]: this rank's query heads, then its k and v heads
  (a kv head is repeated when TP exceeds the number of kv heads); biases alike;
- ``attention.dense`` (o_proj) and ``mlp.proj`` (down) split along their input axis;
- ``mlp.fc`` = gate, ``mlp.gate`` = up, split along their output axis;
- MoE: ``mlp.router`` (fp32, whole), ``mlp.fc`` = experts stacked, each [up_r; gate_r]
  (w3 then w1), ``mlp.proj`` = experts' w2 stacked, each split along its input axis;
- Qwen3's QK-norm: ``attention.q_layernorm`` / ``k_layernorm``, whole on every rank;
- ``vocab_embedding`` whole on the first stage; ``lm_head`` padded to a multiple of TP
  and split by rows, and ``ln_f``, on the last.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from megatron_forge.config import ModelConfig
from megatron_forge.convert.files import (
    HF_DTYPE_NAMES,
    SafetensorsFileWriter,
    TensorSpec,
    check_output,
    release_freed_memory,
    staged_output,
    write_json,
)
from megatron_forge.convert.hf import EMBEDDING, checked_rules, export_vocab_size, open_tokenizer
from megatron_forge.convert.reader import MegatronCheckpoint
from megatron_forge.errors import ConvertError
from megatron_forge.models import families, get_family
from megatron_forge.models.mapping import Rule, head_dim
from megatron_forge.utils import DTYPES

LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.w([123])\.weight")
# HF name (within a layer) -> (TRT-LLM name, TP split axis or None for replicated)
DENSE = {
    "input_layernorm.weight": ("input_layernorm.weight", None),
    "post_attention_layernorm.weight": ("post_layernorm.weight", None),
    "self_attn.o_proj.weight": ("attention.dense.weight", 1),
    "mlp.gate_proj.weight": ("mlp.fc.weight", 0),
    "mlp.up_proj.weight": ("mlp.gate.weight", 0),
    "mlp.down_proj.weight": ("mlp.proj.weight", 1),
    # Qwen3's QK-norm ([head_size], every rank), read by TensorRT-LLM's Attention when the
    # config's qwen_type is qwen3.
    "self_attn.q_norm.weight": ("attention.q_layernorm.weight", None),
    "self_attn.k_norm.weight": ("attention.k_layernorm.weight", None),
}
# model.rope_scaling types TensorRT-LLM's Attention applies (RotaryScalingType); it reads
# the type from "type" (or "rope_type") and the factors under their Hugging Face names.
TRT_ROPE_SCALING = ("llama3",)
# (rank, TRT-LLM name, tensor, row of a stacked tensor or None)
Placement = tuple[int, str, torch.Tensor, Optional[int]]


class TrtLayout:
    """Where each HF tensor goes in a TP x PP TensorRT-LLM checkpoint."""

    def __init__(self, model: ModelConfig, vocab_size: int, tp: int, pp: int, dtype: torch.dtype):
        self.model, self.vocab_size, self.tp, self.pp, self.dtype = model, vocab_size, tp, pp, dtype
        self.layers_per_stage = model.num_layers // pp

    def ranks(self, stage: int) -> list[int]:
        return [stage * self.tp + r for r in range(self.tp)]

    def split(self, t: torch.Tensor, axis: int, r: int) -> torch.Tensor:
        return t.chunk(self.tp, dim=axis)[r].to(self.dtype).contiguous()

    def kv_split(self, t: torch.Tensor, r: int) -> torch.Tensor:
        groups = self.model.num_query_groups
        if groups % self.tp == 0:
            return self.split(t, 0, r)
        d = head_dim(self.model)  # fewer kv heads than ranks: each rank repeats one head
        head = r * groups // self.tp
        return t[head * d : (head + 1) * d].to(self.dtype).contiguous()

    def lm_head(self, t: torch.Tensor) -> Iterator[Placement]:
        rows = -(-self.vocab_size // self.tp) * self.tp
        padded = torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0]))
        for r, rank in enumerate(self.ranks(self.pp - 1)):
            yield rank, "lm_head.weight", self.split(padded, 0, r), None

    def place(self, hf: dict[str, torch.Tensor]) -> Iterator[Placement]:
        """The per-rank tensors of one rule's HF tensors (meta tensors give the plan)."""
        for name, t in hf.items():
            if name == "model.embed_tokens.weight":
                for rank in self.ranks(0):
                    yield rank, "transformer.vocab_embedding.weight", t.to(self.dtype), None
                if not self.model.untie_embeddings:
                    yield from self.lm_head(t)
            elif name == "lm_head.weight":
                yield from self.lm_head(t)
            elif name == "model.norm.weight":
                for rank in self.ranks(self.pp - 1):
                    yield rank, "transformer.ln_f.weight", t.to(self.dtype), None
            else:
                yield from self.place_layer(name, t, hf)

    def place_layer(
        self, name: str, t: torch.Tensor, hf: dict[str, torch.Tensor]
    ) -> Iterator[Placement]:
        match = LAYER.fullmatch(name)
        if match is None:
            raise ConvertError(f"no TensorRT-LLM name for {name}")
        layer, rest = int(match[1]), match[2]
        stage, local = divmod(layer, self.layers_per_stage)
        prefix = f"transformer.layers.{local}."
        ranks = self.ranks(stage)
        if rest in DENSE:
            trt, axis = DENSE[rest]
            for r, rank in enumerate(ranks):
                part = t.to(self.dtype) if axis is None else self.split(t, axis, r)
                yield rank, prefix + trt, part, None
        elif rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]  # weight or bias
            k, v = (hf[name.replace("q_proj", x)] for x in ("k_proj", "v_proj"))
            for r, rank in enumerate(ranks):
                qkv = torch.cat([self.split(t, 0, r), self.kv_split(k, r), self.kv_split(v, r)])
                yield rank, prefix + f"attention.qkv.{kind}", qkv, None
        elif rest.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            pass  # placed with q_proj
        elif rest == "block_sparse_moe.gate.weight":
            for rank in ranks:  # TensorRT-LLM keeps the router in fp32
                yield rank, prefix + "mlp.router.weight", t.float().contiguous(), None
        elif expert := EXPERT.fullmatch(rest):
            e, w = int(expert[1]), expert[2]
            for r, rank in enumerate(ranks):
                if w == "1":
                    up = hf[name.replace(".w1.", ".w3.")]
                    fc = torch.cat([self.split(up, 0, r), self.split(t, 0, r)])
                    yield rank, prefix + "mlp.fc.weight", fc, e
                elif w == "2":
                    yield rank, prefix + "mlp.proj.weight", self.split(t, 1, r), e
        else:
            raise ConvertError(f"no TensorRT-LLM name for {name}")

    def specs(self, rules: list[Rule]) -> dict[int, list[TensorSpec]]:
        """Each rank's file header, from placing meta tensors of the rules' HF shapes."""
        shapes: dict[int, dict[str, tuple[tuple[int, ...], torch.dtype]]] = {
            rank: {} for rank in range(self.tp * self.pp)
        }
        num_experts = self.model.num_experts or 0
        for rule in rules:
            meta = {n: torch.empty(s, device="meta") for n, s in rule.hf.items()}
            for rank, name, t, row in self.place(meta):
                shape = tuple(t.shape) if row is None else (num_experts, *t.shape)
                shapes[rank][name] = (shape, t.dtype)
        return {
            rank: [TensorSpec(n, s, d) for n, (s, d) in entries.items()]
            for rank, entries in shapes.items()
        }


def trtllm_config(
    model: ModelConfig, vocab_size: int, tp: int, pp: int, dtype: torch.dtype
) -> dict[str, Any]:
    """config.json as TensorRT-LLM's PretrainedConfig (and LLaMA/QWen configs) read it."""
    family = get_family(model.family)
    hf = family.hf_config(model, vocab_size)
    moe = {"num_experts": 0, "top_k": 0, "normalization_mode": 0}
    if model.num_experts:
        # Mixtral's routing: softmax over the top-k logits = RENORMALIZE (1).
        moe = {
            "num_experts": model.num_experts,
            "top_k": model.moe_router_topk,
            "normalization_mode": 1,
        }
    config: dict[str, Any] = {
        "architecture": hf["architectures"][0],
        "dtype": HF_DTYPE_NAMES[dtype],
        "logits_dtype": "float32",
        "vocab_size": vocab_size,
        "max_position_embeddings": model.max_position_embeddings,
        "hidden_size": model.hidden_size,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_attention_heads,
        "num_key_value_heads": model.num_query_groups,
        "head_size": head_dim(model),
        "intermediate_size": hf["intermediate_size"],
        "hidden_act": "swiglu" if model.num_experts else "silu",
        "norm_epsilon": model.norm_epsilon,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": model.rotary_base,
        "rotary_scaling": model.rope_scaling.to_dict() if model.rope_scaling else None,
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "tie_word_embeddings": not model.untie_embeddings,
        "attn_bias": False,
        "mlp_bias": False,
        "moe": moe,
        "mapping": {
            "world_size": tp * pp,
            "tp_size": tp,
            "pp_size": pp,
            "moe_tp_size": tp,
            "moe_ep_size": 1,
        },
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    config.update(family.trtllm_config(model))
    return config


def check_trt_family(model: ModelConfig) -> None:
    if not get_family(model.family).serving.trtllm_checkpoint:
        supported = [f.name for f in families() if f.serving.trtllm_checkpoint]
        raise ConvertError(
            f"to-trtllm does not support model.family={model.family} (supported: {supported}); "
            "export with to-hf and serve that directory with trtllm-serve --backend pytorch"
        )
    scaling = model.rope_scaling
    if scaling is not None and scaling.type not in TRT_ROPE_SCALING:
        raise ConvertError(
            f"to-trtllm does not support model.rope_scaling.type={scaling.type} (TensorRT-LLM "
            f"checkpoints support: {list(TRT_ROPE_SCALING)}); export with to-hf and serve that "
            "directory with trtllm-serve --backend pytorch"
        )


def check_trt_layout(model: ModelConfig, tp: int, pp: int) -> None:
    problems = []
    if model.num_attention_heads % tp:
        problems.append(f"num_attention_heads={model.num_attention_heads} % tp={tp} != 0")
    groups = model.num_query_groups
    if groups % tp and tp % groups:
        problems.append(f"num_query_groups={groups} and tp={tp}: one must divide the other")
    if model.num_layers % pp:
        problems.append(f"num_layers={model.num_layers} % pp={pp} != 0")
    ffn = model.moe_ffn_hidden_size if model.num_experts else model.ffn_hidden_size
    if ffn % tp:
        problems.append(f"ffn size {ffn} % tp={tp} != 0")
    if problems:
        raise ConvertError("TensorRT-LLM layout not possible: " + "; ".join(problems))


def build_command(out_dir: Path, tp: int, pp: int) -> str:
    return (
        f"trtllm-build --checkpoint_dir {out_dir} --output_dir {out_dir}_engine "
        f"--gemm_plugin auto  # then run with --tokenizer_dir {out_dir}/tokenizer "
        f"(mpirun -n {tp * pp} for {tp * pp} ranks)"
    )


def export_trtllm(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    tp: int,
    pp: int = 1,
    iteration: Optional[int] = None,
    dtype: Optional[str] = None,
    tokenizer: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Write a TensorRT-LLM checkpoint for a TP x PP engine; return its directory."""
    if tp < 1 or pp < 1:
        raise ConvertError(f"--tp and --pp must be >= 1 (got tp={tp}, pp={pp})")
    check_output(out_dir, ckpt_dir, overwrite)  # before any work
    ckpt = MegatronCheckpoint(ckpt_dir, iteration)
    model = ckpt.model
    check_trt_family(model)
    check_trt_layout(model, tp, pp)
    tok = open_tokenizer(ckpt, tokenizer)
    vocab_size = export_vocab_size(model, tok)
    rules = checked_rules(ckpt, vocab_size)
    out_dtype = DTYPES[dtype] if dtype else ckpt.dtype(EMBEDDING)
    layout = TrtLayout(model, vocab_size, tp, pp, out_dtype)
    specs = layout.specs(rules)
    with staged_output(out_dir, overwrite) as staging:
        writers = {
            rank: SafetensorsFileWriter(staging / f"rank{rank}.safetensors", rank_specs)
            for rank, rank_specs in specs.items()
        }
        for rule in tqdm(rules, desc="to-trtllm", unit="group", file=sys.stderr):
            release_freed_memory()
            tensors = {key: ckpt.read(key, rule.index) for key in rule.megatron}
            hf = rule.to_hf(tensors)
            del tensors
            for rank, name, tensor, row in layout.place(hf):
                writers[rank].write(name, tensor, row)
        for writer in writers.values():
            writer.close()
        write_json(staging / "config.json", trtllm_config(model, vocab_size, tp, pp, out_dtype))
        tok.save_pretrained_files(staging / "tokenizer")
    return Path(out_dir)
