"""The pipeline with real components: `theworld run` as a subprocess against a real MLflow server and
a real Prefect server (both on 127.0.0.1, started once per session by `tests/servers.py`), the
embedded tiny models, synthetic data. Nothing is mocked.

Each test gets its own project folder (THEWORLD_PROJECT_DIR, also the command's working directory,
so relative `output_root`s land in it) and its own PREFECT_HOME / PREFECT_LOCAL_STORAGE_PATH, so
Prefect's task cache records never leak from one test into another; the crash test reuses one of
them for the crashed run and its rerun, which is what a rerun relies on. Each test writes its own
MLflow experiment and registered model name, except the end-to-end test, which keeps the repo's
(`theworld-multistage`, `theworld`).

The pipelines are small (2 stages of 10-30 steps; the end-to-end one keeps the four stages of the
tiny profile at 20 steps each) so that the file runs in a few minutes on 2 CPU cores. The tests
run in the order gate, bad config, end to end, crash (the numbers are those of the test plan).
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from servers import (  # noqa: F401  (fixtures)
    CliResult,
    client_env,
    kill_process_group,
    launched_servers,
    mlflow_server,
    prefect_server,
    run_theworld,
    start_theworld,
    stop_process_group,
)
from stage_helpers import tiny_model_section

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
EVAL_STEPS = 10


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def theworld_home(tmp_path_factory) -> Path:
    """THEWORLD_HOME for every client process, with the embedded tiny models built once in it."""
    from theworld_core.model.tiny import ensure_tiny_models

    home = tmp_path_factory.mktemp("theworld-home")
    ensure_tiny_models(home / "tiny")
    return home


@dataclass
class Project:
    """One client of the servers: its project folder, PREFECT_HOME, environment and log."""

    name: str
    dir: Path
    prefect_home: Path
    env: dict[str, str]
    log: Path

    def run(self, stages_yaml: Path, *extra: str, timeout: float = 900.0) -> CliResult:
        return run_theworld(["run", str(stages_yaml), *extra], self.env, self.dir, self.log, timeout=timeout)

    def start(self, stages_yaml: Path, *extra: str):
        return start_theworld(["run", str(stages_yaml), *extra], self.env, self.dir, self.log)

    def log_tail(self, chars: int = 8000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"


@pytest.fixture
def project(tmp_path, launched_servers, theworld_home, mlflow_server, prefect_server):
    """Factory: `project(name)` -> a fresh `Project` (own folder and own PREFECT_HOME)."""
    # (the servers start while the tiny models are built; a server stopped from outside is restarted)
    mlflow_server.ensure_running()
    prefect_server.ensure_running()

    def make(name: str = "main", prefect_home: Path | None = None) -> Project:
        folder = tmp_path / name
        home = prefect_home or (tmp_path / f"{name}-prefect-home")
        env = client_env(
            mlflow=mlflow_server,
            prefect=prefect_server,
            project_dir=folder,
            prefect_home=home,
            theworld_home=theworld_home,
        )
        return Project(name, folder, home, env, tmp_path / f"{name}.log")

    return make


@pytest.fixture
def mlflow_client(mlflow_server):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


@pytest.fixture
def prefect_client(prefect_server):
    """A synchronous Prefect client of the session's server (settings scoped to the test)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture
def mlflow_uri_restored():
    """MLflow's process-wide tracking/registry URIs as they were before the test (product code sets
    them from MLFLOW_TRACKING_URI when it runs in the test process)."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None)
    yield
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved


def small_pipeline(
    name: str,
    stages: list[dict],
    *,
    gate: dict | None = None,
    defaults: dict | None = None,
    output_root: str = "./stages",
) -> dict:
    """A small pipeline document (tiny models, synthetic data) with its own experiment and model name."""
    doc = {
        "model": tiny_model_section(),
        "data": {
            "dataset_name": "synthetic",
            "streaming": False,
            "synthetic_samples": 120,
            "synthetic_image_size": 32,
            "eval_fraction": 0.15,
        },
        "defaults": {
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "max_steps": 20,
            "eval_steps": EVAL_STEPS,
            "save_steps": 10,
            "logging_steps": 5,
            "mixed_precision": "no",
            "eval_max_samples": 16,
            "divergence_grad_norm": None,
            "warmup_steps": 5,
            **(defaults or {}),
        },
        "stages": stages,
        "plateau": {"min_improvement": 0.01, "window_steps": 10, "patience_steps": 10, "min_steps": 10},
        "gate": {"diverged_warmup_steps": 10, **(gate or {})},
        "mlflow": {
            "experiment": f"test-{name}",
            "registered_model": f"theworld-test-{name}",
            "log_system_metrics": False,
        },
        "output_root": output_root,
        "eval_generations": 2,
        "eval_task_samples": 4,
    }
    return doc


PROJECTION = {"name": "projection", "learning_rate": 3.0e-2}
LANGUAGE = {"name": "language", "freeze_gemma_language": False, "learning_rate": 2.0e-3}


def write_yaml(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def assert_ok(result: CliResult, project: Project) -> None:
    assert result.returncode == 0, f"theworld run exited {result.returncode}:\n{project.log_tail()}"


def experiment_id(client, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r}"
    return experiment.experiment_id


def parent_runs(client, experiment: str) -> list:
    runs = client.search_runs(
        [experiment_id(client, experiment)], max_results=1000, order_by=["attributes.start_time ASC"]
    )
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def child_runs(client, experiment: str, parent_id: str | None = None) -> list:
    """Stage-attempt runs (children) of `experiment`, oldest first; of one parent when given."""
    runs = client.search_runs(
        [experiment_id(client, experiment)], max_results=1000, order_by=["attributes.start_time ASC"]
    )
    runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    if parent_id is not None:
        runs = [r for r in runs if r.data.tags["mlflow.parentRunId"] == parent_id]
    return sorted(runs, key=lambda r: (r.info.start_time, int(r.data.tags.get("attempt", 1))))


def the_parent(client, experiment: str):
    parents = parent_runs(client, experiment)
    assert len(parents) == 1, [p.info.run_name for p in parents]
    return parents[0]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def champion_run(client, model_name: str, alias: str = "champion"):
    version = client.get_model_version_by_alias(model_name, alias)
    return version, client.get_run(version.run_id)


def describe(runs) -> str:
    return "\n".join(
        f"  {r.data.tags.get('stage')} #{r.data.tags.get('attempt')} {r.info.status}: "
        f"{r.data.tags.get('gate_decision')}: {r.data.tags.get('gate_reason')}"
        for r in runs
    )


def fmt(value: float) -> str:
    """How the gate writes a number in its reasons."""
    return f"{value:.6g}"


def artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


# --- 2. the gate, driven for real ----------------------------------------------------------------


def test_gate_target_met_stops_after_first_stage(project, mlflow_client):
    """eval_loss target 100 is met by stage 1: stop_good_enough, one stage ran, it is the champion."""
    p = project("target")
    doc = small_pipeline("target", [PROJECTION, LANGUAGE], gate={"metric": "eval_loss", "target": 100})
    assert_ok(p.run(write_yaml(p.dir / "stages.yaml", doc)), p)

    c = mlflow_client
    parent = the_parent(c, "test-target")
    children = child_runs(c, "test-target", parent.info.run_id)
    assert [r.data.tags["stage"] for r in children] == ["projection"], describe(children)
    stage1 = children[0]
    assert stage1.data.tags["gate_decision"] == "stop_good_enough", describe(children)
    value = stage1.data.metrics["eval/final_loss"]
    reason = stage1.data.tags["gate_reason"]
    assert fmt(value) in reason and "meets target <= 100" in reason, reason
    assert not list((p.dir / "stages").glob("language-*")), "stage 2 must not have started"
    _, champion = champion_run(c, "theworld-test-target")
    assert champion.data.tags["stage"] == "projection"
    assert champion.info.run_id == stage1.info.run_id
    assert parent.data.tags["champion"] == "projection"


def test_gate_regression_keeps_stage_one(project, mlflow_client):
    """Stage 2 trained at learning rate 1.0 ends clearly worse than stage 1 (finite, not diverged):
    stop_regressed, and the registered champion is stage 1's run."""
    p = project("regress")
    hot = {"name": "hot", "freeze_gemma_language": False, "learning_rate": 1.0, "warmup_steps": 0, "max_steps": 10}
    doc = small_pipeline("regress", [LANGUAGE, hot])
    assert_ok(p.run(write_yaml(p.dir / "stages.yaml", doc)), p)

    c = mlflow_client
    parent = the_parent(c, "test-regress")
    stage1, stage2 = child_runs(c, "test-regress", parent.info.run_id)
    assert stage1.data.tags["stage"] == "language" and stage2.data.tags["stage"] == "hot"
    assert stage1.data.tags["gate_decision"] == "next"
    assert stage2.info.status == "FINISHED" and stage2.data.tags["stage_status"] == "completed", describe(
        [stage1, stage2]
    )
    loss1, loss2 = stage1.data.metrics["eval/final_loss"], stage2.data.metrics["eval/final_loss"]
    assert math.isfinite(loss2) and loss2 > loss1 * 1.02, (loss1, loss2)
    assert stage2.data.tags["gate_decision"] == "stop_regressed", describe([stage1, stage2])
    reason = stage2.data.tags["gate_reason"]
    assert fmt(loss2) in reason and fmt(loss1) in reason and "worse than" in reason and "keep 'language'" in reason, (
        reason
    )
    _, champion = champion_run(c, "theworld-test-regress")
    assert champion.data.tags["stage"] == "language"
    assert champion.info.run_id == stage1.info.run_id
    assert parent.data.tags["champion"] == "language"


def test_gate_nan_loss_retries_with_divergence_recipe(project, mlflow_client):
    """A NaN loss at step 3 of stage 1: attempt 1 diverged, retry with lr / 10, max_grad_norm 0.5 and a
    longer warmup; attempt 2 runs clean and the pipeline goes on to stage 2."""
    p = project("nan")
    faulty = {**PROJECTION, "inject_fault": "nan_loss", "inject_fault_step": 3}
    doc = small_pipeline("nan", [faulty, {**LANGUAGE, "max_steps": 10}])
    assert_ok(p.run(write_yaml(p.dir / "stages.yaml", doc)), p)

    c = mlflow_client
    parent = the_parent(c, "test-nan")
    children = child_runs(c, "test-nan", parent.info.run_id)
    assert [(r.data.tags["stage"], r.data.tags["attempt"]) for r in children] == [
        ("projection", "1"),
        ("projection", "2"),
        ("language", "1"),
    ], describe(children)
    first, second, stage2 = children
    assert first.data.tags["stage_status"] == "diverged" and first.info.status == "FAILED", describe(children)
    assert first.data.tags["gate_decision"] == "retry"
    reason = first.data.tags["gate_reason"]
    assert "step 3" in reason and "learning_rate 0.03 -> 0.003" in reason and "max_grad_norm 1 -> 0.5" in reason, reason
    assert "warmup_steps 5 -> 10" in reason, reason
    params = second.data.params
    assert float(params["learning_rate"]) == pytest.approx(3.0e-3)
    assert float(params["max_grad_norm"]) == pytest.approx(0.5)
    assert int(params["warmup_steps"]) == 10
    assert "inject_fault" not in params  # a feature that is off has no param
    assert second.data.tags["stage_status"] in ("completed", "plateaued") and second.info.status == "FINISHED"
    assert second.data.tags["gate_decision"] == "next", describe(children)
    assert stage2.data.tags["gate_decision"] == "next" and stage2.info.status == "FINISHED", describe(children)
    _, champion = champion_run(c, "theworld-test-nan")
    best = min((second, stage2), key=lambda r: r.data.metrics["eval/final_loss"])
    assert champion.info.run_id == best.info.run_id
    assert champion.data.tags["stage"] == parent.data.tags["champion"] == best.data.tags["stage"]


def test_gate_oom_retries_with_half_batch(project, mlflow_client):
    """An out-of-memory error in stage 1: retry with half the batch and twice the accumulation (same
    effective batch), then the pipeline continues."""
    p = project("oom")
    faulty = {**PROJECTION, "inject_fault": "oom", "inject_fault_step": 1}
    doc = small_pipeline("oom", [faulty, {**LANGUAGE, "max_steps": 10}])
    assert_ok(p.run(write_yaml(p.dir / "stages.yaml", doc)), p)

    c = mlflow_client
    parent = the_parent(c, "test-oom")
    children = child_runs(c, "test-oom", parent.info.run_id)
    assert [(r.data.tags["stage"], r.data.tags["attempt"]) for r in children] == [
        ("projection", "1"),
        ("projection", "2"),
        ("language", "1"),
    ], describe(children)
    first, second, stage2 = children
    assert first.data.tags["stage_status"] == "oom" and first.info.status == "FAILED", describe(children)
    assert first.data.tags["gate_decision"] == "retry"
    reason = first.data.tags["gate_reason"]
    assert "batch_size 8 -> 4" in reason and "gradient_accumulation_steps 1 -> 2" in reason, reason
    assert "effective batch 8 per process kept" in reason, reason
    params = second.data.params
    assert int(params["batch_size"]) == 4 and int(params["gradient_accumulation_steps"]) == 2, params
    assert float(params["learning_rate"]) == pytest.approx(3.0e-2)  # only the batch changes
    assert second.data.tags["gate_decision"] == "next" and second.info.status == "FINISHED", describe(children)
    assert int(stage2.data.params["batch_size"]) == 8  # the next stage keeps its own batch
    assert stage2.data.tags["gate_decision"] == "next", describe(children)
    _, champion = champion_run(c, "theworld-test-oom")
    best = min((second, stage2), key=lambda r: r.data.metrics["eval/final_loss"])
    assert champion.info.run_id == best.info.run_id
    assert champion.data.tags["stage"] == parent.data.tags["champion"] == best.data.tags["stage"]


# --- 4. a bad stages.yaml ---------------------------------------------------------------------------


def test_bad_stages_yaml_refused_before_anything_starts(project, mlflow_client, prefect_client):
    """`stages[1].learning_rate: -1`: exit 2 with one message naming the key; no MLflow run, no
    Prefect flow run."""
    p = project("bad")
    doc = small_pipeline("bad-config", [PROJECTION, {**LANGUAGE, "learning_rate": -1}])
    stages_yaml = write_yaml(p.dir / "stages.yaml", doc)

    def mlflow_runs() -> int:
        ids = [e.experiment_id for e in mlflow_client.search_experiments()]
        return len(mlflow_client.search_runs(ids, max_results=10000)) if ids else 0

    runs_before, flows_before = mlflow_runs(), prefect_client.count_flow_runs()
    result = p.run(stages_yaml, timeout=120)
    assert result.returncode == 2, result.output
    errors = [line for line in result.output.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.output
    assert errors[0].startswith("theworld run: error:") and "stages[1].learning_rate" in errors[0], result.output
    assert "-1" in errors[0] and "Traceback" not in result.output, result.output
    assert mlflow_client.get_experiment_by_name("test-bad-config") is None
    assert mlflow_runs() == runs_before
    assert prefect_client.count_flow_runs() == flows_before
    assert not (p.dir / "stages").exists()


# --- 1. end to end on the repo's stages.yaml -------------------------------------------------------


def test_end_to_end_tiny_profile(
    project, mlflow_client, prefect_client, mlflow_server, theworld_home, monkeypatch, mlflow_uri_restored
):
    """The repo's stages.yaml with its `tiny` profile (four stages), shortened by the test: one parent
    run with lineage tags and the summary, a child run per stage with params, global-step metrics and
    gate tags, the champion registered and loadable, the Prefect flow run Completed with its table."""
    from theworld_core.config import parse_pipeline_yaml

    p = project("e2e")
    doc = parse_pipeline_yaml((REPO / "stages.yaml").read_text(encoding="utf-8"))
    tiny = doc["profiles"]["tiny"]
    tiny["defaults"].update(max_steps=20, save_steps=10, eval_steps=EVAL_STEPS, eval_max_samples=16)
    tiny["data"].update(synthetic_samples=120, eval_fraction=0.15)
    tiny["plateau"].update(window_steps=10, patience_steps=10, min_steps=10)
    tiny["gate"].update(diverged_warmup_steps=10)
    # all four stages must run here: a regression stop is the subject of its own test
    tiny["gate"]["regression_tolerance"] = 10.0
    tiny.update(eval_task_samples=4, eval_generations=2)
    stages_yaml = write_yaml(p.dir / "stages.yaml", doc)

    result = p.run(stages_yaml, "--profile", "tiny")
    assert_ok(result, p)
    stage_names = ["projection", "vision", "language", "full"]

    # MLflow: the parent run
    c = mlflow_client
    parent = the_parent(c, "theworld-multistage")
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    for key in ("data_fingerprint", "config_hash", "code_version", "prefect_flow_run_id"):
        assert tags.get(key), f"parent run lacks tag {key}: {tags}"
    assert re.fullmatch(r"[0-9a-f]{64}", tags["config_hash"])
    summary = artifact_paths(c, parent.info.run_id)
    assert {"stage_comparison.png", "stage_summary.json", "stage_summary.md"} <= summary
    rows = json.loads(
        Path(c.download_artifacts(parent.info.run_id, "stage_summary.json", str(p.dir / "downloaded"))).read_text()
    )
    assert [r["stage"] for r in rows] == stage_names

    # one child run per stage attempt
    children = child_runs(c, "theworld-multistage", parent.info.run_id)
    assert [r.data.tags["stage"] for r in children] == stage_names, describe(children)
    by_stage = {r.data.tags["stage"]: r for r in children}
    expected_frozen = {
        "projection": (True, True, True),
        "vision": (False, True, True),
        "language": (False, False, True),
        "full": (False, False, False),
    }
    for run in children:
        name, params, rtags = run.data.tags["stage"], run.data.params, run.data.tags
        assert run.info.status == "FINISHED", describe(children)
        assert float(params["learning_rate"]) > 0
        flags = tuple(
            params[k] == "True" for k in ("freeze_gemma_vision", "freeze_gemma_language", "freeze_cosmos_vae")
        )
        assert flags == expected_frozen[name], (name, params)
        trainable = {k.split("/", 1)[1]: int(v) for k, v in params.items() if k.startswith("trainable/")}
        assert set(trainable) == {"world_projector", "gemma_vision", "gemma_language", "cosmos_vae"}, params
        assert trainable["world_projector"] > 0
        for component, frozen in zip(("gemma_vision", "gemma_language", "cosmos_vae"), flags):
            assert (trainable[component] == 0) == frozen, (name, component, trainable)
        for key in ("gate_decision", "gate_reason", "plateau_verdict"):
            assert rtags.get(key), f"{name} lacks tag {key}: {rtags}"
        assert rtags["gate_decision"] == "next", describe(children)
        assert "stage_output/manifest.json" in artifact_paths(c, run.info.run_id, "stage_output")
    assert "last stage: pipeline complete" in by_stage["full"].data.tags["gate_reason"]
    # learning rates are the profile's, per stage
    assert float(by_stage["projection"].data.params["learning_rate"]) == pytest.approx(3.0e-2)
    assert float(by_stage["full"].data.params["learning_rate"]) == pytest.approx(1.0e-3)

    # metrics: stage_step within the stage, the MLflow step is the pipeline-global step
    end = 0
    for name in stage_names:
        run_id = by_stage[name].info.run_id
        evals = history(c, run_id, "eval/loss")
        stage_steps = dict(history(c, run_id, "stage_step"))
        assert evals, f"{name}: no eval/loss"
        steps = [s for s, _ in evals]
        assert steps[0] == end + EVAL_STEPS, (name, end, steps)  # continues after the previous stage's last step
        assert all(stage_steps[s] == s - end for s in steps), (name, end, stage_steps)
        assert all(math.isfinite(v) for _, v in evals)
        end += int(max(stage_steps.values()))
    assert end == sum(r["steps"] for r in rows)

    # the registered champion
    version, run = champion_run(c, "theworld")
    champion_name = tags["champion"]
    assert run.data.tags["stage"] == champion_name
    assert run.info.run_id == by_stage[champion_name].info.run_id
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    best = min(rows, key=lambda r: r["eval_loss"])
    assert champion_name == best["stage"]

    # ... loads from the registry and answers
    from PIL import Image

    from theworld_core.model.theworld import TheWorld

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("THEWORLD_HOME", str(theworld_home))
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(p.dir))
    model = TheWorld.from_pretrained("models:/theworld@champion")
    answer = model.generate(Image.new("RGB", (32, 32), (200, 30, 30)), "What is in the image?", max_new_tokens=8)
    assert isinstance(answer, str)

    # Prefect: the flow run and its table artifact
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    flow_run = prefect_client.read_flow_run(uuid.UUID(tags["prefect_flow_run_id"]))
    assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
    artifacts = prefect_client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]), key=ArtifactFilterKey(any_=["stage-summary"])
        )
    )
    assert len(artifacts) == 1
    table = artifacts[0].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [r["stage"] for r in table] == stage_names
    assert [r["run_id"] for r in table] == [by_stage[n].info.run_id for n in stage_names]

    # lineage: the parent's data fingerprint is that of the data the stages trained on
    trained_on = {r.data.tags["data_fingerprint"] for r in children}
    assert trained_on == {tags["data_fingerprint"]}, (
        f"parent run data_fingerprint {tags['data_fingerprint'][:16]}, stage runs trained on "
        f"{sorted(f[:16] for f in trained_on)}"
    )


# --- 3. crash and rerun --------------------------------------------------------------------------


CRASH_SAVE_STEPS = 5
"""Stage 2 writes a resume state every 5 steps and evaluates every 10: the kill lands on its first
resume state, before its first evaluation (as with the seed's save_steps 1000 / eval_steps 5000)."""


def _final_weights(folder: Path, stage: str) -> dict:
    from safetensors.torch import load_file

    found = sorted(folder.glob(f"stages/{stage}-*/final/model.safetensors"))
    assert len(found) == 1, found
    return load_file(found[0])


def test_crash_in_stage_two_then_rerun_resumes(project, mlflow_client):
    """SIGKILL the whole `theworld run` while stage 2 is training; the rerun (same environment, so the
    same Prefect result storage) skips stage 1 (cached), resumes stage 2 from its resume state and
    ends with the same stage-2 weights as an uninterrupted run of the same config."""
    import torch

    crash, reference = project("crash"), project("reference")
    stages = [PROJECTION, {**LANGUAGE, "max_steps": 30, "save_steps": CRASH_SAVE_STEPS}]
    crash_yaml = write_yaml(crash.dir / "stages.yaml", small_pipeline("crash", stages))
    reference_yaml = write_yaml(reference.dir / "stages.yaml", small_pipeline("crash-reference", stages))

    # the uninterrupted run goes alongside (its own project, PREFECT_HOME and experiment)
    reference_proc = reference.start(reference_yaml)
    try:
        proc = crash.start(crash_yaml)
        deadline = time.monotonic() + 600
        checkpoint = None
        while checkpoint is None:
            assert proc.poll() is None, f"the run ended ({proc.returncode}) before stage 2 saved:\n{crash.log_tail()}"
            assert time.monotonic() < deadline, f"stage 2 never saved a resume state:\n{crash.log_tail()}"
            checkpoint = next(iter(sorted((crash.dir / "stages").glob("language-*/checkpoint-*"))), None)
            time.sleep(0.05)
        kill_process_group(proc)
        stage2_dir = checkpoint.parent
        assert not (stage2_dir / "final").exists(), "stage 2 finished before the kill: nothing to resume"
        killed_at = sorted(int(c.name.split("-")[1]) for c in stage2_dir.glob("checkpoint-*"))
        assert max(killed_at) < 30, killed_at

        rerun = crash.run(crash_yaml)
        assert_ok(rerun, crash)
        assert reference_proc.wait(timeout=900) == 0, f"reference run failed:\n{reference.log_tail()}"
    finally:
        stop_process_group(reference_proc, grace=5)

    c = mlflow_client
    parents = parent_runs(c, "test-crash")
    assert len(parents) == 2  # the killed pipeline run and the rerun
    children = child_runs(c, "test-crash")
    stage1_runs = [r for r in children if r.data.tags["stage"] == "projection"]
    stage2_runs = [r for r in children if r.data.tags["stage"] == "language"]
    assert len(stage1_runs) == 1, "stage 1 trained again on the rerun:\n" + describe(children)
    assert len(stage2_runs) == 2, describe(children)
    killed, resumed = stage2_runs
    assert killed.info.status == "KILLED"  # its process was killed; the rerun of the same config ended it
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["mlflow.parentRunId"] == parents[1].info.run_id
    assert "Cached" in rerun.output or "cached" in rerun.output.lower(), rerun.output[-3000:]
    assert re.search(r"stage language starts from resumed .*checkpoint-\d+", rerun.output), rerun.output[-3000:]
    assert not re.search(r"stage projection starts from", rerun.output), "stage 1 trained again"

    got, want = _final_weights(crash.dir, "language"), _final_weights(reference.dir, "language")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key

    # the resumed attempt's MLflow run says what it trained with and where it started from
    assert resumed.data.params.get("learning_rate") == killed.data.params.get("learning_rate"), (
        f"the resumed stage's child run has no params ({len(resumed.data.params)})"
    )
    assert resumed.data.tags.get("started_from", "").startswith("resumed"), (
        "the resumed stage's child run does not record where it started from: "
        f"tags {sorted(resumed.data.tags)}, params {len(resumed.data.params)}"
    )


# --- 5. forced rerun, then "no new data" ---------------------------------------------------------------


def _flow_run(prefect_client, parent):
    return prefect_client.read_flow_run(uuid.UUID(parent.data.tags["prefect_flow_run_id"]))


def _artifact(prefect_client, flow_run_id, key: str):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    found = prefect_client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])
        )
    )
    assert len(found) == 1, (key, found)
    data = found[0].data
    return json.loads(data) if key == "stage-summary" and isinstance(data, str) else data


def test_force_retrains_every_stage_then_unchanged_data_is_skipped(
    project, mlflow_client, prefect_client, mlflow_server
):
    """Run, rerun with --force, run again. The forced run trains and evaluates every stage anew (no
    task Cached, child runs of its own, its stages in a folder of their own) and the champion alias
    moves to a version of its run; the third run has nothing new: a Completed state named Skipped.
    Along the way: task runs named by stage, the trainer's lines in the Prefect logs, artifacts with
    rounded numbers and MLflow run links."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, TaskRunFilter, TaskRunFilterFlowRunId

    p = project("force")
    stages = [{**PROJECTION, "max_steps": 10}, {**LANGUAGE, "max_steps": 10}]
    stages_yaml = write_yaml(p.dir / "stages.yaml", small_pipeline("force", stages))
    assert_ok(p.run(stages_yaml), p)
    forced = p.run(stages_yaml, "--force")
    assert_ok(forced, p)

    c = mlflow_client
    first, second = parent_runs(c, "test-force")
    assert second.data.tags["forced"] == "true"
    first_children = child_runs(c, "test-force", first.info.run_id)
    forced_children = child_runs(c, "test-force", second.info.run_id)
    assert [r.data.tags["stage"] for r in forced_children] == ["projection", "language"], describe(forced_children)
    assert not {r.info.run_id for r in forced_children} & {r.info.run_id for r in first_children}
    for run in forced_children:
        assert run.info.status == "FINISHED" and history(c, run.info.run_id, "train/loss"), describe(forced_children)
        assert "eval/final_loss" in run.data.metrics, run.data.metrics
        assert "reused_stage_output" not in run.data.tags, "the forced run reused a finished stage folder"
    assert not re.search(r"Cached\(", forced.output), forced.output[-4000:]
    assert re.search(r"stage projection starts from pretrained bases", forced.output), forced.output[-4000:]
    assert len(list((p.dir / "stages" / "forced").glob("*/projection-*/final"))) == 1
    version, champion = champion_run(c, "theworld-test-force")
    assert int(version.version) == 2
    assert champion.info.run_id in {r.info.run_id for r in forced_children}

    # Prefect: task runs named by stage; the trainer's own lines in the flow run's logs
    forced_flow = _flow_run(prefect_client, second)
    names = {
        t.name
        for t in prefect_client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[forced_flow.id]))
        )
    }
    for stage in ("projection", "language"):
        assert {f"train-{stage}", f"evaluate-{stage}", f"plateau-{stage}", f"gate-{stage}"} <= names, names
    logs = [
        entry.message
        for entry in prefect_client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[forced_flow.id]))
        )
    ]
    assert any(m.startswith("stage language starts from stage output") for m in logs), logs[:40]

    # artifacts: numbers rounded, MLflow runs linked (an http tracking server: run pages)
    table = _artifact(prefect_client, forced_flow.id, "stage-summary")
    for row in table:
        assert row["eval_loss"] == round(row["eval_loss"], 4), row
        assert row["mlflow_run"].startswith(mlflow_server.url) and row["mlflow_run"].endswith(row["run_id"]), row
    comparison = _artifact(prefect_client, forced_flow.id, "stage-comparison")
    assert f"runs/{second.info.run_id})" in comparison and "models:/theworld-test-force/2" in comparison, comparison

    # unchanged data: Completed, named Skipped, nothing trained, the earlier run linked
    skipped = p.run(stages_yaml)
    assert_ok(skipped, p)
    assert "no new data" in skipped.output
    assert len(parent_runs(c, "test-force")) == 2
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    newest = prefect_client.read_flow_runs(
        sort=FlowRunSort.START_TIME_DESC,
        limit=1,
        flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[re.search(r"Beginning flow run '([^']+)'", skipped.output).group(1)])
        ),
    )[0]
    assert newest.state.is_completed() and newest.state.name == "Skipped", newest.state
    assert newest.state.message.startswith("no new data"), newest.state
    markdown = _artifact(prefect_client, newest.id, "no-new-data")
    assert f"runs/{second.info.run_id})" in markdown, markdown
