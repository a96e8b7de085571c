"""The records the pipeline's steps hand each other, their JSON persistence in Prefect's result
store, the stage content key, and the package's public API."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from theworld_core import pipeline
from theworld_core.records import (
    NewDataCheck,
    PipelineSummary,
    PreparedData,
    StageRecord,
    SummaryRow,
    WarmStart,
    json_default,
    json_object_hook,
)

REPO = Path(__file__).resolve().parents[1]


def stage_record(**changes) -> StageRecord:
    values = {
        "stage": "vision",
        "attempt": 2,
        "run_id": "run-2",
        "content_key": "c" * 64,
        "status": "plateaued",
        "reason": "plateau: window",
        "steps": 20,
        "global_end_step": 40,
        "eval_history": [[30, 1.5], [40, 1.25]],
        "stage_eval_history": [[10, 1.5], [20, 1.25]],
        "train_loss_history": [[21, 2.0], [40, 1.0]],
        "stage_output_uri": "runs:/run-2/stage_output",
        "trainable": {"world_projector": 64, "vision": 128},
        "evidence": {},
        "config": {
            "name": "vision",
            "batch_size": 4,
            "gradient_accumulation_steps": 2,
            "learning_rate": 0.01,
            "max_grad_norm": 1.0,
            "warmup_steps": 5,
            "max_steps": 20,
        },
    }
    return StageRecord(**{**values, **changes})


RECORDS = [
    stage_record(),
    stage_record(attempt=1, status="diverged", stage_output_uri=None, evidence={"grad_norm": 1.0e4}),
    PreparedData(fingerprint="f" * 64, train=100, eval=20, bad=1, bad_reasons={"unreadable image": 1}),
    NewDataCheck(
        new_data=False,
        reason="no new data",
        fingerprint="fp",
        config_hash="cfg",
        experiment="exp",
        previous_run_id="r1",
        previous_run_name="one",
        previous_fingerprint="fp",
    ),
    WarmStart(uri="models:/m/3", version=3, reason="stage 1 warm-starts from champion"),
    SummaryRow(
        stage="vision",
        attempt=1,
        status="completed",
        steps=20,
        eval_loss=1.25,
        task_accuracy=None,
        stage_reason="max_steps",
        plateau="improving",
        decision="next",
        decision_reason="next stage",
        run_id="run-1",
        stage_output_uri="runs:/run-1/stage_output",
    ),
    PipelineSummary(champion="vision", model_version=2, plot="p.png", table="t.json", markdown="m.md"),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_records_round_trip_through_plain_json(record):
    as_json = json.loads(json.dumps(record.to_dict()))
    assert type(record).from_dict(as_json) == record
    back = json.loads(json.dumps(record, default=json_default), object_hook=json_object_hook)
    assert type(back) is type(record) and back == record


def test_from_dict_names_unknown_and_missing_keys():
    data = RECORDS[0].to_dict()
    del data["run_id"]
    data["stage_key"] = "old name"
    with pytest.raises(
        ValueError,
        match=r"StageRecord.from_dict: unknown keys \['stage_key'\]; missing keys "
        r"\['run_id'\]",
    ):
        StageRecord.from_dict(data)


def test_records_are_frozen():
    with pytest.raises(AttributeError):
        RECORDS[0].status = "completed"


def test_persisted_records_come_back_as_their_types(tmp_path):
    """What Prefect does for the cached train-stage and evaluate-stage tasks: write the result with
    the task's serializer, read it back (as a rerun's cache hit does) from the record file alone."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore

    from flows import tasks
    from theworld_core.training.evaluation import EvalReport

    report = EvalReport(
        eval_loss=1.25,
        task_accuracy=math.nan,
        exact_match=0.0,
        samples=[{"id": "7", "prompt": "p", "reference": "a cat", "generated": "a dog"}],
    )
    record = stage_record(eval_history=[[30, math.inf]])
    for task, value in ((tasks.train_stage, record), (tasks.evaluate_stage, report)):
        assert task.persist_result and task.cache_key_fn is not None
        store = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)), serializer=task.result_serializer)
        store.persist_result_record(store.create_result_record(value, key=task.name))
        stored = json.loads((tmp_path / task.name).read_text())
        assert stored["metadata"]["serializer"]["type"] == "json"  # readable on disk, not a pickle
        back = ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path))).read(task.name).result
        assert type(back) is type(value)
        assert json.dumps(back.to_dict()) == json.dumps(value.to_dict())  # NaN/inf included


def test_a_persisted_record_naming_a_foreign_class_is_refused():
    blob = json.dumps({"__theworld_record__": "os:system", "data": {}})
    with pytest.raises(ValueError, match="only theworld_core classes are read back"):
        json.loads(blob, object_hook=json_object_hook)


def test_readers_take_the_record_types():
    from theworld_core.training.evaluation import EvalReport
    from theworld_core.training.gate import GateDecision

    record = stage_record()
    report = EvalReport(eval_loss=1.25, task_accuracy=0.5, exact_match=0.25)
    verdict = pipeline.plateau_step(record)
    outcome = pipeline.outcome_of(record, report)
    assert (outcome.name, outcome.attempt, outcome.eval_loss, outcome.batch_size, outcome.max_steps) == (
        "vision",
        2,
        1.25,
        4,
        20,
    )
    assert pipeline.outcome_of(record, None).eval_loss is None
    decision = GateDecision(action="next", reason="next stage", numbers={}, champion="vision")
    row = pipeline.summary_row(record, report, verdict, decision)
    assert row == SummaryRow(
        stage="vision",
        attempt=2,
        status="plateaued",
        steps=20,
        eval_loss=1.25,
        task_accuracy=0.5,
        stage_reason="plateau: window",
        plateau=verdict.code,
        decision="next",
        decision_reason="next stage",
        run_id="run-2",
        stage_output_uri="runs:/run-2/stage_output",
    )
    assert record.label == "vision #2" and stage_record(attempt=1).label == "vision"
    markdown = pipeline.no_new_data_markdown(RECORDS[3])
    assert "| earlier MLflow run | `r1` (one) |" in markdown and "| config hash | `cfg` |" in markdown


def test_stage_content_key_ignores_output_dir_and_follows_the_rest():
    from flows import tasks

    config = {"name": "vision", "learning_rate": 0.01, "output_dir": "/a"}
    key = pipeline.stage_content_key(config, None, "fp", "code-1")
    assert pipeline.stage_content_key({**config, "output_dir": "/b"}, None, "fp", "code-1") == key
    for other in (
        pipeline.stage_content_key({**config, "learning_rate": 0.02}, None, "fp", "code-1"),
        pipeline.stage_content_key(config, "runs:/x/stage_output", "fp", "code-1"),
        pipeline.stage_content_key(config, None, "fp-2", "code-1"),
        pipeline.stage_content_key(config, None, "fp", "code-2"),
    ):
        assert other != key
    parameters = {
        "stage_config": config,
        "upstream_uri": None,
        "data_fingerprint": "fp",
        "code_version": "code-1",
        "parent_run_id": "changes every run",
        "attempt": 1,
    }
    assert tasks._train_cache_key(None, parameters) == f"train-{key}"


def test_public_api_is_lazy():
    """`from theworld_core import TheWorld` works; importing the config alone loads no torch."""
    code = (
        "import sys, theworld_core.config, theworld_core.pipeline, theworld_core\n"
        "assert 'torch' not in sys.modules, 'the config imported torch'\n"
        "from theworld_core import TheWorld, load_pipeline_config\n"
        "from theworld_core.model.theworld import TheWorld as Defined\n"
        "assert TheWorld is Defined and 'torch' in sys.modules\n"
        "assert load_pipeline_config is theworld_core.config.load_pipeline_config\n"
        "assert sorted(theworld_core.__all__) == sorted(theworld_core._PUBLIC)\n"
        "assert all(getattr(theworld_core, name) is not None for name in theworld_core.__all__)\n"
        "assert set(theworld_core.__all__) <= set(dir(theworld_core))\n"
        "try:\n"
        "    theworld_core.NoSuchThing\n"
        "except AttributeError as error:\n"
        "    assert 'NoSuchThing' in str(error) and 'TheWorld' in str(error), error\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
