"""MoE metrics from megatron-core's own routers on gloo ranks (2 pipeline stages x 2
data-parallel ranks, the first stage dense): per-expert load (each data-parallel rank
routes its own tokens, the shares are summed over ranks), the tokens the
capacity limit dropped, the router losses of each load-balancing type, and the expert bias
that megatron's finalize_model_grads moves for aux-loss-free balancing."""

from __future__ import annotations

import pytest
import torch

from tests.multiprocess import run_distributed

pytestmark = pytest.mark.slow

TOKENS, HIDDEN, EXPERTS, TOPK = 64, 16, 4, 2


def _routers_and_metrics(cfg) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_forge.training.moe_metrics import MoEMetrics

    rank = torch.distributed.get_rank()
    tc = TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=0.01,
        moe_router_load_balancing_type="seq_aux_loss",
        moe_aux_loss_coeff=0.01,
        moe_z_loss_coeff=0.001,
        moe_expert_capacity_factor=0.5,
        moe_token_drop_policy="probs",
        moe_layer_freq=[0, 1],
        calculate_per_token_loss=True,
        use_cpu_initialization=True,
    )
    chunk = torch.nn.Module()
    chunk.config = tc
    seen, bias = torch.zeros(EXPERTS), None
    if parallel_state.get_pipeline_model_parallel_rank() == 1:  # stage 0: the dense layer
        chunk.router = TopKRouter(config=tc, pg_collection=get_default_pg_collection())
        chunk.router.layer_number = 2
    metrics = MoEMetrics([chunk], tc.num_layers, EXPERTS, seq_parallel=False)
    if hasattr(chunk, "router"):
        torch.manual_seed(rank)
        hidden = torch.randn(TOKENS, 1, HIDDEN)
        hidden[..., 0] += 3.0  # skew the load so that the bias has something to correct
        _, routing_map = chunk.router(hidden)
        seen += routing_map.sum(dim=0).float()
    _update_router_expert_bias([chunk], tc)
    if hasattr(chunk, "router"):
        bias = chunk.router.expert_bias.clone()
    out = metrics.collect(num_microbatches=1)
    return {"metrics": out, "seen": seen, "bias": bias}


def test_load_drops_losses_and_bias_over_pp2_dp2() -> None:
    """4 ranks: PP=2 x DP=2; the first stage holds the dense layer only (no router) and
    must still join every reduction and report the same numbers."""
    results = run_distributed(
        _routers_and_metrics, 4, overrides=["parallel.pipeline=2"], timeout_s=300
    )
    m = results[0]["metrics"]
    assert all(r["metrics"] == m for r in results)  # reduced over the ranks: the same everywhere
    seen = sum(r["seen"] for r in results)  # tokens each expert took, both DP ranks of stage 1
    shares = [m[f"moe_expert_load/{e}"] for e in range(EXPERTS)]
    assert shares == pytest.approx((seen / seen.sum()).tolist())
    assert m["moe_expert_load_imbalance"] == pytest.approx(float(seen.max() / seen.mean()))
    # Capacity 0.5 x 64 tokens x top-2 / 4 experts = 16 slots per expert and rank: of the
    # 2 x 128 expert choices at most 2 x 64 are kept.
    dropped = 1 - float(seen.sum()) / (2 * TOKENS * TOPK)
    assert m["moe_dropped_token_fraction"] == pytest.approx(dropped) and dropped >= 0.5
    # One MoE layer of two: the means are over that layer, not diluted by the dense one.
    assert m["moe_seq_aux_loss"] > 0.5 and m["moe_z_loss"] > 0
    assert "moe_aux_loss" not in m
    # megatron's update moved the bias by the rate, against the load: spread 2 x 0.01.
    bias = results[3]["bias"]
    assert [r["bias"] is None for r in results] == [True, True, False, False]
    assert torch.equal(bias, results[2]["bias"])
    assert m["moe_expert_bias_spread"] == pytest.approx(float(bias.max() - bias.min()))
    assert m["moe_expert_bias_spread"] == pytest.approx(0.02)
