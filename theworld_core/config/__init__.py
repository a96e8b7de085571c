"""Typed, validated configuration: the one place defaults live.

Modules, leaf first (each imports only those above it):

- `errors`: `ConfigError` and the one problem format for every source,
  `<key path>: <value> is not allowed: <what is allowed>`; did-you-mean; secrets refused.
- `cron`: `cron_problem` for the schedule's cron expression.
- `stage_schema`: `ModelConfig`, `DataConfig`, `TrainingConfig`, `PlateauConfig`, `StageConfig`
  and the key classifications `ARCHITECTURE_KEYS`, `RESUME_COMPATIBLE_KEYS`.
- `stage_file`: the stage JSON files (with comments) -> `load_stage_config`.
- `pipeline_sections`: the gate, schedule, MLflow and plateau sections of stages.yaml.
- `pipeline_schema`: stage layering, `PipelineConfig`.
- `pipeline_file`: `stages.yaml` (duplicate keys, profiles) -> `load_pipeline_config`.
"""

from theworld_core.config.cron import cron_problem
from theworld_core.config.errors import (
    ConfigError,
    StrictModel,
    format_validation_error,
    is_secret_key,
    suggest_key,
    validate_config,
)
from theworld_core.config.pipeline_file import load_pipeline_config, parse_pipeline_yaml
from theworld_core.config.pipeline_schema import PIPELINE_KEYS, PROFILE_KEYS, PipelineConfig
from theworld_core.config.pipeline_sections import (
    GateConfig,
    GateMetric,
    MlflowConfig,
    PipelinePlateauConfig,
    ScheduleConfig,
)
from theworld_core.config.stage_file import load_stage_config, parse_json_with_comments, strip_json_comments
from theworld_core.config.stage_schema import (
    ARCHITECTURE_KEYS,
    COMPONENT_NAMES,
    DEFAULT_COSMOS,
    DEFAULT_GEMMA,
    DEFAULT_MLFLOW_EXPERIMENT,
    FREEZE_FLAG_OF,
    PLATEAU_DEFAULTS,
    PLATEAU_MIN_STEPS_LATER_STAGES,
    PLATEAU_MIN_STEPS_PROJECTION_ONLY,
    RESUME_COMPATIBLE_KEYS,
    Component,
    DataConfig,
    LrSchedulerName,
    MlflowNames,
    ModelConfig,
    PlateauConfig,
    StageConfig,
    TrainingConfig,
    checkpoint_source_kind,
)

__all__ = [
    "ARCHITECTURE_KEYS",
    "COMPONENT_NAMES",
    "DEFAULT_COSMOS",
    "DEFAULT_GEMMA",
    "DEFAULT_MLFLOW_EXPERIMENT",
    "FREEZE_FLAG_OF",
    "PIPELINE_KEYS",
    "PLATEAU_DEFAULTS",
    "PLATEAU_MIN_STEPS_LATER_STAGES",
    "PLATEAU_MIN_STEPS_PROJECTION_ONLY",
    "PROFILE_KEYS",
    "RESUME_COMPATIBLE_KEYS",
    "Component",
    "ConfigError",
    "DataConfig",
    "GateConfig",
    "GateMetric",
    "LrSchedulerName",
    "MlflowConfig",
    "MlflowNames",
    "ModelConfig",
    "PipelineConfig",
    "PipelinePlateauConfig",
    "PlateauConfig",
    "ScheduleConfig",
    "StageConfig",
    "StrictModel",
    "TrainingConfig",
    "checkpoint_source_kind",
    "cron_problem",
    "format_validation_error",
    "is_secret_key",
    "load_pipeline_config",
    "load_stage_config",
    "parse_json_with_comments",
    "parse_pipeline_yaml",
    "strip_json_comments",
    "suggest_key",
    "validate_config",
]
