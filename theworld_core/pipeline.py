"""The pipeline's steps as plain functions; `flows/` wraps each in a Prefect task.

Each step takes small JSON-serialisable values (configs as dicts, URIs, numbers) and returns a typed
record (`theworld_core.records`, `EvalReport`, `PlateauVerdict`, `GateDecision`), never models, so
Prefect can cache and persist them and a crash loses nothing but the step in progress.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from theworld_core.config import ARCHITECTURE_KEYS, GateConfig, StageConfig
from theworld_core.records import (
    NewDataCheck,
    PipelineSummary,
    PreparedData,
    StageRecord,
    SummaryRow,
    WarmStart,
    eval_request,
)
from theworld_core.tracking import lineage
from theworld_core.training.gate import GateDecision, StageOutcome, decide
from theworld_core.training.plateau import PlateauVerdict, plateau_verdict

if TYPE_CHECKING:
    from theworld_core.training.evaluation import EvalReport  # imports torch

SUCCESS = ("completed", "plateaued")
log = logging.getLogger("theworld.pipeline")


def stage_content_key(
    stage_config: dict[str, Any], upstream: str | None, data_fingerprint: str, code_version: str
) -> str:
    """The content key of a stage's work: its config (without output_dir), its input (`upstream`:
    `upstream_content_id` of the stage output it starts from), the data, the code.

    Run ids are deliberately not part of it, so a rerun after a crash, or a second pipeline run that
    waited for the first on a stage lock, finds the same key, the same output folder (and resume
    state) and the same cached result.
    """
    relevant = {k: v for k, v in stage_config.items() if k not in ("output_dir",)}
    payload = json.dumps([relevant, upstream, data_fingerprint, code_version], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


_content_ids: dict[tuple[str, str], str] = {}


def upstream_content_id(upstream_uri: str | None) -> str | None:
    """The stage output at `upstream_uri` by content: `files-sha256:<digest>` of its manifest's
    per-file checksums (`files`), whatever run or folder holds it; the URI itself where no manifest
    can be read cheaply (a hub repo id). None for no upstream."""
    if upstream_uri is None:
        return None
    from theworld_core.model.stage_output import MANIFEST_FILE, checkpoint_folder, read_manifest
    from theworld_core.tracking.mlflow_runs import configure_tracking

    cache_key = (configure_tracking(), upstream_uri)
    if cache_key in _content_ids:
        return _content_ids[cache_key]
    if upstream_uri.startswith("runs:/"):
        import tempfile

        import mlflow

        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{upstream_uri.rstrip('/')}/{MANIFEST_FILE}", dst_path=tmp
            )
            files = read_manifest(Path(path).parent)["files"]
    elif upstream_uri.startswith(("models:/", "mlflow-artifacts:")) or Path(upstream_uri).expanduser().exists():
        files = read_manifest(checkpoint_folder(upstream_uri))["files"]
    else:
        return upstream_uri
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    _content_ids[cache_key] = f"files-sha256:{digest}"
    return _content_ids[cache_key]


class StageNotRecorded(RuntimeError):
    """A stage ended well but its output could not be logged to its MLflow run."""


def prepare_data_step(stage_config: dict[str, Any]) -> PreparedData:
    """Fingerprint and split the data once up front (as the stage `stage_config` sees it), so a bad
    source fails before any stage."""
    from theworld_core.model.inputs import prepare_stage_data

    prepared = prepare_stage_data(StageConfig(**stage_config))
    stats = prepared.stats
    return PreparedData(
        fingerprint=prepared.fingerprint,
        train=stats.train,
        eval=stats.eval,
        bad=stats.bad,
        bad_reasons=dict(stats.bad_reasons),
    )


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
    evaluate_after: dict[str, int] | None = None,
) -> StageRecord:
    """Train one stage attempt in its own MLflow child run; returns its record.

    `evaluate_after` (`eval_request(task_samples, generations)`): the post-stage evaluation to run in the
    training process on the trained model when it can (one process), so that `evaluate_stage_step`
    need not load the stage output again (`StageRecord.evaluation`)."""
    from theworld_core.training.launch import train_stage

    key = stage_content_key(stage_config, upstream_content_id(upstream_uri), data_fingerprint, code_version)
    name = stage_config["name"]
    cfg = StageConfig(
        **{
            **stage_config,
            "output_dir": str(Path(output_root) / f"{name}-{key[:12]}"),
            "resume_from_checkpoint": upstream_uri or stage_config.get("resume_from_checkpoint"),
        }
    )
    # The folder is keyed by content, so another pipeline run may be training the very same stage:
    # wait for it, then the trainer finds the finished stage and returns at once.
    with stage_lock(cfg.output_dir):
        run_id = lineage.create_child_run(
            parent_run_id, name, attempt, {**tags, "run_kind": lineage.STAGE_RUN_KIND, "stage_key": key}
        )
        try:
            result = train_stage(
                cfg, mlflow_run_id=run_id, global_step_offset=global_step_offset, evaluate_after=evaluate_after
            )
            if result.stage_output and not result.stage_output_logged:
                raise StageNotRecorded(
                    f"stage {name} {result.status}; its output is in {result.stage_output}, but MLflow could not "
                    f"record it: {result.tracking_incomplete}. Rerun the pipeline once the tracking server is "
                    "back: the stage is not trained again (its folder is keyed by content) and its records are sent"
                )
            if result.stage_output and not lineage.has_artifact(run_id, lineage.STAGE_OUTPUT_ARTIFACT):
                # So that the stage output URI below is valid for this run too.
                lineage.log_folder(run_id, Path(result.stage_output), lineage.STAGE_OUTPUT_ARTIFACT)
            if result.stage_output and result.already_finished:  # finished earlier in this folder, by another run
                lineage.set_tags(run_id, {"reused_stage_output": result.stage_output})
        except BaseException:
            # With the tracking server down this fails too; the stage's own error is the one to report.
            with contextlib.suppress(Exception):
                lineage.end_run(run_id, "FAILED")
            raise
    train_history = lineage.metric_history(run_id, "train/loss")
    lineage.end_run(run_id, "FINISHED" if result.status in SUCCESS else "FAILED")
    return StageRecord(
        stage=name,
        attempt=attempt,
        run_id=run_id,
        content_key=key,
        status=result.status,
        reason=result.reason,
        steps=result.steps,
        global_end_step=global_step_offset + result.steps,
        eval_history=[[global_step_offset + s, v] for s, v in result.eval_history],
        stage_eval_history=[[s, v] for s, v in result.eval_history],
        train_loss_history=[[s, v] for s, v in train_history],
        stage_output_uri=lineage.stage_output_uri(run_id) if result.stage_output else None,
        trainable=dict(result.trainable),
        evidence=dict(result.evidence),
        config=cfg.model_dump(mode="json"),
        tracking_incomplete=result.tracking_incomplete,
        evaluation=result.evaluation,
    )


def evaluate_stage_step(
    stage_output_uri: str,
    stage_config: dict[str, Any],
    run_id: str,
    *,
    task_samples: int,
    generations: int,
    in_training: dict[str, Any] | None = None,
) -> EvalReport:
    """Held-out loss, task metric and sample generations of a stage output; logged to its run.

    Runs on the training device (CUDA when there is one) in the stage's precision policy with
    every component frozen: bf16 weights and bf16 autocast where bf16 runs, fp32 elsewhere.
    `in_training`: the same evaluation, done by the training process on its model once the stage
    output was saved (`StageRecord.evaluation`); used when it answers this request, instead of
    loading the stage output again."""
    from theworld_core.training.evaluation import EvalReport

    started = time.perf_counter()
    if in_training is not None and in_training.get("request") == eval_request(task_samples, generations):
        evaluation = in_training
    else:
        evaluation = _evaluate_loaded(stage_output_uri, StageConfig(**stage_config), task_samples, generations)
    report = EvalReport(**evaluation["report"])
    c = lineage.client()
    c.log_metric(run_id, "eval/final_loss", report.eval_loss)
    c.log_metric(run_id, "eval/task_accuracy", report.task_accuracy)
    c.log_metric(run_id, "eval/exact_match", report.exact_match)
    c.log_dict(run_id, {"samples": report.samples}, "evaluation/generations.json")
    # The evaluation's own time wherever it ran, plus this step's.
    seconds = time.perf_counter() - started + (evaluation["seconds"] if evaluation is in_training else 0.0)
    c.log_metric(run_id, "walltime/evaluate_s", seconds)
    return report


def _evaluate_loaded(stage_output_uri: str, cfg: StageConfig, task_samples: int, generations: int) -> dict[str, Any]:
    """`post_stage_evaluation` of the stage output at `stage_output_uri`, loaded for it."""
    import torch

    from theworld_core.model.inputs import prepare_stage_data
    from theworld_core.model.precision import resolve_precision
    from theworld_core.model.theworld import TheWorld
    from theworld_core.training.evaluation import post_stage_evaluation

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.mixed_precision, device)
    # Bases built in the compute dtype before the trained weights go in (as the trainer does): fp32
    # weights copied into a bf16 base would be rounded where the policy computes in fp32.
    model = TheWorld.from_pretrained(stage_output_uri, dtype=precision.compute_dtype, **cfg.model_part().model_dump())
    model.requires_grad_(False)
    model.to(device)
    data = prepare_stage_data(cfg)
    return post_stage_evaluation(model, data.eval, cfg, precision, task_samples=task_samples, generations=generations)


def plateau_step(record: StageRecord) -> PlateauVerdict:
    """The plateau verdict for a finished attempt, from its eval history, with its numbers."""
    cfg = StageConfig(**record.config)
    history = [(int(s), float(v)) for s, v in record.stage_eval_history]
    return plateau_verdict(history, cfg.plateau, max_steps=cfg.max_steps)


def outcome_of(record: StageRecord, evaluation: EvalReport | None) -> StageOutcome:
    """The attempt as the gate sees it."""
    cfg = record.config
    return StageOutcome(
        name=record.stage,
        attempt=record.attempt,
        status=record.status,
        eval_loss=evaluation.eval_loss if evaluation else None,
        task_accuracy=evaluation.task_accuracy if evaluation else None,
        steps=record.steps,
        batch_size=cfg["batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        learning_rate=cfg["learning_rate"],
        learning_rates=cfg.get("learning_rates"),
        max_grad_norm=cfg["max_grad_norm"],
        warmup_steps=cfg["warmup_steps"],
        max_steps=cfg.get("max_steps"),
        stage_output_uri=record.stage_output_uri,
        reason=record.reason,
        evidence=record.evidence or {},
    )


def gate_step(
    outcome: StageOutcome,
    earlier: list[StageOutcome],
    gate: GateConfig,
    *,
    retries_used: int,
    is_last_stage: bool,
    run_id: str,
    plateau: PlateauVerdict | None,
    parent_run_id: str | None = None,
    stage_number: int | None = None,
) -> GateDecision:
    """The gate's decision for one attempt, recorded on its MLflow run: params `gate_decision`,
    `gate_reason`, `plateau_verdict` (columns of the runs table) and the same as tags, with the
    numbers. On the parent run (when given): the attempt's summary metrics `<stage>/eval_loss`,
    `<stage>/task_accuracy`, `<stage>/steps` (a retry's values replace the failed attempt's) and,
    with `stage_number` (1 = first stage), `all_stages/eval_loss` and `all_stages/task_accuracy` at
    that step: one chart of the metric over the stages."""
    decision = decide(outcome, earlier, gate, retries_used=retries_used, is_last_stage=is_last_stage)
    verdict = {
        "plateau_verdict": plateau.code if plateau else "n/a",
        "plateau_reason": plateau.reason if plateau else "",
        "gate_decision": decision.action,
        "gate_reason": decision.reason,
    }
    lineage.set_tags(run_id, {**verdict, "gate_numbers": json.dumps(decision.numbers, default=str)})
    lineage.log_params_once(run_id, {k: verdict[k] for k in ("gate_decision", "gate_reason", "plateau_verdict")})
    if parent_run_id is not None:
        summary = {"eval_loss": outcome.eval_loss, "task_accuracy": outcome.task_accuracy}
        lineage.log_stage_summary_metrics(parent_run_id, outcome.name, {**summary, "steps": outcome.steps})
        if stage_number is not None:
            lineage.log_stage_summary_metrics(parent_run_id, "all_stages", summary, step=stage_number)
    return decision


def finish_step(
    parent_run_id: str,
    rows: list[SummaryRow],
    records: list[StageRecord],
    champion: StageOutcome | None,
    champion_run_id: str | None,
    registered_model: str,
    alias: str,
    workdir: str,
    tags: dict[str, str],
) -> PipelineSummary:
    """Register the champion (alias; an MLflow pyfunc model whose description names its stage,
    metrics, data fingerprint and config hash), log its metrics (`champion/eval_loss`,
    `champion/task_accuracy`, `champion/steps`) and the stage comparison plot and table to the parent run."""
    version = None
    if champion is not None and champion_run_id is not None:
        summary = {"eval_loss": champion.eval_loss, "task_accuracy": champion.task_accuracy, "steps": champion.steps}
        lineage.log_stage_summary_metrics(parent_run_id, "champion", summary)
        info = {
            "stage": champion.name,
            "attempt": champion.attempt,
            **summary,
            "data_fingerprint": tags.get("data_fingerprint"),
            "config_hash": tags.get("config_hash"),
            "code_version": tags.get("code_version"),
            "pipeline_run_id": parent_run_id,
            "pipeline_run_name": lineage.client().get_run(parent_run_id).info.run_name,
        }
        version = lineage.register_champion(
            champion_run_id, registered_model, alias, {**tags, "stage": champion.name}, info=info
        )
    plot_stages = [
        {
            "label": r.label,
            "train_loss_history": r.train_loss_history,
            "eval_loss_history": r.eval_history,
            "global_end_step": r.global_end_step,
            "decision": row.decision,
        }
        for r, row in zip(records, rows)
    ]
    paths = lineage.log_summary(
        parent_run_id, [row.to_dict() for row in rows], plot_stages, champion.name if champion else None, Path(workdir)
    )
    lineage.set_tags(
        parent_run_id, {"champion": champion.name if champion else "none", "champion_version": version or "none"}
    )
    return PipelineSummary(champion=champion.name if champion else None, model_version=version, **paths)


def summary_row(
    record: StageRecord, evaluation: EvalReport | None, plateau: PlateauVerdict | None, decision: GateDecision
) -> SummaryRow:
    return SummaryRow(
        stage=record.stage,
        attempt=record.attempt,
        status=record.status,
        steps=record.steps,
        eval_loss=evaluation.eval_loss if evaluation else None,
        task_accuracy=evaluation.task_accuracy if evaluation else None,
        stage_reason=record.reason,
        plateau=plateau.code if plateau else None,
        decision=decision.action,
        decision_reason=decision.reason,
        run_id=record.run_id,
        stage_output_uri=record.stage_output_uri,
    )


# --- operating it: new data, warm start, overlapping runs ---------------------------------------


def new_data_step(
    experiment: str, config_hash: str, fingerprint: str, *, only_on_new_data: bool, force: bool
) -> NewDataCheck:
    """Whether this pipeline run trains (`new_data`), and why (`reason`).

    It does not (`new_data` False) when `only_on_new_data` is set, the run is not forced, and the
    data fingerprint equals the `data_fingerprint` tag of the newest successful pipeline parent run
    (FINISHED, with a champion) with the same `config_hash` in the experiment. A changed config
    therefore always trains; so does a first run, or one whose last attempt failed.
    """

    def check(reason: str, new_data: bool = True, **previous_run) -> NewDataCheck:
        return NewDataCheck(
            new_data=new_data,
            reason=reason,
            fingerprint=fingerprint,
            config_hash=config_hash,
            experiment=experiment,
            **previous_run,
        )

    if force:
        return check("forced run (force=True): the data check is skipped")
    if not only_on_new_data:
        return check("schedule.only_on_new_data is false: every run trains")
    previous = lineage.last_pipeline_run(experiment, config_hash)
    if previous is None:
        return check(f"no earlier successful pipeline run of config {config_hash[:12]} in experiment {experiment!r}")
    previous_run = {
        "previous_run_id": previous["run_id"],
        "previous_run_name": previous["run_name"],
        "previous_fingerprint": previous["data_fingerprint"],
    }
    if previous["data_fingerprint"] == fingerprint:
        return check(
            f"no new data: fingerprint {fingerprint[:16]} equals that of the last successful run "
            f"{previous['run_id']} ({previous['run_name']})",
            new_data=False,
            **previous_run,
        )
    return check(
        f"new data: fingerprint {fingerprint[:16]} differs from {str(previous['data_fingerprint'])[:16]} "
        f"of the last successful run {previous['run_id']}",
        **previous_run,
    )


def no_new_data_markdown(check: NewDataCheck) -> str:
    """The Prefect artifact of a run that ended with "no new data"."""
    return (
        "# No new data\n\n"
        "This run did not train: the data is unchanged since the last successful pipeline run of the same config.\n\n"
        "| | |\n|---|---|\n"
        f"| data fingerprint | `{check.fingerprint}` |\n"
        f"| earlier MLflow run | `{check.previous_run_id}` ({check.previous_run_name}) |\n"
        f"| config hash | `{check.config_hash}` |\n"
        f"| experiment | {check.experiment} |\n\n"
        "Add data (`theworld data add ... --notify`) or rerun regardless with `theworld run --force` "
        "(deployment parameter `force: true`).\n"
    )


def warm_start_step(registered_model: str, alias: str, model_config: dict[str, Any]) -> WarmStart:
    """Where a rerun's first stage starts when `schedule.warm_start_from_champion` is set; `uri` None
    means from the pretrained bases (no champion, or one trained on another architecture; `reason`
    says which).

    The alias is resolved to its version (`models:/<name>/<version>`), so the stage's content key
    and output folder change when the champion does.
    """
    from theworld_core.model.stage_output import StageOutputError, checkpoint_folder, read_manifest

    alias_uri = f"models:/{registered_model}@{alias}"
    version = lineage.champion_version(registered_model, alias)
    if version is None:
        return WarmStart(uri=None, version=None, reason=f"no registered champion {alias_uri}: stage 1 starts fresh")
    uri = f"models:/{registered_model}/{version}"
    try:
        manifest = read_manifest(checkpoint_folder(uri))
    except (StageOutputError, OSError, ValueError) as error:
        return WarmStart(
            uri=None,
            version=version,
            reason=f"champion {alias_uri} (version {version}) cannot be read ({error}): stage 1 starts fresh",
        )
    saved = manifest.get("model_config") or {}
    wanted = {k: v for k, v in model_config.items() if k in ARCHITECTURE_KEYS}
    differs = [
        f"{k}: champion {saved.get(k)!r}, config {wanted.get(k)!r}"
        for k in ARCHITECTURE_KEYS
        if k in wanted and saved.get(k) != wanted[k]
    ]
    if differs:
        return WarmStart(
            uri=None,
            version=version,
            reason=f"champion {alias_uri} (version {version}) has another architecture "
            f"({'; '.join(differs)}): stage 1 starts fresh",
        )
    return WarmStart(uri=uri, version=version, reason=f"stage 1 warm-starts from champion {alias_uri} = {uri}")


@contextlib.contextmanager
def stage_lock(folder: str | os.PathLike[str]):
    """Hold an exclusive `fcntl` lock on `<folder>.lock` while a stage trains in `folder`.

    Stage folders are keyed by content, so two overlapping pipeline runs may reach the same one;
    the second waits here and then finds the stage finished. The lock goes with the process (a
    crashed holder releases it); it works across processes on one machine (and on NFS v4 with
    working locks), not across machines without a shared lock-capable file system.
    """
    path = Path(f"{os.fspath(folder).rstrip('/')}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            log.info("stage folder %s is in use by %s: waiting for it", folder, holder)
            start = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("stage folder %s is free after %.1f s", folder, time.monotonic() - start)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            handle.flush()
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
