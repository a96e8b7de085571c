"""What a stage run hands back (`StageResult`), and the key a resume state must match (`resume_key`).

Plain data, no torch: the launcher, the pipeline and the trainer all read these.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from theworld_core.config import RESUME_COMPATIBLE_KEYS, StageConfig


def resume_key(cfg: StageConfig) -> str:
    """Hash of every key that changes what a stage trains: a resume state saved under another key is
    refused. Stored in the resume state's `TrainerState.config_hash` (the field keeps its name, so
    existing resume states stay resumable) and logged as the MLflow tag `config_hash`."""
    relevant = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in RESUME_COMPATIBLE_KEYS}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def changed_training_keys(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every key that differs and changes what is trained (for the refusal message)."""
    return [
        f"{k}: {before.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(now)
        if k not in RESUME_COMPATIBLE_KEYS and before.get(k) != now.get(k)
    ]


EXIT_NOT_IN_MLFLOW = 4
"""`theworld train`'s exit status when the stage ended well but its output did not reach its MLflow run."""


@dataclass(frozen=True)
class StageResult:
    """What a stage run ended with: small, JSON-serialisable, no tensors."""

    status: str
    """completed (max_steps / epochs reached), plateaued, diverged or oom."""
    reason: str
    steps: int
    output_dir: str
    stage_output: str | None
    """`OUTPUT_DIR/final`, the stage output (None when the stage diverged or ran out of memory)."""
    eval_loss: float | None
    best_eval_loss: float | None
    train_loss: float | None
    eval_history: list[list[float]]
    trainable: dict[str, int]
    data_fingerprint: str
    mlflow_run_id: str | None
    started_from: str
    evidence: dict[str, Any] = field(default_factory=dict)
    tracking_incomplete: str | None = None
    """None when every record of the stage reached MLflow; else why not, in plain words (the rest
    waits in `OUTPUT_DIR/tracking-outbox.jsonl` and is sent by the next run in this output folder)."""
    stage_output_logged: bool = False
    """The stage output is in the stage's MLflow run (artifact `stage_output`), where a pipeline finds it."""
    already_finished: bool = False
    """The output folder held this stage finished (by an earlier run): nothing was trained this time."""
    evaluation: dict[str, Any] | None = None
    """The post-stage evaluation run on the trained model once its output was saved, when asked for
    (`evaluate_after`) and the stage ran in one process: request, report and seconds
    (`training.evaluation.post_stage_evaluation`); None otherwise."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def exit_status(self) -> int:
        """`theworld train`'s exit status as far as training and tracking go: 0 the stage ended well
        and its output is in MLflow; 1 it failed (diverged, oom, disk full); EXIT_NOT_IN_MLFLOW (4) it
        ended well but its output could not be logged to MLflow (it is in `stage_output`; rerun the
        same command once the tracking server is back)."""
        if self.status not in ("completed", "plateaued"):
            return 1
        return 0 if self.stage_output_logged else EXIT_NOT_IN_MLFLOW
