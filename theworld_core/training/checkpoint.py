"""Resume state: what a crashed stage restarts from, exactly.

A resume state folder `OUTPUT_DIR/checkpoint-{step}/` holds:

    model.safetensors, manifest.json   the stage output at that step (see model/stage_output.py)
    optimizer.pt                       AdamW state keyed by parameter name + group hyperparameters
    scheduler.pt                       the learning-rate scheduler's state
    rng.pt                             Python, NumPy and torch (CPU and CUDA) generator states
    trainer_state.json                 steps, data position, plateau tracker, eval history, config hash

It is written to a temporary folder and renamed into place, so a kill at any moment leaves either
the previous complete state or the new complete one. The newest `save_total_limit` are kept.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from theworld_core.model.stage_output import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    atomic_directory,
    build_manifest,
    stage_output_tensors,
)
from safetensors.torch import save_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
FINAL_DIR = "final"


@dataclass
class TrainerState:
    """Everything about loop progress that weights and optimizer do not capture."""

    step: int = 0
    """Optimizer steps taken in this stage."""
    epoch: int = 0
    """Current pass over the training data (0-based)."""
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (the data position)."""
    samples_seen: int = 0
    tokens_seen: int = 0
    plateau: dict[str, Any] = field(default_factory=dict)
    """The plateau tracker's state_dict."""
    eval_history: list[list[float]] = field(default_factory=list)
    """[step, eval_loss] pairs."""
    config_hash: str = ""
    """Hash of the training-relevant stage config; a resume with another config is refused."""
    mlflow_run_id: str | None = None
    """The MLflow run the stage logs into; a resumed stage keeps logging into it."""
    finished: str | None = None
    """Set when the stage ended: its status (completed, plateaued, ...)."""


def capture_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_resume_state(
    output_dir: Path,
    model,
    optimizer_state: dict,
    scheduler_state: dict,
    trainer_state: TrainerState,
    stage_config: dict,
    save_total_limit: int | None,
) -> Path:
    """Atomically write `checkpoint-{step}` and delete the oldest beyond `save_total_limit`."""
    target = Path(output_dir) / f"checkpoint-{trainer_state.step}"
    tensors = stage_output_tensors(model)
    with atomic_directory(target) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / MANIFEST_FILE).write_text(json.dumps(build_manifest(model, tensors, stage_config), indent=2, sort_keys=True))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler_state, tmp / "scheduler.pt")
        torch.save(capture_rng(), tmp / "rng.pt")
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(asdict(trainer_state), indent=2))
    if save_total_limit is not None:
        for old in list_resume_states(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_resume_states(output_dir: Path) -> list[Path]:
    """Complete resume states, oldest first (temporary folders are never listed)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE_FILE).is_file()]


def remove_partial_writes(output_dir: Path) -> None:
    """Delete temporary folders a killed save left behind (they are never read)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for leftover in output_dir.glob(".*.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)


def latest_resume_state(output_dir: Path) -> Path | None:
    states = list_resume_states(output_dir)
    return states[-1] if states else None


def is_resume_state(directory: Path) -> bool:
    return (Path(directory) / TRAINER_STATE_FILE).is_file() and (Path(directory) / "optimizer.pt").is_file()


def load_trainer_state(directory: Path) -> TrainerState:
    return TrainerState(**json.loads((Path(directory) / TRAINER_STATE_FILE).read_text()))


def load_torch(directory: Path, name: str) -> Any:
    # Our own files: optimizer/scheduler/RNG states hold plain Python and NumPy objects.
    return torch.load(Path(directory) / name, weights_only=False)
