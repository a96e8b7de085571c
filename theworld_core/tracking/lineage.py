"""Pipeline lineage in MLflow: a parent run per pipeline run, a child run per stage attempt, the
registered champion (an MLflow pyfunc model over its stage output), and the stage comparison (plot +
table at the parent run's artifact root, per-stage summary metrics on the parent run)."""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

from theworld_core.tracking.mlflow_runs import (
    SYSTEM_METRICS_TAG,
    configure_tracking,
    end_stale_runs,
    ensure_experiment,
    owner_tags,
)

STAGE_OUTPUT_ARTIFACT = "stage_output"


def client():
    from mlflow.tracking import MlflowClient

    configure_tracking()
    return MlflowClient()


def start_parent_run(experiment: str, run_name: str, tags: dict[str, str], params: dict[str, Any]) -> str:
    """A new pipeline parent run, tagged with its owner process. First, runs of the same `config_hash`
    left RUNNING by a process that is gone (a killed pipeline) are ended KILLED, with their stage runs."""
    c = client()
    experiment_id = ensure_experiment(experiment)
    if tags.get("config_hash"):
        end_stale_runs(c, experiment_id, f"tags.config_hash = '{tags['config_hash']}'")
    run = c.create_run(experiment_id, run_name=run_name, tags={**owner_tags(), **tags})
    for key, value in params.items():
        c.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


def pipeline_run_name(profile: str | None, data_fingerprint: str, when: datetime.datetime | None = None) -> str:
    """The parent run's name: what ran, when (local time), on which data, e.g.
    `multistage tiny 2026-11-27 14:03 data 5d21f74b` (the data fingerprint's first 8 hex digits)."""
    when = when or datetime.datetime.now()
    return " ".join(p for p in ("multistage", profile, f"{when:%Y-%m-%d %H:%M}", f"data {data_fingerprint[:8]}") if p)


def create_child_run(parent_run_id: str, stage: str, attempt: int, tags: dict[str, str]) -> str:
    """A stage attempt's run under the parent; it inherits the parent's system-metrics setting."""
    c = client()
    parent = c.get_run(parent_run_id)
    inherited = {k: v for k, v in parent.data.tags.items() if k == SYSTEM_METRICS_TAG}
    run = c.create_run(
        parent.info.experiment_id,
        run_name=f"{stage}" + (f" (attempt {attempt})" if attempt > 1 else ""),
        tags={
            "mlflow.parentRunId": parent_run_id,
            "stage": stage,
            "attempt": str(attempt),
            **owner_tags(),
            **inherited,
            **tags,
        },
    )
    return run.info.run_id


def log_params_once(run_id: str, params: dict[str, Any]) -> None:
    """Log params to a run, skipping those it already has (MLflow params cannot change: a rerun of a
    step on the same run keeps the first values)."""
    from mlflow.entities import Param

    c = client()
    have = c.get_run(run_id).data.params
    new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
    if new:
        c.log_batch(run_id, params=new)


def log_stage_summary_metrics(
    parent_run_id: str, prefix: str, values: dict[str, float | int | None], step: int = 0
) -> None:
    """`<prefix>/<name>` metrics on the parent run (a stage's or the champion's eval_loss,
    task_accuracy, steps), so the chart view compares stages and pipeline runs; None / non-finite
    values are left out."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{prefix}/{k}", float(v), now, step)
        for k, v in values.items()
        if v is not None and math.isfinite(float(v))
    ]
    if metrics:
        client().log_batch(parent_run_id, metrics=metrics)


def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    c = client()
    for key, value in tags.items():
        c.set_tag(run_id, key, str(value)[:5000])


def end_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def stage_output_uri(run_id: str) -> str:
    return f"runs:/{run_id}/{STAGE_OUTPUT_ARTIFACT}"


def register_champion(
    run_id: str, name: str, alias: str, tags: dict[str, str], info: dict[str, Any] | None = None
) -> int:
    """Register the run's stage output as a new version of `name` (an MLflow pyfunc model) and point
    `alias` at it.

    The MLflow model files and the model card (`pyfunc_model.write_model_files`) are added to the
    run's `stage_output` artifact folder, beside the stage output's own files (no weights copied),
    and that folder is the version's source: `mlflow.pyfunc.load_model` and
    `TheWorld.from_pretrained` both load `models:/<name>@<alias>`, and `runs:/<run>/stage_output`
    stays a stage output. `info` (stage, attempt, eval_loss, task_accuracy, steps, data_fingerprint,
    config_hash, code_version, pipeline_run_id, pipeline_run_name) goes into the version's
    description and the model card.
    """
    from mlflow.exceptions import MlflowException

    from theworld_core.tracking import pyfunc_model

    info = {"run_id": run_id, **(info or {})}
    c = client()
    try:
        c.create_registered_model(
            name,
            description="TheWorld (Gemma 3 + Cosmos VAE) stage outputs as MLflow pyfunc "
            f"models; alias '{alias}' marks the pipeline's champion",
        )
    except MlflowException:
        pass  # already registered
    with pyfunc_model.model_files_folder() as tmp:
        manifest_path = c.download_artifacts(run_id, f"{STAGE_OUTPUT_ARTIFACT}/manifest.json", tmp)
        manifest = json.loads(Path(manifest_path).read_text())
        files = pyfunc_model.write_model_files(
            Path(tmp) / "model", pyfunc_model.model_card(manifest, info, name, alias)
        )
        c.log_artifacts(run_id, str(files), artifact_path=STAGE_OUTPUT_ARTIFACT)
    source = f"{c.get_run(run_id).info.artifact_uri}/{STAGE_OUTPUT_ARTIFACT}"
    version = c.create_model_version(
        name, source=source, run_id=run_id, tags=tags, description=pyfunc_model.version_description(info, name, alias)
    )
    c.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client().get_metric_history(run_id, key)]


def comparison_plot(stages: list[dict[str, Any]]):
    """Train and eval loss over the pipeline-global step, one colour per stage attempt, stage
    boundaries as vertical lines labelled with the gate decision (a matplotlib figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    for index, stage in enumerate(stages):
        colour = f"C{index % 10}"
        train, evals = stage.get("train_loss_history", []), stage.get("eval_loss_history", [])
        if train:
            ax.plot(*zip(*train), color=colour, alpha=0.35, linewidth=1)
        if evals:
            ax.plot(*zip(*evals), color=colour, marker="o", markersize=3, label=f"{stage['label']} (eval)")
        end = stage.get("global_end_step")
        if end is not None:
            ax.axvline(end, color=colour, linestyle="--", linewidth=0.8)
            ax.annotate(
                stage.get("decision", ""),
                (end, 1),
                xycoords=("data", "axes fraction"),
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color=colour,
            )
    ax.set_xlabel("pipeline step")
    ax.set_ylabel("loss")
    ax.set_title("TheWorld multistage: loss per stage (faint: train, dots: eval)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def summary_markdown(rows: list[dict[str, Any]], champion: str | None) -> str:
    header = "| stage | attempt | status | steps | eval loss | task accuracy | plateau / stop reason | gate decision | reason |\n"
    header += "|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['stage']} | {r['attempt']} | {r['status']} | {r['steps']} | {_fmt(r.get('eval_loss'))} | "
        f"{_fmt(r.get('task_accuracy'))} | {r.get('stage_reason', '')} | {r.get('decision', '')} | {r.get('decision_reason', '')} |\n"
        for r in rows
    )
    return f"# TheWorld multistage summary\n\nChampion: **{champion or 'none'}**\n\n" + header + body


def log_summary(
    parent_run_id: str,
    rows: list[dict[str, Any]],
    stages_for_plot: list[dict[str, Any]],
    champion: str | None,
    workdir: Path,
) -> dict[str, str]:
    """Log the comparison plot (`stage_comparison.png`, with `log_figure`) and the summary table
    (`stage_summary.json`, `stage_summary.md`) at the parent run's artifact root, the first thing its
    Artifacts tab shows; returns the local copies' paths."""
    import matplotlib.pyplot as plt

    workdir.mkdir(parents=True, exist_ok=True)
    c = client()
    figure = comparison_plot(stages_for_plot)
    plot = workdir / "stage_comparison.png"
    try:
        figure.savefig(plot, dpi=110)
        c.log_figure(parent_run_id, figure, plot.name, save_kwargs={"dpi": 110})
    finally:
        plt.close(figure)
    table = workdir / "stage_summary.json"
    table.write_text(json.dumps(rows, indent=2, default=str))
    markdown = workdir / "stage_summary.md"
    markdown.write_text(summary_markdown(rows, champion))
    for path in (table, markdown):
        c.log_artifact(parent_run_id, str(path))
    return {"plot": str(plot), "table": str(table), "markdown": str(markdown)}


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4f}"


# --- reruns: the last successful pipeline run, the registered champion --------------------------

PIPELINE_RUN_KIND = "pipeline"
"""`run_kind` tag of a pipeline's parent run (stage attempts carry `run_kind = stage`)."""
STAGE_RUN_KIND = "stage"


def last_pipeline_run(experiment: str, config_hash: str) -> dict[str, Any] | None:
    """The newest successful pipeline parent run of this config in `experiment`: status FINISHED and
    a champion found (a run whose every stage failed does not count); {run_id, run_name,
    data_fingerprint, end_time}, or None when there is none."""
    import mlflow

    c = client()
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = c.search_runs(
        [found.experiment_id],
        filter_string=(
            f"tags.run_kind = '{PIPELINE_RUN_KIND}' and tags.config_hash = '{config_hash}' "
            "and attributes.status = 'FINISHED' and tags.champion != 'none'"
        ),
        order_by=["attributes.end_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run = runs[0]
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "data_fingerprint": run.data.tags.get("data_fingerprint"),
        "end_time": run.info.end_time,
    }


def champion_version(name: str, alias: str) -> int | None:
    """The model version `alias` points at in the registry, or None (no such model or alias)."""
    from mlflow.exceptions import MlflowException

    try:
        return int(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def has_artifact(run_id: str, path: str) -> bool:
    return bool(client().list_artifacts(run_id, path))


def recorded_stage_problem(run_id: str, stage_output_uri: str | None) -> str | None:
    """Why a stage record naming `run_id` (and `stage_output_uri`) cannot be used with the current
    tracking store: the run is not there (another store, deleted), or lacks its stage output; None
    when it can."""
    from theworld_core.tracking.mlflow_runs import run_state

    state = run_state(run_id)
    store = configure_tracking()
    if state is None:
        return f"run {run_id} does not exist in the tracking store {store}"
    if state["lifecycle_stage"] != "active":
        return f"run {run_id} is {state['lifecycle_stage']} in the tracking store {store}"
    if stage_output_uri is not None and not has_artifact(run_id, STAGE_OUTPUT_ARTIFACT):
        return f"run {run_id} holds no {STAGE_OUTPUT_ARTIFACT} artifact in the tracking store {store}"
    return None


def log_folder(run_id: str, folder: Path, artifact_path: str) -> None:
    client().log_artifacts(run_id, str(folder), artifact_path=artifact_path)
