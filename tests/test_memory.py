"""megatron_forge.memory: a hand-computed case per term, and the shipped large configs fit
80 GB GPUs at the world sizes their comments state (and the comments match the function)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megatron_forge.config import ConfigError, load_config
from megatron_forge.memory import GB, estimate_memory

REPO = Path(__file__).resolve().parents[1]

SMALL_LLAMA = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.ffn_hidden_size=192",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.seq_length=128",
    "model.vocab_size=1000",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "parallel.tensor=2",
    "parallel.sequence_parallel=true",
    "precision.params_dtype=bf16",
]


def test_hand_computed_dense_tp2_dp2() -> None:
    """TP=2 with SP, DP=2, bf16, distributed optimizer, world size 4."""
    est = estimate_memory(load_config(None, SMALL_LLAMA), world_size=4, flash_attention=False)
    # Per layer: QO 2*64*64 + KV 2*64*32 (2 of 4 heads' width: 64/4*2) = 12288, SwiGLU
    # 3*64*192 = 36864 -> 49152 split over TP, + 2 norms of 64 replicated.
    # Vocab 1000 padded to a multiple of 128 x TP=2 -> 1024; embedding and output 1024*64.
    per_gpu = 2 * (49152 // 2 + 128) + 2 * (1024 * 64 // 2) + 64
    assert est.params_per_gpu == per_gpu == 115008
    assert est.num_params == 2 * (49152 + 128) + 2 * 1024 * 64 + 64 == 229696
    assert est.weights_gb * GB == pytest.approx(2 * per_gpu)  # bf16
    assert est.grads_gb * GB == pytest.approx(4 * per_gpu)  # fp32 grad buffer
    assert est.optimizer_gb * GB == pytest.approx(12 * per_gpu / 2)  # sharded over DP=2
    # s*b*h*(34 + 5*a*s/h)/t per layer: 128*2*64*(34 + 5*4*128/64)/2 = 606208; 2 layers;
    # plus the logits and fp32 softmax of one microbatch: 128*2 tokens * 1000/2 vocab * 6 B.
    assert est.activations_gb * GB == pytest.approx(2 * 606208 + 128 * 2 * 500 * 6)
    assert est.stage == "only"
    assert est.total_gb == pytest.approx(
        est.weights_gb + est.grads_gb + est.optimizer_gb + est.activations_gb
    )
    assert str(est).startswith(f"{est.total_gb:.1f} GB/GPU = weights ")
    # Fused (flash) attention stores no scores: 128*2*64*34/2 = 278528 per layer.
    fused = estimate_memory(load_config(None, SMALL_LLAMA), world_size=4)
    assert fused.activations_gb * GB == pytest.approx(2 * 278528 + 128 * 2 * 500 * 6)
    assert fused.weights_gb == est.weights_gb and fused.optimizer_gb == est.optimizer_gb


def test_head_dim_and_qk_norm_count() -> None:
    """SMALL_LLAMA with 4 heads of 32 channels (h=64) and QK-norm: the attention matrices
    and the activations that scale with the heads' width double."""
    wide = estimate_memory(
        load_config(None, [*SMALL_LLAMA, "model.head_dim=32", "model.qk_layernorm=true"]),
        4,
        flash_attention=False,
    )
    # Per layer: QO 2*64*128 + KV 2*64*64 = 24576, SwiGLU 36864 -> 61440 split over TP;
    # replicated: 2 norms of 64 and the q/k norms of 32.
    per_gpu = 2 * (61440 // 2 + 128 + 64) + 2 * (1024 * 64 // 2) + 64
    assert wide.params_per_gpu == per_gpu
    # Attention's 8 of the 34 bytes scale by 128/64: 128*2*64*(26 + 16 + 40)/2 per layer.
    assert wide.activations_gb * GB == pytest.approx(2 * 671744 + 128 * 2 * 500 * 6)
    same = estimate_memory(load_config(None, [*SMALL_LLAMA, "model.head_dim=16"]), 4)
    assert same == estimate_memory(load_config(None, SMALL_LLAMA), 4)


def test_hand_computed_moe_pp2_ep2_fp32() -> None:
    """Mixtral-style, PP=2 (1F1B: 2 microbatches in flight on the first stage), EP=2, fp32."""
    cfg = load_config(
        None,
        [
            "model.family=mixtral",
            "model.num_layers=2",
            "model.hidden_size=64",
            "model.ffn_hidden_size=128",
            "model.num_attention_heads=4",
            "model.num_query_groups=2",
            "model.num_experts=4",
            "model.seq_length=128",
            "model.vocab_size=1000",
            "train.micro_batch_size=1",
            "train.global_batch_size=4",
            "parallel.pipeline=2",
            "parallel.expert=2",
            "precision.params_dtype=fp32",
        ],
    )
    # DP=2, expert-DP = 4 / (PP 2 x EP 2) = 1; the unfused attention of the local spec
    est = estimate_memory(cfg, world_size=4, flash_attention=False)
    # One layer per stage: attention 12288 + norms 128 + router 4*64 (whole), experts
    # 4*3*64*128 = 98304 over EP=2. First stage adds the 1024x64 embedding.
    dense, experts = 12288 + 128 + 256 + 1024 * 64, 98304 // 2
    assert est.stage == "first"
    assert est.params_per_gpu == dense + experts == 127360
    assert est.weights_gb * GB == pytest.approx(4 * (dense + experts))
    # fp32 params are their own master: Adam m and v, 8 bytes; dense over DP=2, experts
    # over expert-DP=1.
    assert est.optimizer_gb * GB == pytest.approx(8 * (dense / 2 + experts))
    # fp32 activations: twice the formula's 16-bit bytes, 2 microbatches in flight.
    assert est.activations_gb * GB == pytest.approx(2 * 2 * 128 * 64 * (34 + 5 * 4 * 128 / 64))


def test_vocab_size_is_required() -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        estimate_memory(load_config(None, []), world_size=1)


def _comment_estimate(config: Path) -> tuple[int, str]:
    """(world size, 'X GB/GPU = ... activations Y') stated in a config's comment."""
    text = config.read_text()
    match = re.search(
        r"Memory per GPU at world size (\d+).*?\n#\s+(\S+ GB/GPU = [^\n]*)", text, re.S
    )
    assert match, f"{config} has no 'Memory per GPU at world size N' comment"
    return int(match.group(1)), match.group(2).strip()


@pytest.mark.parametrize(
    "name",
    [
        "llama3_2_1b",
        "llama3_8b",
        "llama3_70b",
        "qwen3_8b",
        "llama_7b",
        "llama_70b",
        "mixtral_8x7b",
        "qwen3_30b_a3b",
        "deepseek_v3",
    ],
)
def test_large_configs_fit_80gb_and_comments_match(name: str) -> None:
    config = REPO / "configs" / f"{name}.yaml"
    world_size, stated = _comment_estimate(config)
    cfg = load_config(config)
    cfg.validate(world_size, cuda_available=True, te_available=True)
    est = estimate_memory(cfg, world_size)
    assert est.total_gb < 80, f"{name}: {est}"
    assert str(est).startswith(stated), f"{config}'s comment is stale; now: {est}"


def test_cli_prints_the_estimate(capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_forge.memory import main

    assert main([str(REPO / "configs/llama_70b.yaml")]) == 0  # launch section: 64 x 8
    assert "world size 512" in capsys.readouterr().out
    assert main([str(REPO / "configs/llama_70b.yaml"), "--world-size", "100"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert main([str(REPO / "configs/llama_70b.yaml"), "model.family=gpt"]) == 2
    assert "model.family='gpt' is not a registered family" in capsys.readouterr().err


def test_recompute_reduces_activations() -> None:
    base = [
        "model.num_layers=4",
        "model.hidden_size=256",
        "model.num_attention_heads=8",
        "model.vocab_size=1000",
        "model.seq_length=512",
    ]
    none = estimate_memory(load_config(None, base), 1, flash_attention=False).activations_gb
    selective = estimate_memory(
        load_config(None, [*base, "recompute.granularity=selective"]), 1, flash_attention=False
    )
    full = estimate_memory(
        load_config(
            None,
            [
                *base,
                "recompute.granularity=full",
                "recompute.method=uniform",
                "recompute.num_layers=1",
            ],
        ),
        1,
        flash_attention=False,
    )
    assert full.activations_gb < selective.activations_gb < none
    # Selective recompute of core attention saves what fused attention never stores.
    assert selective == estimate_memory(load_config(None, base), 1)
    # Recomputing the MLP keeps its input: 34 - 16 of Korthikanti's 34 bytes per token
    # and layer (fused attention, no TP), the logits of the last stage aside.
    fused = estimate_memory(load_config(None, base), 1)
    mlp = estimate_memory(
        load_config(None, [*base, "recompute.granularity=selective", "recompute.modules=[mlp]"]),
        1,
    )
    logits = 512 * 2 * 1000 * 6 / GB  # micro batch 2 x seq 512 x vocab 1000, 6 bytes
    assert (mlp.activations_gb - logits) / (fused.activations_gb - logits) == pytest.approx(18 / 34)


MOE_SMALL = [
    "model.family=mixtral",
    "model.hidden_size=64",
    "model.ffn_hidden_size=128",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.num_experts=4",
    "model.seq_length=128",
    "model.vocab_size=1000",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
    "precision.params_dtype=fp32",
]


def test_expert_tensor_parallel_splits_experts_its_own_way() -> None:
    """TP=2 with ETP=1: attention split over TP, experts whole on each rank and spread
    over EP=2 x expert-DP 2 (4 ranks); with ETP=TP=2 the experts halve and expert-DP is 1."""
    base = [*MOE_SMALL, "model.num_layers=1", "parallel.tensor=2", "parallel.expert=2"]
    etp1 = estimate_memory(load_config(None, [*base, "parallel.expert_tensor=1"]), 4)
    etp2 = estimate_memory(load_config(None, base), 4)
    experts = 4 * 3 * 64 * 128
    assert etp1.params_per_gpu - etp2.params_per_gpu == experts / 2 - experts / 4
    # Optimizer: experts over expert-DP = 4 / (ETP 1 x EP 2) = 2 with ETP=1, over 1 else.
    dense = etp2.params_per_gpu - experts / 4
    assert etp1.optimizer_gb * GB == pytest.approx(8 * (dense / 2 + experts / 2 / 2))
    assert etp2.optimizer_gb * GB == pytest.approx(8 * (dense / 2 + experts / 4))


def test_uneven_stages_count_their_own_layers() -> None:
    """3 layers over PP=2 as 1 + 2: the last stage holds two layers' weights and
    activations (one microbatch in flight) and is the most loaded here; PP=2 as 2 + 1 puts
    the two layers and two microbatches on the first."""
    base = [*MOE_SMALL, "model.num_layers=3", "parallel.pipeline=2"]
    # attention (Q, O 64x64; K, V 64x32), norms, router, experts
    layer = 2 * 64 * 64 + 2 * 64 * 32 + 128 + 256 + 4 * 3 * 64 * 128
    last_heavy = estimate_memory(load_config(None, [*base, "parallel.layers_in_first_stage=1"]), 2)
    assert last_heavy.stage == "last"
    assert last_heavy.params_per_gpu == 2 * layer + 1024 * 64 + 64  # + output layer, final norm
    first_heavy = estimate_memory(load_config(None, [*base, "parallel.layers_in_last_stage=1"]), 2)
    assert first_heavy.stage == "first"
    assert first_heavy.params_per_gpu == 2 * layer + 1024 * 64  # + embedding (padded vocab)
    s, h = 128, 64
    assert first_heavy.activations_gb * GB == pytest.approx(2 * 2 * 2 * s * h * 34)


def test_dense_first_layers_and_shared_experts() -> None:
    """An MoE model whose first layer is dense (SwiGLU 128) and whose MoE layer has a
    gated shared expert of 64 (split over TP like a dense MLP)."""
    cfg = load_config(
        None,
        [
            *MOE_SMALL,
            "model.num_layers=2",
            "model.moe_first_k_dense_replace=1",
            "model.moe_shared_expert_intermediate_size=64",
            "model.moe_shared_expert_gate=true",
        ],
    )
    attention, norms = 2 * 64 * 64 + 2 * 64 * 32, 128
    dense_layer = attention + 3 * 64 * 128 + norms
    moe_layer = attention + 3 * 64 * 64 + norms + 4 * 64 + 64 + 4 * 3 * 64 * 128
    est = estimate_memory(cfg, 1)
    assert est.num_params == dense_layer + moe_layer + 2 * 1024 * 64 + 64
    assert est.params_per_gpu == est.num_params
