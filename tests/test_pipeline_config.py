"""The pipeline file (stages.yaml): the shipped file, profiles, resolution, errors, hash."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from theworld_core.config import (
    PIPELINE_KEYS,
    ConfigError,
    GateConfig,
    MlflowConfig,
    PipelineConfig,
    PipelinePlateauConfig,
    ScheduleConfig,
    StageConfig,
    TrainingConfig,
    cron_problem,
    load_pipeline_config,
    parse_pipeline_yaml,
)

ROOT = Path(__file__).resolve().parents[1]
STAGES_YAML = ROOT / "stages.yaml"

MINIMAL = """\
stages:
  - name: a
    learning_rate: 1.0e-4
  - name: b
    freeze_gemma_vision: false
    learning_rate: 5.0e-5
"""


def write(tmp_path: Path, text: str, name: str = "stages.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str, profile: str | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(write(tmp_path, text), profile=profile)
    return info.value.problems


# ---------------------------------------------------------------------------------------------
# The shipped stages.yaml
# ---------------------------------------------------------------------------------------------


def test_shipped_file_has_the_seeds_four_stages():
    pipeline = load_pipeline_config(STAGES_YAML)
    assert pipeline.stage_names == ["projection", "vision", "language", "full"]
    assert pipeline.source == str(STAGES_YAML) and pipeline.profile is None
    stages = {s.name: s for s in pipeline.resolved_stages()}
    expected = {
        # name: (vision frozen, language frozen, vae frozen, lr, warmup, checkpointing, batch, accumulation)
        "projection": (True, True, True, 1e-4, 500, False, 4, 4),
        "vision": (False, True, True, 5e-5, 100, False, 4, 4),
        "language": (False, False, True, 1e-5, 100, True, 2, 8),
        "full": (False, False, False, 5e-6, 100, True, 2, 8),
    }
    for name, (fv, fl, fc, lr, warmup, gc, batch, accum) in expected.items():
        s = stages[name]
        assert (s.freeze_gemma_vision, s.freeze_gemma_language, s.freeze_cosmos_vae) == (fv, fl, fc), name
        assert s.learning_rate == lr and s.warmup_steps == warmup, name
        assert s.use_gradient_checkpointing is gc, name
        assert (s.batch_size, s.gradient_accumulation_steps) == (batch, accum), name
        assert s.effective_batch_size == 16
        # the seed's shared values
        assert s.model_name == "google/gemma-3-4b-it"
        assert s.cosmos_model_name == "nvidia/Cosmos-Predict2-2B-Video2World"
        assert (s.dataset_name, s.streaming, s.num_samples) == ("datacomp", True, None)
        # eval_steps 1000, not the seed's 5000: the plateau rule needs 3 evaluations per window (docs/stages.md#plateau)
        assert (s.mixed_precision, s.eval_steps, s.save_steps, s.save_total_limit, s.logging_steps) == (
            "bf16",
            1000,
            1000,
            5,
            100,
        )
        assert (s.num_epochs, s.weight_decay, s.max_grad_norm, s.max_steps) == (1.0, 0.01, 1.0, None)
        assert s.output_dir == TrainingConfig.model_fields["output_dir"].default  # the flow sets it


def test_shipped_plateau_gate_schedule_mlflow():
    pipeline = load_pipeline_config(STAGES_YAML)
    # patience 3000 (was the guide's 2000): 3 evaluations at eval_steps 1000, as the rule needs
    assert pipeline.plateau == PipelinePlateauConfig(
        min_improvement=0.01, window_steps=5000, patience_steps=3000, min_steps=None
    )
    plateaus = [s.plateau for s in pipeline.resolved_stages()]
    assert [(p.min_improvement, p.window_steps, p.patience_steps) for p in plateaus] == [(0.01, 5000, 3000)] * 4
    assert [p.min_steps for p in plateaus] == [10000, 5000, 5000, 5000]  # the guide: 10K for stage 1, 5K after
    assert pipeline.gate == GateConfig()
    assert pipeline.gate.model_dump() == {
        "metric": "eval_loss",
        "target": None,
        "regression_tolerance": 0.02,
        "max_diverged_retries": 1,
        "max_oom_retries": 2,
        "diverged_lr_factor": 0.1,
        "diverged_max_grad_norm": 0.5,
        "diverged_warmup_steps": 500,
    }
    assert pipeline.schedule == ScheduleConfig(cron="0 3 * * *", timezone="UTC")
    assert pipeline.schedule.only_on_new_data and not pipeline.schedule.warm_start_from_champion
    assert pipeline.schedule.new_data_event == "theworld.data.updated"
    assert pipeline.mlflow == MlflowConfig(
        experiment="theworld-multistage", registered_model="theworld", champion_alias="champion"
    )
    assert pipeline.mlflow.log_system_metrics
    assert (pipeline.output_root, pipeline.eval_generations, pipeline.eval_task_samples) == (
        "./.theworld/stages",
        4,
        64,
    )


def test_shipped_tiny_profile():
    pipeline = load_pipeline_config(STAGES_YAML, profile="tiny")
    assert pipeline.profile == "tiny"
    assert pipeline.stage_names == ["projection", "vision", "language", "full"]
    stages = pipeline.resolved_stages()
    lrs = {s.name: s.learning_rate for s in stages}
    assert lrs == {"projection": 3e-2, "vision": 5e-3, "language": 2e-3, "full": 1e-3}
    for s in stages:
        assert (s.model_name, s.cosmos_model_name) == ("tiny", "tiny")
        assert (s.world_tokens, s.world_image_size, s.max_seq_length) == (4, 32, 128)
        assert (s.dataset_name, s.streaming, s.synthetic_samples, s.synthetic_image_size, s.eval_fraction) == (
            "synthetic",
            False,
            400,
            32,
            0.1,
        )
        assert (s.batch_size, s.gradient_accumulation_steps, s.max_steps, s.warmup_steps) == (8, 1, 150, 10)
        assert (s.eval_steps, s.save_steps, s.logging_steps, s.eval_max_samples) == (10, 25, 5, 40)
        assert s.mixed_precision == "no" and s.divergence_grad_norm is None
        assert s.plateau.model_dump() == {
            "min_improvement": 0.01,
            "window_steps": 30,
            "patience_steps": 30,
            "min_steps": 40,
        }
    # the freeze flags are the base file's
    base = load_pipeline_config(STAGES_YAML)
    assert [s.freeze_flags for s in stages] == [s.freeze_flags for s in base.resolved_stages()]
    assert pipeline.schedule.cron is None
    assert pipeline.gate.diverged_warmup_steps <= 150
    # the divergence recipe's warmup fits a tiny stage
    retried = stages[1].with_changes(
        learning_rate=stages[1].learning_rate * pipeline.gate.diverged_lr_factor,
        warmup_steps=pipeline.gate.diverged_warmup_steps,
    )
    assert retried.learning_rate == pytest.approx(5e-4)
    assert pipeline.output_root == base.output_root
    assert pipeline.pipeline_hash() != base.pipeline_hash()


_KEY_LINE = re.compile(r"^(\s*)(?:-\s+)?([A-Za-z_][A-Za-z0-9_.-]*)\s*:(?:\s|$)")


def test_every_key_in_stages_yaml_is_documented():
    lines = STAGES_YAML.read_text(encoding="utf-8").splitlines()
    undocumented = []
    keys_seen = set()
    for number, line in enumerate(lines):
        if line.lstrip().startswith("#"):
            continue
        match = _KEY_LINE.match(line)
        if not match:
            continue
        if match.group(1) == "":
            keys_seen.add(match.group(2))
        same_line = re.search(r"\s#\s*\S", line) is not None
        above = number > 0 and lines[number - 1].lstrip().startswith("#")
        if not (same_line or above):
            undocumented.append(f"line {number + 1}: {line.strip()}")
    assert undocumented == []
    assert keys_seen == set(PIPELINE_KEYS)  # every top-level key appears (and so is documented)


# ---------------------------------------------------------------------------------------------
# Resolution and profiles
# ---------------------------------------------------------------------------------------------


def test_resolved_stages_apply_defaults_and_stage_keys_win(tmp_path):
    text = """\
model:
  world_tokens: 16
data:
  dataset_name: synthetic
  seed: 7
defaults:
  batch_size: 6
  warmup_steps: 50
  learning_rate: 1.0e-3
plateau:
  window_steps: 300
stages:
  - name: a
  - name: b
    freeze_gemma_vision: false
    warmup_steps: 20
    plateau_min_steps: 7
"""
    pipeline = load_pipeline_config(write(tmp_path, text))
    a, b = pipeline.resolved_stages()
    assert isinstance(a, StageConfig) and isinstance(b, StageConfig)
    assert (a.name, b.name) == ("a", "b")
    assert a.world_tokens == b.world_tokens == 16 and a.dataset_name == "synthetic"
    assert a.seed == b.seed == 7 and b.data_part().seed == 7
    assert a.batch_size == b.batch_size == 6
    assert a.learning_rate == b.learning_rate == 1e-3
    assert (a.warmup_steps, b.warmup_steps) == (50, 20)
    assert a.plateau.window_steps == b.plateau.window_steps == 300
    assert (a.plateau.min_steps, b.plateau.min_steps) == (10000, 7)
    assert pipeline.stage("b") == b
    with pytest.raises(KeyError, match="'a', 'b'"):
        pipeline.stage("c")


def test_profile_changes_only_what_it_names(tmp_path):
    text = (
        MINIMAL
        + """\
gate:
  regression_tolerance: 0.05
profiles:
  p:
    gate:
      target: 1.5
    defaults:
      max_steps: 300
    stages:
      b:
        learning_rate: 1.0e-2
"""
    )
    path = write(tmp_path, text)
    base = load_pipeline_config(path).resolved_dict()
    profiled = load_pipeline_config(path, profile="p").resolved_dict()

    def flat(data, prefix=()):
        if isinstance(data, dict):
            return {k: v for key, value in data.items() for k, v in flat(value, prefix + (key,)).items()}
        if isinstance(data, list):
            return {k: v for i, value in enumerate(data) for k, v in flat(value, prefix + (i,)).items()}
        return {prefix: data}

    before, after = flat(base), flat(profiled)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {
        ("gate", "target"),
        ("stages", 0, "max_steps"),
        ("stages", 1, "max_steps"),
        ("stages", 1, "learning_rate"),
    }
    assert after[("gate", "regression_tolerance")] == 0.05  # deep merge: the rest of the section is kept
    assert after[("stages", 1, "learning_rate")] == 1e-2 and after[("stages", 0, "learning_rate")] == 1e-4


def test_profile_deep_merges_nested_mappings(tmp_path):
    text = """\
defaults:
  learning_rates: {world_projector: 1.0e-3, gemma_vision: 1.0e-5}
stages:
  - name: a
profiles:
  p:
    defaults:
      learning_rates: {gemma_vision: 2.0e-5}
"""
    (stage,) = load_pipeline_config(write(tmp_path, text), profile="p").resolved_stages()
    assert stage.learning_rates == {"world_projector": 1e-3, "gemma_vision": 2e-5}


def test_unknown_profile_lists_the_known_ones(tmp_path):
    text = MINIMAL + "profiles:\n  tiny: {}\n  fast: {}\n"
    assert problems_of(tmp_path, text, profile="tinny") == [
        "profile: 'tinny' is not allowed: must be one of 'tiny', 'fast'; did you mean 'tiny'?"
    ]
    assert problems_of(tmp_path, MINIMAL, profile="tiny") == [
        "profile: 'tiny' is not allowed: the file defines no profiles"
    ]


# ---------------------------------------------------------------------------------------------
# Bad files: every problem at once, each with its key path
# ---------------------------------------------------------------------------------------------

BAD_CASES = [
    # (yaml, expected problem line)
    (
        "stages:\n  - name: a\n  - name: b\n  - name: c\n    learning_rate: -1.0\n",
        "stages[2].learning_rate: -1.0 is not allowed: must be greater than 0",
    ),
    (
        MINIMAL + "gate:\n  target: -1\n",
        "gate.target: -1.0 is not allowed: must be greater than or equal to 0: metric eval_loss is a cross-entropy, never negative",
    ),
    (
        MINIMAL + "gate:\n  metric: task_accuracy\n  target: 1.5\n",
        "gate.target: 1.5 is not allowed: must be in [0, 1]: metric task_accuracy is a share of correct answers",
    ),
    (
        MINIMAL + "gate:\n  metric: accuracy\n",
        "gate.metric: 'accuracy' is not allowed: must be one of 'eval_loss', 'task_accuracy'; did you mean 'task_accuracy'?",
    ),
    (
        MINIMAL + "gate:\n  diverged_lr_factor: 1.0\n",
        "gate.diverged_lr_factor: 1.0 is not allowed: must be less than 1",
    ),
    (
        MINIMAL + "gate:\n  max_oom_retries: -1\n",
        "gate.max_oom_retries: -1 is not allowed: must be greater than or equal to 0",
    ),
    (
        MINIMAL + "profiles:\n  tiny:\n    stages:\n      vison: {learning_rate: 1.0}\n",
        "profiles.tiny.stages.vison: unknown stage; the stages are 'a', 'b'",
    ),
    (MINIMAL + "stagess: []\n", "stagess: unknown key; did you mean 'stages'?"),
    (MINIMAL + "gates: {}\n", "gates: unknown key; did you mean 'gate'?"),
    (
        "stages:\n  - name: a\n  - name: a\n",
        "stages[1].name: 'a' is not allowed: stage names must be unique; stages[0] is already named 'a'",
    ),
    ("stages: []\n", "stages: [] is not allowed: must list at least one stage"),
    ("defaults: {}\n", "stages: required but missing: list the stages, each with a name and its training keys"),
    ("stages:\n  - learning_rate: 1.0\n", "stages[0].name: required but missing: every stage needs a unique name"),
    (
        "stages:\n  - name: a b\n",
        "stages[0].name: 'a b' is not allowed: must start with a letter or digit and use only letters, digits, '_', '-' and '.'",
    ),
    (
        MINIMAL.replace("learning_rate: 5.0e-5", "lr: 5.0e-5"),
        "stages[1].lr: unknown key; did you mean 'learning_rate'?",
    ),
    (
        MINIMAL + "model:\n  world_tokens: 5\n",
        "model.world_tokens: 5 is not allowed: world_tokens=5 must be a perfect square (4, 16, 64, ...): the latent is pooled to a square grid",
    ),
    (
        MINIMAL + "model:\n  learning_rate: 1.0\n",
        "model.learning_rate: unknown key here; 'learning_rate' belongs in defaults or a stage",
    ),
    (MINIMAL + "data:\n  eval_fraction: 1.5\n", "data.eval_fraction: 1.5 is not allowed: must be less than 1"),
    (
        MINIMAL + "plateau:\n  window_steps: 0\n",
        "plateau.window_steps: 0 is not allowed: must be greater than or equal to 1",
    ),
    (
        MINIMAL + "plateau:\n  min_improvment: 0.1\n",
        "plateau.min_improvment: unknown key; did you mean 'min_improvement'?",
    ),
    (
        MINIMAL + "defaults:\n  plateau_window_steps: 10\n",
        "defaults.plateau_window_steps: 10 is not allowed: set it in the plateau section as plateau.window_steps (a stage may override it)",
    ),
    (
        MINIMAL.replace("  - name: b\n", "  - name: b\n    dataset_name: x\n"),
        "stages[1].dataset_name: 'x' is not allowed: a data key: set it in the data section (one data set for all stages, so their eval losses compare)",
    ),
    (
        MINIMAL.replace("  - name: b\n", "  - name: b\n    output_dir: ./x\n"),
        "stages[1].output_dir: './x' is not allowed: the pipeline sets it (a folder per stage under output_root); change output_root instead",
    ),
    (
        MINIMAL.replace("  - name: b\n", "  - name: b\n    resume_from_checkpoint: ./x\n"),
        "stages[1].resume_from_checkpoint: './x' is not allowed: only the first stage may name a checkpoint to start from; "
        "every later stage starts from the previous stage's output, which the pipeline passes on",
    ),
    (
        MINIMAL.replace("  - name: b\n", "  - name: b\n    wandb_project: p\n"),
        "stages[1].wandb_project: 'p' is not allowed: MLflow names come from the mlflow section (mlflow.experiment); stage runs are named after the stages",
    ),
    (
        MINIMAL + "schedule:\n  cron: '0 3 * *'\n",
        "schedule.cron: '0 3 * *' is not allowed: must be a cron expression of 5 fields (minute hour day-of-month month day-of-week), e.g. '0 3 * * *' (03:00 daily); this has 4",
    ),
    (
        MINIMAL + "schedule:\n  cron: '0 24 * * *'\n",
        "schedule.cron: '0 24 * * *' is not allowed: hour field '24': values must be in 0-23",
    ),
    (
        MINIMAL + "schedule:\n  cron: '0 0 30 2 *'\n",
        "schedule.cron: '0 0 30 2 *' is not allowed: day of month field '30': no such day in month field '2', so the schedule never fires",
    ),
    (
        MINIMAL + "schedule:\n  timezone: Europe/Berln\n",
        "schedule.timezone: 'Europe/Berln' is not allowed: must be an IANA time zone name such as 'UTC' or 'Europe/Berlin'; did you mean 'Europe/Berlin'?",
    ),
    (
        MINIMAL + "mlflow:\n  champion_alias: latest\n",
        "mlflow.champion_alias: 'latest' is not allowed: must be an MLflow alias: letters, digits, '_' and '-', and neither 'latest' nor a version like 'v3'",
    ),
    (
        MINIMAL + "mlflow:\n  registered_model: a/b\n",
        "mlflow.registered_model: 'a/b' is not allowed: must be a non-empty model name without '/' or ':' (MLflow Model Registry rule)",
    ),
    (MINIMAL + "eval_generations: -1\n", "eval_generations: -1 is not allowed: must be greater than or equal to 0"),
    (
        MINIMAL + "gate: {metric: task_accuracy}\neval_task_samples: 0\n",
        "eval_task_samples: 0 is not allowed: must be at least 1 when gate.metric is task_accuracy (the metric is computed on these samples)",
    ),
    (MINIMAL + "profiles:\n  p:\n    gat: {}\n", "profiles.p.gat: unknown key; did you mean 'gate'?"),
    (
        MINIMAL + "profiles:\n  p:\n    stages:\n      b: {learning_rate: 0}\n",
        "profiles.p.stages.b.learning_rate: 0 is not allowed: must be greater than 0",
    ),
    (
        MINIMAL + "profiles:\n  p:\n    stages:\n      b: {lr: 1}\n",
        "profiles.p.stages.b.lr: unknown key; did you mean 'learning_rate'?",
    ),
    (
        MINIMAL + "profiles:\n  p:\n    gate: {target: -0.5}\n",
        "profiles.p.gate.target: -0.5 is not allowed: must be greater than or equal to 0: metric eval_loss is a cross-entropy, never negative",
    ),
    (
        "stages:\n  - name: a\n    batch_size: 2\n    batch_size: 3\n",
        "stages[0].batch_size: duplicate key: written on lines 3 and 4 (YAML would silently keep the last)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CASES, ids=[e.split(":")[0] for _, e in BAD_CASES])
def test_bad_files_name_the_key_path(tmp_path, text, expected):
    assert problems_of(tmp_path, text) == [expected]


def test_problem_only_a_profile_brings_out_says_so(tmp_path):
    text = (
        MINIMAL.replace("  - name: a\n", "  - name: a\n    warmup_steps: 100\n")
        + "profiles:\n  short:\n    defaults: {max_steps: 50}\n"
    )
    assert problems_of(tmp_path, text) == [
        f"stages[{i}].warmup_steps: 100 is not allowed: must not exceed max_steps (50): the learning rate would never "
        "reach its peak (with profile 'short')"
        for i in (0, 1)  # stage a sets 100, stage b has the default 100
    ]


def test_cross_field_problem_from_defaults_names_the_stage(tmp_path):
    text = "defaults:\n  warmup_steps: 80\nstages:\n  - name: a\n  - name: b\n    max_steps: 40\n"
    assert problems_of(tmp_path, text) == [
        "defaults.warmup_steps: 80 is not allowed: must not exceed max_steps (40): the learning rate would never reach its peak (in stage 'b')"
    ]


def test_all_problems_are_reported_at_once(tmp_path):
    text = """\
model:
  world_tokens: 5
stagess: 1
defaults:
  lr: 1
stages:
  - name: projection
  - name: vision
  - name: language
    learning_rate: -1.0
gate:
  target: -1
profiles:
  tiny:
    stages:
      vison: {learning_rate: 1.0}
      language: {learning_rate: 0}
"""
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(write(tmp_path, text), profile="tiny")
    problems = info.value.problems
    for expected in [
        "stagess: unknown key; did you mean 'stages'?",
        "profiles.tiny.stages.vison: unknown stage; did you mean 'vision'?",
        "model.world_tokens: 5 is not allowed: world_tokens=5 must be a perfect square (4, 16, 64, ...): the latent is pooled to a square grid",
        "gate.target: -1.0 is not allowed: must be greater than or equal to 0: metric eval_loss is a cross-entropy, never negative",
        "defaults.lr: unknown key; did you mean 'learning_rate'?",
        "stages[2].learning_rate: -1.0 is not allowed: must be greater than 0",
        "profiles.tiny.stages.language.learning_rate: 0 is not allowed: must be greater than 0",
    ]:
        assert expected in problems, problems
    assert len(problems) == len(set(problems)) == 7
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'stages.yaml'}: 7 problems:")


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    text = "stages:\n  - name: a\n    learning_rate: [1\nmodel: {}\n"
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(write(tmp_path, text))
    assert info.value.line == 4 and info.value.column is not None
    assert info.value.problems[0].startswith("invalid YAML: ")
    assert str(info.value).startswith(f"{tmp_path / 'stages.yaml'}:4:")
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(write(tmp_path, "stages:\n  - name: a\n bad: [\n"))
    assert info.value.line is not None


def test_empty_missing_and_non_mapping_files(tmp_path):
    assert problems_of(tmp_path, "") == [
        "the file is empty: a pipeline file is a YAML mapping with at least a stages list"
    ]
    assert problems_of(tmp_path, "# only a comment\n") == [
        "the file is empty: a pipeline file is a YAML mapping with at least a stages list"
    ]
    assert problems_of(tmp_path, "- 1\n")[0].startswith("(top level): [1] is not allowed: must be a YAML mapping")
    with pytest.raises(ConfigError, match="file not found"):
        load_pipeline_config(tmp_path / "missing.yaml")


def test_secrets_are_refused_and_never_echoed(tmp_path):
    secret = "hf_abcdefghijklmnopqrstuvwx"
    text = MINIMAL.replace("  - name: b\n", f"  - name: b\n    hf_token: {secret}\n") + (
        f"defaults:\n  wandb_api_key: {secret}\nprofiles:\n  p:\n    model:\n      hub_token: {secret}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(write(tmp_path, text))
    message = str(info.value)
    assert secret not in message and "abcdefgh" not in message
    paths = [p.split(":")[0] for p in info.value.problems]
    assert paths == ["stages[1].hf_token", "defaults.wandb_api_key", "profiles.p.model.hub_token"]
    assert all("secrets are not allowed in config files" in p for p in info.value.problems)
    assert "set HF_TOKEN in the environment" in info.value.problems[0]


def test_yaml_12_scalars(tmp_path):
    text = "defaults:\n  mixed_precision: no\n  learning_rate: 1e-4\nstages:\n  - name: a\n    use_gradient_checkpointing: true\n"
    (stage,) = load_pipeline_config(write(tmp_path, text)).resolved_stages()
    assert stage.mixed_precision == "no" and stage.learning_rate == 1e-4 and stage.use_gradient_checkpointing is True
    assert parse_pipeline_yaml("a: yes\nb: on\nc: 1e3\nd: .5\ne: 10\nf: false\n") == {
        "a": "yes",
        "b": "on",
        "c": 1000.0,
        "d": 0.5,
        "e": 10,
        "f": False,
    }


def test_underscore_keys_are_notes_and_anchor_holders(tmp_path):
    text = """\
_common: &common
  warmup_steps: 33
stages:
  - name: a
    <<: *common
    _comment: stage one
"""
    (stage,) = load_pipeline_config(write(tmp_path, text)).resolved_stages()
    assert stage.warmup_steps == 33


# ---------------------------------------------------------------------------------------------
# Hash, programmatic construction, sections
# ---------------------------------------------------------------------------------------------


def test_pipeline_hash_is_stable_and_tracks_values(tmp_path):
    base = MINIMAL + "defaults: {batch_size: 4}\n"
    path = write(tmp_path, base)
    first = load_pipeline_config(path)
    assert first.pipeline_hash() == load_pipeline_config(path).pipeline_hash()
    assert re.fullmatch(r"[0-9a-f]{64}", first.pipeline_hash())
    # the same values written differently (reordered, explicit defaults, comments): same hash
    rewritten = "# note\nstages:\n  - learning_rate: 0.0001\n    name: a\n    weight_decay: 0.01\n  - {name: b, learning_rate: 5.0e-5, freeze_gemma_vision: false}\ndefaults: {batch_size: 4}\ngate: {metric: eval_loss}\n"
    assert load_pipeline_config(write(tmp_path, rewritten, "other.yaml")).pipeline_hash() == first.pipeline_hash()
    # the file's location and the profile's name are not part of it
    assert first.model_copy(update={"source": "x", "profile": "y"}).pipeline_hash() == first.pipeline_hash()
    for changed in [
        base.replace("5.0e-5", "6.0e-5"),
        base + "gate: {target: 1.0}\n",
        base + "schedule: {cron: '0 4 * * *'}\n",
        base + "plateau: {min_steps: 3}\n",
        base.replace("batch_size: 4", "batch_size: 2"),
    ]:
        assert (
            load_pipeline_config(write(tmp_path, changed, "changed.yaml")).pipeline_hash() != first.pipeline_hash()
        ), changed


def test_programmatic_construction_validates():
    pipeline = PipelineConfig(stages=[{"name": "only", "learning_rate": 0.5}], defaults={"batch_size": 3})
    (stage,) = pipeline.resolved_stages()
    assert (stage.name, stage.learning_rate, stage.batch_size) == ("only", 0.5, 3)
    assert pipeline.stage_names == ["only"]
    with pytest.raises(ValueError, match=r"stages\[0\]\.learning_rate: -1 is not allowed: must be greater than 0"):
        PipelineConfig(stages=[{"name": "a", "learning_rate": -1}])
    with pytest.raises(ValueError, match="must list at least one stage"):
        PipelineConfig(stages=[])


def test_plateau_section_defaults_agree_with_the_flat_stage_keys():
    plateau = PipelinePlateauConfig()
    for key, value in plateau.model_dump().items():
        assert TrainingConfig.model_fields[f"plateau_{key}"].default == value, key


@pytest.mark.parametrize(
    ("cron", "ok"),
    [
        ("0 3 * * *", True),
        ("*/15 * * * *", True),
        ("0 0 1,15 * mon-fri", True),
        ("30 2 * jan-mar 0", True),
        ("0 0 * * 7", True),
        ("0-30/5 8-18 * * 1-5", True),
        ("@daily", False),
        ("60 * * * *", False),
        ("* * 0 * *", False),
        ("* * * 13 *", False),
        ("*/0 * * * *", False),
        ("5-1 * * * *", False),
        ("0 3 * * * *", False),
        ("x * * * *", False),
        # parses, but never fires; with a weekday as well, it fires on that weekday (cron's OR rule)
        ("0 0 31 2 *", False),
        ("0 0 30 feb *", False),
        ("0 0 31 4,6 *", False),
        ("0 0 30 2,4 *", True),
        ("0 0 31 2 mon", True),
        ("0 0 29 2 *", True),
        # outside what Prefect's croniter and cronsim both read the same way
        ("0 0 L * *", False),
        ("0 0 LW * *", False),
        ("0 0 * * 1#2", False),
        ("0 0 ? * *", False),
    ],
)
def test_cron_validation(cron, ok):
    assert (cron_problem(cron) is None) is ok, cron_problem(cron)
