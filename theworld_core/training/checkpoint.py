"""Resume state: what a crashed stage restarts from, exactly.

A resume state folder `OUTPUT_DIR/checkpoint-{step}/` holds:

    model.safetensors, manifest.json   the stage output at that step (see model/stage_output.py)
    optimizer.pt                       AdamW state keyed by parameter name + group hyperparameters
    scheduler.pt                       the learning-rate scheduler's state
    rng.pt                             Python, NumPy and torch (CPU and CUDA) generator states
    trainer_state.json                 steps, data position, plateau tracker, eval history, config hash

The manifest (format 2) records the sha256 and size of every other file under `files`; it is
written last inside a temporary folder that is renamed into place, so a kill at any moment leaves
either the previous complete state or the new complete one. The newest `save_total_limit`
`checkpoint-{step}` folders are kept.

`latest_resume_state` returns the newest state that verifies (every file present, sizes and
checksums as the manifest records, the weights' tensor list and the manifest fields intact,
trainer_state.json parses). A state that does not is moved aside, never deleted, as
`checkpoint-{step}.corrupt-{reason}` (e.g. `checkpoint-120.corrupt-sha256-model.safetensors`) with a
warning naming it and why; the one before it is used. Moved-aside folders no longer match
`checkpoint-{step}`, so `save_total_limit` neither counts nor deletes them. `load_trainer_state` and
`load_torch` verify the file they read and raise a `ResumeStateError` naming it.

A save that runs out of disk space raises `DiskFullError` ("no space left on <output_dir>:
checkpoint-{step} needs about N MB ..."); the earlier resume states are kept (none is deleted
before the new one is in place), so the stage resumes from the newest once there is space.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from theworld_core.model.stage_output import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    StageOutputError,
    atomic_directory,
    build_manifest,
    read_manifest,
    save_weights,
    stage_output_tensors,
    tensor_bytes,
    verify_files,
    verify_stage_output,
    write_manifest,
)

log = logging.getLogger("theworld.checkpoint")

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE = "optimizer.pt", "scheduler.pt", "rng.pt"
REQUIRED_FILES = (MANIFEST_FILE, WEIGHTS_FILE, OPTIMIZER_FILE, SCHEDULER_FILE, RNG_FILE, TRAINER_STATE_FILE)
CORRUPT_MARK = ".corrupt-"
FINAL_DIR = "final"


class ResumeStateError(StageOutputError):
    """A resume state is incomplete, corrupt or unreadable; `reason` says which file and how."""


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


# ============================================================================== writing


def save_resume_state(
    output_dir: Path,
    model,
    optimizer_state: dict,
    scheduler_state: dict,
    trainer_state: TrainerState,
    stage_config: dict,
    save_total_limit: int | None,
    tensors: dict | None = None,
) -> Path:
    """Atomically write `checkpoint-{step}` and delete the oldest beyond `save_total_limit`.
    `DiskFullError` when the disk is full (every earlier resume state is kept). `tensors`: the
    already gathered `stage_output_tensors(model)` (a sharded model)."""
    target = Path(output_dir) / f"checkpoint-{trainer_state.step}"
    tensors = stage_output_tensors(model) if tensors is None else tensors
    manifest = build_manifest(model, tensors, stage_config)
    earlier = list_resume_states(output_dir)
    kept = (
        f"the earlier resume states are kept (newest: {earlier[-1].name})"
        if earlier
        else "no earlier resume state exists"
    )
    size = tensor_bytes(tensors) + tensor_bytes(optimizer_state) + tensor_bytes(capture_rng()) + (1 << 16)
    with atomic_directory(target, expected_bytes=size, what=f"resume state {target.name}", kept=kept) as tmp:
        save_weights(tensors, tmp / WEIGHTS_FILE, manifest)
        torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(scheduler_state, tmp / SCHEDULER_FILE)
        torch.save(capture_rng(), tmp / RNG_FILE)
        (tmp / TRAINER_STATE_FILE).write_text(json.dumps(asdict(trainer_state), indent=2))
        write_manifest(tmp, manifest)  # last: the checksums of everything above
    if save_total_limit is not None:
        for old in list_resume_states(output_dir)[:-save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def list_resume_states(output_dir: Path) -> list[Path]:
    """`checkpoint-{step}` folders with a trainer state, oldest first (not verified; temporary and
    moved-aside folders are never listed)."""
    return [p for p in _checkpoint_folders(output_dir) if (p / TRAINER_STATE_FILE).is_file()]


def _checkpoint_folders(output_dir: Path) -> list[Path]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def remove_partial_writes(output_dir: Path) -> None:
    """Delete temporary folders a killed save left behind (they are never read)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for leftover in output_dir.glob(".*.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)


# ============================================================================== choosing and verifying


def verify_resume_state(directory: Path) -> None:
    """Raise `ResumeStateError` unless every file of the resume state is present and as written."""
    directory = Path(directory)
    for name in REQUIRED_FILES:
        if not (directory / name).is_file():
            raise ResumeStateError(
                f"{directory / name} is missing: {directory.name} is not a complete resume state", f"missing-{name}"
            )
    try:
        manifest = read_manifest(directory)
        verify_stage_output(directory, manifest, files=REQUIRED_FILES[1:])
    except StageOutputError as exc:
        raise ResumeStateError(str(exc), exc.reason) from exc
    _parse_trainer_state(directory / TRAINER_STATE_FILE)


def latest_resume_state(output_dir: Path) -> Path | None:
    """The newest resume state that verifies; newer ones that do not are moved aside (on rank 0)."""
    for directory in reversed(_checkpoint_folders(output_dir)):
        try:
            verify_resume_state(directory)
            return directory
        except (StageOutputError, OSError) as exc:
            if not directory.exists():  # another rank moved it aside meanwhile
                continue
            reason = getattr(exc, "reason", None) or f"unreadable-{type(exc).__name__}"
            _move_aside(directory, reason, exc)
    return None


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # set on every rank by accelerate / torchrun


def _move_aside(directory: Path, reason: str, error: Exception) -> None:
    if not _is_main_process():  # every rank reaches the same verdict; rank 0 alone renames and warns
        return
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", reason)[:80]
    target = directory.with_name(f"{directory.name}{CORRUPT_MARK}{slug}")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{directory.name}{CORRUPT_MARK}{slug}-{n}")
    try:
        os.rename(directory, target)
    except FileNotFoundError:
        return  # moved by another process
    except OSError as exc:
        log.warning(
            "resume state %s is unusable (%s) and could not be moved aside (%s): skipped", directory, error, exc
        )
        return
    log.warning(
        "resume state %s is unusable and was moved aside to %s: %s; trying the state before it",
        directory,
        target.name,
        error,
    )


def is_resume_state(directory: Path) -> bool:
    return (Path(directory) / TRAINER_STATE_FILE).is_file() and (Path(directory) / OPTIMIZER_FILE).is_file()


# ============================================================================== loading


def _verified(directory: Path, name: str) -> Path:
    """The path of `name` after checking it against the folder's manifest."""
    directory = Path(directory)
    try:
        verify_files(directory, read_manifest(directory), [name])
    except StageOutputError as exc:
        raise ResumeStateError(str(exc), exc.reason) from exc
    return directory / name


def _parse_trainer_state(path: Path) -> TrainerState:
    try:
        values = json.loads(path.read_text())
        known = {f.name for f in fields(TrainerState)}
        if not isinstance(values, dict) or not values.keys() <= known:
            raise ValueError(f"expected an object with keys among {sorted(known)}")
        return TrainerState(**values)
    except (UnicodeDecodeError, ValueError, TypeError) as exc:
        raise ResumeStateError(
            f"{path} is not a readable trainer state ({type(exc).__name__}: {exc})", f"json-{TRAINER_STATE_FILE}"
        ) from exc


def load_trainer_state(directory: Path) -> TrainerState:
    return _parse_trainer_state(_verified(directory, TRAINER_STATE_FILE))


def load_torch(directory: Path, name: str) -> Any:
    path = _verified(directory, name)
    try:
        # Our own files: optimizer/scheduler/RNG states hold plain Python and NumPy objects.
        return torch.load(path, weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ResumeStateError(f"{path} cannot be loaded ({type(exc).__name__}: {exc})", f"load-{name}") from exc
