"""Test-wide settings: offline, no telemetry, and one tiny-model build shared by the session."""

from __future__ import annotations

import os

# Set before any test module imports transformers / prefect / mlflow.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

# Files whose every test is end to end: they start servers, train in subprocesses or run the whole
# pipeline. `scripts/test.sh -m "not e2e"` leaves them out (the quick loop); CI runs everything.
E2E_FILES = {
    "test_console.py",
    "test_deploy.py",
    "test_distributed.py",
    "test_fsdp.py",
    "test_integrity.py",
    "test_mlflow_view.py",
    "test_pipeline.py",
    "test_postgres_stack.py",
    "test_real_size.py",
    "test_tracking_failures.py",
    "test_data_path.py",
    "test_trainer.py",
}


@pytest.fixture(autouse=True)
def mlflow_uris_restored():
    """MLflow's process-wide URIs as they were before each test: `mlflow.set_tracking_uri` and
    `set_registry_uri` also write MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, which later tests and
    the subprocesses they start would inherit."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    environment = {name: os.environ.get(name) for name in names}
    uris = getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None)
    yield
    for name, value in environment.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tracking_utils._tracking_uri, registry_utils._registry_uri = uris


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in E2E_FILES:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """The embedded tiny Gemma 3 and Cosmos VAE, built once per test session in a temp folder."""
    from theworld_core.model.tiny import ensure_tiny_models

    return ensure_tiny_models(tmp_path_factory.mktemp("tiny-models"))
