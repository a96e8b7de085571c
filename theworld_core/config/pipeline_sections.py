"""The pipeline file's sections besides the stages: `GateConfig`, `ScheduleConfig`, `MlflowConfig`,
`PipelinePlateauConfig` (every key documented on its field)."""

from __future__ import annotations

import re
import zoneinfo
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from theworld_core.config.cron import cron_problem
from theworld_core.config.errors import StrictModel, cross_field_error, suggest_key
from theworld_core.config.stage_schema import DEFAULT_MLFLOW_EXPERIMENT, PlateauConfig, PlateauMinSteps, PositiveFloat

GateMetric = Literal["eval_loss", "task_accuracy"]
"""What the gate judges: `eval_loss` (lower is better) or `task_accuracy` (higher is better, in [0, 1])."""


class GateConfig(StrictModel):
    """What the gate after each stage decides on (docs/stages.md#gate).

    After a stage: diverged -> retry with the divergence recipe (up to `max_diverged_retries`);
    out of memory -> retry with half the batch and twice the accumulation (up to `max_oom_retries`);
    metric meets `target` -> stop and deploy this stage; metric worse than the best earlier stage by
    more than `regression_tolerance` -> stop and keep the best earlier stage; otherwise the next stage.
    `theworld_core.training.gate.decide` applies these rules.
    """

    model_config = ConfigDict(use_attribute_docstrings=True)

    metric: GateMetric = "eval_loss"
    """What "good enough" and "regression" are judged on: `eval_loss` (the held-out loss; lower is
    better) or `task_accuracy` (share of `eval_task_samples` held-out samples answered correctly;
    higher is better)."""
    target: float | None = Field(None, allow_inf_nan=False)
    """The stage is good enough, and the pipeline stops and deploys it, once the metric reaches this
    value (eval_loss <= target, or task_accuracy >= target; a task_accuracy target is in [0, 1]).
    Null: never stop early for quality; every stage runs unless one regresses or fails."""
    regression_tolerance: float = Field(0.02, ge=0, allow_inf_nan=False)
    """A stage whose metric is worse than the best earlier stage's by more than this share of it
    (0.02 = 2%) stops the pipeline, and the best earlier stage is kept (rollback)."""
    max_diverged_retries: int = Field(1, ge=0)
    """How often a stage that diverged (NaN/inf loss, or gradient norm above `divergence_grad_norm`)
    is retried with the divergence recipe before the pipeline stops as failed."""
    max_oom_retries: int = Field(2, ge=0)
    """How often a stage that ran out of memory is retried with half the batch size and twice the
    gradient accumulation (the same effective batch) before the pipeline stops as failed."""
    diverged_lr_factor: float = Field(0.1, gt=0, lt=1, allow_inf_nan=False)
    """Divergence recipe: the retry's learning rates are the failed attempt's times this
    (docs/stages.md#retries)."""
    diverged_max_grad_norm: PositiveFloat = 0.5
    """Divergence recipe: the retry clips gradients to at most this norm (docs/stages.md#retries)."""
    diverged_warmup_steps: int = Field(500, ge=0)
    """Divergence recipe: the retry warms up for at least this many steps, capped at
    the stage's `max_steps` (docs/stages.md#retries)."""

    @model_validator(mode="after")
    def _target_range(self) -> GateConfig:
        if self.target is None:
            return self
        if self.metric == "task_accuracy" and not 0 <= self.target <= 1:
            raise cross_field_error(
                type(self).__name__,
                [("target", self.target, "must be in [0, 1]: metric task_accuracy is a share of correct answers")],
            )
        if self.metric == "eval_loss" and self.target < 0:
            raise cross_field_error(
                type(self).__name__,
                [
                    (
                        "target",
                        self.target,
                        "must be greater than or equal to 0: metric eval_loss is a cross-entropy, never negative",
                    )
                ],
            )
        return self


class ScheduleConfig(StrictModel):
    """When the pipeline reruns on its own (the Prefect deployment's triggers)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    cron: str | None = None
    """Standard 5-field cron expression (minute hour day-of-month month day-of-week) of scheduled
    runs, e.g. `0 3 * * *` for 03:00 every day, in `timezone`. Null: no schedule (runs only on demand
    or on `new_data_event`)."""
    timezone: str = "UTC"
    """IANA time zone the cron expression is read in (e.g. `UTC`, `Europe/Berlin`)."""
    new_data_event: str = "theworld.data.updated"
    """Name of the Prefect event that triggers a rerun when new data lands (emit it after adding data)."""
    only_on_new_data: bool = True
    """A scheduled run whose data fingerprint equals the last completed run's completes at once with
    "no new data" instead of training again."""
    warm_start_from_champion: bool = False
    """Start a rerun's first stage from the registered champion's stage output instead of from the
    pretrained base."""

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            problem = cron_problem(value)
            if problem:
                raise ValueError(problem)
            value = " ".join(value.split())
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (ValueError, zoneinfo.ZoneInfoNotFoundError):
            hint = suggest_key(value, sorted(zoneinfo.available_timezones()))
            raise ValueError(
                "must be an IANA time zone name such as 'UTC' or 'Europe/Berlin'"
                + (f"; did you mean {hint!r}?" if hint else "")
            ) from None
        return value

    @field_validator("new_data_event")
    @classmethod
    def _event_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*", value):
            raise ValueError(
                "must be a Prefect event name: letters, digits, '.', '_', '-', ':' (e.g. 'theworld.data.updated')"
            )
        return value


_MLFLOW_ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")


class MlflowConfig(StrictModel):
    """Where the pipeline's runs and models go in MLflow (the tracking server comes from the
    `MLFLOW_TRACKING_URI` environment variable, never from this file)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    experiment: str = DEFAULT_MLFLOW_EXPERIMENT
    """MLflow experiment of the pipeline run (parent) and its stage runs (children, named after the stages)."""
    registered_model: str = "theworld"
    """Model Registry name the winning stage output is registered under."""
    champion_alias: str = "champion"
    """Registry alias moved to the newly registered version (load it as `models:/<registered_model>@<alias>`)."""
    log_system_metrics: bool = True
    """Also record CPU/GPU/memory usage in the stage runs (MLflow system metrics)."""

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty experiment name")
        return value

    @field_validator("registered_model")
    @classmethod
    def _registered_model(cls, value: str) -> str:
        if not value.strip() or "/" in value or ":" in value:
            raise ValueError("must be a non-empty model name without '/' or ':' (MLflow Model Registry rule)")
        return value

    @field_validator("champion_alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        if not _MLFLOW_ALIAS.match(value) or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(
                "must be an MLflow alias: letters, digits, '_' and '-', and neither 'latest' nor a version like 'v3'"
            )
        return value


class PipelinePlateauConfig(PlateauConfig):
    """The `plateau:` section of a pipeline file: `PlateauConfig`, with `min_steps` optional. Each
    key becomes the flat stage key `plateau_<key>` of every stage (a stage may override it)."""

    min_steps: PlateauMinSteps | None = None
    """No plateau verdict before this optimizer step. Null: the per-stage default
    (docs/stages.md#plateau), 10000 for a projection-only stage (all three components frozen) and
    5000 for the others."""
