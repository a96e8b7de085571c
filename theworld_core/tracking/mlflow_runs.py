"""MLflow run handling shared by `theworld train` and the pipeline.

Tracking goes to `MLFLOW_TRACKING_URI` when set; otherwise to SQLite under the project-local
folder (`./.theworld/`, or `THEWORLD_PROJECT_DIR`), with artifacts beside it, so a laptop run
leaves everything in one place that `mlflow ui` can open.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from theworld_core.config import DEFAULT_MLFLOW_EXPERIMENT


def project_dir() -> Path:
    """The folder holding local state (MLflow store, Prefect home, stage outputs) for this project."""
    return Path(os.environ.get("THEWORLD_PROJECT_DIR", Path.cwd() / ".theworld")).resolve()


def local_tracking_uri() -> str:
    return f"sqlite:///{project_dir() / 'mlflow.db'}"


def configure_tracking() -> str:
    """Point MLflow at `MLFLOW_TRACKING_URI`, or at the project-local SQLite store; returns the URI."""
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI") or local_tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def ensure_experiment(name: str = DEFAULT_MLFLOW_EXPERIMENT) -> str:
    """The experiment's id, creating it (with artifacts in the project folder for local stores)."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if mlflow.get_tracking_uri().startswith("sqlite:///"):
        artifact_location = (project_dir() / "mlartifacts" / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location)


def ui_command() -> str:
    """The command that opens the MLflow UI on this run's store."""
    import mlflow

    return f"mlflow ui --backend-store-uri {mlflow.get_tracking_uri()} --host 127.0.0.1 --port 5000"


@contextlib.contextmanager
def stage_run(run_id: str | None, experiment: str, run_name: str | None, tags: dict[str, str] | None = None):
    """Yield an active MLflow run: the given one (resumed) or a new one in `experiment`."""
    import mlflow

    configure_tracking()
    active = mlflow.active_run()
    if run_id is not None and active is not None and active.info.run_id == run_id:
        yield active  # the caller owns it and will end it
        return
    if run_id is not None and _run_exists(run_id):
        with mlflow.start_run(run_id=run_id, nested=active is not None) as run:
            yield run
        return
    with mlflow.start_run(experiment_id=ensure_experiment(experiment), run_name=run_name, tags=tags,
                          nested=active is not None) as run:
        yield run


def _run_exists(run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        import mlflow

        mlflow.get_run(run_id)
        return True
    except MlflowException:
        return False
