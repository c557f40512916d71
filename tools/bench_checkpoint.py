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

- save synchronously three times: the step is blocked for the whole save;
- save asynchronously four times (the later saves reuse the cached plan, as every save
  after the first in a run does): blocked time (plan + staging) and the background write
  time, waited for right after staging;
- save asynchronously again while training steps go on until every rank has written (as
  in a run): the extra memory of each rank and its background writers (proportional set
  sizes), which includes the pages training rewrites while a forked writer still holds
  them (copy-on-write);
- write and fsync a file of the checkpoint's size on each rank, both ranks at once, in
  the same directory (the disk's sequential speed under the same two writers);
- load the checkpoint back.

Printed per size and layout: blocked time async vs sync (medians of the saves after the
first, the slowest rank's) and their ratio, plan and stage times, background write time,
write throughput against the disk's, load time, each rank's peak RSS (and its rise over
the RSS before the first save, over all saves and the load and over the saves alone),
and the memory taken while training during a background write against the rank's share
of the checkpoint. ``--json`` writes the rows to a file.
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
SYNC_SAVES = 2
"""Synchronous saves measured after the first (their median is the row's)."""
ASYNC_SAVES = 3
"""Asynchronous saves measured after the first (their median is the row's)."""
MAX_OVERLAP_STEPS = 50


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


def group_pss_gb() -> float:
    """Physical memory of this process and its descendants (the background writers):
    proportional set sizes, so pages they share count once. Copy-on-write pages that
    training duplicates while a forked writer holds them show up here, not in the RSS
    of either process."""
    import psutil

    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:  # exited meanwhile
            continue
    return total / 1e9


def measure(cfg: Any, out: Path) -> dict[str, Any]:
    """One rank's measurements (all ranks run this together)."""
    import statistics

    import torch.distributed as dist

    from megatron_forge.checkpointing import Checkpointer, iteration_dir, load_checkpoint
    from megatron_forge.training.trainer import Trainer

    rank = dist.get_rank()
    trainer = Trainer(cfg, WORLD, [])
    trainer.train_step()
    dist.barrier()
    before = current_rss_gb()
    row: dict[str, Any] = {}

    def state() -> tuple[Any, ...]:
        return (trainer.model, trainer.optimizer, trainer.scheduler, trainer.train_state())

    def save(name: str, async_save: bool, saves: int) -> list[tuple[float, float, float, float]]:
        ck = dataclasses.replace(cfg.checkpoint, async_save=async_save)
        saver = Checkpointer(out / name, ck)
        times = []
        for _ in range(saves):
            dist.barrier()
            saver.save(*state(), cfg.to_dict())
            blocked, plan, stage = saver.last_blocked_s, saver.last_plan_s, saver.last_stage_s
            saver.finalize(blocking=True)
            times.append((blocked, plan, stage, saver.last_write_s or 0.0))
            trainer.step += 1  # the next save is another iteration of the same structure
        saver.close()
        return times

    def median(rows: list[tuple[float, ...]]) -> tuple[float, ...]:
        return tuple(statistics.median(column) for column in zip(*rows))

    # The first save of a run also pays one-off costs (the write-results manager
    # process, validation of the sharding, planning), which the row reports apart; the
    # later ones (the steady state of a run) are reported by their median.
    first_sync, *sync = save("sync", False, 1 + SYNC_SAVES)
    row["sync_s"], row["sync_first_s"] = median(sync)[0], first_sync[0]
    first, *steady = save("async", True, 1 + ASYNC_SAVES)
    blocked, plan, stage, write = median(steady)
    row.update(
        async_first_blocked_s=first[0],
        async_blocked_s=blocked,
        async_blocked_max_s=max(t[0] for t in steady),
        plan_s=plan,
        stage_s=stage,
        write_s=write,
    )
    row["rss_rise_save_gb"] = rss_gb() - before
    iteration = trainer.step - 1
    size = dir_bytes(iteration_dir(out / "async", iteration)) if rank == 0 else 0
    box = [size]
    dist.broadcast_object_list(box, src=0)
    size = box[0]
    row["checkpoint_gb"] = size / 1e9
    row.update(train_during_write(trainer, cfg, out / "overlap", state))
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


def train_during_write(trainer: Any, cfg: Any, root: Path, state: Any) -> dict[str, Any]:
    """An async save while training goes on, as in a run: training steps (which rewrite
    every parameter and optimizer state) until every rank has written. Measures the
    extra physical memory of the rank and its writers over the same state idle (one step
    taken just before, so that a step's own buffers are in both), sampled every 50 ms
    from the end of the save until the writers are done."""
    import threading

    import torch.distributed as dist

    from megatron_forge.checkpointing import Checkpointer

    saver = Checkpointer(root, dataclasses.replace(cfg.checkpoint, async_save=True))
    for _ in range(2):  # the second save is a steady one (cached plan), as measured above
        trainer.train_step()
        dist.barrier()
        idle = group_pss_gb()
        saver.save(*state(), cfg.to_dict())
        # (a thread only once the writer is forked: a fork must not copy a thread's locks)
        samples, done = [group_pss_gb()], threading.Event()
        sampler = threading.Thread(target=_sample, args=(samples, done), daemon=True)
        sampler.start()
        steps = 0
        while saver.pending_iteration is not None and steps < MAX_OVERLAP_STEPS:
            trainer.train_step()
            steps += 1
            saver.finalize(blocking=False)  # all ranks together: they agree when done
        saver.finalize(blocking=True)
        done.set()
        sampler.join()
    saver.close()
    return {"overlap_steps": steps, "overlap_mem_rise_gb": max(samples) - idle}


def _sample(samples: list[float], done: Any) -> None:
    while not done.wait(0.05):
        samples.append(group_pss_gb())


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
        "rss_rise_save_gb": [r["rss_rise_save_gb"] for r in ranks],
        "share_gb": gb / WORLD,
        "overlap_steps": min(r["overlap_steps"] for r in ranks),
        "overlap_mem_rise_gb": [r["overlap_mem_rise_gb"] for r in ranks],
    }


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['layout'].upper()}=2  {row['checkpoint_gb']:.2f} GB: "
        f"sync save {row['sync_s']:.2f} s (first {row['sync_first_s']:.2f} s); async blocked {row['async_blocked_s']:.3f} s "
        f"(first save {row['async_first_blocked_s']:.3f} s, slowest steady save "
        f"{row['async_blocked_max_s']:.3f} s), {row['blocked_ratio'] * 100:.1f}% of sync "
        f"[plan {row['plan_s']:.3f} s, stage {row['stage_s']:.3f} s]; "
        f"background write {row['write_s']:.2f} s = {row['write_gbps']:.2f} GB/s, "
        f"{row['write_vs_disk'] * 100:.0f}% of the disk's {row['disk_gbps']:.2f} GB/s "
        f"(write+fsync, 2 writers); load {row['load_s']:.2f} s; peak RSS per rank "
        + ", ".join(f"{p:.2f}" for p in row["peak_rss_gb"])
        + " GB (rise "
        + ", ".join(f"{p:.2f}" for p in row["rss_rise_gb"])
        + " GB; over the saves "
        + ", ".join(f"{p:.2f}" for p in row["rss_rise_save_gb"])
        + f" GB); training {row['overlap_steps']} steps during a background write: "
        "memory of each rank and its writers +"
        + ", ".join(f"{p:.2f}" for p in row["overlap_mem_rise_gb"])
        + f" GB (rank's share of the checkpoint {row['share_gb']:.2f} GB)",
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
