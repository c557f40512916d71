"""launch/submit.py without Slurm: flag and override merging, validation before submitting,
the dry-run plan, the submitted callable, and a real --local run of the tiny config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from launch import submit
from megatron_forge.config import ConfigError, load_config
from tests.conftest import data_overrides, read_metrics

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs/tiny.yaml")
LLAMA_7B = str(REPO / "configs/llama_7b.yaml")


def resolved(argv: list[str]):
    args = submit.parse_args(argv)
    return args, load_config(args.config, submit.config_overrides(args))


def test_flags_override_the_launch_section_and_trailing_overrides() -> None:
    args, cfg = resolved(
        ["--config", TINY, "launch.nodes=2", "--nodes", "4", "train.lr=1e-2",
         "--partition", "gpu", "--time", "1-00:00:00", "--", "launch.qos=high"]
    )  # fmt: skip
    assert cfg.launch.nodes == 4  # the flag wins over launch.nodes=2
    assert cfg.launch.partition == "gpu" and cfg.launch.qos == "high"
    assert cfg.launch.time == "1-00:00:00"
    assert cfg.train.lr == 1e-2
    assert cfg.launch.gpus_per_node == 8  # untouched default
    assert args.overrides == ["launch.nodes=2", "train.lr=1e-2", "launch.qos=high"]


def test_config_launch_section_is_the_default() -> None:
    _, cfg = resolved(["--config", str(REPO / "configs/llama_70b.yaml")])
    assert (cfg.launch.nodes, cfg.launch.gpus_per_node, cfg.launch.job_name) == (
        64, 8, "llama_70b",
    )  # fmt: skip


def test_time_flag_is_not_read_as_a_yaml_number() -> None:
    _, cfg = resolved(["--config", TINY, "--time", "4:00:00", "--job-name", "007"])
    assert cfg.launch.time == "4:00:00" and cfg.launch.job_name == "007"
    assert submit.time_minutes(cfg.launch.time) == 240


@pytest.mark.parametrize(
    "limit,minutes",
    [("30", 30), ("90:30", 91), ("04:00:00", 240), ("1-00", 1440), ("2-01:30", 2970),
     ("0-00:00:30", 1)],
)  # fmt: skip
def test_time_limits_in_minutes(limit: str, minutes: int) -> None:
    assert submit.time_minutes(limit) == minutes


def test_bad_time_limit_names_the_field() -> None:
    with pytest.raises(ConfigError, match="launch.time"):
        submit.time_minutes("4h")


def test_slurm_parameters() -> None:
    _, cfg = resolved(
        ["--config", TINY, "--nodes", "2", "--gpus-per-node", "4", "--account", "proj",
         "--constraint", "h100", "launch.container_image=nvcr.io/nvidia/pytorch:25.01-py3"]
    )  # fmt: skip
    params = submit.slurm_parameters(cfg.launch, gpus=True, workdir=Path("/work/x"))
    assert params["nodes"] == 2 and params["ntasks_per_node"] == 4
    assert params["gpus_per_node"] == 4
    assert params["signal_delay_s"] == 120 and params["additional_parameters"] == {"requeue": True}
    assert params["account"] == "proj" and params["constraint"] == "h100"
    assert "partition" not in params and "qos" not in params  # unset: the cluster default
    assert params["time"] == 240
    assert "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in params["srun_args"]
    assert "--container-workdir=/work/x" in params["srun_args"]
    no_gpus = submit.slurm_parameters(cfg.launch, gpus=False, workdir=Path("/x"))
    assert "gpus_per_node" not in no_gpus and no_gpus["ntasks_per_node"] == 4


def test_torch_distributed_env_from_submitit() -> None:
    env = SimpleNamespace(
        global_rank=5, num_tasks=16, local_rank=1, num_nodes=2,
        hostnames=["gpu007", "gpu008"], raw_job_id="4242",
    )  # fmt: skip
    assert submit.torch_distributed_env(env) == {
        "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu007", "MASTER_PORT": str(20000 + 4242),
    }  # fmt: skip
    one_node = SimpleNamespace(**{**vars(env), "num_nodes": 1})
    assert submit.torch_distributed_env(one_node)["MASTER_ADDR"] == "127.0.0.1"


def test_checkpoint_requeues_the_same_job() -> None:
    job = submit.TrainJob(TINY, ["train.lr=1e-4"], str(REPO), num_threads=1)
    delayed = job.checkpoint()
    assert delayed.function is job and delayed.args == () and delayed.kwargs == {}


def test_bad_layout_is_refused_before_submitting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", TINY, "--nodes", "1", "--gpus-per-node", "3", "parallel.tensor=2"]
    assert submit.main(argv + ["--log-dir", str(tmp_path / "logs")]) == 2
    err = capsys.readouterr().err
    assert "world size 3 is not divisible by parallel.tensor" in err
    assert "nothing submitted" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--config", "configs/missing.yaml"], "config file configs/missing.yaml does not exist"),
        (["--config", TINY, "train.lr=oops"], "train.lr='oops' must be a number"),
        (["--config", TINY, "model.family=gpt"], "model.family='gpt' is not a registered family"),
        (["--config", TINY, "--gpus-per-node", "2", "--time", "soon"], "launch.time='soon'"),
        # this CPU machine: llama_70b's sequence parallelism needs TE's layer spec
        (["--config", str(REPO / "configs/llama_70b.yaml"), "--local"], "needs Transformer Engine"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert submit.main(argv + ["--log-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_dry_run_prints_config_layout_and_sbatch_script(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", LLAMA_7B, "--nodes", "16", "--dry-run", "--log-dir", str(tmp_path)]
    assert submit.main(argv) == 0
    out = capsys.readouterr().out
    assert "hidden_size: 4096" in out  # the resolved config
    assert "world=128 (16 nodes x 8) TP=1 PP=1 CP=1 EP=1 DP=128 microbatches=8" in out
    assert "memory: 56.0 GB/GPU" in out
    for line in [
        "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --nodes=16",
        "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --time=240",
        "#SBATCH --cpus-per-task=8", "#SBATCH --open-mode=append",
    ]:  # fmt: skip
        assert line in out.splitlines(), line
    assert "srun --unbuffered" in out and "-m submitit.core._submit" in out
    assert not any(tmp_path.iterdir())  # nothing written, nothing submitted


def test_dry_run_on_cpu_nodes_asks_for_no_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--config", TINY, "--cpu", "--gpus-per-node", "2", "--partition", "debug"]
    assert submit.main(argv + ["--dry-run", "launch.signal_delay_s=60"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=2" in out and "#SBATCH --partition=debug" in out
    assert "#SBATCH --signal=USR2@60" in out and "gpus" not in out.split("# sbatch")[1]


@pytest.mark.slow
def test_local_run_trains(sample_data: Path, tmp_path: Path) -> None:
    """The same path as a Slurm job, with submitit's LocalExecutor: 2 ranks here."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "launch/submit.py", "--local", "--nodes", "1", "--gpus-per-node", "2",
        "--config", "configs/tiny.yaml", "--wait", "--log-dir", str(tmp_path / "logs"), "--",
        *data_overrides(sample_data), "train.train_iters=3", "train.eval_interval=0",
        "logging.log_interval=1", f"logging.dir={run_dir}",
        "checkpoint.save=null", "checkpoint.load=null",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted job" in proc.stdout and "locally (2 tasks)" in proc.stdout
    assert "iteration        3/       3" in proc.stdout  # rank 0's log, followed
    assert proc.stdout.strip().endswith("COMPLETED")
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_submitted_message_has_job_id_logs_and_wandb_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args, cfg = resolved(
        ["--config", TINY, "logging.wandb_project=forge", "logging.wandb_mode=offline"]
    )
    paths = SimpleNamespace(
        stdout=Path("/l/42/42_0_log.out"), stderr=Path("/l/42/42_0_log.err"), folder=Path("/l/42")
    )
    submit.print_submitted(cfg, SimpleNamespace(job_id="42", paths=paths), args)
    out = capsys.readouterr().out
    assert "submitted job 42 to Slurm" in out and "/l/42/42_0_log.out" in out
    assert "scancel 42" in out
    assert "https://wandb.ai/<entity>/forge" in out and "wandb sync runs/tiny/wandb" in out


def test_without_config_the_flagship_recipe_of_the_sbatch_script_is_used(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README's `python launch/submit.py --nodes 16`: the config slurm/pretrain_7b.sh
    trains, read from the script, and a line that says so."""
    assert submit.flagship_config() == REPO / "configs/llama_7b.yaml"
    assert submit.main(["--nodes", "16", "--dry-run", "--log-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"no --config: using {os.path.relpath(LLAMA_7B)}, the "
        "flagship recipe that sbatch slurm/pretrain_7b.sh runs"
    ]
    assert "world=128 (16 nodes x 8) TP=1 PP=1 CP=1 EP=1 DP=128" in captured.out


def test_a_script_without_a_train_command_is_a_clear_error(tmp_path: Path) -> None:
    script = tmp_path / "other.sh"
    script.write_text("#!/bin/bash\nsrun python -m something_else\n")
    with pytest.raises(ConfigError, match=r"other.sh has no 'megatron_forge.train --config"):
        submit.flagship_config(str(script))


def test_every_flag_has_help_text() -> None:
    parser_actions = submit.build_parser()._actions
    missing = [a.option_strings or a.dest for a in parser_actions if not a.help]
    assert missing == []
