"""The pipeline's steps as plain functions; `flows/` wraps each in a Prefect task.

Each step takes and returns small JSON-serialisable values (configs as dicts, URIs, numbers),
never models, so Prefect can cache and persist them and a crash loses nothing but the step
in progress.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from theworld_core.config import GateConfig, PlateauConfig, StageConfig
from theworld_core.tracking import lineage
from theworld_core.training.gate import GateDecision, StageOutcome, decide
from theworld_core.training.plateau import plateau_verdict

SUCCESS = ("completed", "plateaued")


def stage_key(stage_config: dict[str, Any], upstream_uri: str | None, data_fingerprint: str, code_version: str) -> str:
    """What identifies a stage's work: its config (without output_dir), its input, the data, the code.

    Run ids are deliberately not part of it, so a rerun after a crash finds the same key, the same
    output folder (and resume state) and the same cached result.
    """
    relevant = {k: v for k, v in stage_config.items() if k not in ("output_dir",)}
    payload = json.dumps([relevant, upstream_uri, data_fingerprint, code_version], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def prepare_data_step(data_config: dict[str, Any]) -> dict[str, Any]:
    """Fingerprint and split the data once up front, so a bad source fails before any stage."""
    from theworld_core.config import DataConfig
    from theworld_core.data import prepare_data

    prepared = prepare_data(DataConfig(**data_config))
    stats = prepared.stats
    return {"fingerprint": prepared.fingerprint, "train": stats.train, "eval": stats.eval, "bad": stats.bad,
            "bad_reasons": dict(stats.bad_reasons)}


def train_stage_step(
    stage_config: dict[str, Any],
    upstream_uri: str | None,
    data_fingerprint: str,
    code_version: str,
    *,
    output_root: str,
    parent_run_id: str,
    attempt: int,
    global_step_offset: int,
    tags: dict[str, str],
) -> dict[str, Any]:
    """Train one stage attempt in its own MLflow child run; returns its record."""
    from theworld_core.training.trainer import train_stage

    key = stage_key(stage_config, upstream_uri, data_fingerprint, code_version)
    name = stage_config["name"]
    cfg = StageConfig(**{**stage_config, "output_dir": str(Path(output_root) / f"{name}-{key[:12]}"),
                         "resume_from_checkpoint": upstream_uri or stage_config.get("resume_from_checkpoint")})
    run_id = lineage.create_child_run(parent_run_id, name, attempt, {**tags, "stage_key": key})
    try:
        result = train_stage(cfg, mlflow_run_id=run_id, global_step_offset=global_step_offset)
    except BaseException:
        lineage.end_run(run_id, "FAILED")
        raise
    train_history = lineage.metric_history(run_id, "train/loss")
    lineage.end_run(run_id, "FINISHED" if result.status in SUCCESS else "FAILED")
    return {
        "stage": name,
        "attempt": attempt,
        "run_id": run_id,
        "stage_key": key,
        "status": result.status,
        "reason": result.reason,
        "steps": result.steps,
        "global_end_step": global_step_offset + result.steps,
        "eval_history": [[global_step_offset + s, v] for s, v in result.eval_history],
        "stage_eval_history": result.eval_history,
        "train_loss_history": train_history,
        "stage_output_uri": lineage.stage_output_uri(run_id) if result.stage_output else None,
        "trainable": result.trainable,
        "evidence": result.evidence,
        "config": cfg.model_dump(mode="json"),
    }


def evaluate_stage_step(stage_output_uri: str, stage_config: dict[str, Any], run_id: str, *,
                        task_samples: int, generations: int) -> dict[str, Any]:
    """Held-out loss, task metric and sample generations of a stage output; logged to its run."""
    import mlflow

    from theworld_core.data import prepare_data
    from theworld_core.model.theworld import TheWorld
    from theworld_core.training.evaluation import evaluate_model

    cfg = StageConfig(**stage_config)
    model = TheWorld.from_pretrained(stage_output_uri, **cfg.model_part().model_dump())
    data = prepare_data(cfg.data_part())
    report = evaluate_model(model, data.eval, batch_size=cfg.batch_size, loss_samples=cfg.eval_max_samples,
                            task_samples=task_samples, generations=generations)
    c = lineage.client()
    c.log_metric(run_id, "eval/final_loss", report.eval_loss)
    c.log_metric(run_id, "eval/task_accuracy", report.task_accuracy)
    c.log_metric(run_id, "eval/exact_match", report.exact_match)
    c.log_dict(run_id, {"samples": report.samples}, "evaluation/generations.json")
    return report.to_dict()


def plateau_step(record: dict[str, Any]) -> dict[str, Any]:
    """The plateau verdict for a finished attempt, from its eval history, with its numbers."""
    cfg = StageConfig(**record["config"])
    history = [(int(s), float(v)) for s, v in record["stage_eval_history"]]
    verdict = plateau_verdict(history, cfg.plateau, max_steps=cfg.max_steps)
    return verdict.to_dict()


def outcome_of(record: dict[str, Any], evaluation: dict[str, Any] | None) -> StageOutcome:
    cfg = record["config"]
    return StageOutcome(
        name=record["stage"],
        attempt=record["attempt"],
        status=record["status"],
        eval_loss=(evaluation or {}).get("eval_loss"),
        task_accuracy=(evaluation or {}).get("task_accuracy"),
        steps=record["steps"],
        batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        learning_rate=cfg["learning_rate"],
        learning_rates=cfg.get("learning_rates"),
        max_grad_norm=cfg["max_grad_norm"],
        warmup_steps=cfg["warmup_steps"],
        max_steps=cfg.get("max_steps"),
        stage_output_uri=record.get("stage_output_uri"),
        reason=record["reason"],
        evidence=record.get("evidence") or {},
    )


def gate_step(outcome: StageOutcome, earlier: list[StageOutcome], gate: GateConfig, *, retries_used: int,
              is_last_stage: bool, run_id: str, plateau: dict[str, Any] | None) -> GateDecision:
    """The gate's decision for one attempt, recorded as tags on its MLflow run."""
    decision = decide(outcome, earlier, gate, retries_used=retries_used, is_last_stage=is_last_stage)
    lineage.set_tags(run_id, {
        "plateau_verdict": (plateau or {}).get("code", "n/a"),
        "plateau_reason": (plateau or {}).get("reason", ""),
        "gate_decision": decision.action,
        "gate_reason": decision.reason,
        "gate_numbers": json.dumps(decision.numbers, default=str),
    })
    return decision


def finish_step(parent_run_id: str, rows: list[dict[str, Any]], records: list[dict[str, Any]],
                champion: StageOutcome | None, champion_run_id: str | None, registered_model: str, alias: str,
                workdir: str, tags: dict[str, str]) -> dict[str, Any]:
    """Register the champion (alias) and log the stage comparison plot and table to the parent run."""
    version = None
    if champion is not None and champion_run_id is not None:
        version = lineage.register_champion(champion_run_id, registered_model, alias,
                                            {**tags, "stage": champion.name})
    plot_stages = [
        {"label": r["stage"] + (f" #{r['attempt']}" if r["attempt"] > 1 else ""), "train_loss_history": r["train_loss_history"],
         "eval_loss_history": r["eval_history"], "global_end_step": r["global_end_step"], "decision": row["decision"]}
        for r, row in zip(records, rows)
    ]
    paths = lineage.log_summary(parent_run_id, rows, plot_stages, champion.name if champion else None, Path(workdir))
    lineage.set_tags(parent_run_id, {"champion": champion.name if champion else "none",
                                     "champion_version": version or "none"})
    return {"champion": champion.name if champion else None, "model_version": version, **paths}


def summary_row(record: dict[str, Any], evaluation: dict[str, Any] | None, plateau: dict[str, Any] | None,
                decision: GateDecision) -> dict[str, Any]:
    return {
        "stage": record["stage"],
        "attempt": record["attempt"],
        "status": record["status"],
        "steps": record["steps"],
        "eval_loss": (evaluation or {}).get("eval_loss"),
        "task_accuracy": (evaluation or {}).get("task_accuracy"),
        "stage_reason": record["reason"],
        "plateau": (plateau or {}).get("code"),
        "decision": decision.action,
        "decision_reason": decision.reason,
        "run_id": record["run_id"],
        "stage_output_uri": record.get("stage_output_uri"),
    }


def finite(value) -> bool:
    return value is not None and math.isfinite(value)
