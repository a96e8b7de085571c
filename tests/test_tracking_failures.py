"""The tracking server may fail (issue "Integrity and rigor", items 3-7), with real servers.

Each test reproduces one fault an operator measured, on the tiny models and a real MLflow server
(and, for the pipeline, a real Prefect server) on 127.0.0.1:

3. a kill after `final/` lands, before its upload: the rerun completes the run;
4. the tracking server dies mid-stage: training ends without waiting on it, the result says the
   tracking is incomplete (exit status 4), records wait in the output folder's outbox and reach the
   run when the server is back (in the same run, or on the rerun);
5. `theworld run`s started together on a fresh SQLite store all start; runs left RUNNING by a dead
   process are ended KILLED by the next pipeline run of the same config, a live process's are not;
6. a second pipeline run that waited on a stage lock reuses every later stage (content keys);
7. a cached stage record whose MLflow run is not in the current store (another store, deleted) is
   recorded again instead of failing the flow.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import servers
from servers import client_env, kill_process_group, mlflow_server_spec, run_theworld, start_theworld, stop_process_group
from stage_helpers import small_cfg, tiny_model_section

# the session's servers (fixtures of servers.py)
launched_servers, mlflow_server, prefect_server = (
    servers.launched_servers,
    servers.mlflow_server,
    servers.prefect_server,
)

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_mlflow(tmp_path_factory):
    """An MLflow server these tests may kill and restart (same port, same stores)."""
    server = mlflow_server_spec(tmp_path_factory.mktemp("own-mlflow")).launch().wait_healthy()
    yield server
    server.stop()


@pytest.fixture
def tracking_to(monkeypatch):
    """`tracking_to(url)`: this process tracks to `url`; MLflow's process-wide URIs are restored after."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None)

    def point(url: str) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)

    yield point
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved


def restart(server) -> None:
    if not server.alive():
        server.stop()
        server.launch().wait_healthy()


def client_of(url: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=url)


def stage_config(tiny_paths, folder: Path, experiment: str):
    return small_cfg(
        tiny_paths, folder, max_steps=STEPS, logging_steps=1, eval_steps=6, save_steps=6, wandb_project=experiment
    )


def steps_logged(client, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def logged_manifest_files(client, run_id: str, tmp_path: Path) -> dict | None:
    if not client.list_artifacts(run_id, "stage_output"):
        return None
    path = client.download_artifacts(run_id, "stage_output/manifest.json", str(tmp_path))
    return json.loads(Path(path).read_text())["files"]


def local_manifest_files(final: Path) -> dict:
    return json.loads((final / "manifest.json").read_text())["files"]


def train_cli(config: Path) -> tuple[int, str]:
    """`theworld train --config CONFIG` in this process: (exit status, what it printed)."""
    import contextlib
    import io

    from theworld_core.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", "--config", str(config)])
    return code, out.getvalue()


def write_config(cfg, path: Path) -> Path:
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    return path


def server_killer(server, *, down_at: int, up_at: int | None = None):
    """A loss hook that kills the MLflow server before step `down_at` and restarts it before `up_at`."""
    events: dict[str, float] = {}

    def hook(step, loss):
        if step == down_at and "down" not in events:
            kill_process_group(server.proc)
            events["down"] = time.monotonic()
        if up_at is not None and step == up_at and "up" not in events:
            server.launch().wait_healthy()
            events["up"] = time.monotonic()
        return loss

    return hook, events


# --- 4. the tracking server dies mid-stage --------------------------------------------------------


def test_server_back_within_the_stage_gets_every_record(tiny_paths, tmp_path, own_mlflow, tracking_to):
    """Down at step 3, back at step 8: the stage ends with its run whole (all 12 train/loss points,
    the stage output, tracking_status complete, FINISHED) and says tracking is complete."""
    from theworld_core.training.launch import train_stage

    restart(own_mlflow)
    tracking_to(own_mlflow.url)
    hook, _ = server_killer(own_mlflow, down_at=3, up_at=8)
    result = train_stage(stage_config(tiny_paths, tmp_path / "stage", "tf-back"), loss_hook=hook)

    assert result.status == "completed"
    assert result.tracking_incomplete is None and result.stage_output_logged and result.exit_status == 0
    client = client_of(own_mlflow.url)
    run = client.get_run(result.mlflow_run_id)
    assert steps_logged(client, run.info.run_id) == list(range(1, STEPS + 1))
    assert logged_manifest_files(client, run.info.run_id, tmp_path) == local_manifest_files(Path(result.stage_output))
    assert run.data.tags["tracking_status"] == "complete"
    assert run.info.status == "FINISHED"
    assert not (tmp_path / "stage" / "tracking-outbox.jsonl").exists()


def test_server_dead_at_the_end_then_the_rerun_repairs_the_run(tiny_paths, tmp_path, own_mlflow, tracking_to):
    """Down from step 3 to the end: training finishes without sitting in retries, the result says
    tracking is incomplete and the output is not in MLflow (exit status 4), the records wait in the
    output folder. After a server restart, `theworld train` again exits 0 and the same run holds
    every train/loss point, the stage output and tracking_status complete."""
    from theworld_core.training.launch import train_stage

    restart(own_mlflow)
    tracking_to(own_mlflow.url)
    cfg = stage_config(tiny_paths, tmp_path / "stage", "tf-dead")
    hook, events = server_killer(own_mlflow, down_at=3)
    result = train_stage(cfg, loss_hook=hook)
    after_kill = time.monotonic() - events["down"]

    assert result.status == "completed" and Path(result.stage_output, "model.safetensors").is_file()
    # MLflow's default retries kept the operator's process busy for over 6 minutes.
    assert after_kill < 120, f"the stage waited {after_kill:.0f} s on a dead tracking server"
    assert result.exit_status == 4 and not result.stage_output_logged
    assert result.tracking_incomplete and "tracking-outbox.jsonl" in result.tracking_incomplete
    outbox = tmp_path / "stage" / "tracking-outbox.jsonl"
    assert outbox.is_file()

    restart(own_mlflow)
    code, printed = train_cli(write_config(cfg, tmp_path / "stage.json"))
    assert code == 0, printed
    assert "already finished" in printed
    client = client_of(own_mlflow.url)
    run = client.get_run(result.mlflow_run_id)
    assert steps_logged(client, run.info.run_id) == list(range(1, STEPS + 1))
    assert logged_manifest_files(client, run.info.run_id, tmp_path) == local_manifest_files(Path(result.stage_output))
    assert run.data.tags["tracking_status"] == "complete"
    assert run.data.tags["stage_status"] == "completed"
    assert run.info.status == "FINISHED"
    assert not outbox.exists()


def test_a_run_that_cannot_be_opened_fails_at_once_naming_the_server(tiny_paths, tmp_path, tracking_to):
    """No server at the URI: the stage refuses to start within seconds, saying where it looked."""
    from servers import free_port

    from theworld_core.tracking.stage_logger import TrackingUnavailable
    from theworld_core.training.launch import train_stage

    url = f"http://127.0.0.1:{free_port()}"
    tracking_to(url)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="nothing was trained") as error:
        train_stage(stage_config(tiny_paths, tmp_path / "stage", "tf-none"))
    assert url in str(error.value)
    assert time.monotonic() - started < 120
    assert not (tmp_path / "stage" / "final").exists()


def _outbox_on_a_full_disk(folder: Path):
    """An outbox whose files are links to /dev/full: every write to them fails with ENOSPC."""
    from theworld_core.tracking.outbox import OUTBOX_FILE, SENT_FILE, TrackingOutbox

    outbox = TrackingOutbox(folder)
    for name in (OUTBOX_FILE, SENT_FILE.replace(".sent", ".sent.tmp")):
        (folder / name).symlink_to("/dev/full")
    return outbox


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to stand in for a full disk")
def test_a_full_disk_under_the_outbox_stops_neither_training_nor_delivery(tmp_path, own_mlflow, tracking_to, caplog):
    """The outbox file cannot be written (the disk filled during a stage): records still reach the
    run, the sender keeps going, the operator is told once. With the server down as well, the report
    says the undelivered records are lost instead of pointing at a file that does not hold them."""
    from servers import free_port

    from theworld_core.tracking.mlflow_runs import configure_tracking

    restart(own_mlflow)
    tracking_to(own_mlflow.url)
    configure_tracking()
    client = client_of(own_mlflow.url)
    run_id = client.create_run(client.create_experiment(f"tf-full-{time.time_ns()}")).info.run_id
    outbox = _outbox_on_a_full_disk(tmp_path / "out")
    outbox.log_params(run_id, {"lr": 0.001})
    for step in (1, 2, 3):
        outbox.log_metrics(run_id, {"train/loss": 1.0 / step}, step)
    outbox.end_run(run_id, "FINISHED")
    report = outbox.close(timeout=60)

    assert report.complete and report.pending == 0, report
    run = client.get_run(run_id)
    assert run.data.params["lr"] == "0.001" and run.info.status == "FINISHED"
    assert steps_logged(client, run_id) == [1, 2, 3]
    warnings = [r.getMessage() for r in caplog.records if "tracking outbox" in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], warnings
    assert list((tmp_path / "out").iterdir()) == []  # no link or half-written file left behind

    tracking_to(f"http://127.0.0.1:{free_port()}")  # nobody there
    configure_tracking()
    outbox = _outbox_on_a_full_disk(tmp_path / "out")
    outbox.log_metrics(run_id, {"train/loss": 0.1}, 4)
    report = outbox.close(timeout=60)
    assert not report.complete and report.pending == 1
    assert "they are lost" in report.issue and "No space left on device" in report.issue
    assert "sent by the next run" not in report.issue
    assert list((tmp_path / "out").iterdir()) == []  # nothing a later run would replay half of


# --- 3. killed after final/ lands, before its upload ---------------------------------------------

KILL_BEFORE_UPLOAD = """
import os, signal, sys
from theworld_core.config import load_stage_config
from theworld_core.tracking.stage_logger import StageLogger
from theworld_core.training.launch import train_stage

StageLogger.log_stage_output = lambda self, final: os.kill(os.getpid(), signal.SIGKILL)
train_stage(load_stage_config(sys.argv[1]))
"""


def test_kill_after_final_before_upload_then_rerun_completes_the_run(tiny_paths, tmp_path, own_mlflow, tracking_to):
    """SIGKILL right after final/ is written, before its upload; the run is then FINISHED without an
    artifact (as the operator found it). `theworld train` again: exit 0, and the same run holds this
    stage output (same per-file sha256) and every eval/loss point."""
    restart(own_mlflow)
    cfg = stage_config(tiny_paths, tmp_path / "stage", "tf-kill")
    config = write_config(cfg, tmp_path / "stage.json")
    env = {**os.environ, "MLFLOW_TRACKING_URI": own_mlflow.url, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_UPLOAD, str(config)],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    final = tmp_path / "stage" / "final"
    assert (final / "manifest.json").is_file()

    client = client_of(own_mlflow.url)
    (run,) = client.search_runs([client.get_experiment_by_name("tf-kill").experiment_id])
    client.set_terminated(run.info.run_id, "FINISHED")
    assert logged_manifest_files(client, run.info.run_id, tmp_path) is None

    tracking_to(own_mlflow.url)
    code, printed = train_cli(config)
    assert code == 0, printed
    assert "already finished" in printed
    run = client.get_run(run.info.run_id)
    assert logged_manifest_files(client, run.info.run_id, tmp_path) == local_manifest_files(final)
    assert steps_logged(client, run.info.run_id, "eval/loss") == [6, 12]
    assert run.data.tags["tracking_status"] == "complete"
    assert run.info.status == "FINISHED"


# --- 5. the store: created under a lock; runs of dead processes ended ----------------------------

OPEN_STORE = """
import sys, time
from pathlib import Path
import mlflow
from theworld_core.tracking.mlflow_runs import configure_tracking, ensure_experiment

go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
configure_tracking()
experiment = ensure_experiment("race")
print(mlflow.MlflowClient().create_run(experiment).info.run_id)
"""


def test_processes_starting_together_on_a_fresh_sqlite_store_all_start(tmp_path):
    """Four processes open one fresh SQLite store at the same moment (as `theworld run`s started
    together do): each creates its run; none dies in MLflow's schema migration."""
    project, go = tmp_path / "project", tmp_path / "go"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env.update({"THEWORLD_PROJECT_DIR": str(project), "PYTHONPATH": str(REPO)})
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE, str(go)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    time.sleep(8)  # past the imports
    go.touch()
    outcomes = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outcomes):
        assert proc.returncode == 0, err[-3000:]
    runs = client_of(f"sqlite:///{project / 'mlflow.db'}").search_runs(
        [client_of(f"sqlite:///{project / 'mlflow.db'}").get_experiment_by_name("race").experiment_id]
    )
    assert len(runs) == 4


OPEN_PIPELINE_RUN = """
import sys, time
from theworld_core.tracking import lineage

parent = lineage.start_parent_run("tf-stale", sys.argv[1], {"config_hash": sys.argv[2], "run_kind": "pipeline"}, {})
child = lineage.create_child_run(parent, "projection", 1, {"config_hash": sys.argv[2]})
print(parent, child, flush=True)
if sys.argv[3] == "stay":
    time.sleep(600)
"""


def test_runs_of_a_dead_pipeline_are_killed_by_the_next_run_of_its_config(own_mlflow, tracking_to):
    """A pipeline process that is gone left its parent and stage run RUNNING; the next pipeline run
    of the same config ends them KILLED (tag `ended_by`). A live process's runs, and a dead one's of
    another config, stay RUNNING."""
    from theworld_core.tracking import lineage

    restart(own_mlflow)
    env = {**os.environ, "MLFLOW_TRACKING_URI": own_mlflow.url, "PYTHONPATH": str(REPO)}

    def pipeline_process(name: str, config_hash: str, stay: bool) -> tuple[subprocess.Popen, list[str]]:
        proc = subprocess.Popen(
            [sys.executable, "-c", OPEN_PIPELINE_RUN, name, config_hash, "stay" if stay else "go"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        line = proc.stdout.readline()
        assert line, proc.stderr.read()[-3000:]
        return proc, line.split()

    dead, dead_ids = pipeline_process("dead", "cfg-a", stay=False)
    other, other_ids = pipeline_process("other-config", "cfg-b", stay=False)
    live, live_ids = pipeline_process("live", "cfg-a", stay=True)
    try:
        assert dead.wait(timeout=60) == 0 and other.wait(timeout=60) == 0
        tracking_to(own_mlflow.url)
        lineage.start_parent_run("tf-stale", "next", {"config_hash": "cfg-a", "run_kind": "pipeline"}, {})
        client = client_of(own_mlflow.url)
        for run_id in dead_ids:
            run = client.get_run(run_id)
            assert run.info.status == "KILLED", run_id
            assert "is gone" in run.data.tags["ended_by"]
        for run_id in live_ids + other_ids:
            assert client.get_run(run_id).info.status == "RUNNING", run_id
    finally:
        kill_process_group(live)


# --- 5, 6 and 7 through `theworld run` -----------------------------------------------------------


@pytest.fixture(scope="module")
def theworld_home(tmp_path_factory) -> Path:
    from theworld_core.model.tiny import ensure_tiny_models

    home = tmp_path_factory.mktemp("theworld-home")
    ensure_tiny_models(home / "tiny")
    return home


def two_stage_pipeline(experiment: str) -> dict:
    return {
        "model": tiny_model_section(),
        "data": {
            "dataset_name": "synthetic",
            "streaming": False,
            "synthetic_samples": 60,
            "synthetic_image_size": 32,
            "eval_fraction": 0.2,
        },
        "defaults": {
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "max_steps": 4,
            "eval_steps": 2,
            "save_steps": 2,
            "logging_steps": 2,
            "mixed_precision": "no",
            "eval_max_samples": 8,
            "divergence_grad_norm": None,
            "warmup_steps": 1,
        },
        "stages": [
            {"name": "projection", "learning_rate": 3.0e-2},
            {"name": "language", "freeze_gemma_language": False, "learning_rate": 2.0e-3},
        ],
        "gate": {"regression_tolerance": 100.0},
        "schedule": {"only_on_new_data": False},
        "mlflow": {"experiment": experiment, "registered_model": f"{experiment}-model", "log_system_metrics": False},
        "output_root": "./stages",
        "eval_generations": 1,
        "eval_task_samples": 2,
    }


def run_env(
    mlflow_server, prefect_server, project: Path, prefect_home: Path, theworld_home: Path, tracking_uri: str | None
) -> dict[str, str]:
    env = client_env(
        mlflow=mlflow_server,
        prefect=prefect_server,
        project_dir=project,
        prefect_home=prefect_home,
        theworld_home=theworld_home,
        extra={"OMP_NUM_THREADS": "1"},
    )
    if tracking_uri is None:
        env.pop("MLFLOW_TRACKING_URI")  # the project's SQLite store
    else:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def child_runs(client, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=500) if found else []
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.e2e
def test_two_runs_together_on_a_fresh_store_share_every_stage(tmp_path, mlflow_server, prefect_server, theworld_home):
    """Two `theworld run` of one config started together on a fresh SQLite store: both succeed; the
    second waits on each stage's lock and reuses it, so every stage has one folder and both runs'
    stage runs carry the same stage key."""
    project = tmp_path / "project"
    project.mkdir()
    stages_yaml = project / "stages.yaml"
    stages_yaml.write_text(yaml.safe_dump(two_stage_pipeline("tf-together")))
    procs = []
    for name in ("first", "second"):
        env = run_env(mlflow_server, prefect_server, project, tmp_path / f"{name}-prefect", theworld_home, None)
        procs.append((start_theworld(["run", str(stages_yaml)], env, project, tmp_path / f"{name}.log"), name))
    try:
        for proc, name in procs:
            assert proc.wait(timeout=900) == 0, (tmp_path / f"{name}.log").read_text()[-6000:]
    finally:
        for proc, _ in procs:
            stop_process_group(proc, grace=5)

    for stage in ("projection", "language"):
        folders = sorted(p.name for p in (project / "stages").glob(f"{stage}-*") if p.is_dir())
        assert len(folders) == 1, f"stage {stage} was trained in {folders}"
    children = child_runs(client_of(f"sqlite:///{project / 'mlflow.db'}"), "tf-together")
    for stage in ("projection", "language"):
        keys = {r.data.tags["stage_key"] for r in children if r.data.tags["stage"] == stage}
        runs = [r for r in children if r.data.tags["stage"] == stage]
        assert len(runs) == 2 and len(keys) == 1, f"stage {stage}: keys {keys}"


@pytest.mark.e2e
def test_cached_stage_records_of_another_store_or_deleted_runs_are_recorded_again(
    tmp_path, mlflow_server, prefect_server, theworld_home
):
    """One PREFECT_HOME (so one task cache): `theworld run` on the project's SQLite store, then on the
    MLflow server, then again after the server's stage runs were deleted. Each run succeeds, no
    stage trains twice, and the stage runs of each store hold their stage output."""
    project = tmp_path / "project"
    project.mkdir()
    experiment = "tf-cache"
    stages_yaml = project / "stages.yaml"
    doc = two_stage_pipeline(experiment)
    doc["stages"] = doc["stages"][:1]
    stages_yaml.write_text(yaml.safe_dump(doc))
    home, log = tmp_path / "prefect-home", tmp_path / "run.log"

    def run(tracking_uri):
        env = run_env(mlflow_server, prefect_server, project, home, theworld_home, tracking_uri)
        result = run_theworld(["run", str(stages_yaml)], env, project, log, timeout=900)
        assert result.returncode == 0, result.output[-6000:]
        return result

    run(None)
    server = client_of(mlflow_server.url)
    second = run(mlflow_server.url)
    assert "is not used: run" in second.output and "does not exist in the tracking store" in second.output
    (child,) = child_runs(server, experiment)
    assert child.data.tags.get("reused_stage_output") or server.list_artifacts(child.info.run_id, "stage_output")
    assert server.list_artifacts(child.info.run_id, "stage_output")

    server.delete_run(child.info.run_id)
    third = run(mlflow_server.url)
    assert "is deleted in the tracking store" in third.output
    children = child_runs(server, experiment)
    assert len(children) == 1 and children[0].info.run_id != child.info.run_id
    assert server.list_artifacts(children[0].info.run_id, "stage_output")
    assert len([p for p in (project / "stages").glob("projection-*") if p.is_dir()]) == 1
    assert log.read_text().count("stage projection starts from pretrained bases") == 1
