"""Prefect tasks: thin wrappers of `theworld_core.pipeline`'s plain step functions.

Training and evaluation are cached by what determines their result (stage config, upstream stage
output by content, data fingerprint, code version), never by run ids, so a rerun after a crash skips
the stages that finished and the interrupted one resumes from its own resume state. A cached stage
record is used only when the MLflow run it names, with its stage output, exists in the current
tracking store (`usable_record_key`); otherwise the stage is recorded again. Their results
(a `StageRecord`, an `EvalReport`) are persisted as JSON by `RECORD_SERIALIZER` and come back from
the cache as the same types.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.serializers import JSONSerializer

from theworld_core import pipeline
from theworld_core.records import StageRecord
from theworld_core.tracking import lineage

if TYPE_CHECKING:
    from theworld_core.training.evaluation import EvalReport  # imports torch

RECORD_SERIALIZER = JSONSerializer(
    object_encoder="theworld_core.records.json_default", object_decoder="theworld_core.records.json_object_hook"
)
"""Persists the pipeline's records through their `to_dict()` / `from_dict()`, readable on disk."""


MAX_STALE_RECORDS = 20
"""How many unusable cached records in a row a train-stage key may step over."""


def _train_cache_key(context, parameters) -> str:
    key = "train-" + pipeline.stage_content_key(
        parameters["stage_config"],
        pipeline.upstream_content_id(parameters["upstream_uri"]),
        parameters["data_fingerprint"],
        parameters["code_version"],
    )
    return usable_record_key(key)


def usable_record_key(key: str) -> str:
    """`key`, unless the stage record cached under it cannot be used with the current tracking store
    (its run is in another store or was deleted, or lacks its stage output): then the key after it,
    `<key>-after-<run id>`, and so on. A new key has no record, so the task runs again: the stage is
    recorded anew from its finished stage folder (or trained), and that record is the one a later
    run finds."""
    from prefect.results import get_result_store

    store = get_result_store()
    for _ in range(MAX_STALE_RECORDS):
        if not store.exists(key):
            return key
        record = store.read(key).result
        if not isinstance(record, StageRecord):
            return key
        problem = lineage.recorded_stage_problem(record.run_id, record.stage_output_uri)
        if problem is None:
            return key
        _log().warning(
            "cached record of stage %s (key %s) is not used: %s; the stage is recorded again",
            record.stage,
            key[:24],
            problem,
        )
        key = f"{key.split('-after-')[0]}-after-{record.run_id}"
    return key


def _log():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger("theworld.pipeline")


def _evaluate_cache_key(context, parameters) -> str:
    payload = json.dumps(
        [
            parameters["stage_output_uri"],
            parameters["task_samples"],
            parameters["generations"],
            parameters["code_version"],
        ],
        sort_keys=True,
    )
    return "evaluate-" + hashlib.sha256(payload.encode()).hexdigest()


prepare_data = task(name="prepare-data", cache_policy=NO_CACHE, task_run_name="prepare-data")(
    pipeline.prepare_data_step
)


@task(
    name="train-stage",
    cache_key_fn=_train_cache_key,
    persist_result=True,
    result_serializer=RECORD_SERIALIZER,
    task_run_name="train-{stage_config[name]}",
)
def train_stage(
    stage_config: dict,
    upstream_uri: str | None,
    data_fingerprint: str,
    code_version: str,
    *,
    output_root: str,
    parent_run_id: str,
    attempt: int,
    global_step_offset: int,
    tags: dict,
    evaluate_after: dict | None = None,
) -> StageRecord:
    return pipeline.train_stage_step(
        stage_config,
        upstream_uri,
        data_fingerprint,
        code_version,
        output_root=output_root,
        parent_run_id=parent_run_id,
        attempt=attempt,
        global_step_offset=global_step_offset,
        tags=tags,
        evaluate_after=evaluate_after,
    )


@task(
    name="evaluate-stage",
    cache_key_fn=_evaluate_cache_key,
    persist_result=True,
    result_serializer=RECORD_SERIALIZER,
    task_run_name="evaluate-{stage_config[name]}",
)
def evaluate_stage(
    stage_output_uri: str,
    stage_config: dict,
    run_id: str,
    code_version: str,
    *,
    task_samples: int,
    generations: int,
    in_training: dict | None = None,
) -> EvalReport:
    return pipeline.evaluate_stage_step(
        stage_output_uri,
        stage_config,
        run_id,
        task_samples=task_samples,
        generations=generations,
        in_training=in_training,
    )


check_plateau = task(name="check-plateau", cache_policy=NO_CACHE, task_run_name="plateau-{record.stage}")(
    pipeline.plateau_step
)
gate = task(name="gate", cache_policy=NO_CACHE, task_run_name="gate-{outcome.name}")(pipeline.gate_step)
finish = task(name="register-champion", cache_policy=NO_CACHE, task_run_name="register-champion")(pipeline.finish_step)
check_new_data = task(name="check-new-data", cache_policy=NO_CACHE, task_run_name="check-new-data")(
    pipeline.new_data_step
)
warm_start = task(name="warm-start", cache_policy=NO_CACHE, task_run_name="warm-start")(pipeline.warm_start_step)


def forced(cached_task):
    """The task run anew, its result replacing the cached one (Prefect's `refresh_cache`)."""
    return cached_task.with_options(refresh_cache=True)
