"""Stage configs: the seed's JSON files, validation, the error format, secrets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from theworld_core.config import (
    COMPONENT_NAMES,
    DEFAULT_MLFLOW_EXPERIMENT,
    ConfigError,
    DataConfig,
    ModelConfig,
    PlateauConfig,
    StageConfig,
    TrainingConfig,
    checkpoint_source_kind,
    format_validation_error,
    load_stage_config,
    parse_json_with_comments,
    strip_json_comments,
    suggest_key,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]
SEED_DIR = ROOT / "configs" / "seed"
GUIDE = Path("/work/shared/seed/multi-stage-training-guide.md")
SEED_FILES = ["stage1_projection", "stage2_vision", "stage3_language", "stage4_full", "multistage_test"]


def write(tmp_path: Path, text: str, name: str = "stage.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_stage_config(write(tmp_path, text))
    return info.value.problems


# ---------------------------------------------------------------------------------------------
# The seed's files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SEED_FILES)
def test_seed_configs_load(name):
    config = load_stage_config(SEED_DIR / f"{name}.json")
    assert isinstance(config, StageConfig)


@pytest.mark.skipif(not GUIDE.exists(), reason="the seed guide is not available here")
def test_seed_configs_are_the_guides_blocks_verbatim():
    guide = GUIDE.read_text(encoding="utf-8")
    blocks = dict(
        re.findall(
            r"\*\*(?:Create config|Test Config): `configs/([a-z0-9_]+)\.json`\*\*\n```json\n(.*?)```", guide, re.S
        )
    )
    assert set(blocks) == {"stage1_projection", "stage2_vision", "stage3_language", "multistage_test"}
    for name, block in blocks.items():
        assert (SEED_DIR / f"{name}.json").read_text(encoding="utf-8") == block


def test_seed_stage_values_match_the_guide():
    stages = {name: load_stage_config(SEED_DIR / f"{name}.json") for name in SEED_FILES[:4]}
    flags = {name: tuple(c.freeze_flags.values()) for name, c in stages.items()}
    assert flags == {
        "stage1_projection": (True, True, True),
        "stage2_vision": (False, True, True),
        "stage3_language": (False, False, True),
        "stage4_full": (False, False, False),
    }
    assert [c.learning_rate for c in stages.values()] == [1e-4, 5e-5, 1e-5, 5e-6]
    assert [c.warmup_steps for c in stages.values()] == [500, 100, 100, 100]
    assert [c.use_gradient_checkpointing for c in stages.values()] == [False, False, True, True]
    s1, s2, s3, s4 = stages.values()
    assert s1.resume_from_checkpoint is None
    assert s2.resume_from_checkpoint == "your-username/theworld-stage1-projection"
    assert s3.resume_from_checkpoint == "your-username/theworld-stage2-vision"
    assert s4.resume_from_checkpoint == "your-username/theworld-stage3-language"
    assert all(checkpoint_source_kind(c.resume_from_checkpoint) == "hub" for c in (s2, s3, s4))
    assert s1.model_name == "google/gemma-3-4b-it"
    assert s1.cosmos_model_name == "nvidia/Cosmos-Predict2-2B-Video2World"
    assert s1.dataset_name == "datacomp" and s1.streaming is True and s1.num_samples is None
    assert s1.mixed_precision == "bf16" and s1.eval_steps == 5000 and s1.save_total_limit == 5
    assert s1.hub_model_id == "your-username/theworld-stage1-projection" and s1.hub_strategy == "every_save"
    assert s4.effective_batch_size == s1.effective_batch_size == 16
    # The guide: no plateau before 10K steps in stage 1, 5K in the others.
    assert [c.plateau.min_steps for c in stages.values()] == [10000, 5000, 5000, 5000]
    assert s1.mlflow_names().experiment == "theworld-multistage"
    assert s2.mlflow_names().run_name == "stage2-vision"


def test_partial_test_config_parses_alone_with_defaults():
    # multistage_test.json is an overlay in the guide ("run through all stages quickly"); every key
    # has a default, so it is also a complete (projection-only) stage on its own.
    config = load_stage_config(SEED_DIR / "multistage_test.json")
    assert config.num_samples == 1000 and config.streaming is False and config.num_epochs == 3
    assert config.save_steps == 100 and config.push_to_hub is False
    assert config.freeze_flags == {
        "freeze_gemma_vision": True,
        "freeze_gemma_language": True,
        "freeze_cosmos_vae": True,
    }
    assert config.learning_rate == TrainingConfig().learning_rate
    assert config.model_fields_set == {
        "dataset_name",
        "num_samples",
        "streaming",
        "num_epochs",
        "save_steps",
        "push_to_hub",
    }


def test_overlay_on_a_stage_with_model_dump_exclude_unset():
    base = load_stage_config(SEED_DIR / "stage2_vision.json")
    overlay = load_stage_config(SEED_DIR / "multistage_test.json")
    merged = base.with_changes(**overlay.model_dump(exclude_unset=True))
    assert merged.freeze_gemma_vision is False and merged.num_samples == 1000 and merged.push_to_hub is False


# ---------------------------------------------------------------------------------------------
# JSON with comments
# ---------------------------------------------------------------------------------------------


def test_comments_and_comment_keys_are_ignored_but_urls_survive(tmp_path):
    text = """{
  // a full-line comment
  "_comment": "ignored",
  "model_name": "https://example.org/gemma",   // trailing comment after a value
  "dataset_name": "a // b /* c */ d",  /* block
  comment */ "learning_rate": 0.0002,
  "output_dir": "C:\\\\runs\\\\\\"quoted\\" // still a string",
  "learning_rates": {"_note": "x", "gemma_vision": 1e-5,},   // trailing comma too
}"""
    config = load_stage_config(write(tmp_path, text))
    assert config.model_name == "https://example.org/gemma"
    assert config.dataset_name == "a // b /* c */ d"
    assert config.learning_rate == 0.0002
    assert config.output_dir == 'C:\\runs\\"quoted" // still a string'
    assert config.learning_rates == {"gemma_vision": 1e-5}


def test_strip_keeps_positions():
    text = '{"a": 1, // x\n "b": "//"}'
    stripped = strip_json_comments(text)
    assert len(stripped) == len(text) and stripped.count("\n") == text.count("\n")
    assert json.loads(stripped) == {"a": 1, "b": "//"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values, st.sampled_from([None, 2]))
def test_plain_json_parses_unchanged(value, indent):
    # Any valid JSON (strings full of '//', '/*', ',}' included) means the same after stripping.
    text = json.dumps(value, indent=indent)
    stripped = strip_json_comments(text)
    assert json.loads(stripped) == value


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ('{\n  "learning_rate": 0.1\n  "batch_size": 2\n}', 3, 3),
        ('{\n  "a": 1,\n  /* never closed\n}', 3, 3),
        ('{"a": tru}', 1, 7),
    ],
)
def test_invalid_json_reports_line_and_column(tmp_path, text, line, column):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_stage_config(path)
    assert (info.value.line, info.value.column) == (line, column)
    assert str(info.value).startswith(f"{path}:{line}:{column}: invalid JSON")


def test_empty_file_missing_file_and_non_object(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        load_stage_config(write(tmp_path, "  // nothing\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_stage_config(tmp_path / "nope.json")
    assert problems_of(tmp_path, "[1, 2]") == [
        "(top level): [1, 2] is not allowed: must be a JSON object of config keys"
    ]


def test_duplicate_keys_are_refused(tmp_path):
    assert problems_of(tmp_path, '{"learning_rate": 1e-4, "learning_rate": 1e-5}') == [
        "learning_rate: duplicate key: it appears more than once (JSON would silently keep the last)"
    ]


# ---------------------------------------------------------------------------------------------
# The error format
# ---------------------------------------------------------------------------------------------


def test_error_format_examples(tmp_path):
    path = write(tmp_path, '{"learning_rate": -0.1, "lr": 0.1}')
    with pytest.raises(ConfigError) as info:
        load_stage_config(path)
    assert info.value.problems == [
        "learning_rate: -0.1 is not allowed: must be greater than 0",
        "lr: unknown key; did you mean 'learning_rate'?",
    ]
    assert info.value.source == str(path)
    assert str(info.value).splitlines()[0] == f"{path}: 2 problems:"
    single = problems_of(tmp_path, '{"batch_size": 0}')
    assert single == ["batch_size: 0 is not allowed: must be greater than or equal to 1"]


def test_every_problem_is_listed(tmp_path):
    text = """{
      "mixed_precision": "fp32", "lr_scheduler": "cosin", "num_epochs": 0, "batch_size": 2.5,
      "do_eval": "maybe", "hub_strategy": "checkpoint", "learning_rates": {"gemma_vison": 1e-5},
      "resume_from_checkpoint": "s3://bucket/x", "hub_model_id": "no-slash", "num_world_steps": 2,
      "eval_fraction": 1.5, "epochs": 2, "bogus_key": 1, "load_full_cosmos_pipeline": false
    }"""
    problems = problems_of(tmp_path, text)
    assert "mixed_precision: 'fp32' is not allowed: must be one of 'no', 'fp16', 'bf16'" in problems
    assert any(
        p.startswith("lr_scheduler: 'cosin' is not allowed: must be one of 'linear', 'cosine'")
        and p.endswith("did you mean 'cosine'?")
        for p in problems
    )
    assert "num_epochs: 0 is not allowed: must be greater than 0" in problems
    assert "batch_size: 2.5 is not allowed: must be a whole number" in problems
    assert "do_eval: 'maybe' is not allowed: must be true or false" in problems
    assert "hub_strategy: 'checkpoint' is not allowed: must be one of 'every_save', 'end'" in problems
    assert any(
        p.startswith("learning_rates.gemma_vison: 'gemma_vison' is not allowed: must be one of")
        and "did you mean 'gemma_vision'?" in p
        for p in problems
    )
    assert any(
        p.startswith("resume_from_checkpoint: 's3://bucket/x' is not allowed: must be a local folder") for p in problems
    )
    assert "hub_model_id: 'no-slash' is not allowed: must be a hub repo id of the form 'owner/name'" in problems
    assert any(p.startswith("num_world_steps: 2 is not allowed:") for p in problems)
    assert "eval_fraction: 1.5 is not allowed: must be less than 1" in problems
    assert "epochs: unknown key; did you mean 'num_epochs'?" in problems
    assert "bogus_key: unknown key (not a field of this config)" in problems
    assert (
        "load_full_cosmos_pipeline: unknown key; the original trainer's 'load_full_cosmos_pipeline' is not used "
        "here: only the Cosmos VAE encoder is ever loaded (AutoencoderKLWan, subfolder 'vae')"
    ) in problems
    assert len(problems) == 14


def test_cross_field_checks(tmp_path):
    assert problems_of(tmp_path, '{"push_to_hub": true}') == [
        "hub_model_id: null is not allowed: required when push_to_hub is true: the hub repo as 'owner/name'"
    ]
    assert problems_of(tmp_path, '{"max_steps": 50, "warmup_steps": 100}') == [
        "warmup_steps: 100 is not allowed: must not exceed max_steps (50): the learning rate would never reach its peak"
    ]
    assert load_stage_config(write(tmp_path, '{"push_to_hub": true, "hub_model_id": "me/x"}')).push_to_hub


def test_formatter_prefix_for_nested_configs():
    class Pipeline(BaseModel):
        stages: list[StageConfig]

    data = {"stages": [{}, {}, {"learning_rate": -0.1, "lr": 1, "push_to_hub": False}]}
    with pytest.raises(ValidationError) as info:
        Pipeline.model_validate(data)
    assert format_validation_error(info.value, "stages.yaml", model=Pipeline) == [
        "stages[2].learning_rate: -0.1 is not allowed: must be greater than 0",
        "stages[2].lr: unknown key; did you mean 'learning_rate'?",
    ]
    with pytest.raises(ValidationError) as info:
        StageConfig.model_validate({"learning_rate": 0})
    assert format_validation_error(info.value, prefix="stages[1]") == [
        "stages[1].learning_rate: 0 is not allowed: must be greater than 0"
    ]
    with pytest.raises(ConfigError) as cfg_info:
        validate_config(PlateauConfig, {"window_steps": 0, "min_improvment": 0.1}, "stages.yaml", prefix="plateau")
    assert cfg_info.value.problems == [
        "plateau.window_steps: 0 is not allowed: must be greater than or equal to 1",
        "plateau.min_improvment: unknown key; did you mean 'min_improvement'?",
    ]


def test_suggestions():
    fields = list(StageConfig.model_fields)
    assert suggest_key("lr", fields) == "learning_rate"
    assert suggest_key("wd", fields) == "weight_decay"
    assert suggest_key("bs", fields) == "batch_size"
    assert suggest_key("gradient_accumulation", fields) == "gradient_accumulation_steps"
    assert suggest_key("freeze_vision", fields) == "freeze_gemma_vision"
    assert suggest_key("zzzz", fields) is None


# ---------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------

TOKEN = "hf_abcdefghijklmnopqrstuvwxyz0123"


@pytest.mark.parametrize("key", ["hf_token", "token", "hub_token", "HF_TOKEN", "wandb_api_key"])
def test_secret_keys_are_refused_without_echoing_them(tmp_path, key):
    path = write(tmp_path, json.dumps({key: TOKEN, "learning_rate": -1}))
    with pytest.raises(ConfigError) as info:
        load_stage_config(path)
    message = str(info.value)
    assert TOKEN not in message and TOKEN not in repr(info.value.problems)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert any(p.startswith(f"{key}: secrets are not allowed in config files") for p in info.value.problems)
    if "token" in key.lower():
        assert "HF_TOKEN" in message


def test_secret_never_in_a_raw_validation_error():
    with pytest.raises(ValidationError) as info:
        StageConfig.model_validate({"hf_token": TOKEN})
    assert TOKEN not in str(info.value)
    problems = format_validation_error(info.value)
    assert problems[0].startswith("hf_token: secrets are not allowed") and TOKEN not in problems[0]


def test_token_looking_values_are_redacted_in_messages(tmp_path):
    problems = problems_of(tmp_path, json.dumps({"num_epochs": TOKEN}))
    assert TOKEN not in problems[0] and "hf_***" in problems[0]


# ---------------------------------------------------------------------------------------------
# Fields, defaults and views
# ---------------------------------------------------------------------------------------------


def test_stage_is_the_flat_union_and_every_training_field_is_documented():
    stage_fields = set(StageConfig.model_fields)
    assert set(ModelConfig.model_fields) <= stage_fields
    assert set(DataConfig.model_fields) <= stage_fields
    assert set(TrainingConfig.model_fields) <= stage_fields
    assert stage_fields - set(ModelConfig.model_fields) - set(DataConfig.model_fields) - set(
        TrainingConfig.model_fields
    ) == {"name"}
    for name, field in TrainingConfig.model_fields.items():
        assert field.description, f"TrainingConfig.{name} has no docstring"
    for name in ("name", "seed"):
        assert StageConfig.model_fields[name].description


def test_training_defaults():
    c = StageConfig()
    assert (c.freeze_gemma_vision, c.freeze_gemma_language, c.freeze_cosmos_vae) == (True, True, True)
    assert c.learning_rate == 1e-4 and c.learning_rates is None
    assert (c.batch_size, c.gradient_accumulation_steps, c.num_epochs, c.max_steps) == (4, 4, 1.0, None)
    assert (c.warmup_steps, c.lr_scheduler, c.weight_decay, c.max_grad_norm) == (100, "linear", 0.01, 1.0)
    assert c.mixed_precision == "bf16" and c.use_gradient_checkpointing is False
    assert (c.save_steps, c.save_total_limit, c.resume_from_checkpoint, c.carry_optimizer_state) == (
        1000,
        5,
        None,
        False,
    )
    assert (c.eval_steps, c.do_eval, c.eval_max_samples, c.logging_steps) == (1000, True, None, 100)
    assert (c.seed, c.num_processes, c.name) == (42, 1, None)
    assert (c.push_to_hub, c.hub_model_id, c.hub_strategy, c.hub_private_repo) == (False, None, "every_save", False)
    assert (c.log_to_wandb, c.wandb_project, c.wandb_run_name) == (False, None, None)
    assert c.plateau == PlateauConfig(min_improvement=0.01, window_steps=5000, patience_steps=3000, min_steps=10000)


def test_fractional_epochs_and_max_steps():
    c = StageConfig(num_epochs=0.5, max_steps=200, warmup_steps=200)
    assert c.num_epochs == 0.5 and c.max_steps == 200


def test_plateau_view():
    assert StageConfig(freeze_gemma_vision=False).plateau.min_steps == 5000
    assert StageConfig(plateau_min_steps=123).plateau.min_steps == 123
    p = StageConfig(plateau_min_improvement=0.02, plateau_window_steps=10, plateau_patience_steps=3).plateau
    assert (p.min_improvement, p.window_steps, p.patience_steps) == (0.02, 10, 3)


def test_per_component_learning_rates():
    c = StageConfig(learning_rate=1e-4, learning_rates={"gemma_vision": 1e-5})
    assert c.learning_rate_for("gemma_vision") == 1e-5
    assert c.learning_rate_for("world_projector") == 1e-4
    assert c.component_learning_rates == {
        "world_projector": 1e-4,
        "gemma_vision": 1e-5,
        "gemma_language": 1e-4,
        "cosmos_vae": 1e-4,
    }
    with pytest.raises(KeyError):
        c.learning_rate_for("lm_head")
    assert tuple(c.component_learning_rates) == COMPONENT_NAMES


def test_freeze_flags_feed_the_component_registry():
    components = pytest.importorskip("theworld_core.model.components")
    c = StageConfig(freeze_gemma_vision=False, freeze_gemma_language=True, freeze_cosmos_vae=True)
    assert components.trainable_components(c.freeze_flags) == ("world_projector", "gemma_vision")
    assert c.trainable_component_names == ("world_projector", "gemma_vision")
    assert set(c.freeze_flags) == set(components.FREEZE_FLAGS)


def test_parts():
    c = StageConfig(model_name="/tmp/tiny-gemma", dataset_name="synthetic", seed=7, learning_rate=3e-4, world_tokens=16)
    assert c.model_part() == ModelConfig(model_name="/tmp/tiny-gemma", world_tokens=16)
    assert c.data_part() == DataConfig(dataset_name="synthetic", seed=7)
    assert c.training_part().learning_rate == 3e-4 and c.training_part().seed == 7


def test_mixed_precision_resolution():
    # The stage key's meaning per device lives in the precision policy (theworld_core/model/precision.py).
    from theworld_core.model.precision import resolve_precision

    assert resolve_precision(StageConfig(mixed_precision="bf16").mixed_precision, "cpu").effective == "no"
    assert resolve_precision("bf16", "cuda", bf16_supported=True).effective == "bf16"
    assert resolve_precision("bf16", "cuda", bf16_supported=False).effective == "no"
    assert resolve_precision("fp16", "cpu").effective == "no"
    assert resolve_precision("no", "cuda", bf16_supported=True).effective == "no"


def test_wandb_keys_map_to_mlflow():
    c = StageConfig(name="stage1", log_to_wandb=True, wandb_project="proj", wandb_run_name="run-a")
    assert (c.mlflow_names().experiment, c.mlflow_names().run_name) == ("proj", "run-a")
    notice = c.wandb_notice()
    assert "\n" not in notice and "'proj'" in notice and "'run-a'" in notice and "MLflow" in notice
    plain = StageConfig(name="stage1")
    assert plain.wandb_notice() is None
    assert (plain.mlflow_names().experiment, plain.mlflow_names().run_name) == (DEFAULT_MLFLOW_EXPERIMENT, "stage1")


def test_lr_scheduler_names_work_with_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from typing import get_args

    names = get_args(TrainingConfig.model_fields["lr_scheduler"].annotation)
    assert "linear" in names and "cosine" in names
    for name in names:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=1e-3)
        scheduler = transformers.get_scheduler(name, optimizer, num_warmup_steps=2, num_training_steps=10)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("runs:/0123abcd/stage_output", "mlflow_run"),
        ("models:/theworld/3", "mlflow_model"),
        ("models:/theworld@champion", "mlflow_model"),
        ("your-username/theworld-stage1-projection", "hub"),
        ("./checkpoints/stage1", "local"),
        ("/abs/stage1", "local"),
        ("checkpoints/stage1/checkpoint-1000", "local"),
        ("stage1_output", "local"),
    ],
)
def test_checkpoint_source_kinds(value, kind):
    assert checkpoint_source_kind(value) == kind
    assert StageConfig(resume_from_checkpoint=value).resume_from_checkpoint == value


@pytest.mark.parametrize("value", ["runs:/", "models:/", "models:/@x", "https://x.org/ckpt", "s3://b/k", " padded "])
def test_bad_checkpoint_sources(value):
    with pytest.raises(ValueError):
        checkpoint_source_kind(value)


def test_with_changes_validates_everything_together():
    c = load_stage_config(SEED_DIR / "stage2_vision.json")
    retry = c.with_changes(learning_rate=c.learning_rate / 10, max_grad_norm=0.5, warmup_steps=500)
    assert (retry.learning_rate, retry.max_grad_norm, retry.warmup_steps) == (5e-6, 0.5, 500)
    assert retry.freeze_gemma_vision is False and c.learning_rate == 5e-5
    with pytest.raises(ConfigError) as info:
        c.with_changes(push_to_hub=True, hub_model_id=None)
    assert info.value.problems[0].startswith("hub_model_id: null is not allowed")


def test_stage_name_form():
    assert StageConfig(name="stage2_vision").name == "stage2_vision"
    with pytest.raises(ValidationError):
        StageConfig(name="a/b")


def test_repeated_comment_keys_are_fine():
    assert parse_json_with_comments('{"_comment": "a", "_comment": "b", "x": 1}') == {"_comment": "b", "x": 1}


def test_distributed_names_its_values_and_refuses_8bit_moments_under_fsdp():
    from theworld_core.config import StageConfig

    assert StageConfig().distributed == "ddp"
    assert StageConfig(distributed="fsdp", num_processes=8).distributed == "fsdp"
    with pytest.raises(ValidationError) as bad:
        StageConfig(distributed="zero3")
    assert "distributed" in str(bad.value) and "'ddp'" in str(bad.value) and "'fsdp'" in str(bad.value)
    with pytest.raises(ValidationError) as bad:
        StageConfig(distributed="fsdp", optimizer="adamw_8bit")
    message = "\n".join(format_validation_error(bad.value))
    assert "optimizer: 'adamw_8bit' is not allowed: must be adamw when distributed is fsdp" in message, message
