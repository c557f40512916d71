"""Multi-Latent Attention's core attention off Transformer Engine.

megatron-core 0.16.1's MLA passes ``k_channels`` (qk_head_dim + qk_pos_emb_head_dim) and
``v_channels`` (v_head_dim) to its core attention, which only Transformer Engine's accepts:
its local ``DotProductAttention`` takes neither and sizes its output by kv_channels. Under
the local and sdpa backends, MLA layers therefore compute attention with
:class:`LatentSDPAttention`, torch's ``scaled_dot_product_attention`` (which takes values
of another head size than queries and keys) with MLA's softmax scale (YaRN's mscale
included), output [s, b, heads x v_head_dim].
"""

from __future__ import annotations

from typing import Any, Optional

from megatron.core.transformer import multi_latent_attention as _mla_module
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttentionSubmodules

from megatron_forge.models.attention import SDPAttention, walk_spec

# megatron-core 0.16.1 sets multi_latent_attention.HAVE_TE when its TE extension module
# imports, which it does without Transformer Engine (its classes are then mocks), and MLA's
# constructor then calls isinstance(..., <mock>). Without TE the flag must be false.
if not isinstance(_mla_module.TELinear, type):
    _mla_module.HAVE_TE = False


class LatentSDPAttention(SDPAttention):
    """:class:`SDPAttention` for MLA: keys of ``k_channels``, values of ``v_channels``."""

    def __init__(
        self,
        config: Any,
        layer_number: int,
        attn_mask_type: Any,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Any = None,
    ) -> None:
        super().__init__(
            config,
            layer_number,
            attn_mask_type,
            attention_type,
            attention_dropout=attention_dropout,
            softmax_scale=softmax_scale,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
        )
        # megatron's Attention base class builds one without the head sizes first, which
        # MLA then replaces: take them from the config.
        k_channels = k_channels or config.qk_head_dim + config.qk_pos_emb_head_dim
        v_channels = v_channels or config.v_head_dim
        if softmax_scale is None:
            self.sdpa_scale = k_channels**-0.5
        # The context is heads x v_head_dim wide (SDPAttention reshapes to this width).
        self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels


def use_latent_attention(spec: Any) -> Any:
    """``spec`` (a layer, block or MTP spec from megatron-core's local specs) with the core
    attention of every MLA layer replaced by :class:`LatentSDPAttention`, in place."""

    def visit(node: Any) -> bool:
        if isinstance(node, MLASelfAttentionSubmodules) and node.core_attention in (
            DotProductAttention,
            SDPAttention,
        ):
            node.core_attention = LatentSDPAttention
            return True
        return False

    walk_spec(spec, visit)
    return spec
