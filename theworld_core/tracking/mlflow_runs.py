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


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3 opens an experiment in its GenAI layout unless this tag says it is for model training."""


def ensure_experiment(name: str = DEFAULT_MLFLOW_EXPERIMENT) -> str:
    """The experiment's id, creating it (with artifacts in the project folder for local stores).

    New and existing experiments are tagged as model-training experiments, so the MLflow UI opens
    them in its model-training view (runs table, metric charts), not the GenAI one."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != TRAINING_EXPERIMENT_KIND:
            mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG,
                                                     TRAINING_EXPERIMENT_KIND)
        return experiment.experiment_id
    artifact_location = None
    if mlflow.get_tracking_uri().startswith("sqlite:///"):
        artifact_location = (project_dir() / "mlartifacts" / name).as_uri()
    return mlflow.create_experiment(name, artifact_location=artifact_location,
                                    tags={EXPERIMENT_KIND_TAG: TRAINING_EXPERIMENT_KIND})


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


@contextlib.contextmanager
def stage_run(run_id: str | None, experiment: str, run_name: str | None, tags: dict[str, str] | None = None,
              log_system_metrics: bool | None = None):
    """Yield an active MLflow run: the given one (resumed) or a new one in `experiment`.

    `log_system_metrics`: MLflow samples CPU, memory, disk, network and GPU use (`system/...`) while
    the run is active; None leaves it to MLflow's switch (`MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`)."""
    import mlflow

    configure_tracking()
    active = mlflow.active_run()
    if run_id is not None and active is not None and active.info.run_id == run_id:
        yield active  # the caller owns it and will end it
        return
    if run_id is not None and _run_exists(run_id):
        with mlflow.start_run(run_id=run_id, nested=active is not None, log_system_metrics=log_system_metrics) as run:
            yield run
        return
    with mlflow.start_run(experiment_id=ensure_experiment(experiment), run_name=run_name, tags=tags,
                          nested=active is not None, log_system_metrics=log_system_metrics) as run:
        yield run


def _run_exists(run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        import mlflow

        mlflow.get_run(run_id)
        return True
    except MlflowException:
        return False
