"""Submit a pretraining job to Slurm through submitit, or run it on this machine.

    python launch/submit.py --nodes 16 [section.key=value ...]   # the flagship recipe
    python launch/submit.py --config configs/llama_7b.yaml --nodes 16 [section.key=value ...]
    python launch/submit.py --config configs/llama_7b.yaml --nodes 16 --dry-run
    python launch/submit.py --config configs/tiny.yaml --local --gpus-per-node 2 --wait

Without ``--config`` it runs the flagship recipe, the config that
``sbatch slurm/pretrain_7b.sh`` trains (read from that script), and says so.
Flags override the config's ``launch`` section; trailing ``section.key=value`` arguments
(also after ``--``) override any field. The config is validated against nodes x
gpus-per-node before anything is submitted. Every task of the job runs
``megatron_forge.train.main`` (one process per GPU, or per CPU rank with ``--local`` /
``--cpu``), with torch.distributed's variables taken from ``submitit.JobEnvironment``.

Preemption and the time limit: Slurm sends USR2 ``launch.signal_delay_s`` seconds ahead
(``--signal``); the training processes save a checkpoint on every rank, rank 0 requeues
the job and the requeued job resumes from ``checkpoint.load``. The pickled :class:`TrainJob`
holds only the config path and overrides, never training state.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import submitit

from megatron_forge.config import (
    Config,
    ConfigError,
    LaunchConfig,
    load_config,
    validate_for_world,
)
from megatron_forge.errors import ForgeError

# Flags that map onto the launch section: flag dest -> LaunchConfig field.
LAUNCH_FLAGS = {
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "cpus_per_task": "cpus_per_task",
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "time": "time",
    "job_name": "job_name",
    "constraint": "constraint",
}
REPO = Path(__file__).resolve().parents[1]
FLAGSHIP_SCRIPT = "slurm/pretrain_7b.sh"
"""The sbatch script whose config is the default: one source of truth for the recipe."""
FINAL_SLURM_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--config",
        help=f"YAML config file (default: the flagship recipe, the config {FLAGSHIP_SCRIPT} "
        "trains)",
    )
    parser.add_argument(
        "--nodes", type=int, help="number of nodes (default: the config's launch.nodes)"
    )
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        help="tasks per node, one per GPU (default: launch.gpus_per_node)",
    )
    parser.add_argument(
        "--cpus-per-task",
        type=int,
        help="CPU cores per task, for data workers and threads (default: launch.cpus_per_task)",
    )
    parser.add_argument("--partition", help="Slurm partition (sbatch --partition)")
    parser.add_argument("--account", help="Slurm account to charge (sbatch --account)")
    parser.add_argument("--qos", help="Slurm quality of service (sbatch --qos)")
    parser.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS (default: launch.time)")
    parser.add_argument("--job-name", help="Slurm job name (default: launch.job_name)")
    parser.add_argument(
        "--constraint", help="node features to require (sbatch --constraint, e.g. h100)"
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="run nodes x gpus-per-node processes on this machine (submitit's LocalExecutor)",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="the Slurm nodes have no GPUs: ask for none, run gpus-per-node CPU ranks a node",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print config, layout and sbatch script only"
    )
    parser.add_argument(
        "--wait", action="store_true", help="follow the job to its end; exit with its status"
    )
    parser.add_argument(
        "--log-dir", default="logs/submitit", help="submitit folder (default: %(default)s)"
    )
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_intermixed_args(argv)


def flagship_config(script: str = FLAGSHIP_SCRIPT) -> Path:
    """The config that ``sbatch <script>`` trains: the ``--config`` of its
    ``megatron_forge.train`` command, relative to the repo root as the script runs it."""
    path = REPO / script
    match = re.search(r"megatron_forge\.train\s+--config\s+(\S+)", path.read_text())
    if match is None:
        raise ConfigError(
            f"{script} has no 'megatron_forge.train --config FILE' command to take the "
            "default config from; pass --config"
        )
    return REPO / match.group(1).strip("\"'")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """Trailing overrides, then the launch flags that were given (flags win). Flag values
    are JSON-quoted: as bare YAML, ``--time 4:00:00`` would read as the integer 14400."""
    flags = [
        f"launch.{key}={json.dumps(getattr(args, dest))}"
        for dest, key in LAUNCH_FLAGS.items()
        if getattr(args, dest) is not None
    ]
    return list(args.overrides) + flags


def time_minutes(limit: str) -> int:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if not match:
        raise ConfigError(f"launch.time={limit!r} must look like HH:MM:SS or D-HH:MM:SS")
    days, *rest = match.groups()
    parts = [int(x) for x in rest if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = int(days) * 86400 + sum(v * m for v, m in zip(parts, (3600, 60, 1)))
    else:  # MM, MM:SS or HH:MM:SS
        weights = {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]
        seconds = sum(v * m for v, m in zip(parts, weights))
    return max(1, -(-seconds // 60))


def validate_for_target(cfg: Config, args: argparse.Namespace) -> None:
    """Check the model against its family's rules, and the layout against the world the job
    will have, on the hardware that runs it: this machine with --local, else the cluster's
    nodes (GPUs unless --cpu; whether Transformer Engine imports there is checked again by
    the training processes)."""
    from megatron_forge.models import check_model_config

    check_model_config(cfg.model)
    world_size = cfg.launch.world_size
    if args.local:
        validate_for_world(cfg, world_size)
    else:
        validate_for_world(cfg, world_size, cuda_available=not args.cpu, te_available=True)


def slurm_parameters(launch: LaunchConfig, *, gpus: bool, workdir: Path) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch options) for the launch section."""
    params: dict[str, Any] = dict(
        job_name=launch.job_name,
        nodes=launch.nodes,
        ntasks_per_node=launch.gpus_per_node,
        cpus_per_task=launch.cpus_per_task,
        time=time_minutes(launch.time),
        signal_delay_s=launch.signal_delay_s,  # --signal=USR2@<s>: save and requeue
        additional_parameters={"requeue": True},
    )
    if gpus:
        params["gpus_per_node"] = launch.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key):
            params[key] = getattr(launch, key)
    if launch.container_image:  # pyxis/enroot: the checkout (and logs) mounted at one path
        params["srun_args"] = [
            f"--container-image={launch.container_image}",
            f"--container-mounts={workdir}:{workdir}",
            f"--container-workdir={workdir}",
        ]
    return params


def local_parameters(launch: LaunchConfig, *, num_gpus: int) -> dict[str, Any]:
    """submitit LocalExecutor parameters: all ranks on this machine."""
    return dict(
        nodes=1,
        tasks_per_node=launch.world_size,
        gpus_per_node=num_gpus,  # 0 hides GPUs (CUDA_VISIBLE_DEVICES="")
        timeout_min=time_minutes(launch.time),
        signal_delay_s=launch.signal_delay_s,
    )


class _SlurmScriptWriter(submitit.SlurmExecutor):
    """A SlurmExecutor that only renders the sbatch script, so --dry-run works on a
    machine without Slurm (the real one refuses to start where srun is missing)."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def build_executor(
    cfg: Config, args: argparse.Namespace, workdir: Path
) -> submitit.SlurmExecutor | submitit.LocalExecutor:
    folder = Path(args.log_dir).expanduser().absolute() / "%j"
    launch = cfg.launch
    if args.local:
        import torch

        num_gpus = min(launch.world_size, torch.cuda.device_count())
        executor: Any = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(**local_parameters(launch, num_gpus=num_gpus))
        return executor
    # Inside a container the image's python runs the job, not this one.
    python = "python" if launch.container_image else None
    cls = _SlurmScriptWriter if args.dry_run else submitit.SlurmExecutor
    try:
        executor = cls(folder=folder, python=python, max_num_timeout=launch.max_requeues)
    except RuntimeError as err:  # submitit finds no srun
        raise ConfigError(f"{err} Use --local or --dry-run.") from None
    gpus = not args.cpu
    executor.update_parameters(**slurm_parameters(launch, gpus=gpus, workdir=workdir))
    return executor


def sbatch_script(executor: submitit.SlurmExecutor) -> str:
    """The sbatch file submitit writes for this executor (its own renderer)."""
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def torch_distributed_env(env: submitit.JobEnvironment) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from submitit's view of the job
    (Slurm or local). The port derives from the job id, so every task agrees on it."""
    from megatron_forge.distributed import port_from_job_id

    master = "127.0.0.1" if env.num_nodes == 1 else env.hostnames[0]
    return {
        "RANK": str(env.global_rank),
        "WORLD_SIZE": str(env.num_tasks),
        "LOCAL_RANK": str(env.local_rank),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port_from_job_id(env.raw_job_id)),
    }


class TrainJob:
    """What every task runs: the training entry point with torch.distributed's env set.

    Pickled at submission with only the config path and overrides, so a requeued job
    builds its state from the checkpoint in ``checkpoint.load``. The job's interpreter (this
    one, or the container's ``python``) imports megatron_forge as installed there; inside a
    container started in the submit directory, ``python -m`` also finds a checkout there.
    """

    def __init__(self, config: str, overrides: list[str], workdir: str, num_threads: int):
        self.config = config
        self.overrides = overrides
        self.workdir = workdir
        self.num_threads = num_threads

    def __call__(self) -> None:
        os.chdir(self.workdir)  # relative paths in the config mean the submit directory
        os.environ.update(torch_distributed_env(submitit.JobEnvironment()))
        os.environ.setdefault("OMP_NUM_THREADS", str(self.num_threads))
        from megatron_forge.train import main

        # Preemption exits from inside main (SystemExit 3) after saving and requeueing.
        status = main(["--config", self.config, *self.overrides])
        if status != 0:
            raise RuntimeError(f"megatron_forge.train exited with status {status}")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """submitit's preemption hook, called on rank 0 only, and only when USR2 arrives
        before training installed its own handler (which saves on every rank). Requeue
        the same job: it resumes from checkpoint.load."""
        return submitit.helpers.DelayedSubmission(self)


def print_plan(cfg: Config, args: argparse.Namespace, executor: Any) -> None:
    world = cfg.launch.world_size
    print(cfg.to_yaml())
    print(
        f"world={world} ({cfg.launch.nodes} nodes x {cfg.launch.gpus_per_node}) "
        f"{cfg.describe_layout(world)}"
    )
    if cfg.model.vocab_size is not None:
        from megatron_forge.memory import estimate_memory

        print(f"memory: {estimate_memory(cfg, world)}")
    if args.local:
        print(f"\nlocal run: {world} processes on this machine (submitit LocalExecutor)")
    else:
        print("\n# sbatch script (submitit):\n" + sbatch_script(executor))


def print_submitted(cfg: Config, job: Any, args: argparse.Namespace) -> None:
    out, err = job.paths.stdout, job.paths.stderr
    where = "locally" if args.local else "to Slurm"
    print(f"submitted job {job.job_id} {where} ({cfg.launch.world_size} tasks)")
    print(f"  log (rank 0): {out}\n  err (rank 0): {err}\n  all logs:     {job.paths.folder}")
    if not args.local:
        print(f"  follow: tail -f {out}    cancel: scancel {job.job_id}")
    lg = cfg.logging
    if lg.wandb_project and lg.wandb_mode == "disabled":
        print(f"  W&B: logging.wandb_mode=disabled; set it to online to log to {lg.wandb_project}")
    elif lg.wandb_project:
        url = f"https://wandb.ai/{lg.wandb_entity or '<entity>'}/{lg.wandb_project}"
        print(f"  W&B ({lg.wandb_mode}): {url}; rank 0's log prints the run URL when it starts")
        if lg.wandb_mode == "offline":
            print(f"  upload offline runs: wandb sync {lg.dir}/wandb/offline-run-*")
    sys.stdout.flush()  # before --wait blocks: a pipe (tee, CI) shows the job id now


def slurm_state(job_id: str) -> tuple[Optional[str], int]:
    """(JobState, exit code) from scontrol, or sacct once the controller forgot the job."""
    proc = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, check=False
    )
    fields = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
    state, exit_code = fields.get("JobState"), fields.get("ExitCode", "0:0")
    if state is None:
        proc = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-o", "State,ExitCode", "-j", job_id],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        line = proc.stdout.strip().splitlines()[:1]
        if proc.returncode != 0 or not line:
            return None, 1
        state, exit_code = line[0].split("|")
        state = state.split()[0]  # "CANCELLED by 0"
    return state, int(exit_code.split(":")[0])


class LogFollower:
    """Prints what was appended to a log file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def print_new(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        if text:
            print(text, end="", flush=True)


def wait_for(job: Any, args: argparse.Namespace, poll_s: float = 2.0) -> int:
    """Follow rank 0's log until the job ends; return 0 if it succeeded."""
    follower = LogFollower(job.paths.stdout)
    unknown = 0
    while True:
        follower.print_new()
        if args.local:
            if job.done():
                break
        else:
            state, exit_code = slurm_state(job.job_id)
            unknown = unknown + 1 if state is None else 0
            if state in FINAL_SLURM_STATES or unknown >= 30:
                break
        time.sleep(poll_s)
    follower.print_new()
    if args.local:
        try:
            job.results()
            state, status = "COMPLETED", 0
        except Exception as err:  # a task failed: submitit re-raises its error
            state, status = "FAILED", 1
            print(f"{type(err).__name__}: {str(err).strip().splitlines()[-1:]}", file=sys.stderr)
    else:
        state = state or "UNKNOWN (scontrol and sacct do not know the job)"
        status = 0 if state == "COMPLETED" else (exit_code or 1)
    if status != 0 and job.paths.stderr.exists():
        tail = job.paths.stderr.read_text().splitlines()[-20:]
        print(f"--- last lines of {job.paths.stderr} ---", *tail, sep="\n", file=sys.stderr)
    print(f"job {job.job_id}: {state}")
    return status


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    workdir = Path.cwd()
    try:
        if args.config is None:
            args.config = str(flagship_config())
            chosen = os.path.relpath(args.config, workdir)
            print(
                f"no --config: using {chosen}, the flagship recipe that sbatch "
                f"{FLAGSHIP_SCRIPT} runs",
                file=sys.stderr,
                flush=True,
            )
        overrides = config_overrides(args)
        cfg = load_config(args.config, overrides)
        validate_for_target(cfg, args)
        executor = build_executor(cfg, args, workdir)
    except ForgeError as err:
        print(f"{err.kind}: {err}; nothing submitted", file=sys.stderr)
        return 2
    if args.dry_run:
        print_plan(cfg, args, executor)
        return 0
    if args.local and cfg.launch.nodes > 1:
        print(f"--local: running all {cfg.launch.world_size} ranks on this one machine")
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // cfg.launch.world_size) if args.local else cfg.launch.cpus_per_task
    train_job = TrainJob(str(Path(args.config).absolute()), overrides, str(workdir), threads)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr
            job = executor.submit(train_job)
    except (submitit.core.utils.FailedJobError, subprocess.SubprocessError, OSError) as err:
        lines = [line for line in str(err).splitlines() if "error" in line.lower()]
        print(f"submission failed: {(lines or [str(err)])[0].strip()}", file=sys.stderr)
        return 1
    print_submitted(cfg, job, args)
    if not args.wait:
        return 0
    try:
        return wait_for(job, args)
    except KeyboardInterrupt:
        cancel = "" if args.local else f"; cancel it with: scancel {job.job_id}"
        print(f"\nstopped following job {job.job_id}; it keeps running{cancel}")
        return 130


if __name__ == "__main__":
    sys.exit(main())
