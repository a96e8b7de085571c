"""What a person sees in MLflow after a pipeline run: real MLflow (a local SQLite store written by
`theworld run`, and an `mlflow server` on 127.0.0.1), real training on the tiny models, no mocks.

One two-stage pipeline (projection, then language; 20 steps each, system metrics on, sampled every
0.1 s: MLflow logs a sample only after a whole interval, and a tiny stage's run is open about a
second) runs once for the module in its own project folder; the tests read its store as a user
would: the experiment's kind, the parent run's name and summary metrics, the stage runs' params,
datasets and metric names, the comparison plot at the parent's artifact root, and the registered
champion as an MLflow pyfunc model. The server test registers that champion's stage output on a
tracking server (proxied artifacts) and loads it from there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from servers import start_mlflow_server
from stage_helpers import tiny_model_section

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "test-view"
MODEL = "theworld-test-view"
OFF_FEATURE_KEYS = (
    "log_to_wandb",
    "wandb_project",
    "wandb_run_name",
    "push_to_hub",
    "hub_model_id",
    "hub_strategy",
    "hub_private_repo",
    "inject_fault",
    "inject_fault_step",
    "fetch_timeout_s",
    "fetch_retries",
    "fetch_concurrency",
    "image_cache_dir",
    "learning_rates",
    "feature_cache_dir",
)


def pipeline_doc() -> dict:
    return {
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
            "eval_steps": 10,
            "save_steps": 10,
            "logging_steps": 5,
            "mixed_precision": "no",
            "eval_max_samples": 16,
            "divergence_grad_norm": None,
            "warmup_steps": 5,
        },
        "stages": [
            {"name": "projection", "learning_rate": 3.0e-2},
            {"name": "language", "freeze_gemma_language": False, "learning_rate": 2.0e-3},
        ],
        "plateau": {"min_improvement": 0.01, "window_steps": 10, "patience_steps": 10, "min_steps": 10},
        "gate": {"regression_tolerance": 10.0},
        "mlflow": {"experiment": EXPERIMENT, "registered_model": MODEL, "log_system_metrics": True},
        "output_root": "./stages",
        "eval_generations": 1,
        "eval_task_samples": 2,
    }


def _env(project: Path, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        {
            "THEWORLD_PROJECT_DIR": str(project),
            "THEWORLD_HOME": str(home),
            "PREFECT_HOME": str(project / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
    )
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`theworld run` of the two-stage pipeline on a local store whose experiment already exists
    (untagged, as MLflow 3 made it before this change). Yields (project folder, store URI, THEWORLD_HOME)."""
    import mlflow

    from theworld_core.model.tiny import ensure_tiny_models

    root = tmp_path_factory.mktemp("mlflow-view")
    home, project = root / "home", root / "project"
    ensure_tiny_models(home / "tiny")
    project.mkdir()
    store = f"sqlite:///{project / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=store).create_experiment(EXPERIMENT, artifact_location=(project / "art").as_uri())
    (project / "stages.yaml").write_text(yaml.safe_dump(pipeline_doc(), sort_keys=False))
    command = [sys.executable, "-m", "flows.cli", "run", "stages.yaml"]
    done = subprocess.run(
        command, cwd=project, env=_env(project, home), capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    return project, store, home


@pytest.fixture(scope="module")
def client(run):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=run[1], registry_uri=run[1])


def _runs(client):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    return parents[0], {r.data.tags["stage"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}


@pytest.fixture
def restored_tracking():
    """MLflow's process-wide tracking/registry URIs as they were (configure_tracking sets them)."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None)
    yield
    tracking_utils._tracking_uri, registry_utils._registry_uri = saved


def png_base64(colour=(200, 30, 30)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- the experiment and the parent run -------------------------------------------------------------


def test_existing_experiment_is_tagged_for_model_training(client):
    assert client.get_experiment_by_name(EXPERIMENT).tags.get("mlflow.experimentKind") == "custom_model_development"


def test_parent_run_is_named_and_carries_stage_and_champion_metrics(client, tmp_path):
    parent, stages = _runs(client)
    rows = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "stage_summary.json", str(tmp_path))).read_text()
    )
    steps = {r["stage"]: r["steps"] for r in rows}
    fingerprint = parent.data.tags["data_fingerprint"]
    assert re.fullmatch(rf"multistage \d{{4}}-\d\d-\d\d \d\d:\d\d data {fingerprint[:8]}", parent.info.run_name), (
        parent.info.run_name
    )
    metrics = parent.data.metrics
    for name, run in stages.items():
        assert metrics[f"{name}/eval_loss"] == pytest.approx(run.data.metrics["eval/final_loss"])
        assert metrics[f"{name}/task_accuracy"] == pytest.approx(run.data.metrics["eval/task_accuracy"])
        assert metrics[f"{name}/steps"] == steps[name] > 0
    champion = stages[parent.data.tags["champion"]]
    assert metrics["champion/eval_loss"] == pytest.approx(champion.data.metrics["eval/final_loss"])
    assert {"champion/task_accuracy", "champion/steps"} <= set(metrics)
    by_stage = [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "all_stages/eval_loss")]
    assert sorted(by_stage) == [
        (1, pytest.approx(metrics["projection/eval_loss"])),
        (2, pytest.approx(metrics["language/eval_loss"])),
    ]


def test_comparison_plot_and_table_at_the_parent_artifact_root(client, tmp_path):
    parent, _ = _runs(client)
    root = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"stage_comparison.png", "stage_summary.json", "stage_summary.md"} <= root, root
    plot = Path(client.download_artifacts(parent.info.run_id, "stage_comparison.png", str(tmp_path)))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "stage_summary.json", str(tmp_path))).read_text()
    )
    assert [r["stage"] for r in rows] == ["projection", "language"]


# --- the stage runs ----------------------------------------------------------------------------------


def test_stage_params_are_the_meaningful_ones_with_the_gate_decision(client):
    _, stages = _runs(client)
    for name, run in stages.items():
        params, tags = run.data.params, run.data.tags
        # 60 for the stage config, counts and gate, plus the 6 `precision/...` params of the policy.
        precision = [k for k in params if k.startswith("precision/")]
        assert len(precision) == 6, precision
        assert len(params) - len(precision) <= 60, (name, len(params), sorted(params))
        assert not [k for k in OFF_FEATURE_KEYS if k in params], (name, sorted(params))
        assert not any(v == "None" for v in params.values()), (name, params)
        assert params["gate_decision"] == tags["gate_decision"] == "next"
        assert params["gate_reason"] == tags["gate_reason"] and params["gate_reason"]
        assert params["plateau_verdict"] == tags["plateau_verdict"]
        # synthetic data has no bad samples: no bad-sample counts at all
        assert not [k for k in params if k.startswith("data/bad")], params
        assert int(params["data/train"]) + int(params["data/eval"]) == int(params["data/total"]) == 120
        assert params["learning_rate"] and params["freeze_gemma_language"] in ("True", "False")
    assert int(stages["projection"].data.params["trainable/world_projector"]) > 0
    # where a stage starts: only when it does not start from the pretrained bases
    assert "resume_from_checkpoint" not in stages["projection"].data.params
    assert stages["language"].data.params["resume_from_checkpoint"].startswith("runs:/")


def test_stage_metrics_start_with_eval_and_train_and_include_system_metrics(client):
    """Chart sections (metric prefixes, alphabetical in the UI): eval, train, train/..., walltime."""
    _, stages = _runs(client)
    for run in stages.values():
        keys = set(run.data.metrics)
        assert not [k for k in keys if k.startswith(("data/", "lr/"))], sorted(keys)
        sections = sorted({k.rsplit("/", 1)[0] for k in keys if "/" in k and not k.startswith("system/")})
        assert sections[:2] == ["eval", "train"], sections  # the UI shows sections in this order
        # then train/feature_cache (when the cache is on) and train/lr/<group>, all under train
        assert all(s.startswith("train/") for s in sections[2:-1]) and sections[-1] == "walltime", sections
        assert {"train/loss", "eval/loss", "eval/final_loss"} <= keys
        # mlflow.log_system_metrics: true reached the stage run (inherited from the parent's tag), and
        # MLflow's sampler (every 0.1 s here) recorded the machine while the stage trained.
        assert run.data.tags.get("theworld.log_system_metrics") == "true"
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, sorted(keys)


def test_training_and_eval_data_logged_as_datasets(client):
    parent, stages = _runs(client)
    fingerprint = parent.data.tags["data_fingerprint"]
    for run in stages.values():
        inputs = {
            tag.value: item.dataset
            for item in run.inputs.dataset_inputs
            for tag in item.tags
            if tag.key == "mlflow.data.context"
        }
        assert set(inputs) == {"training", "eval"}, inputs
        for context, split in (("training", "train"), ("eval", "eval")):
            dataset = inputs[context]
            assert dataset.digest == fingerprint[:16] and dataset.name == f"synthetic-{split}"
            assert dataset.source_type == "code"
            profile = json.loads(dataset.profile)
            assert profile["fingerprint"] == fingerprint
            assert profile["num_samples"] == int(run.data.params[f"data/{split}"])


def test_system_metrics_follow_the_run_tag(tmp_path, monkeypatch, restored_tracking):
    """The stage logger opens a run with MLflow's sampler when its tag says true, without it when false."""
    import mlflow

    from theworld_core.config import StageConfig
    from theworld_core.tracking.mlflow_runs import SYSTEM_METRICS_TAG
    from theworld_core.tracking.stage_logger import StageLogger

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    logger = StageLogger(
        StageConfig(name="s", model_name="tiny", cosmos_model_name="tiny", output_dir=str(tmp_path / "out"))
    )
    c = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    experiment = c.create_experiment("sysm", artifact_location=(tmp_path / "a").as_uri())
    seen = {}
    for wanted in ("true", "false"):
        run_id = c.create_run(experiment, tags={SYSTEM_METRICS_TAG: wanted}).info.run_id
        with logger.open_run(run_id):
            time.sleep(2.0)
        seen[wanted] = [k for k in c.get_run(run_id).data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in seen["true"], seen
    assert seen["false"] == [], seen


# --- the champion as an MLflow model -------------------------------------------------------------------


def test_champion_is_a_pyfunc_model_answering_paths_and_base64(run, client, tmp_path, monkeypatch, restored_tracking):
    import mlflow
    import pandas as pd
    from PIL import Image

    from theworld_core.model.theworld import TheWorld

    project, store, home = run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("THEWORLD_HOME", str(home))
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(project))
    parent, stages = _runs(client)
    version = client.get_model_version_by_alias(MODEL, "champion")
    champion = stages[parent.data.tags["champion"]]
    assert version.run_id == champion.info.run_id
    for needle in (
        champion.data.tags["stage"],
        parent.data.tags["data_fingerprint"],
        parent.data.tags["config_hash"],
        f"eval_loss {champion.data.metrics['eval/final_loss']:.4f}",
    ):
        assert needle in version.description, (needle, version.description)
    card = Path(client.download_artifacts(champion.info.run_id, "stage_output/README.md", str(tmp_path))).read_text()
    assert parent.data.tags["data_fingerprint"] in card and "model_config" in card

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["image", "prompt"], inputs
    picture = tmp_path / "blue.jpg"
    Image.new("RGB", (32, 32), (10, 10, 200)).save(picture, format="JPEG")
    frame = pd.DataFrame(
        {
            "image": [str(picture), png_base64(), f"data:image/png;base64,{png_base64((0, 200, 0))}"],
            "prompt": ["What is in the image?"] * 3,
        }
    )
    answers = model.predict(frame, params={"max_new_tokens": 6})
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers), answers
    with pytest.raises(Exception, match="row 0.*neither an existing file nor base64"):
        model.predict(pd.DataFrame({"image": ["no/such/file.png"], "prompt": ["?"]}))

    # the stage output loads as before, from the registry and from the run
    for uri in (f"models:/{MODEL}@champion", f"runs:/{champion.info.run_id}/stage_output"):
        assert isinstance(TheWorld.from_pretrained(uri), TheWorld)


def test_champion_registered_on_a_tracking_server_loads_from_it(run, tmp_path, monkeypatch, restored_tracking):
    """On an `mlflow server` (proxied artifacts): an existing experiment gets the training tag, the
    plot lands at the parent's root, the champion registers as a pyfunc model and predicts."""
    import mlflow
    import pandas as pd

    from theworld_core.tracking import lineage

    project, _, home = run
    final = next(Path(p) for p in (project / "stages").glob("projection-*/final"))
    server = start_mlflow_server(tmp_path / "server")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        monkeypatch.setenv("THEWORLD_HOME", str(home))
        mlflow.MlflowClient(tracking_uri=server.url).create_experiment("served")
        parent = lineage.start_parent_run("served", lineage.pipeline_run_name(None, "ab" * 32), {}, {})
        assert mlflow.get_experiment_by_name("served").tags["mlflow.experimentKind"] == "custom_model_development"
        child = lineage.create_child_run(parent, "projection", 1, {})
        lineage.log_folder(child, final, lineage.STAGE_OUTPUT_ARTIFACT)
        lineage.log_summary(
            parent,
            [{"stage": "projection", "attempt": 1, "status": "completed", "steps": 20}],
            [
                {
                    "label": "projection",
                    "train_loss_history": [[5, 2.0], [10, 1.5]],
                    "eval_loss_history": [[10, 1.7]],
                    "global_end_step": 10,
                    "decision": "next",
                }
            ],
            "projection",
            tmp_path / "summary",
        )
        assert {"stage_comparison.png", "stage_summary.json", "stage_summary.md"} <= {
            f.path for f in mlflow.MlflowClient().list_artifacts(parent)
        }
        version = lineage.register_champion(
            child,
            "served-model",
            "champion",
            {"stage": "projection"},
            info={
                "stage": "projection",
                "eval_loss": 1.7,
                "steps": 20,
                "data_fingerprint": "ab" * 32,
                "config_hash": "cd" * 32,
            },
        )
        assert version == 1
        model = mlflow.pyfunc.load_model("models:/served-model@champion")
        answers = model.predict(
            pd.DataFrame({"image": [png_base64()], "prompt": ["What is in the image?"]}), params={"max_new_tokens": 4}
        )
        assert len(answers) == 1 and isinstance(answers[0], str)
        description = mlflow.MlflowClient().get_model_version("served-model", "1").description
        assert "ab" * 32 in description and "cd" * 32 in description and "projection" in description
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "server", ignore_errors=True)
