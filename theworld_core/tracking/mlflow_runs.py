"""MLflow run handling shared by `theworld train` and the pipeline.

Tracking goes to `MLFLOW_TRACKING_URI` when set; otherwise to SQLite under the project-local
folder (`./.theworld/`, or `THEWORLD_PROJECT_DIR`), with artifacts beside it, so a laptop run
leaves everything in one place that `mlflow ui` can open.

The tracking server may fail; training must not wait on it:
- our HTTP calls have bounded timeouts and retries (`HTTP_DEFAULTS`, set unless the environment
  sets them), so an unreachable server costs seconds, not MLflow's default of minutes of backoff;
- a SQLite store is created under an `fcntl` lock beside the database, so two processes starting
  on a fresh store do not race in MLflow's schema migration;
- every run we create carries its owner (`owner_pid`, `owner_host`, `owner_started`), so a run
  left RUNNING by a process that is gone can be told from one still training (`end_stale_runs`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Any

from theworld_core.config import DEFAULT_MLFLOW_EXPERIMENT

log = logging.getLogger("theworld.tracking")

HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
"""Per HTTP call: 30 s without an answer is a failure, retried twice (about 3 s of backoff).
MLflow's own defaults (120 s, 7 retries, factor 2) keep a dead server's caller busy for minutes."""

OWNER_TAGS = ("owner_pid", "owner_host", "owner_started")
"""Tags naming the process that owns a run: its pid, host name and start time (seconds since the epoch)."""


def project_dir() -> Path:
    """The folder holding local state (MLflow store, Prefect home, stage outputs) for this project."""
    return Path(os.environ.get("THEWORLD_PROJECT_DIR", Path.cwd() / ".theworld")).resolve()


def local_tracking_uri() -> str:
    return f"sqlite:///{project_dir() / 'mlflow.db'}"


_opened_stores: set[str] = set()


def configure_tracking() -> str:
    """Point MLflow at `MLFLOW_TRACKING_URI`, or at the project-local SQLite store; returns the URI.

    Sets bounded HTTP timeouts and retries (`HTTP_DEFAULTS`) where the environment does not, and
    creates a SQLite store under a lock (`open_sqlite_store`)."""
    import mlflow

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()
    mlflow.set_tracking_uri(uri)
    # The registry (the champion, models:/ URIs) lives in the same store, whatever was set before
    # (MLflow's set_registry_uri also writes MLFLOW_REGISTRY_URI, so an earlier call would leak).
    mlflow.set_registry_uri(uri)
    if uri.startswith("sqlite:///") and uri not in _opened_stores:
        open_sqlite_store(uri)
        _opened_stores.add(uri)
    return uri


def open_sqlite_store(uri: str) -> None:
    """Create (or migrate) the SQLite store at `uri` while holding an `fcntl` lock on `<db>.lock`.

    MLflow creates its tables and runs its schema migration on first use; two processes doing that
    at once on a fresh file make one fail ("Online migration expected to match one row"). The
    tracking and the registry store are opened here, one process at a time; later uses find the
    schema current."""
    from mlflow.tracking._model_registry.utils import _get_store as registry_store
    from mlflow.tracking._tracking_service.utils import _get_store as tracking_store

    database = Path(uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            tracking_store(uri)
            registry_store(uri)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3 opens an experiment in its GenAI layout unless this tag says it is for model training."""


def ensure_experiment(name: str = DEFAULT_MLFLOW_EXPERIMENT) -> str:
    """The experiment's id, creating it (with artifacts in the project folder for local stores).

    New and existing experiments are tagged as model-training experiments, so the MLflow UI opens
    them in its model-training view (runs table, metric charts), not the GenAI one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        artifact_location = None
        if mlflow.get_tracking_uri().startswith("sqlite:///"):
            artifact_location = (project_dir() / "mlartifacts" / name).as_uri()
        try:
            return mlflow.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND}
            )
        except MlflowException:
            experiment = mlflow.get_experiment_by_name(name)  # another process created it meanwhile
            if experiment is None:
                raise
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_EXPERIMENT_KIND:
        mlflow.MlflowClient().set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_EXPERIMENT_KIND
        )
    return experiment.experiment_id


UI_VIEW = "#/experiments?workflowType=machine_learning"
"""The UI's model-training view: MLflow 3.17's UI picks its layout (GenAI or model training) from
a per-browser switch that defaults to GenAI; this URL parameter selects model training."""


def ui_command() -> str:
    """How to open the MLflow UI on this run's store, in its model-training view."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{UI_VIEW}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, then http://127.0.0.1:5000/{UI_VIEW}"


SYSTEM_METRICS_TAG = "theworld.log_system_metrics"
"""Run tag ("true"/"false") carrying the pipeline's `mlflow.log_system_metrics` to its stage runs."""


# --- run owners: telling a dead process's run from a live one's ---------------------------------


def _process_started(pid: int) -> float | None:
    """The start time of process `pid` (seconds since the epoch), None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def owner_tags() -> dict[str, str]:
    """This process as a run's owner."""
    pid = os.getpid()
    return {"owner_pid": str(pid), "owner_host": socket.gethostname(), "owner_started": f"{_process_started(pid):.2f}"}


def owner_state(tags: dict[str, str]) -> str:
    """ "alive", "dead" or "unknown" (no owner tags, or another host: cannot be decided from here)."""
    if not all(tags.get(k) for k in OWNER_TAGS) or tags["owner_host"] != socket.gethostname():
        return "unknown"
    try:
        pid, started = int(tags["owner_pid"]), float(tags["owner_started"])
    except ValueError:
        return "unknown"
    now = _process_started(pid)
    # A reused pid has another start time.
    return "alive" if now is not None and abs(now - started) < 1.0 else "dead"


def end_stale_runs(client, experiment_id: str, filter_string: str) -> list[str]:
    """End as KILLED the RUNNING runs matching `filter_string` whose owner process is dead, and their
    RUNNING child runs; returns the ids ended. Runs of live processes and of other hosts stay."""
    ended: list[str] = []
    stale = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and {filter_string}", max_results=1000
    )
    for run in stale:
        if owner_state(run.data.tags) != "dead":
            continue
        children = client.search_runs(
            [experiment_id],
            max_results=1000,
            filter_string=f"attributes.status = 'RUNNING' and tags.mlflow.parentRunId = '{run.info.run_id}'",
        )
        for stale_run in [*children, run]:
            if stale_run is run or owner_state(stale_run.data.tags) != "alive":
                client.set_tag(
                    stale_run.info.run_id,
                    "ended_by",
                    f"end_stale_runs: owner pid {run.data.tags['owner_pid']} on {run.data.tags['owner_host']} is gone",
                )
                client.set_terminated(stale_run.info.run_id, status="KILLED")
                ended.append(stale_run.info.run_id)
    if ended:
        log.info("ended %d run(s) left RUNNING by processes that are gone: %s", len(ended), ", ".join(ended))
    return ended


# --- the stage's run -----------------------------------------------------------------------------


def start_stage_run(
    run_id: str | None,
    experiment: str,
    run_name: str | None,
    tags: dict[str, str] | None = None,
    log_system_metrics: bool | None = None,
):
    """Make an MLflow run active (fluent API) and return `(run, owned)`: the given one (resumed), or a
    new one in `experiment` tagged with its owner. `owned` is False when the caller had already
    made `run_id` active (it ends it); end an owned run with `release_stage_run`.

    `log_system_metrics`: MLflow samples CPU, memory, disk, network and GPU use (`system/...`) while
    the run is active; None leaves it to MLflow's switch (`MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`)."""
    import mlflow

    configure_tracking()
    active = mlflow.active_run()
    if run_id is not None and active is not None and active.info.run_id == run_id:
        return active, False
    if run_id is not None and _run_exists(run_id):
        run = mlflow.start_run(run_id=run_id, nested=active is not None, log_system_metrics=log_system_metrics)
        return run, True
    run = mlflow.start_run(
        experiment_id=ensure_experiment(experiment),
        run_name=run_name,
        tags={**owner_tags(), **(tags or {})},
        nested=active is not None,
        log_system_metrics=log_system_metrics,
    )
    return run, True


def release_stage_run(run_id: str, status: str | None) -> None:
    """Leave the fluent run `run_id` (it must be the active one), ending it with `status` in the
    store; with `status` None, or when the store cannot be reached, it is left as it is in the store
    (a pending end is delivered later by the stage's outbox)."""
    import mlflow
    from mlflow.tracking import fluent

    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return
    if status is not None:
        try:
            mlflow.end_run(status)  # pops the run before it calls the store
            return
        except Exception as error:  # noqa: BLE001 - the store is down: the stage's result says so
            log.warning("could not end MLflow run %s as %s: %s", run_id, status, error)
    else:
        fluent._active_run_stack.get().pop()
    monitor = fluent.run_id_to_system_metrics_monitor.pop(run_id, None)
    if monitor is not None:
        with contextlib.suppress(Exception):
            monitor.finish()


@contextlib.contextmanager
def stage_run(
    run_id: str | None,
    experiment: str,
    run_name: str | None,
    tags: dict[str, str] | None = None,
    log_system_metrics: bool | None = None,
):
    """Yield an active MLflow run: the given one (resumed) or a new one in `experiment`; ended
    FINISHED (FAILED on an exception) unless the caller had made it active. `log_system_metrics`: as
    `start_stage_run`."""
    run, owned = start_stage_run(run_id, experiment, run_name, tags, log_system_metrics)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        if owned:
            release_stage_run(run.info.run_id, status)


def _run_exists(run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        import mlflow

        mlflow.get_run(run_id)
        return True
    except MlflowException as error:
        if error.get_http_status_code() >= 500:
            raise  # the store failed: not an answer
        return False


def run_state(run_id: str) -> dict[str, Any] | None:
    """{status, lifecycle_stage, tags} of `run_id` in the current store, None when it has no such run."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    configure_tracking()
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as error:
        if error.get_http_status_code() >= 500:
            raise
        return None
    return {"status": run.info.status, "lifecycle_stage": run.info.lifecycle_stage, "tags": dict(run.data.tags)}
