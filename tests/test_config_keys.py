"""The config package: key classifications, defaults written once, and its module layering."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from theworld_core.config import (
    ARCHITECTURE_KEYS,
    DEFAULT_MLFLOW_EXPERIMENT,
    PLATEAU_DEFAULTS,
    RESUME_COMPATIBLE_KEYS,
    DataConfig,
    MlflowConfig,
    ModelConfig,
    PipelinePlateauConfig,
    PlateauConfig,
    StageConfig,
    TrainingConfig,
)
from theworld_core.tracking import mlflow_runs

PACKAGE = Path(__file__).resolve().parents[1] / "theworld_core" / "config"
# Leaf first: a module may import only modules listed before it.
LAYERS = ["errors", "cron", "stage_schema", "stage_file", "pipeline_sections", "pipeline_schema", "pipeline_file"]


def test_architecture_keys_are_the_marked_model_fields_in_field_order():
    assert ARCHITECTURE_KEYS == (
        "model_name",
        "model_revision",
        "cosmos_model_name",
        "cosmos_revision",
        "max_world_steps",
        "enable_world",
        "world_tokens",
        "world_projector",
    )
    assert [k for k in ModelConfig.model_fields if k in ARCHITECTURE_KEYS] == list(ARCHITECTURE_KEYS)
    # what does not change a parameter's name or shape is not listed
    assert {"world_image_size", "max_seq_length", "num_world_steps"}.isdisjoint(ARCHITECTURE_KEYS)
    # the mark is visible where a user reads the schema
    properties = ModelConfig.model_json_schema()["properties"]
    assert properties["world_tokens"]["architecture"] is True and "architecture" not in properties["max_seq_length"]


def test_resume_compatible_keys_are_marked_stage_fields():
    assert RESUME_COMPATIBLE_KEYS == frozenset(
        {
            "logging_steps",
            "save_steps",
            "save_total_limit",
            "eval_steps",
            "output_dir",
            "resume_from_checkpoint",
            "log_to_wandb",
            "wandb_project",
            "wandb_run_name",
            "push_to_hub",
            "hub_model_id",
            "hub_strategy",
            "hub_private_repo",
            "num_processes",
            "distributed",
            "name",
            "feature_cache",
            "feature_cache_dir",
            "feature_cache_max_gb",
        }
    )
    assert RESUME_COMPATIBLE_KEYS <= set(StageConfig.model_fields)
    # a model or data key changes what is trained, and so does anything the optimizer or the plateau rule reads
    assert RESUME_COMPATIBLE_KEYS.isdisjoint(ModelConfig.model_fields)
    assert RESUME_COMPATIBLE_KEYS.isdisjoint(DataConfig.model_fields)
    assert {"learning_rate", "seed", "max_steps", "plateau_min_steps", "freeze_gemma_vision"}.isdisjoint(
        RESUME_COMPATIBLE_KEYS
    )
    # StageConfig redefines some TrainingConfig fields; the marks must survive that
    trained_marked = {
        k for k, f in TrainingConfig.model_fields.items() if (f.json_schema_extra or {}).get("resume_compatible")
    }
    assert trained_marked == RESUME_COMPATIBLE_KEYS - {"name"}


def test_plateau_defaults_are_written_once():
    assert PLATEAU_DEFAULTS == PlateauConfig()
    stage = TrainingConfig()
    for key, field in PlateauConfig.model_fields.items():
        flat = TrainingConfig.model_fields[f"plateau_{key}"]
        if key != "min_steps":  # the flat min_steps is null: resolved from the freeze flags
            assert flat.default == field.default, key
            assert flat.metadata == field.metadata, key  # the same constraints
    with pytest.raises(ValueError, match="plateau_min_steps"):
        TrainingConfig(plateau_min_steps=-1)
    assert stage.plateau == PlateauConfig()  # projection only: the guide's stage-1 rule
    assert TrainingConfig(freeze_gemma_vision=False).plateau.min_steps == 5000
    assert PipelinePlateauConfig().model_dump() == {**PlateauConfig().model_dump(), "min_steps": None}


def test_default_mlflow_experiment_is_written_once():
    assert MlflowConfig().experiment == DEFAULT_MLFLOW_EXPERIMENT
    assert TrainingConfig().mlflow_names().experiment == DEFAULT_MLFLOW_EXPERIMENT
    assert inspect.signature(mlflow_runs.ensure_experiment).parameters["name"].default == DEFAULT_MLFLOW_EXPERIMENT


def _package_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("theworld_core.config."):
            names.append(node.module.removeprefix("theworld_core.config."))
    return names


@pytest.mark.parametrize("module", LAYERS)
def test_modules_import_only_lower_layers_at_the_top_and_stay_short(module):
    path = PACKAGE / f"{module}.py"
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 600
    lower = LAYERS[: LAYERS.index(module)]
    assert set(_package_imports(path)) <= set(lower), f"{module} imports a module at or above its layer"
    tree = ast.parse(text)
    first_code = next(
        i for i, node in enumerate(tree.body) if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr))
    )
    late = [node.lineno for node in tree.body[first_code:] if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert late == [], f"{module}: imports half-way down, at lines {late}"


def test_every_module_is_listed():
    assert {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"} == set(LAYERS)
