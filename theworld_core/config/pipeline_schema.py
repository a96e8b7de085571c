"""The pipeline schema (`stages.yaml`): `PipelineConfig`, and how each stage is layered from its sections.

- The sections besides the stages are in `pipeline_sections.py`.
- `PipelineConfig`: a validated pipeline; `resolved_stages()` gives each stage as a `StageConfig`,
  `pipeline_hash()` the identity of its resolved content.
- `build_pipeline`: a parsed document (profiles already applied) -> `PipelineConfig`, or every problem.

A stage of the pipeline is built from layers, later ones winning:
    model section + data section + defaults + plateau section (as the flat plateau_* keys)
    + the stage's own keys (+ its name)
and validated as one `StageConfig`. Each problem names the key path where the bad value was written;
a cadence that cannot feed the plateau rule is warned about the same way (`PlateauCadenceWarning`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from theworld_core.config.errors import (
    ConfigError,
    M,
    StrictModel,
    describe_error,
    errors_of,
    join_path,
    render_value,
    unknown_key_problem,
)
from theworld_core.config.pipeline_sections import GateConfig, MlflowConfig, PipelinePlateauConfig, ScheduleConfig
from theworld_core.config.stage_file import PlateauCadenceWarning, cadence_lines
from theworld_core.config.stage_schema import DataConfig, ModelConfig, PlateauConfig, StageConfig, TrainingConfig


class _PipelineSettings(StrictModel):
    """The pipeline-level scalar keys of a pipeline file."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    output_root: str = "./.theworld/stages"
    """Folder the stages' output folders go in (one folder per stage and attempt, made by the flow),
    relative to the working directory of the run."""
    eval_generations: int = Field(4, ge=0)
    """Sample generations (image + prompt -> answer) recorded per stage for a look by eye."""
    eval_task_samples: int = Field(64, ge=0)
    """Held-out samples the task metric (`task_accuracy`) is computed on, per stage."""

    @field_validator("output_root")
    @classmethod
    def _non_empty_root(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty folder path")
        return value


_SETTINGS_KEYS: tuple[str, ...] = tuple(_PipelineSettings.model_fields)
_SECTIONS: dict[str, type[StrictModel]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "plateau": PipelinePlateauConfig,
    "gate": GateConfig,
    "schedule": ScheduleConfig,
    "mlflow": MlflowConfig,
}
PIPELINE_KEYS: tuple[str, ...] = (
    "model",
    "data",
    "defaults",
    "stages",
    "plateau",
    "gate",
    "schedule",
    "mlflow",
    *_SETTINGS_KEYS,
    "profiles",
)
"""The top-level keys of a pipeline file."""
PROFILE_KEYS: tuple[str, ...] = tuple(k for k in PIPELINE_KEYS if k != "profiles")
"""The keys of a profile overlay (`stages` there maps a stage name to its overrides)."""

_PLATEAU_FLAT = {f"plateau_{k}": k for k in PlateauConfig.model_fields}
_WANDB_KEYS = ("log_to_wandb", "wandb_project", "wandb_run_name")
_TRAINING_KEYS: tuple[str, ...] = tuple(TrainingConfig.model_fields)


def _stage_key_problem(key: Any, value: Any, path: str, *, in_defaults: bool, first_stage: bool) -> str | None:
    """Why `key` may not appear in `defaults` (or in a stage entry); None when it may."""

    def refuse(reason: str) -> str:
        return f"{path}: {render_value(value)} is not allowed: {reason}"

    if not isinstance(key, str):
        return f"{path}: unknown key (keys are names of config fields)"
    if key == "name":
        return refuse("stage names are given per stage, in the stages list") if in_defaults else None
    if key in _PLATEAU_FLAT:
        return (
            refuse(f"set it in the plateau section as plateau.{_PLATEAU_FLAT[key]} (a stage may override it)")
            if in_defaults
            else None
        )
    if key == "plateau":
        return refuse("a stage overrides the plateau rule with the flat keys " + ", ".join(_PLATEAU_FLAT))
    if key == "output_dir":
        return refuse("the pipeline sets it (a folder per stage under output_root); change output_root instead")
    if key in _WANDB_KEYS:
        return refuse(
            "MLflow names come from the mlflow section (mlflow.experiment); stage runs are named after the stages"
        )
    if key == "resume_from_checkpoint" and not first_stage:
        return refuse(
            "only the first stage may name a checkpoint to start from; every later stage starts from the "
            "previous stage's output, which the pipeline passes on"
        )
    if key == "seed" and not in_defaults:
        return refuse(
            "one seed for the whole pipeline: set it in defaults (it also seeds the synthetic data, so the "
            "stages' eval losses stay comparable)"
        )
    if key in ModelConfig.model_fields and key not in _TRAINING_KEYS:
        return refuse("a model key: set it in the model section (one model for all stages)")
    if key in DataConfig.model_fields and key not in _TRAINING_KEYS:
        return refuse(
            "a data key: set it in the data section (one data set for all stages, so their eval losses compare)"
        )
    if key in _TRAINING_KEYS:
        return None
    allowed = [k for k in _TRAINING_KEYS if k not in ("output_dir", *_WANDB_KEYS)]
    return unknown_key_problem(path, key, allowed, "not a training config key")


def where_plain(loc: tuple[Any, ...]) -> str:
    """A key path as a problem line shows it, for a document with no profile applied."""
    return join_path("", loc)


def _validate_section(
    cls: type[M], raw: Any, at: tuple[Any, ...], where: Callable[[tuple[Any, ...]], str], problems: list[str]
) -> M | None:
    """Validate one section, adding a problem line per error (paths rendered by `where`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{where(at)}: {render_value(raw)} is not allowed: must be a mapping of keys to values")
        return None
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        for loc, error in errors_of(exc):
            home = _home_of(loc[0]) if error["type"] == "extra_forbidden" and len(loc) == 1 else None
            if home is not None and home != at:
                problems.append(f"{where(at + loc)}: unknown key here; {loc[0]!r} belongs in {home}")
            else:
                problems.append(describe_error(error, loc, cls, where(at + loc)))
        return None


def _home_of(key: Any) -> str | None:
    """Where a key that is misplaced in a section belongs (None when it is nobody's key)."""
    if not isinstance(key, str):
        return None
    if key in ModelConfig.model_fields:
        return "the model section"
    if key in DataConfig.model_fields:
        return "the data section"
    if key in _PLATEAU_FLAT:
        return f"the plateau section (as {_PLATEAU_FLAT[key]})"
    if key in _TRAINING_KEYS:
        return "defaults or a stage"
    for section, cls in _SECTIONS.items():
        if key in cls.model_fields and section not in ("model", "data"):
            return f"the {section} section"
    if key in _SETTINGS_KEYS:
        return "the top level of the file"
    return None


def _stage_layers(
    model: Mapping[str, Any],
    data: Mapping[str, Any],
    defaults: Mapping[str, Any],
    plateau: Mapping[str, Any],
    stage: Mapping[str, Any],
    index: int,
) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]]]:
    """The flat stage dict (later layers win, key by key) and, per key, the path it came from."""
    merged: dict[str, Any] = {}
    origin: dict[str, tuple[Any, ...]] = {}
    layers: list[tuple[Mapping[str, Any], Callable[[str], tuple[Any, ...]]]] = [
        (model, lambda k: ("model", k)),
        (data, lambda k: ("data", k)),
        (defaults, lambda k: ("defaults", k)),
        ({f"plateau_{k}": v for k, v in plateau.items()}, lambda k: ("plateau", k.removeprefix("plateau_"))),
        (stage, lambda k: ("stages", index, k)),
    ]
    for layer, path_of in layers:
        for key, value in layer.items():
            merged[key] = value
            origin[key] = path_of(key)
    return merged, origin


def _check_stages(
    model: Mapping[str, Any] | None,
    data: Mapping[str, Any] | None,
    defaults: Any,
    plateau: Mapping[str, Any] | None,
    stages: Any,
    where: Callable[[tuple[Any, ...]], str],
    problems: list[str],
    *,
    stages_given: bool = True,
    cadence: list[str] | None = None,
) -> tuple[list[StageConfig], dict[str, Any], list[dict[str, Any]]]:
    """Check `defaults` and `stages` and resolve every stage. Sections that failed their own
    validation are passed as None and left out of the layering (their problems are already listed).
    Returns the resolved stages (only when all resolved) and the cleaned defaults and stage entries;
    `cadence` (when given) receives the plateau cadence warnings (`stage_file.cadence_lines`)."""
    model, data, plateau = model or {}, data or {}, plateau or {}
    clean_defaults: dict[str, Any] = {}
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, Mapping):
        problems.append(
            f"{where(('defaults',))}: {render_value(defaults)} is not allowed: must be a mapping of training keys to values"
        )
        defaults = {}
    for key, value in defaults.items():
        problem = _stage_key_problem(key, value, where(("defaults", key)), in_defaults=True, first_stage=False)
        if problem:
            problems.append(problem)
        else:
            clean_defaults[key] = value
    if "seed" in clean_defaults and "seed" in data and clean_defaults["seed"] != data["seed"]:
        problems.append(
            f"{where(('defaults', 'seed'))}: {render_value(clean_defaults['seed'])} is not allowed: must equal "
            f"data.seed ({render_value(data['seed'])}): a stage has one seed for training and the synthetic data"
        )

    if not stages_given:
        problems.append(
            f"{where(('stages',))}: required but missing: list the stages, each with a name and its training keys"
        )
        return [], clean_defaults, []
    if not isinstance(stages, list):
        problems.append(
            f"{where(('stages',))}: {render_value(stages)} is not allowed: must be a list of stages (mappings with a name)"
        )
        return [], clean_defaults, []
    if not stages:
        problems.append(f"{where(('stages',))}: [] is not allowed: must list at least one stage")
        return [], clean_defaults, []

    resolved: list[StageConfig] = []
    placed: list[tuple[StageConfig, dict[str, tuple[Any, ...]], int]] = []  # with where each key was written
    clean_stages: list[dict[str, Any]] = []
    first_with_name: dict[str, int] = {}
    ok = True
    for index, entry in enumerate(stages):
        at = ("stages", index)
        if not isinstance(entry, Mapping):
            problems.append(
                f"{where(at)}: {render_value(entry)} is not allowed: must be a mapping with a name and training keys"
            )
            ok = False
            continue
        own: dict[str, Any] = {}
        for key, value in entry.items():
            problem = _stage_key_problem(key, value, where(at + (key,)), in_defaults=False, first_stage=index == 0)
            if problem:
                problems.append(problem)
                ok = False
            else:
                own[key] = value
        name = entry.get("name")
        if "name" not in entry:
            problems.append(f"{where(at + ('name',))}: required but missing: every stage needs a unique name")
            ok = False
        elif isinstance(name, str) and name in first_with_name:
            problems.append(
                f"{where(at + ('name',))}: {name!r} is not allowed: stage names must be unique; "
                f"stages[{first_with_name[name]}] is already named {name!r}"
            )
            ok = False
        elif isinstance(name, str):
            first_with_name[name] = index
        clean_stages.append(own)
        merged, origin = _stage_layers(model, data, clean_defaults, plateau, own, index)
        try:
            resolved.append(StageConfig.model_validate(merged))
            placed.append((resolved[-1], origin, index))
        except ValidationError as exc:
            ok = False
            for loc, error in errors_of(exc):
                key = loc[0] if loc else None
                source = origin.get(key, at + ((key,) if key is not None else ()))
                line = describe_error(error, loc, StageConfig, where(source + loc[1:]))
                if error["type"] == "cross_field" and source[:2] != at:
                    line += f" (in stage {name!r})" if isinstance(name, str) else f" (in stages[{index}])"
                problems.append(line)
    if cadence is not None:
        cadence += cadence_lines(placed, where)
    return (resolved if ok else []), clean_defaults, clean_stages


class PipelineConfig(_PipelineSettings):
    """A validated pipeline file (`stages.yaml`): the shared model and data, the stages, the plateau
    rule, the gate, the schedule and the MLflow names. Load one with `load_pipeline_config`.

    `resolved_stages()` gives each stage as a `StageConfig` (its `output_dir` is left at the
    placeholder default; the flow sets a folder under `output_root`). `pipeline_hash()` identifies the
    resolved content.
    """

    model_config = ConfigDict(use_attribute_docstrings=True, hide_input_in_errors=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model every stage trains (ModelConfig keys). `tiny` as `model_name` / `cosmos_model_name`
    means the embedded tiny models; it is resolved when the model is loaded."""
    data: DataConfig = Field(default_factory=DataConfig)
    """The data every stage trains and evaluates on (DataConfig keys)."""
    defaults: dict[str, Any] = Field(default_factory=dict)
    """Training keys applied to every stage (a stage's own keys win)."""
    stages: list[dict[str, Any]]
    """The stages in order, each `{"name": ..., <training keys>}`."""
    plateau: PipelinePlateauConfig = Field(default_factory=PipelinePlateauConfig)
    """The plateau rule of every stage (a stage may override a key with the flat `plateau_<key>`)."""
    gate: GateConfig = Field(default_factory=GateConfig)
    """What the gate after each stage decides on."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """When the pipeline reruns on its own."""
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """MLflow experiment, registered model and champion alias."""
    profile: str | None = None
    """The profile applied when the file was loaded (null: none). Not part of `pipeline_hash`."""
    source: str | None = None
    """The file this was loaded from. Not part of `pipeline_hash`."""

    @model_validator(mode="after")
    def _stages_resolve(self) -> PipelineConfig:
        problems = self._problems(where_plain)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _problems(self, where: Callable[[tuple[Any, ...]], str]) -> list[str]:
        problems: list[str] = []
        _check_stages(
            self.model.model_dump(exclude_unset=True),
            self.data.model_dump(exclude_unset=True),
            self.defaults,
            self.plateau.model_dump(exclude_unset=True),
            self.stages,
            where,
            problems,
        )
        if self.gate.metric == "task_accuracy" and self.eval_task_samples < 1:
            problems.append(
                f"{where(('eval_task_samples',))}: {self.eval_task_samples} is not allowed: must be at least 1 when "
                "gate.metric is task_accuracy (the metric is computed on these samples)"
            )
        return list(dict.fromkeys(problems))

    def resolved_stages(self) -> list[StageConfig]:
        """Each stage as a validated `StageConfig`: model + data + defaults + plateau + its own keys,
        with `name` set and `output_dir` left at its default."""
        problems: list[str] = []
        resolved, _, _ = _check_stages(
            self.model.model_dump(exclude_unset=True),
            self.data.model_dump(exclude_unset=True),
            self.defaults,
            self.plateau.model_dump(exclude_unset=True),
            self.stages,
            where_plain,
            problems,
        )
        if problems:  # only reachable after in-place mutation of `defaults` / `stages`
            raise ConfigError(problems, self.source)
        return resolved

    def stage(self, name: str) -> StageConfig:
        """The resolved stage called `name` (KeyError naming the stages otherwise)."""
        for stage in self.resolved_stages():
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages: {self.stage_names}")

    @property
    def stage_names(self) -> list[str]:
        """The stage names in order."""
        return [entry["name"] for entry in self.stages]

    def resolved_dict(self) -> dict[str, Any]:
        """The resolved content as JSON-ready data: every section with defaults filled in, and the
        resolved stages instead of `defaults` + stage entries (`profile` and `source` left out)."""
        return {
            "model": self.model.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
            "plateau": self.plateau.model_dump(mode="json"),
            "gate": self.gate.model_dump(mode="json"),
            "schedule": self.schedule.model_dump(mode="json"),
            "mlflow": self.mlflow.model_dump(mode="json"),
            **{key: getattr(self, key) for key in _SETTINGS_KEYS},
            "stages": [stage.model_dump(mode="json") for stage in self.resolved_stages()],
        }

    def pipeline_hash(self) -> str:
        """The identity of this pipeline config: sha256 (hex) of `resolved_dict()` as canonical JSON
        (sorted keys, no spaces), equal for configs that resolve to the same values however they were
        written. A scheduled run compares it (stored as the MLflow tag `config_hash` of pipeline runs)
        to find the earlier run of the same config for "no new data"."""
        text = json.dumps(
            self.resolved_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def build_pipeline(
    document: Mapping[str, Any], where: Callable[[tuple[Any, ...]], str]
) -> tuple[PipelineConfig | None, list[str]]:
    """Validate a document (profiles already applied); the config, or None and the problems."""
    problems: list[str] = []
    cadence: list[str] = []
    parts: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        parts[key] = _validate_section(cls, document.get(key), (key,), where, problems)
    settings = _validate_section(
        _PipelineSettings, {k: document[k] for k in _SETTINGS_KEYS if k in document}, (), where, problems
    )

    def layer(key: str) -> dict[str, Any] | None:
        # a section that failed its own checks is left out of the stages (its problems are listed)
        return parts[key].model_dump(exclude_unset=True) if parts[key] is not None else None

    _, defaults, stages = _check_stages(
        layer("model"),
        layer("data"),
        document.get("defaults"),
        layer("plateau"),
        document.get("stages"),
        where,
        problems,
        stages_given="stages" in document,
        cadence=cadence,
    )
    if (
        settings is not None
        and parts["gate"] is not None
        and parts["gate"].metric == "task_accuracy"
        and settings.eval_task_samples < 1
    ):
        problems.append(
            f"{where(('eval_task_samples',))}: {settings.eval_task_samples} is not allowed: must be at least 1 when "
            "gate.metric is task_accuracy (the metric is computed on these samples)"
        )
    problems = list(dict.fromkeys(problems))
    if problems or settings is None:
        return None, problems
    config = PipelineConfig(
        **{k: v for k, v in parts.items() if k in document},
        **settings.model_dump(exclude_unset=True),
        defaults=defaults,
        stages=stages,
    )
    for line in cadence:  # a warning, not a problem: see stage_file.plateau_cadence_problems
        warnings.warn(line, PlateauCadenceWarning, stacklevel=3)
    return config, []
