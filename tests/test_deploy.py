"""Operating the pipeline: the `multistage/full` deployment served by `theworld serve`, "no new
data" reruns, the new-data event, overlapping runs, `prefect.yaml` on a work pool, `theworld data`.

All real and local: a Prefect server on a free 127.0.0.1 port with its own PREFECT_HOME, MLflow on
a SQLite store, the tiny models on a small local image folder. Every background process runs in its
own process group and is stopped by that group's id (SIGTERM, then SIGKILL after a grace period: a
backgrounded `theworld serve` ignores a single SIGTERM).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from servers import prefect_server_spec, start_theworld, stop_process_group  # noqa: E402
from stage_helpers import tiny_model_section

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PREFECT = str(VENV_BIN / "prefect")
THEWORLD = str(VENV_BIN / "theworld")
IMAGES = 96  # 32 px images in the test's image folder (~86 train / ~10 eval)


# --- helpers -----------------------------------------------------------------------------------------


def make_images(folder: Path, start: int, count: int) -> list[dict]:
    """`count` synthetic shape images (32 px PNG) written to `folder`, with their metadata rows."""
    from theworld_core.data.synthetic import render_png, shape_spec

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(start, start + count):
        spec = shape_spec(7, index)
        name = f"shape{index:04d}.png"
        (folder / name).write_bytes(render_png(spec, 32))
        rows.append({"file_name": name, "text": spec.caption})
    return rows


def pipeline_doc(images: Path, output_root: Path, experiment: str, cron: str | None) -> dict:
    """A two-stage pipeline like stages.yaml, on the tiny models and a local image folder; < 40 s a run."""
    return {
        "model": {
            "model_name": "google/gemma-3-4b-it",
            "cosmos_model_name": "nvidia/Cosmos-Predict2-2B-Video2World",
            "world_tokens": 64,
            "world_image_size": 256,
            "max_seq_length": 2048,
        },
        "data": {"dataset_name": str(images), "streaming": False, "eval_fraction": 0.1},
        "defaults": {"batch_size": 4, "gradient_accumulation_steps": 4, "eval_steps": 5000, "save_steps": 1000},
        "stages": [
            {
                "name": "projection",
                "freeze_gemma_vision": True,
                "freeze_gemma_language": True,
                "freeze_cosmos_vae": True,
                "learning_rate": 1.0e-4,
                "warmup_steps": 500,
            },
            {
                "name": "vision",
                "freeze_gemma_vision": False,
                "freeze_gemma_language": True,
                "freeze_cosmos_vae": True,
                "learning_rate": 5.0e-5,
                "warmup_steps": 100,
            },
        ],
        "schedule": {
            "cron": "0 3 * * *",
            "timezone": "UTC",
            "new_data_event": "theworld.data.updated",
            "only_on_new_data": True,
            "warm_start_from_champion": True,
        },
        "mlflow": {"experiment": experiment, "registered_model": f"{experiment}-model", "log_system_metrics": False},
        "output_root": str(output_root),
        "profiles": {
            "tiny": {
                "model": tiny_model_section(),
                "defaults": {
                    "batch_size": 8,
                    "gradient_accumulation_steps": 1,
                    "max_steps": 20,
                    "eval_steps": 10,
                    "save_steps": 10,
                    "logging_steps": 5,
                    "mixed_precision": "no",
                    "eval_max_samples": 8,
                    "divergence_grad_norm": None,
                },
                "plateau": {"window_steps": 10, "patience_steps": 10, "min_steps": 10},
                "gate": {"regression_tolerance": 10.0, "diverged_warmup_steps": 10},
                "stages": {
                    "projection": {"learning_rate": 3.0e-2, "warmup_steps": 5},
                    "vision": {"learning_rate": 5.0e-3, "warmup_steps": 5},
                },
                "schedule": {"cron": cron},
                "eval_generations": 1,
                "eval_task_samples": 2,
            }
        },
    }


def far_cron() -> str:
    """A daily cron 12 hours from now (UTC): it never fires while the test runs."""
    return f"17 {(datetime.now(UTC).hour + 12) % 24} * * *"


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        {
            "DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def run(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run a command to its end in its own process group (killed with its children on timeout)."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc, grace=2)
        raise AssertionError(f"{' '.join(cmd)} ran over {timeout} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def deployment_run(env: dict[str, str], cwd: Path, *params: str) -> str:
    """`prefect deployment run multistage/full [--param k=v ...]`; the new flow run's id."""
    args = [PREFECT, "deployment", "run", "multistage/full"]
    for param in params:
        args += ["--param", param]
    result = run(args, env, cwd, timeout=90)
    assert result.returncode == 0, result.stdout
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
    assert found, result.stdout
    return found.group(1)


class Prefect:
    """A synchronous client of the test's Prefect server."""

    def __init__(self, url: str):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        self._settings = temporary_settings(updates={PREFECT_API_URL: url})
        self._settings.__enter__()
        self._client_cm = get_client(sync_client=True)
        self.client = self._client_cm.__enter__()

    def close(self) -> None:
        self._client_cm.__exit__(None, None, None)
        self._settings.__exit__(None, None, None)

    def flow_run(self, run_id: str):
        return self.client.read_flow_run(uuid.UUID(str(run_id)))

    def wait_final(self, run_id: str, timeout: float, log: Path):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            flow_run = self.flow_run(run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            time.sleep(0.5)
        raise AssertionError(
            f"flow run {run_id} not finished after {timeout} s (state {self.flow_run(run_id).state}):\n{tail(log)}"
        )

    def manual_runs(self, deployment_id) -> list:
        """The deployment's flow runs that no schedule made, oldest first."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.sorting import FlowRunSort

        runs = self.client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
        return [r for r in runs if not r.auto_scheduled]

    def artifacts(self, run_id: str) -> list:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        return self.client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(str(run_id))]))
        )

    def state_names(self, run_id: str) -> list[str]:
        return [s.name for s in self.client.read_flow_run_states(uuid.UUID(str(run_id)))]


def tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def pipeline_runs(tracking_uri: str, experiment: str) -> list:
    """Parent (pipeline) runs of `experiment`, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs(
        [found.experiment_id],
        filter_string="tags.run_kind = 'pipeline'",
        order_by=["attributes.start_time ASC"],
        max_results=100,
    )


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A Prefect server of this module (own PREFECT_HOME); an enqueued run retries its slot every 2 s."""
    spec = prefect_server_spec(tmp_path_factory.mktemp("deploy-prefect-server"))
    spec.env.update(
        {
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        }
    )
    server = spec.launch()
    try:
        yield server.wait_healthy(180)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def theworld_home(tmp_path_factory) -> Path:
    from theworld_core.model.tiny import ensure_tiny_models

    home = tmp_path_factory.mktemp("deploy-theworld-home")
    ensure_tiny_models(home / "tiny")
    return home


@pytest.fixture
def own_mlflow_store(tmp_path, monkeypatch):
    """MLflow on a SQLite store of this test, in this process; the process-wide tracking URI that
    `mlflow.set_tracking_uri` keeps is put back afterwards (the environment by monkeypatch)."""
    from mlflow.tracking._tracking_service import utils

    before = utils._tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(tmp_path / "project"))
    yield
    utils._tracking_uri = before


# --- fast: the data check, the lock, `theworld data add` ------------------------------------------------


def test_new_data_decision(own_mlflow_store):
    """No new data exactly when the fingerprint equals the newest FINISHED pipeline run's of the same
    config; force, only_on_new_data=false, another config or a failed last run train."""
    from theworld_core.pipeline import new_data_step
    from theworld_core.tracking import lineage

    def check(fingerprint="fp-a", config="cfg-1", **kw):
        return new_data_step("exp", config, fingerprint, **{"only_on_new_data": True, "force": False, **kw})

    assert check().new_data and "no earlier successful" in check().reason
    first = lineage.start_parent_run(
        "exp",
        "one",
        {"run_kind": "pipeline", "config_hash": "cfg-1", "data_fingerprint": "fp-a", "champion": "vision"},
        {},
    )
    assert check().new_data, "a RUNNING run is no reference"
    lineage.end_run(first)
    stage = lineage.start_parent_run(
        "exp", "stage", {"run_kind": "stage", "config_hash": "cfg-1", "data_fingerprint": "fp-b"}, {}
    )
    lineage.end_run(stage)  # a stage run never counts
    same = check()
    assert not same.new_data and same.previous_run_id == first and same.reason.startswith("no new data")
    assert check("fp-b").new_data and check("fp-b").previous_run_id == first
    assert check(config="cfg-2").new_data
    assert check(force=True).new_data and check(only_on_new_data=False).new_data
    failed = lineage.start_parent_run(
        "exp",
        "two",
        {"run_kind": "pipeline", "config_hash": "cfg-1", "data_fingerprint": "fp-b", "champion": "vision"},
        {},
    )
    lineage.end_run(failed, "FAILED")
    assert check("fp-b").new_data, "a failed run is no reference"
    no_champion = lineage.start_parent_run(
        "exp",
        "three",
        {"run_kind": "pipeline", "config_hash": "cfg-1", "data_fingerprint": "fp-b", "champion": "none"},
        {},
    )
    lineage.end_run(no_champion)
    assert check("fp-b").new_data, "a run whose every stage failed is no reference"
    assert not check("fp-a").new_data


def test_warm_start_checks_the_champion_architecture(own_mlflow_store, tmp_path):
    """No champion: fresh. A champion of the same architecture: its pinned version. Another
    architecture (here world_tokens): fresh, and the reason names the key."""
    from theworld_core.config import ModelConfig
    from theworld_core.model.stage_output import FORMAT, FORMAT_VERSION, MANIFEST_FILE
    from theworld_core.pipeline import warm_start_step
    from theworld_core.tracking import lineage

    model = ModelConfig(model_name="tiny", cosmos_model_name="tiny", world_tokens=4, world_image_size=32).model_dump()
    assert warm_start_step("m", "champion", model).uri is None
    folder = tmp_path / "stage_output"
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text(
        json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "model_config": model})
    )
    run = lineage.start_parent_run("exp", "stage", {}, {})
    lineage.log_folder(run, folder, lineage.STAGE_OUTPUT_ARTIFACT)
    lineage.end_run(run)
    assert lineage.register_champion(run, "m", "champion", {}) == 1
    same = warm_start_step("m", "champion", model)
    assert same.uri == "models:/m/1" and same.version == 1, same
    other = warm_start_step("m", "champion", {**model, "world_tokens": 16})
    assert other.uri is None and "world_tokens: champion 4, config 16" in other.reason, other


def test_stage_lock_makes_the_second_wait(tmp_path):
    from theworld_core.pipeline import stage_lock

    folder = tmp_path / "stages" / "projection-abc"
    events: list[tuple[str, float]] = []
    inside = threading.Event()

    def first():
        with stage_lock(folder):
            events.append(("first in", time.monotonic()))
            inside.set()
            time.sleep(0.8)
            events.append(("first out", time.monotonic()))

    def second():
        inside.wait(10)
        with stage_lock(folder):
            events.append(("second in", time.monotonic()))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert [e for e, _ in events] == ["first in", "first out", "second in"]
    assert (tmp_path / "stages" / "projection-abc.lock").is_file()


def cli(capsys, *args: str) -> tuple[int, str]:
    """`theworld ARGS` in this process: (exit code, stdout + stderr)."""
    from flows.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_data_add_appends_atomically(tmp_path, capsys):
    """`theworld data add` copies images and appends metadata rows; a taken name gets a suffix; the
    same image and caption again is skipped; a missing caption or a non-image is refused."""
    src = tmp_path / "src"
    make_images(src, 0, 3)
    folder = tmp_path / "images"
    code, out = cli(
        capsys,
        "data",
        "add",
        str(src / "shape0000.png"),
        str(src / "shape0001.png"),
        "--to",
        str(folder),
        "--caption",
        "a shape",
    )
    assert code == 0, out
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert rows == [
        {"file_name": "shape0000.png", "text": "a shape"},
        {"file_name": "shape0001.png", "text": "a shape"},
    ]

    other = tmp_path / "other"
    other.mkdir()
    (other / "shape0000.png").write_bytes((src / "shape0002.png").read_bytes())  # same name, other bytes
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"file_name": "shape0000.png", "text": "another shape"}) + "\n")
    code, out = cli(
        capsys, "data", "add", str(other / "shape0000.png"), "--to", str(folder), "--captions", str(captions)
    )
    assert code == 0, out
    code, out = cli(capsys, "data", "add", str(src / "shape0000.png"), "--to", str(folder), "--caption", "a shape")
    assert code == 0 and "already there" in out, out
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert rows[2] == {"file_name": "shape0000-1.png", "text": "another shape"} and len(rows) == 3
    assert (folder / "shape0000-1.png").read_bytes() == (src / "shape0002.png").read_bytes()
    assert not list(folder.glob(".*tmp*")), "temporary files left behind"

    (tmp_path / "broken.png").write_bytes(b"not an image")
    code, out = cli(
        capsys,
        "data",
        "add",
        str(tmp_path / "broken.png"),
        str(src / "shape0002.png"),
        "--to",
        str(folder),
        "--caption",
        "x",
    )
    assert code == 2 and "not readable as images" in out, out
    code, out = cli(capsys, "data", "add", str(src / "shape0002.png"), "--to", str(folder))
    assert code == 2 and "no caption" in out, out
    assert len((folder / "metadata.jsonl").read_text().splitlines()) == 3  # nothing written by the refused adds

    from theworld_core.config import DataConfig
    from theworld_core.data import prepare_data

    assert (
        prepare_data(DataConfig(dataset_name=str(folder), eval_fraction=0.3), cache_dir=tmp_path / "cache").stats.total
        == 3
    )


def test_serve_and_notify_need_prefect_api_url(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(tmp_path / "project"))
    # the CLI sets these with setdefault: set here, monkeypatch restores them afterwards
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    for args in (["serve", str(REPO / "stages.yaml")], ["data", "notify", "--stages-yaml", str(REPO / "stages.yaml")]):
        code, out = cli(capsys, *args)
        assert code == 2 and "PREFECT_API_URL is not set" in out, out


# --- slow: the deployment, served and from prefect.yaml ---------------------------------------------------


@pytest.mark.e2e
def test_prefect_yaml_deploys_to_a_process_pool(prefect_api, tmp_path):
    """`prefect --no-prompt deploy --name full` from the repository root (the work-pool route):
    the deployment's pool, entrypoint, parameters, schedule, trigger and concurrency limit."""
    env = base_env(PREFECT_API_URL=prefect_api.url, PREFECT_HOME=str(tmp_path / "prefect-home"))
    created = run([PREFECT, "work-pool", "create", "theworld", "--type", "process"], env, REPO, timeout=90)
    assert created.returncode == 0, created.stdout
    deployed = run([PREFECT, "--no-prompt", "deploy", "--name", "full"], env, REPO, timeout=120)
    assert deployed.returncode == 0, deployed.stdout
    prefect = Prefect(prefect_api.url)
    try:
        d = prefect.client.read_deployment_by_name("multistage/full")
        assert d.work_pool_name == "theworld" and d.entrypoint == "flows/multistage.py:multistage"
        assert d.parameters == {"stages_yaml": "stages.yaml", "profile": None, "force": False}
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        stages = yaml.safe_load((REPO / "stages.yaml").read_text())["schedule"]
        assert [(s.schedule.cron, s.schedule.timezone) for s in d.schedules] == [(stages["cron"], stages["timezone"])]
        assert d.global_concurrency_limit.limit == 1
        assert d.concurrency_options.collision_strategy.value == "ENQUEUE"
        automations = prefect.client.read_resource_related_automations(f"prefect.deployment.{d.id}")
        assert len(automations) == 1, automations
        trigger = automations[0].trigger
        assert trigger.expect == {stages["new_data_event"]}
        assert dict(trigger.match.root) == {
            "prefect.resource.id": "theworld.data.datacomp"
        }  # the base config's dataset
        prefect.client.delete_deployment(d.id)  # `theworld serve` registers its own multistage/full next
    finally:
        prefect.close()


@pytest.mark.e2e
def test_served_deployment_no_new_data_event_and_overlap(prefect_api, theworld_home, tmp_path):
    """`theworld serve` + `prefect deployment run`: a run trains; a rerun ends at once with "no new
    data"; `theworld data add --notify` starts a run through the event trigger, which trains (warm
    start from the champion); two forced runs fired at once run one after the other."""
    images, project = tmp_path / "images", tmp_path / "project"
    rows = make_images(images, 0, IMAGES)
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    experiment, cron = "deploy-test", far_cron()
    stages_yaml = tmp_path / "pipeline.yaml"
    doc = pipeline_doc(images, tmp_path / "stages", experiment, cron)
    # "cold": the tiny profile without the warm start, so that a forced rerun of it is all cached
    doc["profiles"]["cold"] = {**doc["profiles"]["tiny"], "schedule": {"cron": cron, "warm_start_from_champion": False}}
    stages_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = base_env(
        PREFECT_API_URL=prefect_api.url,
        PREFECT_HOME=str(tmp_path / "prefect-home"),
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        PREFECT_RUNNER_HEARTBEAT_FREQUENCY="30",
        MLFLOW_TRACKING_URI=tracking,
        THEWORLD_PROJECT_DIR=str(project),
        THEWORLD_HOME=str(theworld_home),
    )
    log = tmp_path / "serve.log"
    timings: dict[str, float] = {}
    serve = start_theworld(["serve", str(stages_yaml), "--profile", "tiny"], env, tmp_path, log)
    prefect = Prefect(prefect_api.url)
    try:
        # the deployment, as served
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None:
            assert serve.poll() is None, f"theworld serve exited {serve.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"multistage/full never appeared:\n{tail(log)}"
            try:
                deployment = prefect.client.read_deployment_by_name("multistage/full")
            except Exception:  # noqa: BLE001 - ObjectNotFound until serve has registered it
                time.sleep(0.5)
        assert deployment.parameters == {"stages_yaml": str(stages_yaml.resolve()), "profile": "tiny", "force": False}
        assert [(s.schedule.cron, s.schedule.timezone) for s in deployment.schedules] == [(cron, "UTC")]
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"
        # serve registers the trigger's automation just after the deployment: wait for it
        deadline = time.monotonic() + 30
        while not (
            automations := prefect.client.read_resource_related_automations(f"prefect.deployment.{deployment.id}")
        ):
            assert time.monotonic() < deadline, f"the new-data automation never appeared:\n{tail(log)}"
            time.sleep(0.5)
        assert [(a.trigger.expect, dict(a.trigger.match.root)) for a in automations] == [
            ({"theworld.data.updated"}, {"prefect.resource.id": "theworld.data.images"})
        ]

        # 1. a run trains
        start = time.monotonic()
        first = deployment_run(env, tmp_path)
        done = prefect.wait_final(first, 240, log)
        timings["first run"] = time.monotonic() - start
        assert done.state.is_completed(), f"{done.state}:\n{tail(log)}"
        parents = pipeline_runs(tracking, experiment)
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert parents[0].data.tags["prefect_flow_run_id"] == first
        assert parents[0].data.tags["warm_start_from"] == "none"  # nothing registered yet
        fingerprint = parents[0].data.tags["data_fingerprint"]

        # 2. the same data again: "no new data" within seconds, nothing trained
        start = time.monotonic()
        rerun = deployment_run(env, tmp_path)
        done = prefect.wait_final(rerun, 120, log)
        timings["no-new-data rerun"] = time.monotonic() - start
        assert done.state.is_completed() and done.state.message.startswith("no new data"), done.state
        assert fingerprint[:16] in done.state.message and parents[0].info.run_id in done.state.message
        artifacts = {a.key: a for a in prefect.artifacts(rerun)}
        assert "no-new-data" in artifacts and fingerprint in artifacts["no-new-data"].data
        assert parents[0].info.run_id in artifacts["no-new-data"].data
        assert len(pipeline_runs(tracking, experiment)) == 1
        assert done.total_run_time.total_seconds() < 60, done.total_run_time

        # 3. new data: `theworld data add --notify` -> the trigger starts a run, which trains
        known = {str(r.id) for r in prefect.manual_runs(deployment.id)}
        new_image = tmp_path / "new" / "fresh.png"
        new_image.parent.mkdir()
        from theworld_core.data.synthetic import render_png, shape_spec

        new_image.write_bytes(render_png(shape_spec(7, 999), 32))
        start = time.monotonic()
        added = run(
            [
                THEWORLD,
                "data",
                "add",
                str(new_image),
                "--to",
                str(images),
                "--caption",
                "a fresh shape",
                "--notify",
                "--stages-yaml",
                str(stages_yaml),
                "--profile",
                "tiny",
            ],
            env,
            tmp_path,
            timeout=180,
        )
        assert added.returncode == 0, added.stdout
        assert "emitted theworld.data.updated about theworld.data.images" in added.stdout, added.stdout
        triggered = None
        deadline = time.monotonic() + 60
        while triggered is None:
            assert time.monotonic() < deadline, f"no run after the event:\n{tail(log)}"
            fresh = [r for r in prefect.manual_runs(deployment.id) if str(r.id) not in known]
            triggered = str(fresh[0].id) if fresh else None
            time.sleep(0.5)
        done = prefect.wait_final(triggered, 240, log)
        timings["event-triggered run"] = time.monotonic() - start
        assert done.state.is_completed() and not (done.state.message or "").startswith("no new data"), done.state
        parents = pipeline_runs(tracking, experiment)
        assert len(parents) == 2 and parents[1].data.tags["prefect_flow_run_id"] == triggered
        assert parents[1].data.tags["data_fingerprint"] != fingerprint
        assert re.fullmatch(rf"models:/{experiment}-model/\d+", parents[1].data.tags["warm_start_from"])
        from mlflow.tracking import MlflowClient

        stage1 = MlflowClient(tracking_uri=tracking).search_runs(
            [parents[1].info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parents[1].info.run_id}' and tags.stage = 'projection'",
        )
        assert (
            stage1 and stage1[0].data.tags["started_from"] == f"stage output {parents[1].data.tags['warm_start_from']}"
        )

        # 4. two runs at once (forced: the data is unchanged; no warm start, so the second one's stages
        #    come from Prefect's cache): the second waits for the first, each has its own summary
        a = deployment_run(env, tmp_path, "force=true", "profile=cold")
        b = deployment_run(env, tmp_path, "force=true", "profile=cold")
        start = time.monotonic()
        runs = [prefect.wait_final(r, 420, log) for r in (a, b)]
        timings["two forced runs"] = time.monotonic() - start
        assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
        earlier, later = sorted(runs, key=lambda r: r.start_time)
        assert later.start_time >= earlier.end_time, (earlier.start_time, earlier.end_time, later.start_time)
        assert "AwaitingConcurrencySlot" in prefect.state_names(str(later.id))
        by_flow_run = {p.data.tags["prefect_flow_run_id"]: p for p in pipeline_runs(tracking, experiment)}
        assert {a, b} <= set(by_flow_run)
        summaries = [project / "summaries" / by_flow_run[r].info.run_id / "stage_summary.json" for r in (a, b)]
        assert all(s.is_file() for s in summaries) and summaries[0] != summaries[1]
        for r in (a, b):
            assert by_flow_run[r].info.status == "FINISHED" and by_flow_run[r].data.tags["forced"] == "true"
        assert [len(json.loads(s.read_text())) for s in summaries] == [2, 2]
    finally:
        prefect.close()
        stop_process_group(serve, grace=10)
        print("timings (s):", {k: round(v, 1) for k, v in timings.items()})


LOCK_CHILD = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from theworld_core import pipeline
from theworld_core.config import load_pipeline_config
from theworld_core.tracking import lineage

stages_yaml, name, out = sys.argv[1:4]
cfg = load_pipeline_config(stages_yaml, profile="tiny")
stage = cfg.resolved_stages()[0].model_dump(mode="json")
fingerprint = pipeline.prepare_data_step(stage).fingerprint
parent = lineage.start_parent_run(cfg.mlflow.experiment, name, {"run_kind": "pipeline"}, {})
record = pipeline.train_stage_step(stage, None, fingerprint, "test-code", output_root=cfg.output_root,
                                   parent_run_id=parent, attempt=1, global_step_offset=0, tags={})
lineage.end_run(parent)
fields = ("run_id", "status", "steps", "stage_output_uri", "content_key")
open(out, "w").write(json.dumps({k: v for k, v in record.to_dict().items() if k in fields}))
"""


@pytest.mark.e2e
def test_two_runs_of_the_same_stage_do_not_clobber(theworld_home, tmp_path):
    """Two pipeline processes reach the same content-keyed stage folder at once: one trains, the other
    waits on `<folder>.lock`, then finds the stage finished and reuses its output (logged to its own
    MLflow run, so its stage output URI works)."""
    images = tmp_path / "images"
    rows = make_images(images, 0, 48)
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = pipeline_doc(images, tmp_path / "stages", "lock-test", None)
    doc["stages"] = doc["stages"][:1]
    del doc["profiles"]["tiny"]["stages"]["vision"]
    doc["profiles"]["tiny"]["defaults"].update(max_steps=10, eval_steps=5, save_steps=5)
    stages_yaml = tmp_path / "pipeline.yaml"
    stages_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = base_env(
        MLFLOW_TRACKING_URI=tracking, THEWORLD_PROJECT_DIR=str(tmp_path / "project"), THEWORLD_HOME=str(theworld_home)
    )
    # one process creates the MLflow store first (two creating one SQLite schema at once collide)
    init = run(
        [
            sys.executable,
            "-c",
            "from theworld_core.tracking.mlflow_runs import configure_tracking, "
            "ensure_experiment; configure_tracking(); ensure_experiment('lock-test')",
        ],
        env,
        tmp_path,
        timeout=120,
    )
    assert init.returncode == 0, init.stdout
    script = tmp_path / "child.py"
    script.write_text(LOCK_CHILD)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(stages_yaml), name, str(tmp_path / f"{name}.json")],
            cwd=tmp_path,
            env=env,
            stdout=open(tmp_path / f"{name}.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for name in ("a", "b")
    ]
    try:
        for proc in procs:
            proc.wait(timeout=240)
    finally:
        for proc in procs:
            stop_process_group(proc, grace=2)
    logs = {n: tail(tmp_path / f"{n}.log") for n in ("a", "b")}
    assert [p.returncode for p in procs] == [0, 0], logs
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("a", "b"))
    assert a["content_key"] == b["content_key"] and a["status"] == b["status"] == "completed", (a, b)
    assert a["steps"] == b["steps"] == 10 and a["run_id"] != b["run_id"]
    folders = [p for p in (tmp_path / "stages").iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "final").is_dir(), folders
    assert (tmp_path / "stages" / f"{folders[0].name}.lock").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    runs = {r: client.get_run(r) for r in (a["run_id"], b["run_id"])}
    reused = [r for r, run in runs.items() if "reused_stage_output" in run.data.tags]
    assert len(reused) == 1, "exactly one process trained; the other reused its output"
    waited = next(n for n, rec in (("a", a), ("b", b)) if rec["run_id"] in reused)
    assert "is in use by pid" in logs[waited] and "waiting for it" in logs[waited], logs[waited]
    for run_id in runs:
        assert {f.path for f in client.list_artifacts(run_id, "stage_output")} >= {
            "stage_output/manifest.json",
            "stage_output/model.safetensors",
        }
    trained = next(r for r in runs if r not in reused)
    assert runs[reused[0]].info.start_time >= runs[trained].info.end_time, "the waiting run started early"
