"""FLOPs per token against hand counts and published Llama-2-7B figures; peak FLOP/s
lookup; the throughput callback and the console line."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_forge.config import ConfigError, ModelConfig, load_config
from megatron_forge.monitoring.flops import (
    find_gpu,
    flops_per_token,
    resolve_peak,
    run_flops_per_token,
)
from megatron_forge.training.metrics_logger import MetricsLogger
from megatron_forge.training.monitors import ThroughputCallback
from tests.conftest import REPO


def test_dense_gqa_hand_count() -> None:
    """configs/tiny.yaml's shape: h=64, 4 layers, 4 heads, 2 KV groups, SwiGLU 192, s=128."""
    m = ModelConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=192,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=128,
    )
    # One token, one layer, 2 FLOPs per multiply-add of each weight matrix (in x out):
    q, k, v, o = 64 * 64, 64 * 32, 64 * 32, 64 * 64  # K/V: 2 groups x head dim 16
    gate, up, down = 64 * 192, 64 * 192, 192 * 64
    # Causal attention: on average 64 of the 128 keys, QK^T and AV each 2 x 64 keys x 64.
    scores = 2 * 64 * 64 + 2 * 64 * 64
    layer = 2 * (q + k + v + o + gate + up + down) + scores
    assert layer == 24576 + 16384 + 73728 == 114688
    head = 2 * 64 * 2048
    f = flops_per_token(m, vocab_size=2048)
    assert f.attention_projections == 4 * 24576
    assert f.attention_scores == 4 * 16384
    assert f.mlp == 4 * 73728 and f.router == 0 and f.lm_head == head
    assert f.forward == 4 * layer + head == 720896
    assert f.training == 3 * 720896 == 2162688


def test_head_dim_sets_the_attention_width() -> None:
    """Qwen3-style heads wider than hidden / heads: 4 heads of 32 channels on h=64, 2 KV
    groups. Q and O are 64 x 128, K and V 64 x 64; the scores run over 128 channels."""
    m = ModelConfig(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=192,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=32,
        qk_layernorm=True,
        seq_length=128,
    )
    q, k, v, o = 64 * 128, 64 * 64, 64 * 64, 128 * 64
    scores = 2 * 64 * 128 + 2 * 64 * 128  # 64 keys on average, QK^T and AV over 128 channels
    f = flops_per_token(m, vocab_size=2048)
    assert f.attention_projections == 2 * 2 * (q + k + v + o) == 2 * 49152
    assert f.attention_scores == 2 * scores == 2 * 32768
    same_width = flops_per_token(ModelConfig(**{**m.__dict__, "head_dim": 16}), 2048)
    assert same_width == flops_per_token(ModelConfig(**{**m.__dict__, "head_dim": None}), 2048)


def test_moe_hand_count() -> None:
    """4 experts of SwiGLU 128, top-2: each token runs 2 experts plus the router."""
    m = ModelConfig(
        family="mixtral",
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        seq_length=64,
        num_experts=4,
        moe_router_topk=2,
        moe_ffn_hidden_size=128,
    )
    attention = 2 * 4 * 64 * 64  # Q, K, V, O all 64 x 64 (no GQA)
    scores = 2 * 2 * 64 * 32  # QK^T and AV over 32 keys on average (causal, s=64)
    experts = 2 * 2 * 3 * 64 * 128  # top-2 x (gate, up, down)
    router = 2 * 64 * 4
    f = flops_per_token(m, vocab_size=256)
    assert (f.attention_projections, f.attention_scores, f.mlp, f.router) == (
        2 * attention,
        2 * scores,
        2 * experts,
        2 * router,
    )
    assert f.forward == 2 * (attention + scores + experts + router) + 2 * 64 * 256 == 312320


def test_moe_with_dense_first_layer_and_gated_shared_expert() -> None:
    """3 layers, the first dense (SwiGLU 96); the 2 MoE layers run their top-2 of 8
    experts (SwiGLU 16), a gated shared expert of 32 and the router; the other 6 experts
    cost nothing for the token."""
    m = ModelConfig(
        family="mixtral",
        num_layers=3,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        seq_length=64,
        num_experts=8,
        moe_router_topk=2,
        moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=32,
        moe_shared_expert_gate=True,
        moe_first_k_dense_replace=1,
    )
    dense = 2 * 3 * 64 * 96
    moe = 2 * 3 * 64 * (2 * 16) + 2 * 3 * 64 * 32 + 2 * 64  # routed top-2, shared, its gate
    f = flops_per_token(m, vocab_size=256)
    assert f.mlp == dense + 2 * moe == 36864 + 2 * 24704
    assert f.router == 2 * (2 * 64 * 8)
    as_pattern = ModelConfig(**{**m.__dict__, "moe_first_k_dense_replace": None})
    assert as_pattern.moe_layer_freq == [0, 1, 1]
    assert flops_per_token(as_pattern, 256) == f


LLAMA2_7B = ModelConfig(
    num_layers=32,
    hidden_size=4096,
    ffn_hidden_size=11008,
    num_attention_heads=32,
    seq_length=4096,
)


def megatron_lm_flops_per_token(m: ModelConfig, vocab: int) -> float:
    """Megatron-LM's num_floating_point_operations (megatron/training/training.py: SwiGLU,
    GQA, causal attention, no MoE) for one sequence, divided by the sequence length."""
    h, s, n = m.hidden_size, m.seq_length, m.num_layers
    gqa = m.num_query_groups / m.num_attention_heads
    return (
        12
        * n
        * h
        * h
        * ((1 + gqa + s / h / 2) + m.ffn_hidden_size / h * 3 / 2 + vocab / (2 * n * h))
    )


def test_llama2_7b_matches_published_figures() -> None:
    f = flops_per_token(LLAMA2_7B, vocab_size=32000)
    h, n, s, ff, vocab = 4096, 32, 4096, 11008, 32000
    # Every weight matrix a token goes through costs 2 FLOPs per weight forward:
    matmul_weights = n * (4 * h * h + 3 * h * ff) + h * vocab  # 6.607e9 (no input embedding)
    assert f.forward - f.attention_scores == 2 * matmul_weights
    # Megatron-LM's formula: identical for a dense model.
    assert f.training == pytest.approx(megatron_lm_flops_per_token(LLAMA2_7B, vocab), rel=1e-12)
    # Published: Llama-2-7B has 6.74e9 parameters; training ~ 6N FLOPs per token plus
    # causal attention 6 * n * s * h = 3.2e9. Ours is 4.286e10 against 4.366e10: 1.8%
    # lower, the input embedding's 0.13e9 parameters (a lookup, no FLOPs). Tolerance 2.5%.
    published = 6 * 6.74e9 + 6 * n * s * h
    assert f.training == pytest.approx(published, rel=0.025)
    assert f.training == pytest.approx(4.286e10, rel=1e-3)


def test_run_flops_pad_the_vocabulary_like_megatron() -> None:
    cfg = load_config(None, ["model.vocab_size=32000", "parallel.tensor=8"])
    # 32000 padded to a multiple of 128 x TP 8 = 1024 -> 32768
    assert run_flops_per_token(cfg, 32000).lm_head == 2 * cfg.model.hidden_size * 32768


@pytest.mark.parametrize(
    ("device", "entry", "bf16", "fp8"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4, 1978.9),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5, 1513.0),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5, 1670.5),
        ("NVIDIA H200", "H200 SXM", 989.4, 1978.9),
        ("NVIDIA GH200 480GB", "GH200", 989.4, 1978.9),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB", 312.0, None),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB", 312.0, None),
        ("NVIDIA L40S", "L40S", 362.05, 733.0),
        ("NVIDIA B200", "B200", 2250.0, 4500.0),
    ],
)
def test_gpu_table_lookup(device: str, entry: str, bf16: float, fp8: float | None) -> None:
    gpu = find_gpu(device)
    assert (gpu.name, gpu.bf16, gpu.fp8) == (entry, bf16, fp8)
    assert resolve_peak(device, fp8=False).tflops == bf16
    assert resolve_peak(device, fp8=True).tflops == fp8


def test_unknown_gpu_gives_no_peak_and_a_hint() -> None:
    peak = resolve_peak("NVIDIA Quantum Flux 9000", fp8=False)
    assert peak.tflops is None
    assert "'NVIDIA Quantum Flux 9000' is not in the table" in peak.note
    assert "set logging.peak_tflops" in peak.note
    a100_fp8 = resolve_peak("NVIDIA A100-SXM4-80GB", fp8=True)
    assert a100_fp8.tflops is None and "has no FP8 peak" in a100_fp8.note
    assert resolve_peak("NVIDIA Quantum Flux 9000", fp8=False, override=500.0).tflops == 500.0
    assert resolve_peak(None, fp8=False).tflops is None  # CPU


def test_peak_tflops_is_validated() -> None:
    with pytest.raises(ConfigError, match="logging.peak_tflops=0.0 must be positive"):
        load_config(None, ["logging.peak_tflops=0"])
    with pytest.raises(ConfigError, match="logging.wandb_tags"):
        load_config(None, ["logging.wandb_tags=[ok, 7]"])
    assert load_config(None, ["logging.wandb_tags=[a, b]"]).logging.wandb_tags == ["a", "b"]


def _trainer(overrides: list[str]) -> SimpleNamespace:
    cfg = load_config(REPO / "configs/tiny.yaml", ["model.vocab_size=2048", *overrides])
    return SimpleNamespace(cfg=cfg, tokenizer=None, step=0)


STEP = {
    "step": 5,
    "loss": 7.5,
    "lr": 3e-3,
    "grad_norm": 0.9,
    "consumed_samples": 80,
    "step_time_s": 0.25,
    "step_time_min_s": 0.2,
    "tokens_per_s": 8192.0,
    "tokens_per_s_per_gpu": 2e8,
    "peak_mem_gb": 1.5,
    "skipped_steps": 0,
    "nan_steps": 0,
}


def test_throughput_on_unknown_gpu_reports_tflops_and_mfu_na(capsys) -> None:
    trainer = _trainer([])
    monitor = ThroughputCallback(trainer.cfg, device_name="NVIDIA Quantum Flux 9000")
    monitor.on_train_start(trainer)
    metrics = dict(STEP)
    monitor.on_step_end(trainer, metrics)  # never raises
    assert metrics["tflops_per_gpu"] == pytest.approx(2162688 * 2e8 / 1e12)
    assert "mfu" not in metrics
    err = capsys.readouterr().err
    assert "MFU: n/a: GPU 'NVIDIA Quantum Flux 9000' is not in the table" in err
    assert "set logging.peak_tflops" in err
    line = MetricsLogger.console_line(trainer, metrics)
    assert "throughput per GPU (TFLOP/s/GPU): 432.5 | MFU: n/a |" in line


def test_throughput_on_h100_gives_mfu() -> None:
    trainer = _trainer([])
    monitor = ThroughputCallback(trainer.cfg, device_name="NVIDIA H100 80GB HBM3")
    metrics = dict(STEP)
    monitor.on_step_end(trainer, metrics)  # starts itself if on_train_start was skipped
    assert metrics["mfu"] == pytest.approx(metrics["tflops_per_gpu"] / 989.4)
    line = MetricsLogger.console_line(trainer, metrics)
    assert "| MFU: 43.7% |" in line
    assert line.startswith("[") and "iteration        5/      60 | consumed samples:" in line
    assert "tokens/s/GPU: 200000000.0 | step time min/max (ms): 200.0/250.0" in line
    assert "skipped iterations" not in line  # only shown when there are any


def test_peak_override_wins() -> None:
    trainer = _trainer(["logging.peak_tflops=865"])
    monitor = ThroughputCallback(trainer.cfg, device_name="NVIDIA H100 80GB HBM3")
    metrics = dict(STEP, skipped_steps=2, nan_steps=1)
    metrics.update(moe_aux_loss=0.0123, moe_expert_load_imbalance=1.25)
    monitor.on_step_end(trainer, metrics)
    assert metrics["mfu"] == pytest.approx(metrics["tflops_per_gpu"] / 865)
    line = MetricsLogger.console_line(trainer, metrics)
    assert "number of skipped iterations:   2 | number of nan iterations:   1" in line
    assert "| moe aux loss: 1.2300E-02 | expert load imbalance: 1.250 |" in line


def test_cli_checks_the_family(capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_forge.monitoring.flops import main

    config = str(REPO / "configs/tiny.yaml")
    assert main([config, "model.vocab_size=2048"]) == 0
    assert "forward FLOPs/token" in capsys.readouterr().out
    assert main([config, "model.vocab_size=2048", "model.family=gpt"]) == 2
    assert "model.family='gpt' is not a registered family" in capsys.readouterr().err
