"""The `multistage` flow: train, evaluate, check the plateau and gate, stage after stage.

    prepare data -> for each stage: train -> evaluate -> plateau -> gate
                                     (retry with the gate's changes | next | stop)
                 -> register the champion, log the stage comparison
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows import tasks
from theworld_core import pipeline
from theworld_core.config import load_pipeline_config
from theworld_core.tracking import lineage
from theworld_core.tracking.mlflow_runs import project_dir
from theworld_core.version import code_version


@flow(name="multistage", log_prints=True)
def multistage(stages_yaml: str = "stages.yaml", profile: str | None = None) -> dict:
    """Train TheWorld through the stages of `stages_yaml` (optionally with a profile applied)."""
    log = get_run_logger()
    cfg = load_pipeline_config(stages_yaml, profile=profile)
    version = code_version()
    data = tasks.prepare_data(cfg.data.model_dump())
    tags = {"data_fingerprint": data["fingerprint"], "config_hash": cfg.config_hash(), "code_version": version,
            "prefect_flow_run_id": str(flow_run.get_id() or ""), "profile": profile or ""}
    parent = lineage.start_parent_run(cfg.mlflow.experiment, f"multistage-{flow_run.get_name() or 'local'}", tags,
                                      {"stages_yaml": stages_yaml, "profile": profile, "stages": ",".join(cfg.stage_names)})
    stages = cfg.resolved_stages()
    records, rows, successes = [], [], []
    champion, offset, stopped = None, 0, False
    try:
        for index, stage in enumerate(stages):
            stage_config, attempt, retries = stage.model_dump(mode="json"), 1, 0
            while True:
                upstream = champion.stage_output_uri if champion else None
                record = tasks.train_stage(stage_config, upstream, data["fingerprint"], version,
                                           output_root=cfg.output_root, parent_run_id=parent, attempt=attempt,
                                           global_step_offset=offset, tags=tags)
                offset = record["global_end_step"]
                evaluation = plateau = None
                if record["stage_output_uri"]:
                    evaluation = tasks.evaluate_stage(record["stage_output_uri"], record["config"], record["run_id"],
                                                      version, task_samples=cfg.eval_task_samples,
                                                      generations=cfg.eval_generations)
                    plateau = tasks.check_plateau(record)
                outcome = pipeline.outcome_of(record, evaluation)
                decision = tasks.gate(outcome, successes, cfg.gate, retries_used=retries,
                                      is_last_stage=index == len(stages) - 1, run_id=record["run_id"], plateau=plateau)
                records.append(record)
                rows.append(pipeline.summary_row(record, evaluation, plateau, decision))
                log.info("stage %s attempt %d: %s -> %s: %s", stage.name, attempt, record["status"],
                         decision.action, decision.reason)
                if decision.action != "retry":
                    break
                # The retry runs clean: a rehearsed fault fires on the first attempt only.
                stage_config = {**stage_config, **decision.retry_changes, "inject_fault": None}
                attempt, retries = attempt + 1, retries + 1
            if outcome.succeeded:
                successes.append(outcome)
            champion = next((o for o in successes if o.name == decision.champion), champion)
            if decision.action != "next":
                stopped = True
                break
    except BaseException:
        lineage.end_run(parent, "FAILED")
        raise
    champion_run = next((r["run_id"] for r in records if champion and r["stage_output_uri"] == champion.stage_output_uri), None)
    summary = tasks.finish(parent, rows, records, champion, champion_run, cfg.mlflow.registered_model,
                           cfg.mlflow.champion_alias, str(project_dir() / "summaries" / parent), tags)
    create_table_artifact(rows, key="stage-summary", description="TheWorld multistage: one row per stage attempt")
    create_markdown_artifact(Path(summary["markdown"]).read_text(), key="stage-comparison",
                             description=f"MLflow parent run {parent}")
    lineage.end_run(parent)
    return {"parent_run_id": parent, "champion": summary["champion"], "model_version": summary["model_version"],
            "stopped_early": stopped, "stages": rows, "data_fingerprint": data["fingerprint"]}
