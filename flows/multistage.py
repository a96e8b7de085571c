"""The `multistage` flow: train, evaluate, check the plateau and gate, stage after stage.

    prepare data (fingerprint) -> new data? (else: Completed, named "Skipped": nothing trains)
                 -> warm start from the champion? (schedule.warm_start_from_champion)
                 -> for each stage: train -> evaluate -> plateau -> gate
                                     (retry with the gate's changes | next | stop)
                 -> register the champion, log the stage comparison

A forced run (`force=True`, `theworld run --force`) skips the data check and retrains every stage:
its train and evaluate tasks refresh Prefect's cache instead of reading it, and its stages train
in a folder of their own (`<output_root>/forced/<flow run>-<id>/`), since the content-keyed stage
folders hold finished stages the trainer would otherwise reuse.

Deployed as `multistage/full` by `theworld serve` (or `prefect.yaml` on a work pool); the
deployment's schedule, new-data trigger and concurrency limit come from the config's `schedule`.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.states import Completed

from flows import artifacts, tasks
from theworld_core import pipeline
from theworld_core.config import load_pipeline_config
from theworld_core.logs import library_loggers_at_info
from theworld_core.records import StageRecord, SummaryRow, eval_request
from theworld_core.tracking import lineage
from theworld_core.tracking.mlflow_runs import SYSTEM_METRICS_TAG, project_dir
from theworld_core.training.gate import StageOutcome
from theworld_core.version import code_version


@flow(name="multistage", log_prints=True)
def multistage(stages_yaml: str = "stages.yaml", profile: str | None = None, force: bool = False) -> dict:
    """Train TheWorld through the stages of `stages_yaml` (optionally with a profile applied).

    With `schedule.only_on_new_data` (the default) a run whose data fingerprint equals that of the
    last successful run of the same config completes at once with "no new data"; `force` trains
    regardless, and retrains every stage (see the module's docstring).
    """
    library_loggers_at_info()  # the trainer's lines, also in a flow-run process the CLI did not start
    log = get_run_logger()
    cfg = load_pipeline_config(stages_yaml, profile=profile)
    version = code_version()
    stage_configs = cfg.resolved_stages()
    # The data as the stages see it (their seed included), so the fingerprint is the one they train on.
    data = tasks.prepare_data(stage_configs[0].model_dump(mode="json"))
    check = tasks.check_new_data(
        cfg.mlflow.experiment,
        cfg.pipeline_hash(),
        data.fingerprint,
        only_on_new_data=cfg.schedule.only_on_new_data,
        force=force,
    )
    log.info(check.reason)
    if not check.new_data:
        links = artifacts.RunLinks(cfg.mlflow.experiment)
        create_markdown_artifact(
            artifacts.no_new_data_markdown(pipeline.no_new_data_markdown(check), check.previous_run_id, links),
            key="no-new-data",
            description=check.reason,
        )
        return Completed(
            name="Skipped",
            message=check.reason,
            data={
                "no_new_data": True,
                "reason": check.reason,
                "data_fingerprint": data.fingerprint,
                "previous_run_id": check.previous_run_id,
                "parent_run_id": None,
                "stages": [],
            },
        )

    stages = [stage.model_dump(mode="json") for stage in stage_configs]
    warm = None
    if cfg.schedule.warm_start_from_champion:
        if stages[0].get("resume_from_checkpoint"):
            log.info(
                "stage %s sets resume_from_checkpoint=%s: no warm start from the champion",
                stages[0]["name"],
                stages[0]["resume_from_checkpoint"],
            )
        else:
            warm = tasks.warm_start(cfg.mlflow.registered_model, cfg.mlflow.champion_alias, cfg.model.model_dump())
            log.info(warm.reason)
            if warm.uri:
                stages[0] = {**stages[0], "resume_from_checkpoint": warm.uri}
    warm_start_from = warm.uri if warm else None
    tags = {
        "data_fingerprint": data.fingerprint,
        "config_hash": cfg.pipeline_hash(),
        "code_version": version,
        "prefect_flow_run_id": str(flow_run.get_id() or ""),
        "profile": profile or "",
    }
    # Named for what it is (profile, start time, data), not Prefect's random flow-run name (kept as a tag);
    # its stage runs inherit the system-metrics setting from its tag.
    parent = lineage.start_parent_run(
        cfg.mlflow.experiment,
        lineage.pipeline_run_name(profile, data.fingerprint),
        {
            **tags,
            "run_kind": lineage.PIPELINE_RUN_KIND,
            "forced": str(force).lower(),
            "new_data_reason": check.reason,
            "warm_start_from": warm_start_from or "none",
            "prefect_flow_run_name": str(flow_run.get_name() or ""),
            SYSTEM_METRICS_TAG: str(cfg.mlflow.log_system_metrics).lower(),
        },
        {
            "stages_yaml": stages_yaml,
            "profile": profile,
            "stages": ",".join(cfg.stage_names),
            "force": force,
            "log_system_metrics": cfg.mlflow.log_system_metrics,
        },
    )
    output_root = cfg.output_root
    if force:
        output_root = str(Path(cfg.output_root) / "forced" / f"{flow_run.get_name() or 'local'}-{_short_run_id()}")
        log.info("forced run: every stage retrains, in %s", output_root)
    try:
        records, rows, champion, stopped = _train_stages(
            cfg, stages, data.fingerprint, version, parent, tags, output_root=output_root, force=force
        )
    except BaseException:
        lineage.end_run(parent, "FAILED")
        raise
    champion_run = next(
        (r.run_id for r in records if champion and r.stage_output_uri == champion.stage_output_uri), None
    )
    summary = tasks.finish(
        parent,
        rows,
        records,
        champion,
        champion_run,
        cfg.mlflow.registered_model,
        cfg.mlflow.champion_alias,
        str(project_dir() / "summaries" / parent),
        tags,
    )
    row_dicts = [row.to_dict() for row in rows]
    if summary.champion:
        log.info(
            "champion: %s, registered as models:/%s/%s (alias @%s)",
            summary.champion,
            cfg.mlflow.registered_model,
            summary.model_version,
            cfg.mlflow.champion_alias,
        )
    else:
        log.info("no champion: no stage succeeded, nothing registered")
    links = artifacts.RunLinks(cfg.mlflow.experiment)
    create_table_artifact(
        artifacts.stage_table(row_dicts, links),
        key="stage-summary",
        description="TheWorld multistage: one row per stage attempt",
    )
    create_markdown_artifact(
        artifacts.comparison_markdown(
            Path(summary.markdown).read_text(),
            row_dicts,
            parent,
            links,
            cfg.mlflow.registered_model,
            summary.model_version,
            cfg.mlflow.champion_alias,
        ),
        key="stage-comparison",
        description=f"MLflow parent run {parent}",
    )
    lineage.end_run(parent)
    return {
        "no_new_data": False,
        "parent_run_id": parent,
        "champion": summary.champion,
        "model_version": summary.model_version,
        "stopped_early": stopped,
        "stages": row_dicts,
        "data_fingerprint": data.fingerprint,
        "warm_start_from": warm_start_from,
        "summary_dir": str(Path(summary.markdown).parent),
    }


def _short_run_id() -> str:
    return str(flow_run.get_id() or "")[:8] or "local"


def _train_stages(
    cfg, stages: list[dict], fingerprint: str, version: str, parent: str, tags: dict, *, output_root: str, force: bool
) -> tuple[list[StageRecord], list[SummaryRow], StageOutcome | None, bool]:
    """The stage loop: train -> evaluate -> plateau -> gate, with the gate's retries."""
    log = get_run_logger()
    train, evaluate = tasks.train_stage, tasks.evaluate_stage
    if force:
        train, evaluate = tasks.forced(train), tasks.forced(evaluate)
    records, rows, successes = [], [], []
    champion, offset, stopped = None, 0, False
    # The evaluation the training process runs on its model when it can: no second load of the output.
    evaluate_after = eval_request(cfg.eval_task_samples, cfg.eval_generations)
    for index, stage_config in enumerate(stages):
        attempt, retries = 1, 0
        while True:
            upstream = champion.stage_output_uri if champion else None
            record = train(
                stage_config,
                upstream,
                fingerprint,
                version,
                output_root=output_root,
                parent_run_id=parent,
                attempt=attempt,
                global_step_offset=offset,
                tags=tags,
                evaluate_after=evaluate_after,
            )
            offset = record.global_end_step
            evaluation = plateau = None
            if record.stage_output_uri:
                evaluation = evaluate(
                    record.stage_output_uri,
                    record.config,
                    record.run_id,
                    version,
                    task_samples=cfg.eval_task_samples,
                    generations=cfg.eval_generations,
                    in_training=record.evaluation,
                )
                log.info(
                    "stage %s attempt %d evaluated: eval loss %.4f, task accuracy %.3f",
                    stage_config["name"],
                    attempt,
                    evaluation.eval_loss,
                    evaluation.task_accuracy,
                )
                plateau = tasks.check_plateau(record)
            outcome = pipeline.outcome_of(record, evaluation)
            decision = tasks.gate(
                outcome,
                successes,
                cfg.gate,
                retries_used=retries,
                is_last_stage=index == len(stages) - 1,
                run_id=record.run_id,
                plateau=plateau,
                parent_run_id=parent,
                stage_number=index + 1,
            )  # the parent's summary metrics
            records.append(record)
            rows.append(pipeline.summary_row(record, evaluation, plateau, decision))
            log.info(
                "stage %s attempt %d: %s -> %s: %s",
                stage_config["name"],
                attempt,
                record.status,
                decision.action,
                decision.reason,
            )
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
    return records, rows, champion, stopped
