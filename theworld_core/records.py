"""The typed records the pipeline's steps hand each other (`theworld_core.pipeline`).

Each is a frozen dataclass of plain values with a `to_dict()` / `from_dict()` pair. Prefect persists
the cached ones (the train-stage record, the evaluation report) as JSON through `json_default` and
`json_object_hook` (flows/tasks.py), so a rerun reads a cached record back as the same type.

No torch, MLflow or Prefect here.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import asdict, dataclass, field
from typing import Any, Self


class Record:
    """`to_dict()` (JSON-ready: plain dicts, lists, numbers) and a checked `from_dict()`."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        return _construct(cls, data)


def _construct(cls: type, data: dict[str, Any]):
    """`cls(**data)`, refusing unknown and missing keys by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    unknown, missing = sorted(set(data) - names), sorted(required - set(data))
    if unknown or missing:
        raise ValueError(
            f"{cls.__name__}.from_dict: "
            + "; ".join(
                part
                for part in (f"unknown keys {unknown}" if unknown else "", f"missing keys {missing}" if missing else "")
                if part
            )
            + f" (allowed: {sorted(names)})"
        )
    return cls(**data)


def eval_request(task_samples: int, generations: int) -> dict[str, int]:
    """What a post-stage evaluation is asked for (`StageRecord.evaluation["request"]`): one done for
    another request is not reused."""
    return {"task_samples": task_samples, "generations": generations}


@dataclass(frozen=True)
class PreparedData(Record):
    """The data, fingerprinted and split once before any stage."""

    fingerprint: str
    train: int
    """Training rows."""
    eval: int
    """Held-out rows."""
    bad: int
    """Rows dropped as unreadable."""
    bad_reasons: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class NewDataCheck(Record):
    """Whether a pipeline run trains (`new_data`), and why (`reason`)."""

    new_data: bool
    reason: str
    fingerprint: str
    config_hash: str
    experiment: str
    previous_run_id: str | None = None
    """The last successful pipeline run of the same config (None when there is none or it was not looked up)."""
    previous_run_name: str | None = None
    previous_fingerprint: str | None = None


@dataclass(frozen=True)
class WarmStart(Record):
    """Where a rerun's first stage starts: `uri` (the champion's `models:/<name>/<version>`), or None
    for the pretrained bases; `reason` says which and why."""

    uri: str | None
    version: int | None
    reason: str


@dataclass(frozen=True)
class StageRecord(Record):
    """One finished stage attempt: its MLflow run, status, histories, output and the config it ran with."""

    stage: str
    attempt: int
    """1 for the first try, 2 for the first retry, ..."""
    run_id: str
    """The attempt's MLflow child run."""
    content_key: str
    """`pipeline.stage_content_key` of the attempt (names its output folder and its Prefect cache entry)."""
    status: str
    """completed | plateaued | diverged | oom."""
    reason: str
    steps: int
    """Optimizer steps of this stage."""
    global_end_step: int
    """Pipeline-global step at the end of this stage (the offset plus `steps`)."""
    eval_history: list[list[float]]
    """[global step, eval loss] pairs."""
    stage_eval_history: list[list[float]]
    """[stage step, eval loss] pairs (what the plateau rule reads)."""
    train_loss_history: list[list[float]]
    """[global step, train loss] pairs from the MLflow run."""
    stage_output_uri: str | None
    """`runs:/<run_id>/stage_output`; None when the stage diverged or ran out of memory."""
    trainable: dict[str, int]
    evidence: dict[str, Any]
    config: dict[str, Any]
    """The `StageConfig` it ran with, as JSON (its output_dir and resume_from_checkpoint included)."""
    tracking_incomplete: str | None = None
    """None when everything the stage logged reached its MLflow run; else why not (`StageResult`'s field)."""
    evaluation: dict[str, Any] | None = None
    """The post-stage evaluation the training process ran on the trained model (`StageResult`'s field)."""

    @property
    def label(self) -> str:
        """`stage`, or `stage #attempt` for a retry."""
        return self.stage + (f" #{self.attempt}" if self.attempt > 1 else "")


@dataclass(frozen=True)
class SummaryRow(Record):
    """One row of the stage summary (the Prefect table artifact, stage_summary.json/.md, the flow's result)."""

    stage: str
    attempt: int
    status: str
    steps: int
    eval_loss: float | None
    task_accuracy: float | None
    stage_reason: str
    plateau: str | None
    """The plateau verdict's code (None without an evaluation)."""
    decision: str
    decision_reason: str
    run_id: str
    stage_output_uri: str | None


@dataclass(frozen=True)
class PipelineSummary(Record):
    """What `finish_step` did: the champion it registered and the summary files it logged."""

    champion: str | None
    model_version: int | None
    plot: str
    table: str
    markdown: str


# --- Prefect result persistence as JSON ---------------------------------------------------------

_KIND = "__theworld_record__"
_TRUSTED_MODULES = ("theworld_core.",)


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)`: a dataclass of this package as {__theworld_record__: class, data: to_dict()}."""
    cls = type(obj)
    if dataclasses.is_dataclass(obj) and cls.__module__.startswith(_TRUSTED_MODULES) and hasattr(obj, "to_dict"):
        return {_KIND: f"{cls.__module__}:{cls.__qualname__}", "data": obj.to_dict()}
    raise TypeError(f"{cls.__module__}.{cls.__qualname__} is not a record this pipeline persists as JSON")


def json_object_hook(value: dict[str, Any]) -> Any:
    """`json.loads(object_hook=...)`: the inverse of `json_default` (other dicts pass through)."""
    if _KIND not in value:
        return value
    module_name, _, qualname = str(value[_KIND]).partition(":")
    if not module_name.startswith(_TRUSTED_MODULES):
        raise ValueError(f"persisted record names class {value[_KIND]!r}: only theworld_core classes are read back")
    cls = getattr(importlib.import_module(module_name), qualname)
    from_dict = getattr(cls, "from_dict", None)
    return from_dict(value["data"]) if from_dict else _construct(cls, value["data"])
