"""tools/megatron_lm_interop.py, its parts that need no Megatron-LM checkout: the
translation of our config into Megatron-LM's pretrain_gpt.py flags, what it refuses, and
the comparison of two runs. (The runs themselves need Megatron-LM's training package,
which is not on PyPI: docs/checkpoints.md records a run.)"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import pytest

from megatron_forge.config import load_config
from tests.conftest import REPO

TOOL = REPO / "tools/megatron_lm_interop.py"
MOCK = ["data.format=mock", "data.tokenizer=null", "data.blend=[]", "model.vocab_size=2048"]


@pytest.fixture(scope="module")
def tool() -> Any:
    spec = importlib.util.spec_from_file_location("megatron_lm_interop", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pairs(flags: list[str]) -> dict[str, Any]:
    """--flag value pairs (True for a switch)."""
    out: dict[str, Any] = {}
    for i, flag in enumerate(flags):
        if flag.startswith("--"):
            following = flags[i + 1] if i + 1 < len(flags) else "--"
            out[flag] = True if following.startswith("--") else following
    return out


def test_tiny_config_becomes_megatron_lm_flags(tool: Any) -> None:
    cfg = load_config(REPO / "configs/tiny.yaml", MOCK)
    flags = _pairs(tool.megatron_lm_flags(cfg))
    expected = {
        "--num-layers": "4",
        "--hidden-size": "64",
        "--ffn-hidden-size": "192",
        "--num-attention-heads": "4",
        "--group-query-attention": True,
        "--num-query-groups": "2",
        "--seq-length": "128",
        "--max-position-embeddings": "128",
        "--rotary-base": "10000",
        "--normalization": "RMSNorm",
        "--norm-epsilon": "1e-05",
        "--swiglu": True,
        "--disable-bias-linear": True,
        "--untie-embeddings-and-output-weights": True,
        "--vocab-size": "2047",  # NullTokenizer(2047) has 2048 ids, as ours
        "--make-vocab-size-divisible-by": "128",
        "--micro-batch-size": "4",
        "--global-batch-size": "16",
        "--lr": "0.003",
        "--min-lr": "0.0003",
        "--lr-warmup-iters": "5",
        "--lr-decay-style": "cosine",
        "--weight-decay": "0.1",
        "--clip-grad": "1",
        "--adam-beta2": "0.95",
        "--adam-eps": "1e-08",
        "--split": "98,2,0",
        "--seed": "1234",
        "--use-distributed-optimizer": True,
        "--calculate-per-token-loss": True,
        "--ckpt-format": "torch_dist",
        "--transformer-impl": "local",
        "--distributed-backend": "gloo",
    }
    assert {k: flags.get(k) for k in expected} == expected
    assert "--bf16" not in flags and "--qk-layernorm" not in flags
    assert "--dist-ckpt-optim-fully-reshardable" not in flags  # dp_reshardable on both sides
    wsd = load_config(
        REPO / "configs/tiny.yaml",
        [*MOCK, "train.decay_style=wsd", "train.wsd_decay_iters=10", "train.decay_iters=50"],
    )
    flags = _pairs(tool.megatron_lm_flags(wsd))
    assert flags["--lr-decay-style"] == "WSD" and flags["--lr-wsd-decay-style"] == "minus_sqrt"
    assert flags["--lr-wsd-decay-iters"] == "10" and flags["--lr-decay-iters"] == "50"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.family=qwen3"], "model.family=qwen3"),
        (["data.format=indexed"], "data.format=mock"),
        (["parallel.context=2"], "parallel.context"),
        (["precision.params_dtype=fp16"], "precision.params_dtype=fp16"),
    ],
)
def test_what_has_no_flag_here_is_refused_by_name(
    tool: Any, overrides: list[str], field: str
) -> None:
    cfg = load_config(REPO / "configs/tiny.yaml", [*MOCK, *overrides])
    with pytest.raises(tool.Unsupported, match=field):
        tool.megatron_lm_flags(cfg)


def test_comparison_reports_the_largest_relative_difference(tool: Any) -> None:
    reference = {11: (6.0, 0.5, 1e-3), 12: (5.0, 0.4, 5e-4)}
    resumed = {11: (6.0, 0.5, 1e-3), 12: (5.0 * (1 + 2e-6), 0.4, 5e-4)}
    lines, worst = tool.compare(reference, resumed, range(11, 13))
    assert len(lines) == 2 and worst[0] == pytest.approx(2e-6) and worst[1:] == [0.0, 0.0]
    _, worst = tool.compare(reference, {11: resumed[11]}, range(11, 13))
    assert worst == [math.inf] * 3  # a step the resumed run did not log fails the check


def _main_error(tool: Any, capsys: Any, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tool.main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_needs_a_megatron_lm_checkout(tool: Any, capsys: Any, tmp_path: Any) -> None:
    error = _main_error(tool, capsys, "--megatron-lm", str(tmp_path), "--out", str(tmp_path))
    assert "has no pretrain_gpt.py: give a checkout" in error


def test_our_runs_neither_load_nor_save_into_the_configs_directories(tool: Any) -> None:
    overrides = tool.our_overrides(["train.seed=7"])
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    assert cfg.checkpoint.load is None and cfg.checkpoint.save is None  # tiny.yaml sets both
    assert cfg.train.train_iters == 20 and cfg.checkpoint.save_interval == 10
    assert cfg.model.vocab_size == 2048 and cfg.train.seed == 7
    assert load_config(None, tool.our_overrides(["model.vocab_size=4096"])).model.vocab_size == 4096


def test_an_out_directory_with_files_is_refused_and_left_alone(
    tool: Any, capsys: Any, tmp_path: Any
) -> None:
    checkout, out = tmp_path / "Megatron-LM", tmp_path / "out"
    checkout.mkdir()
    (checkout / "pretrain_gpt.py").write_text("")
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    error = _main_error(tool, capsys, "--megatron-lm", str(checkout), "--out", str(out))
    assert f"--out {out} is not empty" in error
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]
