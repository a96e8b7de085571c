"""The pipeline's post-stage evaluation, run by the training process on its own model once the
stage output is saved, gives what loading that stage output back gives (the reason it may replace
the reload), and `evaluate_stage_step` uses it only for the request it answers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from stage_helpers import small_cfg

from theworld_core import pipeline
from theworld_core.config import StageConfig
from theworld_core.records import eval_request
from theworld_core.training.launch import train_stage

TASK_SAMPLES, GENERATIONS = 4, 2


@pytest.fixture(autouse=True)
def local_mlflow(tmp_path, monkeypatch):
    """MLflow in SQLite under the test's own project folder."""
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(tmp_path / "project"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_evaluation_in_training_equals_the_reloaded_stage_output(tiny_paths, tmp_path):
    from mlflow.tracking import MlflowClient

    from theworld_core.tracking.mlflow_runs import configure_tracking

    # The vision tower trains too, so the saved output holds two components.
    cfg = small_cfg(
        tiny_paths,
        tmp_path / "vision",
        freeze_gemma_vision=False,
        max_steps=10,
        eval_max_samples=8,
        mixed_precision="no",
    )
    result = train_stage(cfg, evaluate_after=eval_request(TASK_SAMPLES, GENERATIONS))
    assert result.status == "completed", result.reason
    in_training = result.evaluation
    assert in_training is not None and in_training["request"] == eval_request(TASK_SAMPLES, GENERATIONS)
    assert in_training["seconds"] > 0
    assert len(in_training["report"]["samples"]) == GENERATIONS

    reloaded = pipeline._evaluate_loaded(
        result.stage_output, StageConfig(**cfg.model_dump()), TASK_SAMPLES, GENERATIONS
    )["report"]
    got = in_training["report"]
    assert math.isclose(got["eval_loss"], reloaded["eval_loss"], rel_tol=1e-6), (got, reloaded)
    assert got["task_accuracy"] == reloaded["task_accuracy"]
    assert got["exact_match"] == reloaded["exact_match"]
    assert got["samples"] == reloaded["samples"]

    # The step logs the in-training report when it answers the request ...
    stage = cfg.model_dump(mode="json")
    report = pipeline.evaluate_stage_step(
        result.stage_output,
        stage,
        result.mlflow_run_id,
        task_samples=TASK_SAMPLES,
        generations=GENERATIONS,
        in_training=in_training,
    )
    assert report.to_dict() == got
    client = MlflowClient(configure_tracking())
    metrics = client.get_run(result.mlflow_run_id).data.metrics
    assert metrics["eval/final_loss"] == pytest.approx(got["eval_loss"])
    assert metrics["eval/task_accuracy"] == pytest.approx(got["task_accuracy"])
    assert metrics["walltime/evaluate_s"] >= in_training["seconds"]
    assert Path(client.download_artifacts(result.mlflow_run_id, "evaluation/generations.json", str(tmp_path))).is_file()

    # ... and loads the stage output for any other request (here: fewer recorded generations).
    other = pipeline.evaluate_stage_step(
        result.stage_output,
        stage,
        result.mlflow_run_id,
        task_samples=TASK_SAMPLES,
        generations=1,
        in_training=in_training,
    )
    assert math.isclose(other.eval_loss, got["eval_loss"], rel_tol=1e-6)
    assert other.samples == got["samples"][:1]


def test_without_a_request_the_trainer_does_not_evaluate_after_the_stage(tiny_paths, tmp_path):
    result = train_stage(small_cfg(tiny_paths, tmp_path / "projection", max_steps=4, eval_steps=4, save_steps=4))
    assert result.status == "completed", result.reason
    assert result.evaluation is None
