"""Measure training throughput, TFLOP/s, MFU and peak memory of a config on this machine's
GPUs, for BF16 and (with Transformer Engine) FP8 side by side in one run.

    python tools/bench_mfu.py --config configs/llama3_2_1b.yaml                 # one GPU
    torchrun --nproc_per_node 8 tools/bench_mfu.py --config configs/llama_7b.yaml
    python tools/bench_mfu.py --config configs/llama3_2_1b.yaml --precisions bf16 \\
        parallel.tensor=1 train.micro_batch_size=2 recompute.granularity=null
    python tools/bench_mfu.py --config configs/llama3_2_1b.yaml --precisions bf16 \\
        --attention-backend sdpa,local --json runs/bench.json model.seq_length=4096

Each precision (and with ``--attention-backend``, each attention backend: ``te``, ``sdpa``,
``local``; default: the config's ``model.attention_backend``) builds the model afresh on
the same process groups, runs ``--warmup``
untimed steps and ``--steps`` timed ones on synthetic tokens (``data.format=mock``:
megatron-core's MockGPTDataset, so no dataset is needed), and reports the means over the
timed steps.
The global batch is ``train.micro_batch_size x DP`` (one microbatch per step) unless
``--global-batch-size`` is given. FLOPs per token follow megatron_forge/monitoring/flops.py;
the MFU peak comes from its GPU table (or ``logging.peak_tflops``). ``--precisions fp32``
runs on CPU as a smoke test (MFU n/a). ``--json`` also writes the rows, with the device
and the layout, to a file (tools/gpu_check.py reads it).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch

from megatron_forge import distributed
from megatron_forge.config import Config, ConfigError, load_config, validate_for_world
from megatron_forge.errors import ForgeError
from megatron_forge.monitoring.flops import resolve_peak, run_flops_per_token
from megatron_forge.utils import transformer_engine_available

PRECISION_OVERRIDES = {
    "bf16": ["precision.params_dtype=bf16", "precision.fp8=null"],
    "fp8": ["precision.params_dtype=bf16", "precision.fp8=hybrid"],
    "fp32": ["precision.params_dtype=fp32", "precision.fp8=null"],
}


def variant(
    args: argparse.Namespace, precision: str, world_size: int, backend: str | None = None
) -> Config:
    """The config of one measured run: synthetic data, no checkpoints, no W&B."""
    base = load_config(args.config, args.overrides)
    dp = world_size // base.parallel.model_parallel_size
    gbs = args.global_batch_size or base.train.micro_batch_size * max(dp, 1)
    steps = args.warmup + args.steps
    name = precision if backend is None else f"{precision}_{backend}"
    chosen = [] if backend is None else [f"model.attention_backend={backend}"]
    return load_config(
        args.config,
        [
            *args.overrides,
            *PRECISION_OVERRIDES[precision],
            *chosen,
            "data.format=mock",
            f"train.global_batch_size={gbs}",
            f"train.train_iters={steps}",
            f"train.warmup_iters={min(steps, base.train.warmup_iters)}",
            "train.eval_interval=0",
            "checkpoint.save=null",
            "checkpoint.load=null",
            "logging.wandb_project=null",
            "logging.tensorboard=false",
            f"logging.dir={args.log_dir}/{name}",
        ],
    )


def measure(cfg: Config, world_size: int, warmup: int, steps: int) -> dict[str, float]:
    from megatron_forge.training.trainer import Trainer

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(cfg, world_size, callbacks=[])
    timed = [trainer.train_step() for _ in range(warmup + steps)][warmup:]
    vocab = cfg.model.vocab_size
    flops = run_flops_per_token(cfg, vocab).training
    tokens_per_gpu = statistics.mean(m["tokens_per_s_per_gpu"] for m in timed)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    peak = resolve_peak(device, cfg.precision.fp8 is not None, cfg.logging.peak_tflops)
    tflops = tokens_per_gpu * flops / 1e12
    result = {
        "step_time_ms": 1000 * statistics.mean(m["step_time_s"] for m in timed),
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "tflops_per_gpu": tflops,
        "mfu": tflops / peak.tflops if peak.tflops else float("nan"),
        "peak_mem_gb": max(m["peak_mem_gb"] for m in timed),
        "loss": timed[-1]["loss"],
    }
    del trainer
    gc.collect()
    return result


def attention_of(cfg: Config) -> str:
    """The attention backend a run uses: te, sdpa or local."""
    return cfg.model.resolved_attention_backend(
        transformer_engine_available(), torch.cuda.is_available()
    )


def table(rows: dict[str, dict[str, float]], header: str) -> str:
    width = max(9, *(len(name) for name in rows))
    lines = [
        header,
        f"{'precision':>{width}} | {'step ms':>9} | {'tokens/s/GPU':>12} | "
        f"{'TFLOP/s/GPU':>11} | {'MFU':>6} | {'peak mem GB':>11} | {'loss':>7}",
    ]
    for name, r in rows.items():
        mfu = "n/a" if r["mfu"] != r["mfu"] else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"{name:>{width}} | {r['step_time_ms']:9.1f} | {r['tokens_per_s_per_gpu']:12.0f} | "
            f"{r['tflops_per_gpu']:11.4g} | {mfu:>6} | {r['peak_mem_gb']:11.2f} | "
            f"{r['loss']:7.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # megatron-core warns on import that TE/apex are missing; the report says which spec ran.
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per precision")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--precisions", default="bf16,fp8", help="comma list: bf16,fp8,fp32")
    parser.add_argument("--global-batch-size", type=int, help="default: micro batch x DP")
    parser.add_argument(
        "--attention-backend",
        help="comma list of te, sdpa, local: one run each (default: the config's choice)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--log-dir", default="runs/bench_mfu")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)

    env = distributed.read_environment()
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    skipped = []
    if "fp8" in precisions and not transformer_engine_available():
        precisions.remove("fp8")
        skipped.append("fp8 (needs CUDA + Transformer Engine)")
    backends: list[str | None] = [None]
    if args.attention_backend:
        backends = [b.strip() for b in args.attention_backend.split(",") if b.strip()]
    try:
        configs = {
            p if b is None else f"{p} {b}": variant(args, p, env.world_size, b)
            for p in precisions
            for b in backends
        }
        for cfg in configs.values():
            if cfg.model.vocab_size is None:
                raise ConfigError("bench_mfu needs model.vocab_size (synthetic data)")
            validate_for_world(cfg, env.world_size)
    except ForgeError as err:
        print(f"{err.kind}: {err}", file=sys.stderr)
        return 2
    except KeyError as err:  # a --precisions name with no overrides
        print(f"config error: --precisions: unknown precision {err}", file=sys.stderr)
        return 2
    first = next(iter(configs.values()))
    distributed.initialize(first, env)
    rows = {p: measure(cfg, env.world_size, args.warmup, args.steps) for p, cfg in configs.items()}
    if env.rank == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        p = first.parallel
        attention = {name: attention_of(cfg) for name, cfg in configs.items()}
        header = (
            f"{args.config} on {env.world_size} x {device} (TP={p.tensor} PP={p.pipeline} "
            f"CP={p.context} EP={p.expert}), micro batch {first.train.micro_batch_size}, "
            f"global batch {first.train.global_batch_size}, seq {first.model.seq_length}, "
            f"{args.steps} timed steps after {args.warmup}; "
            f"spec: {'Transformer Engine' if attention_of(first) == 'te' else 'local'}, "
            f"attention: {', '.join(dict.fromkeys(attention.values()))}"
        )
        print(table(rows, header))
        for note in skipped:
            print(f"skipped: {note}")
        if args.json:
            report = {
                "config": args.config,
                "overrides": args.overrides,
                "device": device,
                "world_size": env.world_size,
                "micro_batch_size": first.train.micro_batch_size,
                "global_batch_size": first.train.global_batch_size,
                "seq_length": first.model.seq_length,
                "warmup_steps": args.warmup,
                "timed_steps": args.steps,
                "skipped": skipped,
                "runs": {
                    name: {
                        "attention_backend": attention[name],
                        "tokens_per_s": r["tokens_per_s_per_gpu"] * env.world_size,
                        # JSON has no NaN: MFU without a known peak (CPU) is null
                        **{k: None if v != v else v for k, v in r.items()},
                    }
                    for name, r in rows.items()
                },
            }
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
