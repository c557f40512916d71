"""The schema: one typed tree of dataclasses, every config key in one file.

YAML files map onto it 1:1 (:mod:`.loader`), CLIs override ``section.key=value``. Each section checks its own fields in ``__post_init__``; rules that involve several
sections or the world size live in :meth:`Config.validate`, which runs before anything
is allocated or submitted. Every error names the field at fault and how to fix it.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from megatron_forge.errors import ConfigError


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


ROPE_SCALING_FIELDS: dict[str, tuple[str, ...]] = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
    ),
}
"""The fields each ``model.rope_scaling.type`` needs (and the only ones it may set)."""
ROPE_SCALING_EXAMPLES = {
    "llama3": "Llama 3.1: factor 8.0, low_freq_factor 1.0, high_freq_factor 4.0, "
    "original_max_position_embeddings 8192",
    "yarn": "DeepSeek-V3: factor 40.0, original_max_position_embeddings 4096, beta_fast 32.0, "
    "beta_slow 1.0, mscale 1.0, mscale_all_dim 1.0",
}


@dataclass
class RopeScalingConfig:
    """RoPE frequency scaling (``model.rope_scaling``); ``type`` selects the method and
    with it the fields that must be set (:data:`ROPE_SCALING_FIELDS`):

    ``llama3`` (Llama 3.1 and later): wavelengths longer than
    original_max_position_embeddings / low_freq_factor are divided by ``factor``, those
    shorter than original_max_position_embeddings / high_freq_factor are kept, and the
    ones in between are interpolated smoothly; Llama 3.1 uses factor 8, low_freq_factor 1,
    high_freq_factor 4, original_max_position_embeddings 8192, Llama 3.2 factor 32.

    ``yarn`` (DeepSeek-V3, with Multi-Latent Attention only): frequencies whose wavelength
    spans fewer than beta_fast rotations over original_max_position_embeddings are kept,
    those with more than beta_slow rotations divided by ``factor``, a linear ramp between;
    attention logits are scaled by (0.1 * mscale_all_dim * ln(factor) + 1)^2 and the
    rotary part of q and k by the ratio of the mscale and mscale_all_dim terms (as
    transformers' DeepseekV3 does). DeepSeek-V3: factor 40, original_max_position_embeddings
    4096, beta_fast 32, beta_slow 1, mscale 1.0, mscale_all_dim 1.0."""

    type: Optional[Literal["llama3", "yarn"]] = None
    factor: Optional[float] = None
    low_freq_factor: Optional[float] = None
    high_freq_factor: Optional[float] = None
    original_max_position_embeddings: Optional[int] = None
    beta_fast: Optional[float] = None
    beta_slow: Optional[float] = None
    mscale: Optional[float] = None
    mscale_all_dim: Optional[float] = None

    def __post_init__(self) -> None:
        where = "model.rope_scaling"
        _require(
            self.type in ROPE_SCALING_FIELDS,
            f"{where}.type is not set; set it to one of {list(ROPE_SCALING_FIELDS)} with "
            "that type's fields (or model.rope_scaling: null for plain RoPE)",
        )
        needed = ROPE_SCALING_FIELDS[self.type]
        for name in (f.name for f in dataclasses.fields(self) if f.name != "type"):
            value = getattr(self, name)
            if name in needed:
                _require(
                    value is not None,
                    f"{where}.{name} is required for {where}.type={self.type} (needs "
                    f"{', '.join(needed)}; {ROPE_SCALING_EXAMPLES[self.type]})",
                )
            else:
                _require(
                    value is None,
                    f"{where}.{name}={value!r} is not used by {where}.type={self.type}; remove it",
                )
        if self.type == "llama3":
            _require(
                self.factor >= 1.0,
                f"{where}.factor={self.factor} must be >= 1 (1 keeps every frequency)",
            )
            _require(
                0 < self.low_freq_factor < self.high_freq_factor,
                f"{where}: low_freq_factor={self.low_freq_factor} and high_freq_factor="
                f"{self.high_freq_factor} must satisfy 0 < low_freq_factor < high_freq_factor",
            )
            _require(
                self.original_max_position_embeddings > 0,
                f"{where}.original_max_position_embeddings="
                f"{self.original_max_position_embeddings} must be positive (the context "
                "length the model was first trained with, e.g. 8192)",
            )

        if self.type == "yarn":
            self._check_yarn(where)

    def _check_yarn(self, where: str) -> None:
        _require(
            self.factor >= 1.0,
            f"{where}.factor={self.factor} must be >= 1 (1 keeps every frequency)",
        )
        _require(
            self.original_max_position_embeddings > 0,
            f"{where}.original_max_position_embeddings={self.original_max_position_embeddings} "
            "must be positive (the context length the model was first trained with, e.g. 4096)",
        )
        _require(
            0 < self.beta_slow < self.beta_fast,
            f"{where}: beta_fast={self.beta_fast} and beta_slow={self.beta_slow} must satisfy "
            "0 < beta_slow < beta_fast (DeepSeek-V3: 32 and 1)",
        )
        # transformers applies mscale only with a nonzero mscale_all_dim, megatron-core
        # always: the two agree (and exports stay exact) when mscale is 1 or both are set.
        _require(
            self.mscale > 0 and self.mscale_all_dim >= 0,
            f"{where}: mscale={self.mscale} must be > 0 and mscale_all_dim="
            f"{self.mscale_all_dim} >= 0 (DeepSeek-V3: 1.0 and 1.0)",
        )
        _require(
            self.mscale_all_dim > 0 or self.mscale == 1.0,
            f"{where}: mscale={self.mscale} with mscale_all_dim=0 is read differently by "
            "transformers (which then ignores mscale) and megatron-core; set mscale: 1.0 or a "
            "nonzero mscale_all_dim",
        )

    def to_dict(self) -> dict[str, Any]:
        """``type`` and the fields it uses."""
        return {"type": self.type, **{k: getattr(self, k) for k in ROPE_SCALING_FIELDS[self.type]}}


MOE_ONLY_FIELDS = (
    "moe_router_load_balancing_type",
    "moe_router_score_function",
    "moe_router_topk_scaling_factor",
    "moe_router_enable_expert_bias",
    "moe_router_num_groups",
    "moe_router_group_topk",
    "moe_z_loss_coeff",
    "moe_expert_capacity_factor",
    "moe_pad_expert_input_to_capacity",
    "moe_shared_expert_intermediate_size",
    "moe_shared_expert_gate",
    "moe_layer_freq",
    "moe_first_k_dense_replace",
)
"""MoE options a dense model (model.num_experts null) refuses when set away from default."""


@dataclass
class ModelConfig:
    family: str = "llama"
    """Model family, one registered in megatron_forge/models/: ``llama`` (dense), ``qwen2``
    (dense, QKV bias), ``qwen3`` (dense, QK-norm), ``mixtral`` (MoE), ... Checked, with the family's own rules (MoE
    families need num_experts, dense ones refuse it), by
    ``megatron_forge.models.check_model_config``: the config layer knows no family."""
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: Optional[int] = None
    """SwiGLU inner size; default: Llama's rule, 2/3 * 4 * hidden rounded up to 256."""
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; default: num_attention_heads (MHA)."""
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None
    """Longest sequence the RoPE tables cover; default: seq_length."""
    rotary_base: float = 10000.0
    rope_scaling: Optional[RopeScalingConfig] = None
    """RoPE frequency scaling, a mapping with ``type`` (``llama3``) and that type's fields
    (see :class:`RopeScalingConfig`), e.g. ``{type: llama3, factor: 8.0, low_freq_factor:
    1.0, high_freq_factor: 4.0, original_max_position_embeddings: 8192}``; null for plain
    RoPE."""
    head_dim: Optional[int] = None
    """Channels per attention head (megatron's kv_channels); null: hidden_size /
    num_attention_heads. Set it when heads x head_dim differs from hidden_size (Qwen3: 128)."""
    qk_layernorm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3's QK-norm)."""
    multi_latent_attention: bool = False
    """Multi-Latent Attention (DeepSeek-V2/V3, megatron-core's MLASelfAttention): queries
    and keys/values pass through low-rank latents, each head has a part without position
    (qk_head_dim) and a rotary part shared by all heads of a key (qk_pos_emb_head_dim).
    num_query_groups and head_dim do not apply."""
    q_lora_rank: Optional[int] = None
    """MLA: rank of the query latent (DeepSeek-V3: 1536); null: no query compression (a
    full q projection, as DeepSeek-V2-Lite)."""
    kv_lora_rank: Optional[int] = None
    """MLA: rank of the key/value latent (DeepSeek-V3: 512); required with MLA."""
    qk_head_dim: Optional[int] = None
    """MLA: per-head query/key channels without RoPE (qk_nope_head_dim; DeepSeek-V3: 128)."""
    qk_pos_emb_head_dim: Optional[int] = None
    """MLA: per-head query/key channels with RoPE (qk_rope_head_dim; DeepSeek-V3: 64)."""
    v_head_dim: Optional[int] = None
    """MLA: per-head value channels (DeepSeek-V3: 128)."""
    mtp_num_layers: Optional[int] = None
    """Multi-token prediction (DeepSeek-V3): this many extra layers after the decoder, the
    k-th predicting the token k+1 positions ahead; null: none. They sit on the last
    pipeline stage; their loss is added to the language-model loss."""
    mtp_loss_scaling_factor: float = 0.1
    """Weight of the MTP loss (averaged over the MTP layers) added to the training loss
    (DeepSeek-V3: 0.3 early, then 0.1)."""
    attention_backend: Optional[Literal["te", "sdpa", "local"]] = None
    """Core attention: ``te`` (Transformer Engine's layer spec and fused attention),
    ``sdpa`` (megatron-core's local spec with torch's scaled_dot_product_attention: flash /
    memory-efficient kernels, no s x s score matrix), ``local`` (megatron-core's local spec
    and its unfused softmax). null: te when Transformer Engine is usable, else sdpa on CUDA
    and local on CPU. Checkpoints load under any of them (docs/gpu.md)."""
    gradient_accumulation_fusion: Optional[bool] = None
    """Accumulate weight gradients into the fp32 main_grad inside the weight-gradient GEMM
    (apex's fused_weight_gradient_mlp_cuda, as megatron-core checks); null: on when that
    kernel imports on CUDA."""
    apply_rope_fusion: Optional[bool] = None
    """Transformer Engine's fused RoPE kernel; null: on when TE is usable."""
    bias_dropout_fusion: Optional[bool] = None
    """megatron-core's fused (jit-scripted) bias-dropout-add; null: on with CUDA."""
    bias_activation_fusion: Optional[bool] = None
    """megatron-core's fused bias-SwiGLU/GeLU; null: on with CUDA."""
    norm_epsilon: float = 1e-5
    vocab_size: Optional[int] = None
    """Tokenizer vocabulary; default: read from data.tokenizer. Padded for TP at build."""
    make_vocab_size_divisible_by: int = 128
    untie_embeddings: bool = True
    """Separate output layer (Llama-2 style); false shares the input embedding."""
    init_method_std: float = 0.02
    num_experts: Optional[int] = None
    """MoE experts per layer (mixtral); None for a dense model."""
    moe_router_topk: int = 2
    moe_aux_loss_coeff: float = 0.01
    moe_ffn_hidden_size: Optional[int] = None
    """Expert SwiGLU inner size; default: ffn_hidden_size."""
    moe_token_dispatcher: Literal["alltoall", "allgather", "flex"] = "alltoall"
    """Token dispatch: alltoall (EP default), allgather, or flex (DeepEP, CUDA only)."""
    moe_grouped_gemm: Optional[bool] = None
    """One grouped GEMM for all local experts (TE); None: on when TE is usable."""
    moe_router_load_balancing_type: Literal[
        "aux_loss", "seq_aux_loss", "global_aux_loss", "none"
    ] = "aux_loss"
    """Load-balancing loss: aux_loss (per microbatch, GShard/Switch), seq_aux_loss (per
    sequence, DeepSeek-V2/V3), global_aux_loss (over the global batch), or none (e.g.
    aux-loss-free balancing by expert bias alone; then moe_aux_loss_coeff must be 0)."""
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: softmax (Mixtral, Qwen-MoE) or sigmoid (DeepSeek-V3)."""
    moe_router_norm_topk_prob: bool = True
    """Renormalize the top-k routing weights to sum to 1 (Hugging Face's norm_topk_prob).
    softmax: true takes the softmax over the top-k logits, false the top-k of the softmax
    over all experts (needed for top-1); sigmoid is always renormalized (top-k > 1)."""
    moe_router_topk_scaling_factor: Optional[float] = None
    """Multiplies the routing weights (DeepSeek-V3's routed_scaling_factor, 2.5); null: 1."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing: a per-expert bias added to the scores for the top-k choice
    only, moved after every step towards equal load (sigmoid scoring only)."""
    moe_router_bias_update_rate: float = 1e-3
    """How far each step moves the expert bias (DeepSeek-V3: 1e-3)."""
    moe_router_num_groups: Optional[int] = None
    """Group-limited routing: experts fall into this many equal groups (e.g. one per node)."""
    moe_router_group_topk: Optional[int] = None
    """Group-limited routing: each token chooses its top-k experts within this many groups."""
    moe_z_loss_coeff: Optional[float] = None
    """Router z-loss coefficient (ST-MoE; 1e-3 is a common start); null: off."""
    moe_expert_capacity_factor: Optional[float] = None
    """Token dropping: each expert takes at most factor x tokens x top-k / experts tokens
    per microbatch; null: no capacity limit, no token is dropped."""
    moe_pad_expert_input_to_capacity: bool = False
    """With a capacity factor: pad every expert's input to its capacity (static shapes)."""
    moe_token_drop_policy: Literal["probs", "position"] = "probs"
    """With a capacity factor: drop the tokens of lowest routing weight (probs) or the
    latest in the sequence (position)."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Total inner size of the shared experts every token passes through (DeepSeek: one
    expert of moe_ffn_hidden_size); null: no shared expert."""
    moe_shared_expert_gate: bool = False
    """Scale the shared experts' output by a learned sigmoid gate per token (Qwen2-MoE)."""
    moe_layer_freq: int | list[int] = 1
    """Which layers are MoE: an int N (every N-th layer, from layer 0, is MoE; 1: all) or a
    list of 0/1 per layer (1: MoE, 0: dense SwiGLU of ffn_hidden_size)."""
    moe_first_k_dense_replace: Optional[int] = None
    """Shorthand for DeepSeek's first_k_dense_replace: the first k layers are dense, the rest
    MoE (sets moe_layer_freq to that list; leave moe_layer_freq at 1)."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            _require(getattr(self, name) > 0, f"model.{name} must be positive")
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 256 * -(-int(8 * self.hidden_size / 3) // 256)
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                f"model.hidden_size={self.hidden_size} is not divisible by "
                f"model.num_attention_heads={self.num_attention_heads}; change one, or set "
                "model.head_dim for heads of a size of their own",
            )
        else:
            _require(
                self.head_dim > 0 and self.head_dim % 2 == 0,
                f"model.head_dim={self.head_dim} must be a positive even number (RoPE rotates "
                "pairs of channels), or null for hidden_size / num_attention_heads",
            )
        if isinstance(self.rope_scaling, dict):  # built in code rather than by the loader
            self.rope_scaling = RopeScalingConfig(**self.rope_scaling)
        self._check_latent_attention()
        self._check_mtp()
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
            f"model.num_query_groups={self.num_query_groups}",
        )
        _require(
            self.seq_length <= self.max_position_embeddings,
            f"model.seq_length={self.seq_length} exceeds model.max_position_embeddings="
            f"{self.max_position_embeddings}; raise max_position_embeddings or shorten "
            "seq_length",
        )
        if self.num_experts is not None:
            _require(
                1 <= self.moe_router_topk <= self.num_experts,
                f"model.moe_router_topk={self.moe_router_topk} must be in "
                f"[1, model.num_experts={self.num_experts}]",
            )
            if self.moe_ffn_hidden_size is None:
                self.moe_ffn_hidden_size = self.ffn_hidden_size
        if self.num_experts is not None and self.num_experts >= 2:  # fewer: the family says
            self._check_router()
            self._check_capacity()
            self._resolve_moe_layers()
        elif self.num_experts is None:
            self._check_dense_has_no_moe_options()

    def _check_router(self) -> None:
        k, n = self.moe_router_topk, self.num_experts
        if self.moe_router_load_balancing_type == "none":
            _require(
                self.moe_aux_loss_coeff == 0,
                f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff} has no effect with "
                "model.moe_router_load_balancing_type=none; set moe_aux_loss_coeff=0 or choose "
                "aux_loss, seq_aux_loss or global_aux_loss",
            )
        _require(
            self.moe_aux_loss_coeff >= 0,
            f"model.moe_aux_loss_coeff={self.moe_aux_loss_coeff} must be >= 0",
        )
        if self.moe_router_score_function == "softmax":
            _require(
                not (k == 1 and self.moe_router_norm_topk_prob),
                "model.moe_router_topk=1 with model.moe_router_norm_topk_prob=true gives every "
                "token the weight 1 and the router no gradient; set "
                "moe_router_norm_topk_prob=false (softmax over all experts, then top-1)",
            )
        else:
            _require(
                self.moe_router_norm_topk_prob or k == 1,
                "model.moe_router_score_function=sigmoid always renormalizes the top-k "
                "weights (megatron-core); set model.moe_router_norm_topk_prob=true",
            )
        _require(
            not self.moe_router_enable_expert_bias or self.moe_router_score_function == "sigmoid",
            "model.moe_router_enable_expert_bias=true (aux-loss-free balancing) needs "
            "model.moe_router_score_function=sigmoid",
        )
        _require(
            self.moe_router_bias_update_rate >= 0,
            f"model.moe_router_bias_update_rate={self.moe_router_bias_update_rate} must be >= 0",
        )
        _require(
            self.moe_router_topk_scaling_factor is None or self.moe_router_topk_scaling_factor > 0,
            f"model.moe_router_topk_scaling_factor={self.moe_router_topk_scaling_factor} must "
            "be positive (DeepSeek-V3: 2.5), or null for no scaling",
        )
        _require(
            self.moe_z_loss_coeff is None or self.moe_z_loss_coeff > 0,
            f"model.moe_z_loss_coeff={self.moe_z_loss_coeff} must be positive, or null for no "
            "z-loss",
        )
        groups, group_k = self.moe_router_num_groups, self.moe_router_group_topk
        _require(
            (groups is None) == (group_k is None),
            "group-limited routing needs both model.moe_router_num_groups and "
            f"model.moe_router_group_topk (got {groups} and {group_k}); set both or neither",
        )
        if groups is not None:
            _require(
                groups >= 1 and n % groups == 0,
                f"model.moe_router_num_groups={groups} does not divide model.num_experts={n}; "
                "experts are split into equal groups",
            )
            _require(
                1 <= group_k <= groups,
                f"model.moe_router_group_topk={group_k} must be in [1, "
                f"model.moe_router_num_groups={groups}]",
            )
            _require(
                k % group_k == 0 and k // group_k <= n // groups,
                f"model.moe_router_topk={k} must be a multiple of model.moe_router_group_topk="
                f"{group_k} and pick at most the {n // groups} experts of each group",
            )

    def _check_capacity(self) -> None:
        factor = self.moe_expert_capacity_factor
        _require(
            factor is None or factor > 0,
            f"model.moe_expert_capacity_factor={factor} must be positive (1.0: an expert takes "
            "its even share of tokens), or null for no token dropping",
        )
        _require(
            not self.moe_pad_expert_input_to_capacity or factor is not None,
            "model.moe_pad_expert_input_to_capacity=true needs model.moe_expert_capacity_factor",
        )
        _require(
            self.moe_shared_expert_intermediate_size is None
            or self.moe_shared_expert_intermediate_size > 0,
            f"model.moe_shared_expert_intermediate_size={self.moe_shared_expert_intermediate_size}"
            " must be positive, or null for no shared expert",
        )
        _require(
            not self.moe_shared_expert_gate or self.moe_shared_expert_intermediate_size is not None,
            "model.moe_shared_expert_gate=true needs model.moe_shared_expert_intermediate_size",
        )

    def _resolve_moe_layers(self) -> None:
        n, freq, first_k = self.num_layers, self.moe_layer_freq, self.moe_first_k_dense_replace
        if first_k is not None:
            resolved = [0] * first_k + [1] * (n - first_k)
            _require(
                freq in (1, resolved),  # the resolved list: a stored config reloaded
                f"model.moe_first_k_dense_replace={first_k} and model.moe_layer_freq={freq} "
                "both choose the dense layers; set only one",
            )
            _require(
                0 <= first_k < n,
                f"model.moe_first_k_dense_replace={first_k} must be in [0, model.num_layers={n})"
                " (at least one MoE layer)",
            )
            self.moe_layer_freq = freq = resolved if first_k else 1
        if isinstance(freq, (list, tuple)):
            _require(
                len(freq) == n and all(v in (0, 1) for v in freq) and 1 in freq,
                f"model.moe_layer_freq={list(freq)} must list 0 (dense) or 1 (MoE) for each of "
                f"the model.num_layers={n} layers, with at least one 1",
            )
            self.moe_layer_freq = [int(v) for v in freq]
        else:
            _require(
                isinstance(freq, int) and not isinstance(freq, bool) and 1 <= freq <= n,
                f"model.moe_layer_freq={freq!r} must be an int in [1, model.num_layers={n}] "
                "(every N-th layer is MoE) or a list of 0/1 per layer",
            )

    def _check_dense_has_no_moe_options(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        changed = [
            name
            for name in MOE_ONLY_FIELDS
            if getattr(self, name) != defaults[name] and getattr(self, name) is not None
        ]
        _require(
            not changed,
            f"model.{changed[0] if changed else ''} is an MoE option but model.num_experts is "
            "not set; set model.num_experts or remove it",
        )

    def moe_layer_pattern(self) -> list[int]:
        """1 for each MoE layer, 0 for each dense one (all 0 for a dense model)."""
        if self.num_experts is None:
            return [0] * self.num_layers
        freq = self.moe_layer_freq
        if isinstance(freq, list):
            return list(freq)
        return [int(i % freq == 0) for i in range(self.num_layers)]

    def _check_latent_attention(self) -> None:
        mla_fields = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim")
        if not self.multi_latent_attention:
            stray = [name for name in (*mla_fields, "v_head_dim") if getattr(self, name)]
            _require(
                not stray,
                f"model.{stray[0] if stray else ''} is a Multi-Latent Attention field; set "
                "model.multi_latent_attention=true or remove it",
            )
            _require(
                self.rope_scaling is None or self.rope_scaling.type != "yarn",
                "model.rope_scaling.type=yarn is implemented for Multi-Latent Attention only "
                "(model.multi_latent_attention=true, family deepseek_v3); use type llama3 or "
                "null for standard attention",
            )
            return
        missing = [
            name
            for name in ("kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
            if getattr(self, name) is None
        ]
        _require(
            not missing,
            f"model.multi_latent_attention=true needs model.{', model.'.join(missing)} "
            "(DeepSeek-V3: kv_lora_rank 512, qk_head_dim 128, qk_pos_emb_head_dim 64, "
            "v_head_dim 128; q_lora_rank 1536 or null)",
        )
        for name in (*mla_fields, "v_head_dim"):
            value = getattr(self, name)
            _require(
                value is None or value > 0,
                f"model.{name}={value} must be positive"
                + (" (or null for no query compression)" if name == "q_lora_rank" else ""),
            )
        _require(
            self.qk_pos_emb_head_dim % 2 == 0,
            f"model.qk_pos_emb_head_dim={self.qk_pos_emb_head_dim} must be even (RoPE rotates "
            "pairs of channels)",
        )
        _require(
            self.num_query_groups == self.num_attention_heads and self.head_dim is None,
            "model.num_query_groups and model.head_dim do not apply to Multi-Latent Attention "
            "(every head has its own keys and values of qk_head_dim + qk_pos_emb_head_dim and "
            "v_head_dim channels); remove them",
        )
        _require(
            self.rope_scaling is None or self.rope_scaling.type == "yarn",
            f"model.rope_scaling.type={self.rope_scaling.type if self.rope_scaling else None} "
            "is not available with Multi-Latent Attention (megatron-core's MLA implements "
            "plain RoPE and YaRN); use type yarn or null",
        )

    def _check_mtp(self) -> None:
        if self.mtp_num_layers is None:
            return
        _require(
            self.mtp_num_layers >= 1,
            f"model.mtp_num_layers={self.mtp_num_layers} must be >= 1, or null for no "
            "multi-token prediction",
        )
        _require(
            self.mtp_loss_scaling_factor >= 0,
            f"model.mtp_loss_scaling_factor={self.mtp_loss_scaling_factor} must be >= 0 "
            "(DeepSeek-V3: 0.1)",
        )

    @property
    def attention_head_dim(self) -> int:
        """Channels per head: model.head_dim, or hidden_size / num_attention_heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    MACHINE_CHOICES = (
        "attention_backend",
        "gradient_accumulation_fusion",
        "apply_rope_fusion",
        "bias_dropout_fusion",
        "bias_activation_fusion",
    )
    """Fields that choose kernels, not the model: the same weights compute the same
    function under any of their values."""

    def for_this_machine(self) -> ModelConfig:
        """This model with its kernel choices (MACHINE_CHOICES) left automatic: how a
        checkpoint's stored model section is rebuilt elsewhere, e.g. on a CPU for
        conversion, when it was trained with Transformer Engine attention or fusions."""
        return dataclasses.replace(self, **dict.fromkeys(self.MACHINE_CHOICES))

    def resolved_attention_backend(self, te_available: bool, cuda_available: bool) -> str:
        """model.attention_backend, or the automatic choice when it is null."""
        if self.attention_backend is not None:
            return self.attention_backend
        if te_available:
            return "te"
        return "sdpa" if cuda_available else "local"


def _pipeline_layout_class() -> type:
    """megatron-core's PipelineParallelLayerLayout (imported on first use: it imports
    megatron-core, which warns where TE or apex is missing)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.transformer.pipeline_parallel_layer_layout import (
            PipelineParallelLayerLayout,
        )
    return PipelineParallelLayerLayout


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    """Model chunks per pipeline rank (interleaved 1F1B); None for plain 1F1B."""
    context: int = 1
    expert: int = 1
    expert_tensor: Optional[int] = None
    """Expert-tensor parallel size (ETP): how many ranks split each expert's matrices; null:
    parallel.tensor (megatron-core's default). ETP=1 with TP>1 keeps experts whole and
    spreads them over more expert-parallel x expert-data-parallel ranks."""
    layers_in_first_stage: Optional[int] = None
    """Uneven pipeline: layers of the first stage (e.g. fewer, it also holds the
    embedding); null: an even share. The other stages split the rest evenly."""
    layers_in_last_stage: Optional[int] = None
    """Uneven pipeline: layers of the last stage (e.g. fewer, it also holds the output
    layer and loss); null: an even share."""
    pipeline_layout: Optional[str] = None
    """Where every layer goes (megatron-core's ``pipeline_model_parallel_layout``), e.g.
    DeepSeek-V3's ``"Et|(tt|)*30mL"``: one group per pipeline stage, separated by ``|``,
    PP x virtual_pipeline groups in order (group ``i`` on pipeline rank ``i mod PP``); ``E``
    the embedding (first group), ``t`` a decoder layer, ``m`` a multi-token prediction layer
    (last group), ``L`` the loss (last group); ``(...)*N`` and ``t*N`` repeat. null:
    megatron-core's split (even, or layers_in_first_stage / layers_in_last_stage)."""
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True
    """ZeRO-1: shard optimizer state over data-parallel ranks."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce with the backward pass (bucketed)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the next forward."""
    grad_bucket_size_mb: Optional[float] = None
    """DDP bucket size for overlapped reduction; None: megatron-core's default."""
    tp_comm_overlap: bool = False
    """Overlap TP communication with GEMMs (Transformer Engine userbuffers; needs SP)."""
    cp_comm_type: Literal["p2p", "all_gather", "a2a", "a2a+p2p"] = "p2p"
    """Context-parallel attention communication (TE): ring p2p, all-gather, or all-to-all."""

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "context", "expert"):
            _require(getattr(self, name) >= 1, f"parallel.{name} must be >= 1")
        for name in ("expert_tensor", "layers_in_first_stage", "layers_in_last_stage"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"parallel.{name}={value} must be >= 1 or null")
        _require(
            self.pipeline > 1
            or (self.layers_in_first_stage is None and self.layers_in_last_stage is None),
            "parallel.layers_in_first_stage / layers_in_last_stage need parallel.pipeline > 1; "
            "remove them for a single stage",
        )
        if self.pipeline_layout is not None:
            _require(
                self.pipeline > 1,
                "parallel.pipeline_layout needs parallel.pipeline > 1; remove it for a single "
                "stage",
            )
            _require(
                self.layers_in_first_stage is None and self.layers_in_last_stage is None,
                "parallel.pipeline_layout places every layer itself: remove "
                "parallel.layers_in_first_stage / layers_in_last_stage",
            )
        if self.virtual_pipeline is not None:
            _require(
                self.virtual_pipeline >= 2 and self.pipeline >= 2,
                "parallel.virtual_pipeline needs parallel.pipeline >= 2 and >= 2 chunks; "
                "set virtual_pipeline: null to disable interleaving",
            )
        _require(
            not self.sequence_parallel or self.tensor > 1,
            "parallel.sequence_parallel=true requires parallel.tensor > 1; "
            "set sequence_parallel: false or raise tensor",
        )
        _require(
            not self.overlap_param_gather
            or (self.use_distributed_optimizer and self.overlap_grad_reduce),
            "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true "
            "and parallel.overlap_grad_reduce=true",
        )
        _require(
            not self.tp_comm_overlap or self.sequence_parallel,
            "parallel.tp_comm_overlap=true needs parallel.sequence_parallel=true (and TP > 1)",
        )

    @property
    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline * self.context

    @property
    def expert_tensor_size(self) -> int:
        """ETP in effect: parallel.expert_tensor, or parallel.tensor when null."""
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    @property
    def uneven_pipeline(self) -> bool:
        """Whether stages may hold different numbers of layers (first/last stage sizes, or a
        pipeline_layout)."""
        return (
            self.layers_in_first_stage is not None
            or self.layers_in_last_stage is not None
            or self.pipeline_layout is not None
        )

    def layout_groups(self) -> list[str]:
        """pipeline_layout as one string of layer letters per group (``E``, ``t``, ``m``,
        ``L``), in order, repetitions unrolled (megatron-core's parser); [] without it."""
        if self.pipeline_layout is None:
            return []
        letters = {"embedding": "E", "decoder": "t", "mtp": "m", "loss": "L"}
        try:
            groups = _pipeline_layout_class().parse_str_to_list(self.pipeline_layout)
        except (AssertionError, ValueError) as e:
            raise ConfigError(
                f"parallel.pipeline_layout={self.pipeline_layout!r} cannot be read: {e}; "
                'write one group per stage separated by "|" with the letters E, t, m, L '
                'and repetitions (...)*N or t*N, e.g. "Et|(tt|)*3tL"'
            ) from None
        return ["".join(letters[kind.name] for kind in group) for group in groups]

    def layers_per_stage(self, num_layers: int) -> list[int]:
        """Decoder layers of each pipeline stage (virtual chunks of a rank summed), as
        megatron-core splits them: as pipeline_layout places them, else first/last stage
        as set and the middle ones evenly."""
        if self.pipeline_layout is not None:
            stages = [0] * self.pipeline
            for index, group in enumerate(self.layout_groups()):
                stages[index % self.pipeline] += group.count("t")
            return stages
        first, last, pp = self.layers_in_first_stage, self.layers_in_last_stage, self.pipeline
        middle_stages = pp - (first is not None) - (last is not None)
        rest = num_layers - (first or 0) - (last or 0)
        even = rest // middle_stages if middle_stages else 0
        stages = [even] * pp
        if first is not None:
            stages[0] = first
        if last is not None:
            stages[-1] = last
        return stages


@dataclass
class DataConfig:
    """Where training data comes from: megatron indexed datasets (``format: indexed``, the
    default: ``blend`` + ``split``, or ``blend_per_split``) or WebDataset tar shards
    (``format: webdataset``: ``train_shards`` / ``valid_shards``)."""

    format: Literal["indexed", "webdataset", "mock"] = "indexed"
    """``indexed``: megatron .bin/.idx datasets from tools/preprocess_data.py, blended and
    split by megatron-core. ``webdataset``: tar shards of fixed-length token sequences from
    tools/make_webdataset.py, streamed (local paths or ``pipe:`` URLs); blend, split and
    blend_per_split are then not used. ``mock``: synthetic tokens (megatron-core's
    MockGPTDataset) for benchmarks and smoke tests; needs model.vocab_size, reads no files."""
    blend: list[Any] = field(default_factory=list)
    """Dataset prefixes (``PREFIX_text_document``), optionally weighted:
    ``[path]`` or ``[0.7, path_a, 0.3, path_b]`` (Megatron-LM's data_path format)."""
    split: str = "98,2,0"
    """Train/valid/test proportions of the blend."""
    blend_per_split: Optional[dict[str, list[Any]]] = None
    """Separate blends per split instead of ``blend`` + ``split`` (Megatron-LM's
    --train-data-path/--valid-data-path/--test-data-path): a mapping with ``train`` and
    optionally ``valid`` and ``test``, each in ``blend``'s format, e.g.
    ``{train: [0.7, a, 0.3, b], valid: [c]}``. ``test`` is checked but not read (training
    has no test loop)."""
    tokenizer: Optional[str] = None
    """SentencePiece .model, HF tokenizer.json, a directory holding one, or a name in
    tokenizers/."""
    cache_dir: Optional[str] = None
    """Where megatron-core writes its sample index cache; default: <logging.dir>/data_cache."""
    eod_mask_loss: bool = False
    """Exclude end-of-document tokens from the loss."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0: load in the training process). With
    webdataset each worker reads its own shards, so the order depends on this number too."""
    train_shards: list[str] = field(default_factory=list)
    """format=webdataset: the training shards. Each entry is a manifest written by
    tools/make_webdataset.py (``.../NAME.json``, which lists the shards and their sample
    counts: resume then skips whole shards without reading them) or shard URLs: a path, a
    glob, a brace pattern (``shards/web-{000000..000099}.tar``) or a ``pipe:`` command
    (``pipe:aws s3 cp s3://bucket/web-000000.tar -``)."""
    valid_shards: list[str] = field(default_factory=list)
    """format=webdataset: validation shards, as train_shards; empty: no validation."""
    shuffle_buffer: int = 1024
    """format=webdataset: samples shuffled together (a seeded permutation of each block of
    this many consecutive samples of a reader's stream; shard order is also reshuffled every
    epoch). A resume re-reads at most one block plus one shard per reader. 0 or 1: no
    shuffling within shards."""
    log_sample_ids: bool = False
    """Append the ids of the samples each rank trains on to
    ``<logging.dir>/sample_ids/train_rank<R>.txt``, one line per microbatch (indexed: the
    sample index; webdataset: the sample key). For auditing data order and resumes."""
    full_check: bool = False
    """format=indexed: before training, read every token of every .bin to find ids outside
    the vocabulary. Costs one read of the whole dataset per node (every rank reads it; ranks
    on a node share the page cache): minutes for hundreds of GB. Default false: each .bin is
    sampled (its first and last 4 MiB and 32 blocks of 256 KiB spread between, about 16 MiB
    per dataset), which catches a dataset made with another tokenizer. Either way the .idx
    is checked in full against its .bin (12 bytes per document)."""

    def __post_init__(self) -> None:
        parts = self.split.split(",")
        _require(
            len(parts) == 3 and all(p.strip().replace(".", "", 1).isdigit() for p in parts),
            f"data.split={self.split!r} must be three comma-separated numbers like '98,2,0'",
        )
        self._check_blend(self.blend, "data.blend")
        _require(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")
        _require(
            self.shuffle_buffer >= 0, f"data.shuffle_buffer={self.shuffle_buffer} must be >= 0"
        )
        if self.blend_per_split is not None:
            self._check_blend_per_split()
        for name in ("train_shards", "valid_shards"):
            shards = getattr(self, name)
            _require(
                all(isinstance(s, str) and s for s in shards),
                f"data.{name} must be a list of manifest paths or shard URLs (strings)",
            )
        if self.format == "webdataset":
            _require(
                bool(self.train_shards),
                "data.format=webdataset needs data.train_shards: shard URLs or the manifest "
                "(NAME.json) written by tools/make_webdataset.py",
            )

    @staticmethod
    def _check_blend(blend: Any, where: str) -> None:
        _require(isinstance(blend, list), f"{where} must be a list of prefixes")
        if blend and not isinstance(blend[0], str):
            _require(
                len(blend) % 2 == 0
                and all(isinstance(w, (int, float)) for w in blend[::2])
                and all(isinstance(p, str) for p in blend[1::2]),
                f"{where} must be [prefix, ...] or [weight, prefix, weight, prefix, ...]",
            )
            _require(
                all(w >= 0 for w in blend[::2]) and sum(blend[::2]) > 0,
                f"{where} weights must be >= 0 and not all 0",
            )
        else:
            _require(all(isinstance(p, str) for p in blend), f"{where} must list prefixes")

    def _check_blend_per_split(self) -> None:
        per_split = self.blend_per_split
        _require(
            isinstance(per_split, dict) and set(per_split) <= {"train", "valid", "test"},
            f"data.blend_per_split={per_split!r} must be a mapping with keys train, valid, "
            "test (e.g. {train: [0.7, a, 0.3, b], valid: [c]})",
        )
        _require(
            bool(per_split.get("train")), "data.blend_per_split needs a non-empty 'train' blend"
        )
        _require(
            not self.blend,
            "data.blend and data.blend_per_split are both set; use blend + split, or "
            "blend_per_split (set data.blend=[])",
        )
        for name, blend in per_split.items():
            self._check_blend(blend or [], f"data.blend_per_split.{name}")

    def prefixes_and_weights(self) -> tuple[list[str], Optional[list[float]]]:
        """The blend as megatron-core's (prefixes, weights) pair."""
        return self.split_blend(self.blend)

    @staticmethod
    def split_blend(blend: list[Any]) -> tuple[list[str], Optional[list[float]]]:
        """A blend in ``data.blend``'s format as megatron-core's (prefixes, weights) pair."""
        if not blend or isinstance(blend[0], str):
            return list(blend), None
        return list(blend[1::2]), [float(w) for w in blend[::2]]

    def all_prefixes(self) -> list[str]:
        """Every dataset prefix the config names (blend or blend_per_split)."""
        if self.blend_per_split is None:
            return self.prefixes_and_weights()[0]
        blends = [b or [] for b in self.blend_per_split.values()]
        return [p for blend in blends for p in self.split_blend(blend)[0]]


@dataclass
class TrainConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_iters: int = 100
    seed: int = 1234
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_iters: int = 10
    decay_style: Literal["cosine", "linear", "constant", "wsd", "inverse-square-root"] = "cosine"
    """After ``warmup_iters`` of linear warmup (megatron-core's OptimizerParamScheduler):
    ``cosine``/``linear`` decay to min_lr at ``decay_iters``; ``constant`` stays at lr;
    ``wsd`` (warmup-stable-decay) stays at lr, then decays to min_lr over the last
    ``wsd_decay_iters`` of ``decay_iters`` in the shape ``wsd_decay_style``;
    ``inverse-square-root`` is lr x sqrt(warmup / step), floored at min_lr. All are
    stepped in samples, as Megatron-LM does (this matters with ``rampup_batch_size``)."""
    decay_iters: Optional[int] = None
    """Iterations over which lr decays to min_lr; default: train_iters. For ``wsd`` the
    end of the decay phase: lengthen it (or train_iters) to extend the stable phase."""
    wsd_decay_iters: Optional[int] = None
    """``decay_style: wsd`` only: length of the decay phase, the last iterations before
    ``decay_iters``. Setting ``decay_iters`` to (resumed step + wsd_decay_iters) on a resume
    sends a run into its decay from that step."""
    wsd_decay_style: Literal["linear", "cosine", "1-sqrt", "exponential"] = "1-sqrt"
    """Shape of the WSD decay phase: ``1-sqrt`` is lr x (1 - sqrt(progress)) above min_lr."""
    rampup_batch_size: Optional[list[int]] = None
    """``[start, increment, samples]``, Megatron-LM's --rampup-batch-size: the global batch
    starts at ``start`` and grows by ``increment`` (every samples / number of increments
    samples consumed) up to ``global_batch_size``, reached after ``samples`` samples (through
    megatron-core's microbatch calculator). Every batch size on the way must be divisible
    by micro_batch_size x data-parallel size. Steps count iterations of any size; the lr
    schedule runs in samples, its warmup and decay ending where the iterations named by
    warmup_iters and decay_iters end."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    eval_interval: int = 0
    """Evaluate on the validation split every N steps (0: never)."""
    eval_iters: int = 2
    skip_train: bool = False
    """Only evaluate the loaded checkpoint on the validation split, then exit."""
    hang_timeout_s: Optional[float] = 1800.0
    """Exit with status 4 (and requeue) when a rank shows no progress for this long after
    its first step: no step ends, no training or evaluation microbatch is read, no
    checkpoint save starts or ends. So a long evaluation is fine, one save or one
    microbatch taking this long is not. Names the stalled ranks; null disables it."""
    nonfinite_policy: Literal["skip", "rollback"] = "skip"
    """A step whose loss or gradient norm is NaN/inf never updates the parameters (nor the
    lr schedule). After ``max_nonfinite_steps`` such steps in a row: ``skip`` stops the run
    with exit status 5; ``rollback`` reloads the newest checkpoint and continues with the
    data after the bad steps (the batches read since that checkpoint are skipped), at most
    ``max_rollbacks`` times, then stops with status 5."""
    max_nonfinite_steps: int = 3
    """Consecutive non-finite steps that stop (or, with rollback, roll back) the run."""
    max_rollbacks: int = 3
    """Rollbacks allowed in a run (the count is kept in checkpoints) before it stops."""
    resume_hparams: Optional[Literal["config", "checkpoint"]] = None
    """When a resumed run's lr, min_lr, warmup_iters, decay_iters (train_iters when
    unset), decay_style, wsd_decay_iters, wsd_decay_style, weight_decay, adam_beta1/2 or
    adam_eps differ from its checkpoint's: ``config`` follows the config from the resumed
    step on (Megatron-LM's --override-opt-param-scheduler), ``checkpoint`` keeps the
    checkpoint's values (--use-checkpoint-opt-param-scheduler). Unset: a difference is an
    error listing it, except that a WSD run may change its length (decay_iters or
    train_iters, wsd_decay_iters) where the lr at the resumed step stays the same: the
    stable phase extended, or the decay started there."""

    def __post_init__(self) -> None:
        for name in ("micro_batch_size", "global_batch_size"):
            _require(getattr(self, name) >= 1, f"train.{name} must be >= 1")
        _require(self.train_iters >= 0, "train.train_iters must be >= 0")
        # Written so that NaN fails too: every comparison with NaN is false.
        for name in ("lr", "min_lr", "weight_decay", "adam_eps", "clip_grad"):
            value = getattr(self, name)
            _require(
                0 <= value < float("inf"),
                f"train.{name}={value} must be a finite number >= 0 (default: "
                f"{TrainConfig.__dataclass_fields__[name].default})",
            )
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _require(
                0 <= value < 1,
                f"train.{name}={value} must be in [0, 1) (default: "
                f"{TrainConfig.__dataclass_fields__[name].default})",
            )
        _require(
            self.min_lr <= self.lr,
            f"train.min_lr={self.min_lr} is above train.lr={self.lr}; min_lr must be in "
            "[0, train.lr]",
        )
        _require(
            self.global_batch_size % self.micro_batch_size == 0,
            f"train.global_batch_size={self.global_batch_size} is not divisible by "
            f"train.micro_batch_size={self.micro_batch_size}",
        )
        self._check_schedule()
        self._check_rampup()
        if self.hang_timeout_s is not None:
            _require(
                0 < self.hang_timeout_s < float("inf"),
                f"train.hang_timeout_s={self.hang_timeout_s} must be a positive number of "
                "seconds; set it to null to disable the hang watchdog",
            )
        for name in ("max_nonfinite_steps", "max_rollbacks"):
            minimum = 1 if name == "max_nonfinite_steps" else 0
            _require(
                getattr(self, name) >= minimum,
                f"train.{name}={getattr(self, name)} must be >= {minimum} (default: "
                f"{TrainConfig.__dataclass_fields__[name].default})",
            )

    def _check_schedule(self) -> None:
        decay_iters = self.decay_iters if self.decay_iters is not None else self.train_iters
        where = "train.decay_iters" if self.decay_iters is not None else "train.train_iters"
        _require(
            self.warmup_iters >= 0 and (self.decay_iters is None or self.decay_iters >= 1),
            f"train.warmup_iters={self.warmup_iters} must be >= 0 and train.decay_iters="
            f"{self.decay_iters} >= 1 (or null: train.train_iters)",
        )
        if self.decay_style != "wsd":
            _require(
                self.wsd_decay_iters is None,
                f"train.wsd_decay_iters={self.wsd_decay_iters} is used only with "
                f"train.decay_style=wsd (this config has {self.decay_style}); remove it or "
                "set train.decay_style=wsd",
            )
        else:
            _require(
                self.wsd_decay_iters is not None and self.wsd_decay_iters >= 1,
                f"train.decay_style=wsd needs train.wsd_decay_iters >= 1 (the length of the "
                f"decay phase at the end of {where}={decay_iters}), got {self.wsd_decay_iters}",
            )
            stable = decay_iters - self.warmup_iters - self.wsd_decay_iters
            _require(
                stable >= 0,
                f"train.wsd_decay_iters={self.wsd_decay_iters} does not fit: warmup_iters="
                f"{self.warmup_iters} + wsd_decay_iters must be <= {where}={decay_iters}; "
                f"lower train.wsd_decay_iters to at most {decay_iters - self.warmup_iters} or "
                f"raise {where}",
            )
        if self.decay_style == "inverse-square-root":
            _require(
                self.warmup_iters >= 1,
                "train.decay_style=inverse-square-root scales lr by sqrt(warmup / step) "
                "after warmup; set train.warmup_iters >= 1",
            )

    def _check_rampup(self) -> None:
        ramp = self.rampup_batch_size
        if ramp is None:
            return
        form = "train.rampup_batch_size must be [start, increment, samples] (integers)"
        _require(
            isinstance(ramp, list)
            and len(ramp) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in ramp),
            f"{form}, got {ramp!r}",
        )
        start, increment, samples = ramp
        _require(
            start >= 1 and increment >= 1 and samples >= 0,
            f"{form} with start >= 1, increment >= 1 and samples >= 0, got {ramp}",
        )
        _require(
            start < self.global_batch_size and (self.global_batch_size - start) % increment == 0,
            f"train.rampup_batch_size={ramp}: the global batch must grow from start={start} "
            f"by increment={increment} to train.global_batch_size={self.global_batch_size}; "
            "global_batch_size - start must be a positive multiple of the increment (or "
            "remove train.rampup_batch_size for a fixed batch)",
        )

    def rampup_batch_sizes(self) -> list[int]:
        """Every global batch size a run goes through (just global_batch_size without a
        ramp-up)."""
        if self.rampup_batch_size is None:
            return [self.global_batch_size]
        start, increment, _ = self.rampup_batch_size
        return list(range(start, self.global_batch_size + 1, increment))


@dataclass
class PrecisionConfig:
    params_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    """FP8 through Transformer Engine (needs CUDA + TE); None for no FP8."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8"] = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    fp8_param_gather: bool = False
    """Keep parameters in FP8 and all-gather them in FP8 (distributed optimizer)."""
    first_last_layers_bf16: bool = False
    """Keep the first/last transformer layers out of FP8 (not with the delayed recipe)."""
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1

    def __post_init__(self) -> None:
        _require(
            not self.fp8_param_gather or self.fp8 is not None,
            "precision.fp8_param_gather=true needs precision.fp8 (hybrid or e4m3)",
        )
        _require(
            not self.first_last_layers_bf16 or self.fp8_recipe != "delayed",
            "precision.first_last_layers_bf16 is not supported with "
            "precision.fp8_recipe=delayed; use tensorwise or mxfp8",
        )
        if self.fp8 is not None:
            _require(
                self.params_dtype == "bf16",
                f"precision.fp8={self.fp8} needs precision.params_dtype=bf16",
            )


RECOMPUTE_MODULES = (
    "core_attn",
    "mlp",
    "moe",
    "moe_act",
    "layernorm",
    "shared_experts",
    "mla_up_proj",
)


@dataclass
class RecomputeConfig:
    """Activation recomputation, mapped onto megatron-core's recompute_* fields."""

    granularity: Optional[Literal["selective", "full"]] = None
    """selective: recompute the listed modules; full: whole layers; None: keep activations."""
    method: Optional[Literal["uniform", "block"]] = None
    """full only: uniform (every num_layers-layer unit) or block (first num_layers per stage)."""
    num_layers: Optional[int] = None
    modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """selective only: any of core_attn, mlp, moe, moe_act, layernorm, shared_experts."""

    def __post_init__(self) -> None:
        if self.granularity == "full":
            _require(
                self.method is not None and self.num_layers is not None and self.num_layers >= 1,
                "recompute.granularity=full needs recompute.method (uniform or block) and "
                "recompute.num_layers >= 1",
            )
        else:
            _require(
                self.method is None and self.num_layers is None,
                "recompute.method and recompute.num_layers apply only to granularity=full",
            )
        bad = sorted(set(self.modules) - set(RECOMPUTE_MODULES))
        _require(
            not bad,
            f"recompute.modules has unknown entries {bad}; choose from {list(RECOMPUTE_MODULES)}",
        )


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    """Directory for iter_NNNNNNN/ checkpoints; None disables saving."""
    load: Optional[str] = None
    """Directory to load from (its latest_checkpointed_iteration.txt); None starts fresh."""
    save_interval: int = 0
    """Save every N steps (0: only at the end and on preemption)."""
    save_interval_minutes: Optional[float] = None
    """Also save when this much wall-clock time passed since the last save."""
    async_save: bool = True
    """Write in a background process; the step blocks only while the state is staged."""
    load_mode: Literal["full", "no_optim", "finetune"] = "full"
    """What is taken from checkpoint.load. ``full``: everything (a resume). ``no_optim``
    (Megatron-LM's --no-load-optim): the weights, the iteration, the consumed samples, the
    RNG and callback states; the optimizer and the learning-rate schedule start fresh (Adam
    moments at zero, the schedule from its warmup at the resumed iteration, as in
    Megatron-LM, whose scheduler state is not loaded either); e.g. after a layout change
    the optimizer's format cannot follow. ``finetune`` (Megatron-LM's --finetune): the
    weights only; a new run from step 0 (e.g. from a converted Hugging Face model)."""
    load_optimizer: bool = True
    """False: the older spelling of load_mode=finetune (weights only, a new run at step 0)."""
    load_rng: bool = True
    """Restore RNG states (skipped with a warning when the TP/PP/CP/DP layout changed)."""
    keep_last: Optional[int] = None
    """Keep only the newest N checkpoints (None: keep all)..."""
    keep_every: Optional[int] = None
    """...plus every checkpoint whose iteration is a multiple of this. Retention removes
    only complete checkpoints this run wrote, never the newest one, and never files in an
    iter_ directory that are not part of the checkpoint."""
    load_iteration: Optional[int] = None
    """Iteration of checkpoint.load to load (null: the one its tracker names). Use it when
    the tracker is lost or names a missing iteration, as convert's --iteration."""
    overwrite: bool = False
    """Let a run that does not resume from checkpoint.save write there although the
    directory belongs to another run (its forge_owner.json) or holds a tracker or complete
    checkpoints this run did not write. This run then owns the directory: the previous
    tracker is removed (its value is kept in forge_owner.json), the previous checkpoints
    are kept, never resumed and never removed by retention, except one at an iteration
    this run saves itself, which that save replaces. Ignored by a run that resumes from
    checkpoint.save (checkpoint.load pointing at the same directory)."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """How the distributed optimizer's state is written (Megatron-LM's names and default).
    dp_reshardable: each rank writes its own buckets, no gather (fastest, least memory);
    loads under the same tensor, pipeline and expert parallel sizes (and virtual pipeline
    chunks), data parallel may change. fully_reshardable: gathered per parameter across
    data-parallel ranks; loads under any layout. Loading reads the format a checkpoint was
    written in, whatever this says."""
    fully_parallel_save: bool = True
    """Data-parallel (+context) ranks split the writing of what they hold in common, so no
    rank writes a whole replica (Megatron-LM's --ckpt-fully-parallel-save)."""
    fully_parallel_load: bool = True
    """Data-parallel (+context) ranks split the reading and exchange the tensors
    (Megatron-LM's --ckpt-fully-parallel-load)."""
    persistent_writer: bool = False
    """Async saves: one background writer process per rank for the whole run (megatron-core's
    persistent caller) instead of a fork per save."""

    def __post_init__(self) -> None:
        _require(self.save_interval >= 0, "checkpoint.save_interval must be >= 0")
        _require(
            self.load_optimizer or self.load_mode != "no_optim",
            "checkpoint.load_optimizer=false (the older spelling of load_mode=finetune: a new "
            "run at step 0) contradicts checkpoint.load_mode=no_optim (keep the iteration, "
            "fresh optimizer); remove checkpoint.load_optimizer",
        )
        # one mode from here on, under either spelling (code that reads the older field
        # sees the same)
        if not self.load_optimizer:
            self.load_mode = "finetune"
        self.load_optimizer = self.load_mode != "finetune"
        _require(
            self.load_iteration is None or self.load_iteration >= 0,
            f"checkpoint.load_iteration={self.load_iteration} must be >= 0 (or null to load "
            "the iteration the tracker names)",
        )
        _require(
            self.load_iteration is None or self.load is not None,
            f"checkpoint.load_iteration={self.load_iteration} needs checkpoint.load: set it to "
            "the directory holding that iter_ directory",
        )
        _require(
            self.keep_last is None or self.keep_last >= 1,
            "checkpoint.keep_last must be >= 1 (or null to keep every checkpoint)",
        )
        _require(
            self.keep_every is None or self.keep_every >= 1, "checkpoint.keep_every must be >= 1"
        )


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    """Run directory: metrics.jsonl, resolved config, caches, wandb/ and tensorboard/."""
    log_interval: int = 1
    """Log metrics (console, metrics.jsonl, W&B, TensorBoard) every N steps and at the last."""
    wandb_project: Optional[str] = None
    """W&B project; W&B logs only when this is set (and wandb_mode is not disabled)."""
    wandb_entity: Optional[str] = None
    """W&B user or team; default: the API key's default entity."""
    wandb_run_name: Optional[str] = None
    """Display name of the W&B run; default: the last component of logging.dir."""
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    """online falls back to offline (said once in the log) when no API key is configured
    (WANDB_API_KEY or a netrc entry); offline runs land in <dir>/wandb/, upload them later
    with ``wandb sync``."""
    wandb_tags: list[str] = field(default_factory=list)
    """Tags of the W&B run (e.g. [llama, 7b, ablation])."""
    wandb_group: Optional[str] = None
    """W&B group, to show related runs (a sweep, the jobs of an ablation) together."""
    tensorboard: bool = False
    """Also write TensorBoard event files to <dir>/tensorboard/."""
    peak_tflops: Optional[float] = None
    """Peak dense TFLOP/s of one GPU, the denominator of MFU; default: looked up from the
    GPU's name (BF16, or FP8 when precision.fp8 is set). Set it for GPUs not in
    megatron_forge/monitoring/flops.py."""
    wandb_alerts: bool = True
    """Send W&B alerts (``wandb.alert``: e-mail/Slack per the W&B user settings) for loss
    and grad-norm spikes, persistent stragglers, stops on NaN/inf, hangs and preemptions."""
    mlflow_experiment: Optional[str] = None
    """MLflow experiment; MLflow logs (the same metrics and config as W&B) only when set.
    Needs the ``mlflow`` extra (``pip install -e '.[mlflow]'``)."""
    mlflow_tracking_uri: Optional[str] = None
    """MLflow tracking server or store; default: $MLFLOW_TRACKING_URI, else a local file
    store in <dir>/mlruns (no server; view it with ``mlflow ui --backend-store-uri``)."""
    mlflow_run_name: Optional[str] = None
    """Display name of the MLflow run; default: the last component of logging.dir."""
    straggler_window: int = 5
    """Per-rank step, data-wait and compute times are gathered every log interval; a rank
    that is the slowest in this many log intervals in a row (by more than
    straggler_threshold) gets a warning naming it and its host. 0: no gather."""
    straggler_threshold: float = 0.2
    """How much slower than the median rank (0.2: 20%) the slowest rank's busy time (data
    wait + compute) must be to count towards a straggler warning."""
    spike_window: int = 50
    """Steps of loss and grad-norm history the spike detector compares each step with
    (a running mean and standard deviation); 0 disables spike detection."""
    spike_zscore: float = 4.0
    """A loss or grad norm this many standard deviations above the window's mean is a
    spike: flagged in metrics.jsonl, the console and (as an alert) W&B."""

    def __post_init__(self) -> None:
        _require(self.log_interval >= 1, "logging.log_interval must be >= 1")
        for name in ("straggler_window", "spike_window"):
            _require(
                getattr(self, name) >= 0,
                f"logging.{name}={getattr(self, name)} must be >= 0 (0 disables it)",
            )
        _require(
            self.spike_window == 0 or self.spike_window >= 5,
            f"logging.spike_window={self.spike_window} is too short for a mean and standard "
            "deviation; use >= 5 steps (default 50), or 0 to disable spike detection",
        )
        _require(
            0 < self.spike_zscore < float("inf"),
            f"logging.spike_zscore={self.spike_zscore} must be a positive number of standard "
            "deviations (default 4.0)",
        )
        _require(
            0 <= self.straggler_threshold < float("inf"),
            f"logging.straggler_threshold={self.straggler_threshold} must be a fraction >= 0 "
            "(0.2: 20% slower than the median rank)",
        )
        _require(
            all(isinstance(t, str) and t for t in self.wandb_tags),
            f"logging.wandb_tags={self.wandb_tags!r} must be a list of non-empty strings; "
            "quote tags that YAML reads as numbers",
        )
        _require(
            all(len(t) <= 64 for t in self.wandb_tags),
            "logging.wandb_tags: W&B tags are at most 64 characters; shorten "
            + ", ".join(repr(t) for t in self.wandb_tags if len(t) > 64),
        )
        _require(
            self.peak_tflops is None or self.peak_tflops > 0,
            f"logging.peak_tflops={self.peak_tflops} must be positive (a GPU's dense TFLOP/s, "
            "e.g. 989 for an H100 SXM in BF16), or null to look it up from the GPU name",
        )


@dataclass
class ProfileConfig:
    """torch.profiler windows (Chrome/Perfetto JSON traces per rank), NVTX ranges and
    cudaProfilerStart/Stop for ``nsys --capture-range=cudaProfilerApi``. A running job is
    profiled without a restart by ``touch <logging.dir>/profile`` (optionally holding a
    number of steps); traces go to <logging.dir>/profiles/."""

    start_step: Optional[int] = None
    """First step of the profiling window (as numbered on the console); null: none."""
    end_step: Optional[int] = None
    """Last step of the window (inclusive); default: start_step."""
    ranks: Optional[list[int]] = field(default_factory=lambda: [0])
    """Global ranks that profile; null: every rank."""
    record_shapes: bool = False
    """Record the input shapes of each operator."""
    with_stack: bool = False
    """Record the Python stack of each operator (larger traces)."""
    profile_memory: bool = False
    """Record tensor allocations and frees in the trace."""
    memory_snapshot: bool = False
    """CUDA only: record the caching allocator's history over the window and write
    memory_snapshot_*.pickle next to the trace (drop it on pytorch.org/memory_viz)."""
    trigger_steps: int = 2
    """Steps profiled when the trigger file is touched without a number in it."""
    trigger_check_interval: int = 1
    """Look for the trigger file every N steps (rank 0 stats it; one all-reduce of one
    number tells the others); 0: no trigger file."""
    torch_profiler: bool = True
    """Record torch.profiler traces in the window; false leaves the window to Nsight
    Systems alone (NVTX ranges and cudaProfilerStart/Stop), whose CUDA tracing can clash
    with torch.profiler's."""

    def __post_init__(self) -> None:
        if self.start_step is not None:
            _require(self.start_step >= 1, f"profile.start_step={self.start_step} must be >= 1")
        if self.end_step is not None:
            _require(
                self.start_step is not None,
                f"profile.end_step={self.end_step} needs profile.start_step; set both",
            )
            _require(
                self.end_step >= self.start_step,
                f"profile.end_step={self.end_step} is before profile.start_step="
                f"{self.start_step}; the window is start_step..end_step, inclusive",
            )
        _require(
            self.ranks is None
            or (
                isinstance(self.ranks, list)
                and all(
                    isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in self.ranks
                )
            ),
            f"profile.ranks={self.ranks!r} must be a list of global ranks (e.g. [0, 8]) or "
            "null for every rank",
        )
        _require(
            self.trigger_steps >= 1, f"profile.trigger_steps={self.trigger_steps} must be >= 1"
        )
        _require(
            self.trigger_check_interval >= 0,
            f"profile.trigger_check_interval={self.trigger_check_interval} must be >= 0 (0: "
            "no trigger file)",
        )


@dataclass
class LaunchConfig:
    """How launch/submit.py asks Slurm for resources. The training processes read only
    ``max_requeues`` (preemption and the hang watchdog requeue the job at most that often)."""

    nodes: int = 1
    gpus_per_node: int = 8
    """Tasks (one per GPU, or per CPU rank with --local) on each node."""
    cpus_per_task: int = 8
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"
    """Slurm time limit, HH:MM:SS or D-HH:MM:SS."""
    job_name: str = "forge"
    constraint: Optional[str] = None
    container_image: Optional[str] = None
    """pyxis/enroot image; None runs in the submitting environment."""
    signal_delay_s: int = 120
    """Slurm sends USR2 this many seconds before the time limit: save and requeue."""
    max_requeues: int = 10

    def __post_init__(self) -> None:
        _require(
            re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", self.time) is not None,
            f"launch.time={self.time!r} is not a Slurm time limit; use MM, HH:MM:SS or D-HH:MM:SS",
        )
        _require(self.nodes >= 1, "launch.nodes must be >= 1")
        _require(self.gpus_per_node >= 1, "launch.gpus_per_node must be >= 1")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _token_ids(value: Any) -> list[Any]:
    """The ids of a token id field (one id, or a list of them for eos_token_id)."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


@dataclass
class ExportConfig:
    """Generation metadata that ``forge-convert to-hf`` writes into config.json and
    generation_config.json. ``forge-convert from-hf`` fills it from the source directory,
    and every checkpoint stores it with the rest of the config, so it survives training
    (instruct models stop on several ids: ``eos_token_id: [128001, 128008, 128009]``).
    An unset id is taken from the tokenizer the export ships."""

    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int | list[int]] = None
    """One id, or the list of ids generation stops on."""
    pad_token_id: Optional[int] = None
    generation: Optional[dict[str, Any]] = None
    """generation_config.json as written (do_sample, temperature, top_p, its own token
    ids...); unset: one with the token ids above."""
    converted_from: Optional[str] = None
    """The Hugging Face directory from-hf read (informational)."""

    def __post_init__(self) -> None:
        for name in TOKEN_ID_FIELDS:
            self._check_ids(f"export.{name}", getattr(self, name))
        if self.generation is None:
            return
        _require(
            isinstance(self.generation, dict) and all(isinstance(k, str) for k in self.generation),
            f"export.generation={self.generation!r} must be a mapping of generation_config.json "
            "fields (e.g. {do_sample: true, temperature: 0.6, top_p: 0.9}), or null",
        )
        for name in TOKEN_ID_FIELDS:
            self._check_ids(f"export.generation.{name}", self.generation.get(name))

    @staticmethod
    def _check_ids(where: str, value: Any) -> None:
        ids = _token_ids(value)
        _require(
            not isinstance(value, list) or (bool(value) and "eos" in where),
            f"{where}={value!r}: only eos_token_id may be a list, and not an empty one",
        )
        _require(
            all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids),
            f"{where}={value!r} must be a token id (an integer >= 0)"
            + (" or a list of them" if "eos" in where else "")
            + ", or null",
        )

    def check_vocabulary(self, vocab_size: int, where: str = "model.vocab_size") -> None:
        """ConfigError naming the field when a token id is outside [0, vocab_size)."""
        fields = {f"export.{name}": getattr(self, name) for name in TOKEN_ID_FIELDS}
        for name in TOKEN_ID_FIELDS:
            fields[f"export.generation.{name}"] = (self.generation or {}).get(name)
        for field_name, value in fields.items():
            outside = [i for i in _token_ids(value) if i >= vocab_size]
            _require(
                not outside,
                f"{field_name}={value!r} has {outside} outside the vocabulary ({where}="
                f"{vocab_size}, ids 0..{vocab_size - 1}); set it to the model's own ids",
            )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def data_parallel_size(self, world_size: int) -> int:
        """Data-parallel degree implied by the world size (after validate())."""
        return world_size // self.parallel.model_parallel_size

    def describe_layout(self, world_size: int) -> str:
        """One line: the parallel degrees and microbatches of this config on a world."""
        p = self.parallel
        etp = f"ETP={p.expert_tensor} " if p.expert_tensor is not None else ""
        stages = (
            f"stages={'+'.join(map(str, p.layers_per_stage(self.model.num_layers)))} "
            if p.uneven_pipeline
            else ""
        )
        return (
            f"TP={p.tensor} PP={p.pipeline} CP={p.context} EP={p.expert} {etp}"
            f"DP={self.data_parallel_size(world_size)} {stages}"
            f"microbatches={self.num_microbatches(world_size)}"
        )

    def num_microbatches(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def _check_uneven_pipeline(self) -> None:
        m, p = self.model, self.parallel
        first, last, vp = p.layers_in_first_stage, p.layers_in_last_stage, p.virtual_pipeline
        for name, value in (("layers_in_first_stage", first), ("layers_in_last_stage", last)):
            _require(
                value is None or not vp or value % vp == 0,
                f"parallel.{name}={value} is not divisible by parallel.virtual_pipeline={vp} "
                "(each virtual chunk of the stage gets the same number of layers)",
            )
        middle = p.pipeline - (first is not None) - (last is not None)
        rest = m.num_layers - (first or 0) - (last or 0)
        where = (
            f"model.num_layers={m.num_layers} with parallel.layers_in_first_stage={first} and "
            f"layers_in_last_stage={last} leaves {rest} layers for the {middle} middle "
            f"stage(s) of parallel.pipeline={p.pipeline}"
        )
        _require(rest >= 0 and bool(rest) == bool(middle), f"{where}; every stage needs layers")
        if middle:
            _require(
                rest % (middle * (vp or 1)) == 0,
                f"{where}, not divisible by {middle}"
                + (f" x virtual_pipeline={vp}" if vp else "")
                + "; change the first/last stage sizes",
            )
        if self.recompute.granularity == "full" and self.recompute.method == "block":
            fewest = min(p.layers_per_stage(m.num_layers)) // (vp or 1)
            _require(
                self.recompute.num_layers <= fewest,
                f"recompute.num_layers={self.recompute.num_layers} exceeds the {fewest} layers "
                "of the smallest pipeline stage (recompute.method=block)",
            )

    def _check_pipeline_layout(self) -> None:
        """parallel.pipeline_layout against the pipeline, the layers and the MTP layers, by
        megatron-core's own rules, with messages that name the fields."""
        m, p = self.model, self.parallel
        groups, where = p.layout_groups(), f"parallel.pipeline_layout={p.pipeline_layout!r}"
        vp = len(groups) // p.pipeline
        _require(
            len(groups) % p.pipeline == 0 and vp == (p.virtual_pipeline or 1),
            f"{where} has {len(groups)} stage groups, but parallel.pipeline={p.pipeline} x "
            f"virtual_pipeline={p.virtual_pipeline} needs {p.pipeline * (p.virtual_pipeline or 1)}"
            + (
                f"; set parallel.virtual_pipeline={vp}"
                if len(groups) % p.pipeline == 0 and vp > 1
                else ""
            ),
        )
        flat = "".join(groups)
        _require(
            flat.count("t") == m.num_layers,
            f"{where} places {flat.count('t')} decoder layers (t), model.num_layers is "
            f"{m.num_layers}",
        )
        mtp = m.mtp_num_layers or 0
        _require(
            flat.count("m") == mtp,
            f"{where} places {flat.count('m')} MTP layers (m), model.mtp_num_layers is "
            f"{m.mtp_num_layers}",
        )
        _require(
            flat.startswith("E") and flat.count("E") == 1,
            f'{where}: the embedding (E) must open the first group, once (e.g. "Et|...")',
        )
        _require(
            flat.endswith("L") and flat.count("L") == 1,
            f'{where}: the loss (L) must close the last group, once (e.g. "...|ttL")',
        )
        _require(
            "m" not in "".join(groups[:-1]),
            f"{where}: the MTP layers (m) must be in the last group, with the loss (e.g. "
            '"...|tmL")',
        )
        layout = _pipeline_layout_class()(p.pipeline_layout, p.pipeline)
        try:  # megatron-core's own checks, should it have more than the above
            layout.validate_layer_layout(m.num_layers, m.mtp_num_layers)
        except (AssertionError, NotImplementedError) as e:
            raise ConfigError(f"{where}: {e}") from None
        if self.recompute.granularity == "full" and self.recompute.method == "block":
            fewest = min(group.count("t") for group in groups)
            _require(
                self.recompute.num_layers <= fewest,
                f"recompute.num_layers={self.recompute.num_layers} exceeds the {fewest} "
                f"decoder layers of the smallest group of {where} (recompute.method=block)",
            )

    def _check_expert_tensor(self, world_size: int) -> None:
        m, p = self.model, self.parallel
        if p.expert_tensor is None:
            return
        etp = p.expert_tensor
        _require(
            m.num_experts is not None,
            f"parallel.expert_tensor={etp} needs an MoE model (model.num_experts); remove it",
        )
        size = etp * p.expert * p.pipeline
        _require(
            world_size % size == 0,
            f"world size {world_size} is not divisible by parallel.expert_tensor x expert x "
            f"pipeline = {etp} x {p.expert} x {p.pipeline} = {size}; the expert layers need "
            "ETP x EP x PP x expert-data-parallel ranks",
        )
        _require(
            m.moe_ffn_hidden_size % etp == 0,
            f"model.moe_ffn_hidden_size={m.moe_ffn_hidden_size} is not divisible by "
            f"parallel.expert_tensor={etp}",
        )

    def validate(self, world_size: int, *, cuda_available: bool, te_available: bool) -> None:
        """Check rules that involve the world size or several sections; raise ConfigError."""
        m, p, t = self.model, self.parallel, self.train
        mp = p.model_parallel_size
        _require(
            world_size % mp == 0,
            f"world size {world_size} is not divisible by parallel.tensor x pipeline x "
            f"context = {p.tensor} x {p.pipeline} x {p.context} = {mp}; world size must be "
            "TP x PP x CP x DP",
        )
        dp = world_size // mp
        _require(
            m.num_attention_heads % p.tensor == 0,
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"parallel.tensor={p.tensor}",
        )
        _require(
            m.num_query_groups % p.tensor == 0,
            f"model.num_query_groups={m.num_query_groups} is not divisible by "
            f"parallel.tensor={p.tensor}",
        )
        if m.multi_latent_attention:
            # megatron-core's MLA splits the down projections' outputs over TP ranks.
            for name, rows in (
                ("q_lora_rank", m.q_lora_rank),
                (
                    "kv_lora_rank + model.qk_pos_emb_head_dim",
                    m.kv_lora_rank + m.qk_pos_emb_head_dim,
                ),
            ):
                _require(
                    rows is None or rows % p.tensor == 0,
                    f"model.{name} = {rows} is not divisible by parallel.tensor={p.tensor} "
                    "(Multi-Latent Attention splits the latent projections over TP ranks)",
                )
        stages = p.pipeline * (p.virtual_pipeline or 1)
        if p.pipeline_layout is not None:
            self._check_pipeline_layout()
        elif p.uneven_pipeline:
            self._check_uneven_pipeline()
        else:
            _require(
                m.num_layers % stages == 0,
                f"model.num_layers={m.num_layers} is not divisible by parallel.pipeline"
                + (f" x virtual_pipeline = {stages}" if p.virtual_pipeline else f"={p.pipeline}")
                + (
                    "; or set parallel.layers_in_first_stage / layers_in_last_stage"
                    if p.pipeline > 1
                    else ""
                ),
            )
        self._check_expert_tensor(world_size)
        if p.virtual_pipeline:
            num_mb = t.global_batch_size // (t.micro_batch_size * dp) if dp else 0
            _require(
                num_mb % p.pipeline == 0,
                f"interleaved pipelining needs the number of microbatches ({num_mb}) to be a "
                f"multiple of parallel.pipeline={p.pipeline}; adjust train.global_batch_size",
            )
        if p.expert > 1:
            _require(
                m.num_experts is not None,
                f"parallel.expert={p.expert} needs an MoE model (model.num_experts)",
            )
            _require(  # with its own ETP, _check_expert_tensor checks the expert layout
                p.expert_tensor is not None or (dp * p.context) % p.expert == 0,
                f"parallel.expert={p.expert} must divide data-parallel x context size "
                f"= {dp} x {p.context}; experts are spread over those ranks",
            )
        if m.num_experts is not None:
            _require(
                m.num_experts % p.expert == 0,
                f"model.num_experts={m.num_experts} is not divisible by parallel.expert={p.expert}",
            )
        _require(
            t.global_batch_size % (t.micro_batch_size * dp) == 0,
            f"train.global_batch_size={t.global_batch_size} is not divisible by "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}",
        )
        for size in t.rampup_batch_sizes()[:-1]:
            _require(
                size % (t.micro_batch_size * dp) == 0,
                f"train.rampup_batch_size={t.rampup_batch_size} passes through a global batch "
                f"of {size}, which is not divisible by train.micro_batch_size x "
                f"data-parallel size = {t.micro_batch_size} x {dp}; choose start and "
                f"increment as multiples of {t.micro_batch_size * dp}",
            )
            _require(
                not p.virtual_pipeline or (size // (t.micro_batch_size * dp)) % p.pipeline == 0,
                f"train.rampup_batch_size={t.rampup_batch_size} passes through a global batch "
                f"of {size}: {size // (t.micro_batch_size * dp)} microbatches, not a multiple "
                f"of parallel.pipeline={p.pipeline} as interleaved pipelining needs",
            )
        _require(
            t.rampup_batch_size is None or self.data.format != "webdataset",
            "train.rampup_batch_size needs data.format indexed or mock: WebDataset shards are "
            "streamed in batches of a fixed size; remove train.rampup_batch_size",
        )
        if p.context > 1:
            _require(
                m.seq_length % (2 * p.context) == 0,
                f"model.seq_length={m.seq_length} must be divisible by 2 x parallel.context"
                f" = {2 * p.context} (load-balanced context parallel)",
            )
        self._check_attention_backend(cuda_available, te_available)
        if m.num_experts is not None and p.tensor > 1:
            # megatron-core's MoELayer raises at the first training step otherwise.
            _require(
                p.sequence_parallel,
                f"parallel.tensor={p.tensor} with an MoE model needs "
                "parallel.sequence_parallel=true (megatron-core trains MoE layers under TP "
                "only with sequence parallelism); set it, or parallel.tensor=1 and spread the "
                "experts with parallel.expert",
            )
        if p.sequence_parallel:
            # megatron-core's local spec norms (torch LayerNorm/RMSNorm) reject SP.
            _require(
                te_available,
                "parallel.sequence_parallel=true needs Transformer Engine's layer spec "
                "(megatron-core's local norms do not support it); install the [gpu] extra "
                "on a CUDA machine or set sequence_parallel: false",
            )
        if p.context > 1:
            # megatron-core's local DotProductAttention asserts context_parallel_size == 1.
            _require(
                te_available,
                f"parallel.context={p.context} needs Transformer Engine's attention; install "
                "the [gpu] extra on a CUDA machine or set parallel.context: 1",
            )
        _require(
            t.nonfinite_policy != "rollback" or bool(self.checkpoint.save),
            "train.nonfinite_policy=rollback reloads the newest checkpoint, but "
            "checkpoint.save is unset; set checkpoint.save (and save_interval) or "
            "train.nonfinite_policy=skip",
        )
        if t.skip_train:
            _require(
                t.eval_interval > 0 and t.eval_iters > 0,
                "train.skip_train=true evaluates the validation split only; set "
                "train.eval_interval > 0 and train.eval_iters > 0",
            )
            d = self.data
            if d.format == "webdataset":
                has_valid, where = bool(d.valid_shards), "data.valid_shards is empty"
            elif d.blend_per_split is not None:
                has_valid = bool(d.blend_per_split.get("valid"))
                where = "data.blend_per_split has no 'valid' blend"
            else:
                has_valid = float(d.split.split(",")[1]) > 0
                where = f"data.split={d.split!r} gives it no share"
            _require(has_valid, f"train.skip_train=true needs a validation split, but {where}")
        r = self.recompute
        if r.granularity == "full" and r.method == "block" and not p.uneven_pipeline:
            per_stage = m.num_layers // stages
            _require(
                r.num_layers <= per_stage,
                f"recompute.num_layers={r.num_layers} exceeds the {per_stage} layers per "
                "pipeline stage (recompute.method=block)",
            )
        _require(
            r.granularity != "selective"
            or "mla_up_proj" not in r.modules
            or m.multi_latent_attention,
            "recompute.modules=[mla_up_proj] recomputes Multi-Latent Attention's up "
            "projections: it needs model.multi_latent_attention=true; remove it",
        )
        if r.granularity == "selective" and "moe_act" in r.modules:
            _require(
                te_available and m.moe_grouped_gemm is not False,
                "recompute.modules=[moe_act] needs grouped GEMM experts (Transformer Engine)",
            )
        if p.tp_comm_overlap:
            _require(
                te_available,
                "parallel.tp_comm_overlap=true needs Transformer Engine on CUDA; set it false",
            )
        if m.moe_token_dispatcher == "flex":
            _require(
                cuda_available and te_available,
                "model.moe_token_dispatcher=flex needs CUDA, Transformer Engine and DeepEP; "
                "use alltoall",
            )
        if m.moe_grouped_gemm:
            _require(
                te_available,
                "model.moe_grouped_gemm=true needs Transformer Engine on CUDA; set it null",
            )
        if self.precision.fp8_param_gather:
            _require(
                p.use_distributed_optimizer,
                "precision.fp8_param_gather=true needs parallel.use_distributed_optimizer=true",
            )
        if self.precision.fp8 is not None:
            _require(
                cuda_available and te_available,
                f"precision.fp8={self.precision.fp8} needs CUDA and Transformer Engine "
                f"(CUDA available: {cuda_available}, Transformer Engine importable: "
                f"{te_available}); set precision.fp8: null or install the [gpu] extra",
            )
        if m.vocab_size is not None:
            self.export.check_vocabulary(m.vocab_size)
        pr = self.profile
        outside = [r for r in pr.ranks or [] if r >= world_size]
        _require(
            not outside,
            f"profile.ranks={pr.ranks} names ranks {outside} outside the world of {world_size} "
            f"ranks (0..{world_size - 1})",
        )
        _require(
            not pr.memory_snapshot or cuda_available,
            "profile.memory_snapshot=true records the CUDA caching allocator, but CUDA is not "
            "available; set profile.memory_snapshot: false",
        )
        if not cuda_available:
            _require(
                self.precision.params_dtype == "fp32",
                f"precision.params_dtype={self.precision.params_dtype} is not supported on "
                "CPU; set precision.params_dtype=fp32",
            )

    def _check_attention_backend(self, cuda_available: bool, te_available: bool) -> None:
        """model.attention_backend and the fusions against what this machine provides."""
        m, p = self.model, self.parallel
        _require(
            m.attention_backend != "te" or te_available,
            "model.attention_backend=te needs Transformer Engine on CUDA (CUDA available: "
            f"{cuda_available}, Transformer Engine importable: {te_available}); set "
            "model.attention_backend: sdpa (CUDA), local, or null to choose automatically",
        )
        backend = m.resolved_attention_backend(te_available, cuda_available)
        if backend != "te" and te_available:
            # Without TE the checks below name the missing install instead.
            te_only = {
                f"parallel.context={p.context}": p.context > 1,
                "parallel.sequence_parallel=true": p.sequence_parallel,
                "parallel.tp_comm_overlap=true": p.tp_comm_overlap,
                f"precision.fp8={self.precision.fp8}": self.precision.fp8 is not None,
                "model.moe_grouped_gemm=true": m.moe_grouped_gemm is True,
            }
            asked = [name for name, on in te_only.items() if on]
            _require(
                not asked,
                f"{', '.join(asked)} needs Transformer Engine's layer spec, but "
                f"model.attention_backend={backend} builds megatron-core's local spec; set "
                "model.attention_backend: te (or null) or turn those off",
            )
        _require(
            not m.apply_rope_fusion or te_available,
            "model.apply_rope_fusion=true needs Transformer Engine's fused RoPE kernel "
            f"(Transformer Engine usable: {te_available}); set it null (on when available)",
        )
        for name in ("bias_dropout_fusion", "bias_activation_fusion"):
            _require(
                not getattr(m, name) or cuda_available,
                f"model.{name}=true is a CUDA kernel and CUDA is not available; set it null "
                "(on with CUDA)",
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)
