"""Where a stage runs: in this process, or relaunched as `theworld train` under torchrun or `accelerate launch`.

`train_stage` is the entry point (the CLI and the pipeline call it). One process per GPU (or CPU
processes over gloo). Every rank runs the same trainer; rank 0 alone evaluates, logs and writes,
and writes the stage result the caller reads back. This module imports the trainer, never the reverse.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from theworld_core.config import StageConfig
from theworld_core.training.result import StageResult


def train_stage(cfg: StageConfig, *, accelerate_config: str | None = None, **kwargs) -> StageResult:
    """Train one stage to its end (max steps, epochs or plateau) and return its result.

    With `num_processes` > 1 (or an accelerate config file) the stage is relaunched in that many
    processes, unless this process is already one of them. `kwargs` go to `StageTrainer`: `fresh`,
    `mlflow_run_id`, `global_step_offset` (and `loss_hook`, `evaluate_after` in a single process).
    """
    if (cfg.num_processes > 1 or accelerate_config) and not in_distributed_launch():
        # The post-stage evaluation needs the model in this process: the caller loads the output instead.
        kwargs.pop("evaluate_after", None)
        return run_distributed(cfg, cfg.num_processes, accelerate_config=accelerate_config, **kwargs)
    # Imported here: a launched rank arms die_with_parent before the heavy imports.
    from theworld_core.training.trainer import StageTrainer

    return StageTrainer(cfg, **kwargs).run()


def in_distributed_launch() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return "LOCAL_RANK" in os.environ


def die_with_parent() -> None:
    """Make this process die when its parent does (Linux): torchrun starts ranks in sessions of
    their own, so killing the launcher's process group would otherwise leave the ranks training."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def launch_command(
    config_path: Path, num_processes: int, accelerate_config: str | None, train_args: list[str]
) -> list[str]:
    train = ["-m", "theworld_core.cli", "train", "--config", str(config_path), *train_args]
    if accelerate_config:
        # FSDP / DeepSpeed / multi-GPU settings live in the accelerate config file (configs/accelerate/).
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            accelerate_config,
            "--num_processes",
            str(num_processes),
            *train,
        ]
    # torchrun gives real DDP on GPUs and gloo DDP on CPUs (`accelerate launch --cpu` would silently
    # run a single process).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}", *train]


def run_distributed(
    cfg: StageConfig,
    num_processes: int,
    *,
    accelerate_config: str | None = None,
    fresh: bool = False,
    mlflow_run_id: str | None = None,
    global_step_offset: int = 0,
) -> StageResult:
    """Run one stage in `num_processes` processes and return rank 0's StageResult."""
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for leftover in output_dir.glob(".launch-*"):  # from a launch that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".launch-") as tmp:
        config_path, result_path = Path(tmp) / "stage.json", Path(tmp) / "result.json"
        config_path.write_text(json.dumps(cfg.model_dump(mode="json")))
        args = [
            "--result-file",
            str(result_path),
            "--global-step-offset",
            str(global_step_offset),
            "--num-processes",
            "1",
        ]
        if fresh:
            args.append("--fresh")
        if mlflow_run_id:
            args += ["--mlflow-run-id", mlflow_run_id]
        command = launch_command(config_path, num_processes, accelerate_config, args)
        completed = subprocess.run(command, check=False, preexec_fn=die_with_parent)
        if not result_path.is_file():
            raise RuntimeError(f"distributed stage failed (exit code {completed.returncode}): {' '.join(command)}")
        return StageResult(**json.loads(result_path.read_text()))
