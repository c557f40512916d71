"""Aux-loss-free balancing on a real tiny_deepseek_v3 run (configs/tiny_deepseek_v3.yaml:
sigmoid scores, group-limited routing, megatron-core's expert bias moved in
finalize_model_grads): the bias moves, the per-expert load imbalance that training builds
up falls again once the bias catches up, and a run resumed from the half-way checkpoint
gives bit-identical losses, loads and bias spreads, and saves the same final biases.

The uninterrupted run is trained once per session; tests/convert/test_trained_export.py
exports its last checkpoint to Hugging Face (its routers carry a moved bias)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import data_overrides, read_metrics, run_training

pytestmark = pytest.mark.slow

CONFIG = "configs/tiny_deepseek_v3.yaml"
STEPS = 20
HALF = STEPS // 2
RATE = 1e-2
OVERRIDES = [
    f"train.train_iters={STEPS}",
    "train.global_batch_size=4",
    "train.micro_batch_size=4",
    "train.eval_interval=0",
    "logging.log_interval=1",
    f"checkpoint.save_interval={HALF}",
    # Ten times the recipe's rate, so the bias catches up within a 20-step run.
    f"model.moe_router_bias_update_rate={RATE}",
    # A wider init than the recipe's 0.02: tokens' router scores then differ by more than
    # a few bias steps. With 0.02 every token of a layer soon picks the same expert groups
    # (imbalance 2.0 with and without the bias), which no per-expert bias can spread.
    "model.init_method_std=0.1",
    # A padded vocabulary (2048 -> 2112 rows) for the export test.
    "model.make_vocab_size_divisible_by=96",
]
ROUTERS = [
    "decoder.layers.1.mlp.router.expert_bias",
    "decoder.layers.2.mlp.router.expert_bias",
    "mtp.layers.0.transformer_layer.mlp.router.expert_bias",
]
"""The MoE layers' expert biases (layer 0 is dense; the MTP layer routes too)."""

_RUNS: dict[Path, Path] = {}


def balancing_run(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of the uninterrupted run (trained once per session): ``run/metrics.jsonl``
    and ``ckpt`` with iterations HALF and STEPS."""
    if sample_data not in _RUNS:
        root = tmp_path_factory.mktemp("deepseek_v3_bias")
        extra = data_overrides(sample_data) + [f"checkpoint.save={root / 'ckpt'}"]
        run_training(1, CONFIG, OVERRIDES + extra, root / "run")
        _RUNS[sample_data] = root
    return _RUNS[sample_data]


def _steps(run_dir: Path) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def _biases(ckpt: Path, iteration: int) -> list[list[float]]:
    from megatron_forge.convert.reader import MegatronCheckpoint

    saved = MegatronCheckpoint(ckpt, iteration)
    return [saved.read(name).tolist() for name in ROUTERS]


def test_expert_bias_balances_and_resumes_exactly(sample_data, tmp_path_factory, tmp_path):
    root = balancing_run(sample_data, tmp_path_factory)
    full = _steps(root / "run")
    assert sorted(full) == list(range(1, STEPS + 1))
    spread = [full[s]["moe_expert_bias_spread"] for s in range(1, STEPS + 1)]
    imbalance = [full[s]["moe_expert_load_imbalance"] for s in range(1, STEPS + 1)]
    peak = max(imbalance)
    tail = sum(imbalance[-3:]) / 3
    print(
        f"bias spread: step 1 {spread[0]:.4f}, step {HALF} {spread[HALF - 1]:.4f}, "
        f"step {STEPS} {spread[-1]:.4f}; load imbalance (max/mean): step 1 "
        f"{imbalance[0]:.3f}, peak {peak:.3f} at step {imbalance.index(peak) + 1}, "
        f"last 3 steps {[round(x, 3) for x in imbalance[-3:]]}"
    )
    # The bias moves: one update gives +-RATE per expert, twenty give far more.
    assert spread[0] == pytest.approx(2 * RATE)
    assert spread[-1] > 10 * RATE, spread
    # Training concentrates the load first; the grown bias brings it back down.
    assert imbalance.index(peak) < STEPS - 3, imbalance
    assert tail - 1 < 0.6 * (peak - 1), imbalance

    # Resume from the half-way checkpoint into a new directory.
    resumed_ckpt = tmp_path / "ckpt"
    resume = [
        f"checkpoint.load={root / 'ckpt'}",
        f"checkpoint.load_iteration={HALF}",
        f"checkpoint.save={resumed_ckpt}",
    ]
    run_training(1, CONFIG, OVERRIDES + data_overrides(sample_data) + resume, tmp_path / "run")
    resumed = _steps(tmp_path / "run")
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1))  # it resumed, not restarted
    keys = ["loss", "grad_norm", "moe_expert_bias_spread", "moe_expert_load_imbalance"]
    keys += [k for k in full[STEPS] if k.startswith("moe_expert_load/")]
    for step in resumed:  # bit-identical
        assert {k: resumed[step][k] for k in keys} == {k: full[step][k] for k in keys}, step
    assert _biases(resumed_ckpt, STEPS) == _biases(root / "ckpt", STEPS)
