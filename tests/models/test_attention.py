"""model.attention_backend and the fusions: which backend a config gets, the spec it builds,
the errors for what a machine cannot run; and (slow tier, from the one 4-rank run of
tests/training/backends_worker.py) SDPAttention against megatron-core's
DotProductAttention as modules: same outputs and gradients, dropout, and no s x s tensor."""

from __future__ import annotations

import pytest

from megatron_forge.config import ConfigError, load_config
from megatron_forge.models import build_transformer_config
from megatron_forge.models.build import layer_spec


def _cfg(*overrides: str):
    return load_config(None, ["precision.params_dtype=fp32", *overrides])


@pytest.mark.parametrize(
    "choice,te,cuda,expected",
    [
        (None, True, True, "te"),
        (None, False, True, "sdpa"),
        (None, False, False, "local"),  # CPU: the path every CPU parity test was measured on
        ("sdpa", False, False, "sdpa"),
        ("local", True, True, "local"),
    ],
)
def test_automatic_backend(choice, te, cuda, expected) -> None:
    model = _cfg(f"model.attention_backend={'null' if choice is None else choice}").model
    assert model.resolved_attention_backend(te, cuda) == expected


def _core_attention(spec):
    return spec.submodules.self_attention.submodules.core_attention


@pytest.mark.parametrize("moe", [False, True])
def test_sdpa_replaces_core_attention_in_the_local_spec(moe: bool) -> None:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_forge.models.attention import SDPAttention

    family = ["model.family=mixtral", "model.num_experts=4"] if moe else []
    sdpa = layer_spec(_cfg(*family, "model.attention_backend=sdpa"))
    local = layer_spec(_cfg(*family, "model.attention_backend=local"))
    assert _core_attention(sdpa) is SDPAttention
    assert _core_attention(local) is DotProductAttention
    assert type(sdpa.submodules.mlp) is type(local.submodules.mlp)  # nothing else changes


def test_block_spec_of_mixed_layers_gets_sdpa() -> None:
    """A block spec of dense and MoE layers (what megatron-core builds per layer when they
    alternate) gets it in every layer."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from megatron_forge.models.attention import SDPAttention, use_sdpa

    layers = [gpt_layer_specs.get_gpt_layer_local_spec(num_experts=n) for n in (None, 4)]
    spec = use_sdpa(TransformerBlockSubmodules(layer_specs=layers))
    assert [_core_attention(s) for s in spec.layer_specs] == [SDPAttention, SDPAttention]


def test_cpu_config_has_no_fusions() -> None:
    tc = build_transformer_config(_cfg())
    assert not tc.gradient_accumulation_fusion and not tc.apply_rope_fusion
    assert not tc.bias_dropout_fusion and not tc.bias_activation_fusion
    assert not tc.masked_softmax_fusion


@pytest.mark.parametrize("kernels", [False, True])
def test_fusions_on_cuda_follow_the_kernels(kernels: bool) -> None:
    """On CUDA the jit-scripted bias fusions are on; the others only where their kernel
    imports. Without megatron's compiled softmax kernels (no apex, no TE) the local
    attention's masked-softmax fusion stays off: it would import them at its first step."""
    from megatron_forge.models.build import choose_fusions

    fusions = choose_fusions(
        _cfg().model,
        on_gpu=True,
        grad_accum_kernel=kernels,
        rope_kernel=kernels,
        softmax_kernel=kernels,
    )
    assert fusions == {
        "bias_activation_fusion": True,
        "bias_dropout_fusion": True,
        "apply_rope_fusion": kernels,
        "gradient_accumulation_fusion": kernels,
        "masked_softmax_fusion": kernels,
    }
    off = _cfg("model.bias_dropout_fusion=false", "model.apply_rope_fusion=false").model
    chosen = choose_fusions(
        off, on_gpu=True, grad_accum_kernel=True, rope_kernel=True, softmax_kernel=True
    )
    assert not chosen["bias_dropout_fusion"] and not chosen["apply_rope_fusion"]


def test_gradient_accumulation_fusion_without_its_kernel() -> None:
    with pytest.raises(ConfigError, match="model.gradient_accumulation_fusion=true needs CUDA"):
        build_transformer_config(_cfg("model.gradient_accumulation_fusion=true"))


@pytest.mark.parametrize(
    "overrides,cuda,te,message",
    [
        (
            ["model.attention_backend=te"],
            True,
            False,
            "model.attention_backend=te needs Transformer",
        ),
        (
            ["model.attention_backend=sdpa", "parallel.context=2", "model.seq_length=128"],
            True,
            True,
            "parallel.context=2 needs Transformer Engine's layer spec, but "
            "model.attention_backend=sdpa",
        ),
        (
            ["model.attention_backend=local", "parallel.sequence_parallel=true"],
            True,
            True,
            "parallel.sequence_parallel=true needs Transformer Engine's layer spec",
        ),
        (["model.apply_rope_fusion=true"], True, False, "model.apply_rope_fusion=true needs"),
        (["model.bias_dropout_fusion=true"], False, False, "model.bias_dropout_fusion=true is a"),
    ],
)
def test_backend_errors(overrides: list[str], cuda: bool, te: bool, message: str) -> None:
    cfg = _cfg("parallel.tensor=2", "train.global_batch_size=8", *overrides)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        cfg.validate(4, cuda_available=cuda, te_available=te)


def test_te_backend_accepted_where_te_is_usable() -> None:
    cfg = _cfg("model.attention_backend=te", "parallel.context=2", "train.global_batch_size=8")
    cfg.validate(4, cuda_available=True, te_available=True)


# --- slow tier: the modules themselves, measured on rank 0 of the 4-rank worker run


@pytest.fixture(scope="module")
def module_checks() -> dict:
    from tests.training import backends_worker

    return backends_worker.results()[0]["module"]


@pytest.mark.slow
def test_sdpa_module_matches_dot_product_attention(module_checks: dict) -> None:
    """Output, and query/key/value gradients, agree to float rounding (GQA, causal)."""
    for name, diff, scale in zip(
        ("output", "dq", "dk", "dv"), module_checks["max_abs_diff"], module_checks["max_abs"]
    ):
        print(f"{name}: max abs diff {diff:.2e} of max {scale:.2e}")
        assert diff <= 1e-5 * max(scale, 1.0)


@pytest.mark.slow
def test_sdpa_dropout_only_in_training(module_checks: dict) -> None:
    assert module_checks["eval_ignores_dropout"] and module_checks["train_applies_dropout"]


@pytest.mark.slow
def test_sdpa_does_not_allocate_the_score_matrix(module_checks: dict) -> None:
    """Forward + backward at seq 2048, 8 heads: local holds [b, heads, s, s] scores and
    probabilities; SDPA's blockwise kernel none of them."""
    local, sdpa = module_checks["peak_mib_local"], module_checks["peak_mib_sdpa"]
    scores = module_checks["scores_mib"]
    print(f"peak CPU memory at seq 2048: local {local:.1f} MiB, sdpa {sdpa:.1f} MiB")
    assert local >= 2 * scores  # the measurement sees the scores and the probabilities
    assert sdpa < scores / 4
    assert sdpa < local / 20


# --- GPU: the same comparison with torch's CUDA kernels (tools/gpu_check.py runs it)


def _cuda_attention(_cfg) -> dict:
    """Llama-3.2-1B's attention shape (32 query heads, 8 key/value groups, 64 channels) at
    seq 4096 in BF16: outputs and peak CUDA memory of a forward + backward per backend."""
    import torch
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_forge.models.attention import SDPAttention

    config = TransformerConfig(
        num_layers=1,
        hidden_size=2048,
        num_attention_heads=32,
        num_query_groups=8,
        kv_channels=64,
        attention_dropout=0.0,
        bf16=True,
        params_dtype=torch.bfloat16,
        masked_softmax_fusion=False,
    )
    torch.manual_seed(0)
    shapes = [(4096, 1, 32, 64), (4096, 1, 8, 64), (4096, 1, 8, 64)]
    inputs = [torch.randn(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    out: dict = {}
    for name, cls in (("local", DotProductAttention), ("sdpa", SDPAttention)):
        module = cls(config, 1, AttnMaskType.causal, "self")
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        context = module(q, k, v, None)
        context.float().square().mean().backward()
        torch.cuda.synchronize()
        out[f"peak_mib_{name}"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        out[name] = context.detach().float().cpu()
    out["max_abs_diff"] = (out.pop("local") - out.pop("sdpa")).abs().max().item()
    return out


@pytest.mark.gpu
def test_cuda_sdpa_matches_local_without_the_score_matrix() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tests.multiprocess import run_distributed

    (result,) = run_distributed(_cuda_attention, 1, timeout_s=300)
    print(result)
    assert result["max_abs_diff"] < 3e-2  # BF16 rounding
    assert result["peak_mib_sdpa"] < result["peak_mib_local"] / 4
