"""Resume checkpoints across trainers: Megatron-LM's own ``pretrain_gpt.py`` and ours, on CPU,
with the same model, data and hyper-parameters, both directions.

    pip install --target /tmp/mlm_deps six triton    # imported by Megatron-LM's training code
    git clone -b core_v0.16.1 https://github.com/NVIDIA/Megatron-LM /tmp/Megatron-LM
    python tools/megatron_lm_interop.py --megatron-lm /tmp/Megatron-LM --deps /tmp/mlm_deps

Megatron-LM's training package (``megatron/training``, ``pretrain_gpt.py``) is not on PyPI,
so this is not part of the test suite; use a checkout at the tag that matches the installed
megatron-core (core_v0.16.1). Its ``megatron/core`` is not used: both trainers run the
installed megatron-core. Four runs on ``--nprocs`` gloo ranks (synthetic tokens, so no
tokenizer question arises; ``configs/tiny.yaml`` by default):

1. ours: steps 1-20, saving at step 10;
2. Megatron-LM: steps 1-20, saving at step 10 (its flags: :func:`megatron_lm_flags`);
3. ours, resuming Megatron-LM's iteration 10: steps 11-20;
4. Megatron-LM, resuming our iteration 10 (``--ckpt-step 10``): steps 11-20.

Printed: loss, grad norm and learning rate of steps 11-20 for each direction (the run that
resumed the other trainer's checkpoint against that trainer's own run), and the largest
relative differences; the exit status is 1 when one exceeds ``--tolerance``.

Megatron-LM on CPU: it runs under our CPU emulation (:mod:`megatron_forge.cpu`) with four
adjustments made here, in its process only, each for a step that needs a GPU and has
nothing to do on CPU: ``initialize_megatron(allow_no_cuda=True)`` (it asserts CUDA);
``torch.cuda.device_count()`` answers 1 (below 1 it skips initializing model parallelism
and seeding the model-parallel RNG tracker); the dataset helpers are not rebuilt (the
installed megatron-core ships them compiled; the build needs the source tree's Makefile);
the legacy fused kernels are not compiled (nvcc; the fusions are off). And one for
megatron-core's distributed optimizer over torch's Adam (no TE or apex, as on CPU), which
cannot load any checkpoint into a fresh optimizer (``DistributedOptimizer.state_dict``
asserts on Adam's missing 'step') and then shares one 'step' tensor among all parameters
(bias correction goes wrong from the first step): the fixes our loader applies on that
path (:func:`~megatron_forge.checkpointing.state.prepare_optimizer_for_load`,
:func:`~megatron_forge.checkpointing.state.untie_adam_steps`) wrap its methods, since
Megatron-LM's ``load_checkpoint`` calls them directly. On GPUs with TE or apex, Megatron-LM
needs none of this.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
SAVE_AT = 10
TRAIN_ITERS = 20
MOCK = ["data.format=mock", "data.tokenizer=null", "data.blend=[]"]
"""Synthetic tokens on both sides: megatron-core's MockGPTDataset, its NullTokenizer."""
DECAY_STYLES = {
    "cosine": "cosine",
    "linear": "linear",
    "constant": "constant",
    "wsd": "WSD",
    "inverse-square-root": "inverse-square-root",
}
WSD_STYLES = {
    "linear": "linear",
    "cosine": "cosine",
    "1-sqrt": "minus_sqrt",
    "exponential": "exponential",
}
CPU_FLAGS = [
    # Megatron-LM's local (non-TE) layers with its fusions off: the unfused math our CPU
    # runs use (megatron-core's local spec, unfused softmax, torch norms).
    "--transformer-impl", "local",
    "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion",
    "--no-masked-softmax-fusion",
    "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion",
    "--no-rope-fusion",
    "--distributed-backend", "gloo",
]  # fmt: skip


class Unsupported(ValueError):
    """A config field this comparison has no Megatron-LM flag for."""


def megatron_lm_flags(cfg: Any) -> list[str]:
    """Megatron-LM ``pretrain_gpt.py`` arguments that build and train the same model as
    ``cfg`` (a resolved :class:`~megatron_forge.config.Config` of a Llama-family model on
    synthetic tokens): architecture, vocabulary, batch, schedule, optimizer, layout, and
    how both trainers compute (per-token loss, distributed optimizer, torch_dist, the
    unfused CPU path). Raises :class:`Unsupported` naming a field it cannot translate."""
    m, t, p, d = cfg.model, cfg.train, cfg.parallel, cfg.data
    if m.family != "llama":
        raise Unsupported(f"model.family={m.family}: this comparison covers llama only")
    for name in ("rope_scaling", "num_experts", "mtp_num_layers"):
        if getattr(m, name) is not None:
            raise Unsupported(f"model.{name} is set: this comparison covers dense Llama only")
    if d.format != "mock" or m.vocab_size is None:
        raise Unsupported("data.format=mock with model.vocab_size is needed (synthetic tokens)")
    if p.context != 1 or p.expert != 1 or p.virtual_pipeline is not None:
        raise Unsupported("parallel.context/expert/virtual_pipeline must be left unset")
    if cfg.precision.params_dtype == "fp16":
        raise Unsupported("precision.params_dtype=fp16 has no loss-scaling twin here")
    if t.rampup_batch_size is not None:
        raise Unsupported("train.rampup_batch_size is not translated")
    heads = m.num_attention_heads
    flags = [
        "--num-layers", m.num_layers,
        "--hidden-size", m.hidden_size,
        "--ffn-hidden-size", m.ffn_hidden_size or 4 * m.hidden_size,
        "--num-attention-heads", heads,
        "--seq-length", m.seq_length,
        "--max-position-embeddings", m.max_position_embeddings or m.seq_length,
        "--position-embedding-type", "rope",
        "--rotary-base", _number(m.rotary_base),
        "--normalization", "RMSNorm",
        "--norm-epsilon", _number(m.norm_epsilon),
        "--swiglu",
        "--disable-bias-linear",
        "--attention-dropout", 0,
        "--hidden-dropout", 0,
        "--init-method-std", _number(m.init_method_std),
        # NullTokenizer(n) has n + 1 ids (the last one end-of-document), as ours builds it.
        "--mock-data",
        "--tokenizer-type", "NullTokenizer",
        "--vocab-size", m.vocab_size - 1,
        "--make-vocab-size-divisible-by", m.make_vocab_size_divisible_by,
        "--split", d.split,
        "--seed", t.seed,
        "--micro-batch-size", t.micro_batch_size,
        "--global-batch-size", t.global_batch_size,
        "--train-iters", t.train_iters,
        "--lr", _number(t.lr),
        "--min-lr", _number(t.min_lr),
        "--lr-warmup-iters", t.warmup_iters,
        "--lr-decay-style", DECAY_STYLES[t.decay_style],
        "--weight-decay", _number(t.weight_decay),
        "--clip-grad", _number(t.clip_grad),
        "--adam-beta1", _number(t.adam_beta1),
        "--adam-beta2", _number(t.adam_beta2),
        "--adam-eps", _number(t.adam_eps),
        "--tensor-model-parallel-size", p.tensor,
        "--pipeline-model-parallel-size", p.pipeline,
        "--use-distributed-optimizer",
        "--calculate-per-token-loss",
        "--ckpt-format", "torch_dist",
        "--eval-iters", 0,
        "--eval-interval", t.train_iters + 1,
        *CPU_FLAGS,
    ]  # fmt: skip
    if m.num_query_groups is not None and m.num_query_groups != heads:
        flags += ["--group-query-attention", "--num-query-groups", m.num_query_groups]
    if m.head_dim is not None:
        flags += ["--kv-channels", m.head_dim]
    if m.qk_layernorm:
        flags.append("--qk-layernorm")
    if m.untie_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if t.decay_iters is not None:
        flags += ["--lr-decay-iters", t.decay_iters]
    if t.decay_style == "wsd":
        flags += ["--lr-wsd-decay-style", WSD_STYLES[t.wsd_decay_style]]
        if t.wsd_decay_iters is not None:
            flags += ["--lr-wsd-decay-iters", t.wsd_decay_iters]
    if cfg.precision.params_dtype == "bf16":
        flags.append("--bf16")
    if p.sequence_parallel:
        flags.append("--sequence-parallel")
    if cfg.checkpoint.optimizer_format == "fully_reshardable":
        flags.append("--dist-ckpt-optim-fully-reshardable")
    return [str(flag) for flag in flags]


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


# ---------------------------------------------------------------------------------------
# Megatron-LM's pretrain_gpt.py in this process (the --pretrain-gpt mode)


def run_pretrain_gpt(checkout: Path, argv: list[str]) -> None:
    """Megatron-LM's ``pretrain_gpt.py`` with ``argv``, on CPU (see the module docstring)."""
    import torch

    from megatron_forge import cpu

    cpu.install()
    sys.path.append(str(checkout))  # megatron.training, gpt_builders, model_provider
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *args, **kwargs: None
    try:
        import megatron.core.datasets.utils as dataset_utils
        import megatron.legacy.fused_kernels as fused_kernels
        import megatron.training.training as training
    except ModuleNotFoundError as err:
        raise SystemExit(
            f"Megatron-LM's training package ({checkout}) imports {err.name}, which "
            f"megatron-forge does not install: pip install --target <dir> {err.name} (and "
            "six, triton), then pass --deps <dir>"
        ) from None
    _fill_torch_adam_load_gaps()
    dataset_utils.compile_helpers = lambda: None
    fused_kernels.load = lambda args: None
    training.initialize_megatron = functools.partial(
        training.initialize_megatron, allow_no_cuda=True
    )
    script = checkout / "pretrain_gpt.py"
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


def _fill_torch_adam_load_gaps() -> None:
    """Our loader's fixes of megatron-core 0.16.1's torch-Adam path, around the
    distributed optimizer's own methods (see the module docstring)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from megatron_forge.checkpointing.state import prepare_optimizer_for_load, untie_adam_steps

    sharded_state_dict = DistributedOptimizer.sharded_state_dict
    load_state_dict = DistributedOptimizer.load_state_dict

    def sharded_for_load(
        self: Any, model_state: Any, is_loading: bool = False, *args: Any, **kwargs: Any
    ) -> Any:
        if is_loading:
            prepare_optimizer_for_load(self)
        return sharded_state_dict(self, model_state, is_loading, *args, **kwargs)

    def load_untied(self: Any, state_dict: Any) -> None:
        load_state_dict(self, state_dict)
        untie_adam_steps(self)

    DistributedOptimizer.sharded_state_dict = sharded_for_load
    DistributedOptimizer.load_state_dict = load_untied


# ---------------------------------------------------------------------------------------
# The four runs


def _launch(nprocs: int, module_args: list[str], env: dict[str, str], log: Path) -> None:
    from megatron_forge.utils import free_port

    cmd = [sys.executable]
    if nprocs > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nprocs}"]
    else:
        env = {**env, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd += module_args
    print(f"$ {' '.join(cmd)}  > {log}", flush=True)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"run failed ({proc.returncode}), see {log}:\n{tail}")


def _env(deps: Optional[Path]) -> dict[str, str]:
    # One OpenMP thread: both trainers fork checkpoint writers, and a fork taken after
    # OpenMP ran can hang in the child's first parallel copy (GNU libgomp is not fork-safe).
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if deps is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(deps), env.get("PYTHONPATH")]))
    return env


def run_ours(
    config: str, overrides: list[str], run_dir: Path, nprocs: int, env: dict[str, str]
) -> None:
    args = ["-m", "megatron_forge.train", "--config", config, *overrides]
    _launch(nprocs, [*args, f"logging.dir={run_dir}"], env, run_dir.with_suffix(".log"))


def run_megatron_lm(
    checkout: Path, flags: list[str], run_dir: Path, nprocs: int, env: dict[str, str]
) -> None:
    args = [str(Path(__file__).resolve()), "--pretrain-gpt", str(checkout), "--"]
    flags = [*flags, "--tensorboard-dir", str(run_dir / "tb"), "--log-interval", "1"]
    _launch(nprocs, [*args, *flags], env, run_dir.with_suffix(".log"))


def read_ours(run_dir: Path) -> dict[int, tuple[float, float, float]]:
    """(loss, grad norm, lr) by step, from our metrics.jsonl."""
    rows = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record and "grad_norm" in record and "event" not in record:
            rows[int(record["step"])] = (record["loss"], record["grad_norm"], record["lr"])
    return rows


def read_megatron_lm(run_dir: Path) -> dict[int, tuple[float, float, float]]:
    """(loss, grad norm, lr) by iteration, from Megatron-LM's TensorBoard scalars (its
    console line rounds the grad norm to 3 decimals)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    series = [
        {s.step: s.value for s in events.Scalars(tag)}
        for tag in ("lm loss", "grad-norm", "learning-rate")
    ]
    return {step: tuple(s[step] for s in series) for step in sorted(series[0])}


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(
    reference: dict[int, tuple], resumed: dict[int, tuple], steps: range
) -> tuple[list[str], list[float]]:
    """Table lines for ``steps`` and the largest relative differences (loss, grad norm,
    lr) of ``resumed`` against ``reference``."""
    lines, worst = [], [0.0, 0.0, 0.0]
    for step in steps:
        ref, got = reference.get(step), resumed.get(step)
        if ref is None or got is None:
            lines.append(f"{step:>4}  missing in {'reference' if ref is None else 'resumed'}")
            worst = [math.inf] * 3
            continue
        diffs = [relative(g, r) for g, r in zip(got, ref)]
        worst = [max(w, d) for w, d in zip(worst, diffs)]
        cells = "  ".join(f"{r:.7f} {g:.7f} {d:8.1e}" for r, g, d in zip(ref, got, diffs))
        lines.append(f"{step:>4}  {cells}")
    return lines, worst


def our_overrides(extra: list[str]) -> list[str]:
    """Overrides of the config for our runs (and the flags' source): synthetic tokens, 20
    steps each logged, no load and no save (the runs add theirs), saves synchronous and
    every 10 steps, fp32; ``extra`` last."""
    vocab = (
        [] if any(s.startswith("model.vocab_size=") for s in extra) else ["model.vocab_size=2048"]
    )
    return [
        *MOCK,
        *vocab,
        f"train.train_iters={TRAIN_ITERS}",
        "train.eval_interval=0",
        "logging.log_interval=1",
        "precision.params_dtype=fp32",
        "checkpoint.load=null",
        "checkpoint.save=null",
        f"checkpoint.save_interval={SAVE_AT}",
        "checkpoint.async_save=false",
        *extra,
    ]


def run_both_directions(
    checkout: Path, config: str, overrides: list[str], flags: list[str], out: Path, nprocs: int,
    env: dict[str, str],
) -> dict[str, Path]:  # fmt: skip
    """The four runs; their directories by name."""
    dirs = {
        name: out / name
        for name in ("ours", "megatron_lm", "ours_from_megatron_lm", "megatron_lm_from_ours")
    }
    ours, mlm = dirs["ours"], dirs["megatron_lm"]
    run_ours(config, [*overrides, f"checkpoint.save={ours}/ckpt"], ours, nprocs, env)
    save = ["--save", f"{mlm}/ckpt", "--save-interval", str(SAVE_AT)]
    run_megatron_lm(checkout, [*flags, *save], mlm, nprocs, env)
    resume = [f"checkpoint.load={mlm}/ckpt", f"checkpoint.load_iteration={SAVE_AT}"]
    run_ours(config, [*overrides, *resume], dirs["ours_from_megatron_lm"], nprocs, env)
    load = ["--load", f"{ours}/ckpt", "--ckpt-step", str(SAVE_AT)]
    run_megatron_lm(checkout, [*flags, *load], dirs["megatron_lm_from_ours"], nprocs, env)
    return dirs


def report(dirs: dict[str, Path], tolerance: float) -> int:
    """Print both directions' steps 11-20 and their largest differences; 0 when every one
    is within ``tolerance``, else 1."""
    ours, mlm = read_ours(dirs["ours"]), read_megatron_lm(dirs["megatron_lm"])
    directions = (
        ("Megatron-LM's checkpoint: Megatron-LM's own run (ref) / ours resumed", mlm,
         read_ours(dirs["ours_from_megatron_lm"])),
        ("our checkpoint: our own run (ref) / Megatron-LM resumed", ours,
         read_megatron_lm(dirs["megatron_lm_from_ours"])),
    )  # fmt: skip
    steps = range(SAVE_AT + 1, TRAIN_ITERS + 1)
    columns = "  ".join(f"{q:>10} ref / resumed / rel" for q in ("loss", "grad norm", "lr"))
    worst_all = 0.0
    for title, reference, resumed in directions:
        lines, worst = compare(reference, resumed, steps)
        print(f"\n{title}, steps {steps.start}-{steps.stop - 1}\nstep  {columns}", *lines, sep="\n")
        loss, grad, lr = worst
        print(f"max relative difference: loss {loss:.1e}, grad norm {grad:.1e}, lr {lr:.1e}")
        worst_all = max(worst_all, *worst)
    first = compare(mlm, ours, range(1, SAVE_AT + 1))[1][0]
    print(
        f"\n(steps 1-{SAVE_AT}, each from its own initialisation: loss differs by up to {first:.1e})"
    )
    print(f"largest relative difference after a resume: {worst_all:.1e} (tolerance {tolerance:g})")
    return 0 if worst_all <= tolerance else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megatron-lm", type=Path, required=True, help="Megatron-LM checkout")
    parser.add_argument("--deps", type=Path, help="directory added to Megatron-LM's PYTHONPATH")
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--set", nargs="*", default=[], help="overrides of the config")
    parser.add_argument("--nprocs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/megatron_lm_interop"))
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args(argv)
    from megatron_forge.config import load_config

    checkout, out = args.megatron_lm.resolve(), args.out.resolve()
    if not (checkout / "pretrain_gpt.py").is_file():
        parser.error(f"--megatron-lm {checkout} has no pretrain_gpt.py: give a checkout")
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out} is not empty: give a new directory (or remove that one)")
    overrides = our_overrides(args.set)
    try:
        flags = megatron_lm_flags(load_config(args.config, overrides))
    except Unsupported as err:
        parser.error(str(err))
    out.mkdir(parents=True, exist_ok=True)
    env = _env(args.deps.resolve() if args.deps else None)
    dirs = run_both_directions(checkout, args.config, overrides, flags, out, args.nprocs, env)
    return report(dirs, args.tolerance)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--pretrain-gpt":
        rest = sys.argv[3:]
        run_pretrain_gpt(Path(sys.argv[2]), rest[1:] if rest[:1] == ["--"] else rest)
    else:
        sys.exit(main())
