"""Measure checkpoint saves and loads of the same model state at several sizes, on 2 ranks
under DP=2 and TP=2, against this disk's own sequential write speed measured in the same
run.

    python tools/bench_checkpoint.py                           # ~0.5 GB and ~2 GB
    python tools/bench_checkpoint.py --sizes 0.5 --layouts dp --dir /scratch/bench
    python tools/bench_checkpoint.py --sizes 0.02 --json runs/bench_ckpt.json  # a quick look

For each size (GB of checkpoint: weights plus the distributed optimizer's fp32 parameters
and Adam moments) and layout, two gloo (CPU) or NCCL (GPU) ranks build a Llama-style model
sized to it (``configs/tiny.yaml`` with more layers and a wider hidden size), take one
training step on synthetic tokens, and then, with ``checkpoint.*`` as given by ``--set``
(default: dp_reshardable, fully parallel save and load):

- save synchronously twice: the step is blocked for the whole save;
- save asynchronously twice (the second save reuses the cached plan, as every save after
  the first in a run does): blocked time (plan + staging) and the background write time,
  waited for right after staging;
- write and fsync a file of the checkpoint's size on each rank, both ranks at once, in
  the same directory (the disk's sequential speed under the same two writers);
- load the checkpoint back.

Printed per size and layout: blocked time async vs sync and their ratio, plan and stage
times, background write time, write throughput against the disk's, load time, and each
rank's peak RSS (and its rise over the RSS before the first save: the host memory the
checkpoint took). ``--json`` writes the rows to a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {"dp": [], "tp": ["parallel.tensor=2"]}
BYTES_PER_PARAM = 16  # fp32 weights + fp32 main parameters and two Adam moments
WORLD = 2
CHUNK = 64 << 20


def model_overrides(size_gb: float) -> list[str]:
    """A model whose checkpoint is about ``size_gb``: 8 layers (2 below 50 MB) of
    ~12 hidden^2 parameters each, hidden a multiple of 64."""
    layers = 8 if size_gb >= 0.05 else 2
    params = size_gb * 1e9 / BYTES_PER_PARAM
    hidden = max(64, int(math.sqrt(params / (12 * layers)) // 64 * 64))
    return [
        f"model.num_layers={layers}",
        f"model.hidden_size={hidden}",
        f"model.ffn_hidden_size={hidden * 4}",
        f"model.num_attention_heads={hidden // 64 * 2}",
        f"model.num_query_groups={hidden // 64 * 2}",
    ]


def rss_gb() -> float:
    """This process's peak resident set so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def disk_write_s(path: Path, size: int) -> float:
    """Seconds to write ``size`` bytes sequentially and fsync them."""
    block = os.urandom(min(CHUNK, max(size, 1)))
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def measure(cfg: Any, out: Path) -> dict[str, Any]:
    """One rank's measurements (all ranks run this together)."""
    import torch.distributed as dist

    from megatron_forge.checkpointing import Checkpointer, iteration_dir, load_checkpoint
    from megatron_forge.training.trainer import Trainer

    rank = dist.get_rank()
    trainer = Trainer(cfg, WORLD, [])
    trainer.train_step()
    dist.barrier()
    before = current_rss_gb()
    row: dict[str, Any] = {}

    def save(name: str, async_save: bool, saves: int) -> list[tuple[float, float, float, float]]:
        ck = dataclasses.replace(cfg.checkpoint, async_save=async_save)
        saver = Checkpointer(out / name, ck)
        times = []
        for _ in range(saves):
            dist.barrier()
            saver.save(
                trainer.model,
                trainer.optimizer,
                trainer.scheduler,
                trainer.train_state(),
                cfg.to_dict(),
            )
            blocked, plan, stage = saver.last_blocked_s, saver.last_plan_s, saver.last_stage_s
            saver.finalize(blocking=True)
            times.append((blocked, plan, stage, saver.last_write_s or 0.0))
            trainer.step += 1  # the next save is another iteration of the same structure
        saver.close()
        return times

    # Twice each: the first save of a run also pays one-off costs (the write-results
    # manager process, validation of the sharding, planning), which the row reports apart.
    first_sync, sync = save("sync", False, 2)
    row["sync_s"], row["sync_first_s"] = sync[0], first_sync[0]
    first, steady = save("async", True, 2)
    row.update(
        async_first_blocked_s=first[0],
        async_blocked_s=steady[0],
        plan_s=steady[1],
        stage_s=steady[2],
        write_s=steady[3],
    )
    iteration = trainer.step - 1
    size = dir_bytes(iteration_dir(out / "async", iteration)) if rank == 0 else 0
    box = [size]
    dist.broadcast_object_list(box, src=0)
    size = box[0]
    row["checkpoint_gb"] = size / 1e9
    dist.barrier()
    disk = disk_write_s(out / f"disk_{rank}.bin", size // WORLD)
    row["disk_s"] = disk
    dist.barrier()
    start = time.perf_counter()
    how = dataclasses.replace(cfg.checkpoint, load=str(out / "async"))
    load_checkpoint(out / "async", trainer.model, trainer.optimizer, trainer.scheduler, how)
    dist.barrier()
    row["load_s"] = time.perf_counter() - start
    row["rss_before_gb"] = before
    row["peak_rss_gb"] = rss_gb()
    return row


def _rank(rank: int, port: int, cfg_args: tuple, out: Path, results: Any) -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore")
    from megatron_forge import distributed
    from megatron_forge.config import load_config

    try:
        cfg = load_config(*cfg_args)
        env = distributed.DistEnv(rank, WORLD, rank, "127.0.0.1", port, "bench")
        distributed.initialize(cfg, env)
        try:
            results.put((rank, measure(cfg, out), None))
        finally:
            distributed.shutdown()
    except BaseException:
        results.put((rank, None, traceback.format_exc()))


def run_case(size_gb: float, layout: str, settings: list[str], root: Path) -> dict[str, Any]:
    from megatron_forge.utils import free_port

    out = root / f"{layout}_{size_gb:g}gb"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    overrides = [
        "data.format=mock",
        "data.tokenizer=null",
        "data.blend=[]",
        "model.vocab_size=2048",
        "model.seq_length=64",
        "model.max_position_embeddings=64",
        "train.micro_batch_size=1",
        "train.global_batch_size=2",
        "train.eval_interval=0",
        "checkpoint.save=null",
        "checkpoint.load=null",
        f"logging.dir={out / 'run'}",
        *model_overrides(size_gb),
        *LAYOUTS[layout],
        *settings,
    ]
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    cfg_args = (REPO / "configs/tiny.yaml", overrides)
    procs = [
        ctx.Process(target=_rank, args=(rank, port, cfg_args, out, results))
        for rank in range(WORLD)
    ]
    for proc in procs:
        proc.start()
    rows: dict[int, Any] = {}
    errors = []
    for _ in range(WORLD):
        rank, row, error = results.get(timeout=3600)
        if error:
            errors.append(f"rank {rank}:\n{error}")
        rows[rank] = row
    for proc in procs:
        proc.join()
    shutil.rmtree(out, ignore_errors=True)
    if errors:
        raise RuntimeError("\n".join(errors))
    return summarize(size_gb, layout, [rows[r] for r in range(WORLD)])


def summarize(size_gb: float, layout: str, ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One row: the slowest rank's times (a save ends when the last rank is done)."""
    slowest = {key: max(r[key] for r in ranks) for key in ranks[0] if key.endswith("_s")}
    gb = ranks[0]["checkpoint_gb"]
    write_gbps = gb / slowest["write_s"] if slowest["write_s"] else float("nan")
    disk_gbps = gb / slowest["disk_s"] if slowest["disk_s"] else float("nan")
    return {
        "target_gb": size_gb,
        "layout": layout,
        "checkpoint_gb": gb,
        **slowest,
        "blocked_ratio": slowest["async_blocked_s"] / slowest["sync_s"],
        "write_gbps": write_gbps,
        "disk_gbps": disk_gbps,
        "write_vs_disk": write_gbps / disk_gbps,
        "peak_rss_gb": [r["peak_rss_gb"] for r in ranks],
        "rss_rise_gb": [r["peak_rss_gb"] - r["rss_before_gb"] for r in ranks],
    }


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['layout'].upper()}=2  {row['checkpoint_gb']:.2f} GB: "
        f"sync save {row['sync_s']:.2f} s (first {row['sync_first_s']:.2f} s); async blocked {row['async_blocked_s']:.3f} s "
        f"(first save {row['async_first_blocked_s']:.3f} s), "
        f"{row['blocked_ratio'] * 100:.1f}% of sync "
        f"[plan {row['plan_s']:.3f} s, stage {row['stage_s']:.3f} s]; "
        f"background write {row['write_s']:.2f} s = {row['write_gbps']:.2f} GB/s, "
        f"{row['write_vs_disk'] * 100:.0f}% of the disk's {row['disk_gbps']:.2f} GB/s "
        f"(write+fsync, 2 writers); load {row['load_s']:.2f} s; peak RSS per rank "
        + ", ".join(f"{p:.2f}" for p in row["peak_rss_gb"])
        + " GB (rise "
        + ", ".join(f"{p:.2f}" for p in row["rss_rise_gb"])
        + " GB)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.5,2", help="checkpoint sizes in GB (comma list)")
    parser.add_argument("--layouts", default="dp,tp", help="dp (DP=2), tp (TP=2), or both")
    parser.add_argument("--dir", type=Path, help="where to write (default: a temp directory)")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="a checkpoint.* override, e.g. --set checkpoint.optimizer_format=fully_reshardable",
    )
    args = parser.parse_args(argv)
    try:
        sizes = [float(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes={args.sizes}: give sizes in GB, e.g. 0.5,2")
    layouts = args.layouts.split(",")
    unknown = [name for name in layouts if name not in LAYOUTS]
    if unknown:
        parser.error(f"--layouts: unknown {unknown}; choose from {sorted(LAYOUTS)}")
    bad = [s for s in args.set if not s.startswith("checkpoint.")]
    if bad:
        parser.error(f"--set takes checkpoint.* overrides only, not {bad}")
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench_checkpoint_"))
    print(f"writing under {root} ({torch.__version__}, {os.cpu_count()} CPUs)", flush=True)
    rows = []
    for size in sizes:
        for layout in layouts:
            row = run_case(size, layout, args.set, root)
            print_row(row)
            rows.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
