"""The `multistage/full` deployment: schedule, new-data trigger, concurrency limit; the new-data event.

Two ways to run it, the same deployment either way:

- `theworld serve` (`serve()` here): one long-running process registers the deployment and runs its
  flow runs itself, as subprocesses on this machine.
- `prefect.yaml` at the repository root + `prefect deploy --name full` + `prefect worker start --pool
  theworld`: a work pool's worker runs them (process, Docker or Kubernetes pools).

The deployment's settings come from the config's `schedule` section (`deployment_settings`):
- a cron schedule (`schedule.cron` read in `schedule.timezone`; none when cron is null);
- an event trigger: `schedule.new_data_event` about the config's dataset (`theworld data notify`
  emits it) starts a run, which trains if the data fingerprint changed;
- a concurrency limit of 1 with collision strategy ENQUEUE: a run that fires while another runs
  waits (state AwaitingConcurrencySlot) instead of running beside it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from theworld_core.config import PipelineConfig

DEPLOYMENT_NAME = "full"
FLOW_NAME = "multistage"
RESOURCE_PREFIX = "theworld.data."


class PrefectApiMissing(ValueError):
    """PREFECT_API_URL is not set, or nothing answers there."""


def dataset_resource_id(cfg: PipelineConfig) -> str:
    """The Prefect resource id of the config's dataset: `theworld.data.<name>` (a folder's or file's
    name for local data, the source name otherwise)."""
    name = cfg.data.dataset_name
    short = Path(name).name if ("/" in name or os.sep in name) else name
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in short) or "data"
    return RESOURCE_PREFIX + safe


def require_api_url() -> str:
    """PREFECT_API_URL, checked to answer `/health`; a clear error otherwise."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        raise PrefectApiMissing(
            "PREFECT_API_URL is not set: point it at a Prefect server, e.g. start one with "
            "`prefect server start --host 127.0.0.1 --port 4200` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    import httpx

    try:
        response = httpx.get(url.rstrip("/") + "/health", timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as error:
        raise PrefectApiMissing(f"no Prefect API answers at PREFECT_API_URL={url} ({error})") from None
    return url


def deployment_settings(cfg: PipelineConfig, stages_yaml: str, profile: str | None) -> dict[str, Any]:
    """Keyword arguments of `Flow.serve` for `multistage/full` from the config."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron

    schedule = cfg.schedule
    return {
        "name": DEPLOYMENT_NAME,
        "parameters": {"stages_yaml": str(Path(stages_yaml).resolve()), "profile": profile, "force": False},
        "schedules": [Cron(schedule.cron, timezone=schedule.timezone)] if schedule.cron else [],
        "triggers": [DeploymentEventTrigger(
            name="new data",
            description=f"{schedule.new_data_event} about {dataset_resource_id(cfg)}: rerun (trains if the data changed)",
            expect={schedule.new_data_event},
            match={"prefect.resource.id": dataset_resource_id(cfg)},
        )],
        "global_limit": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        "description": f"TheWorld multistage pipeline: {Path(stages_yaml).resolve()}"
                       + (f" (profile {profile})" if profile else ""),
        "tags": ["theworld"],
    }


def serve(stages_yaml: str, profile: str | None) -> None:
    """Register `multistage/full` and run its flow runs in this process until stopped."""
    # The flow runs (subprocesses) send the library's own log lines (trainer progress, "starts
    # from ...") to Prefect too, beside the flow's.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "theworld")
    from flows.multistage import multistage
    from theworld_core.config import load_pipeline_config

    cfg = load_pipeline_config(stages_yaml, profile=profile)
    require_api_url()
    multistage.serve(**deployment_settings(cfg, stages_yaml, profile))


def notify_new_data(cfg: PipelineConfig, fingerprint: str | None) -> dict[str, Any]:
    """Emit `schedule.new_data_event` about the config's dataset to the Prefect API (the
    deployment's trigger starts a run about a second later)."""
    require_api_url()
    from prefect.events import emit_event

    resource = {"prefect.resource.id": dataset_resource_id(cfg), "prefect.resource.name": cfg.data.dataset_name}
    event = emit_event(event=cfg.schedule.new_data_event, resource=resource, payload={"fingerprint": fingerprint})
    if event is None:
        raise PrefectApiMissing("Prefect did not emit the event (events are disabled in this Prefect profile)")
    return {"event": cfg.schedule.new_data_event, "resource": resource["prefect.resource.id"], "id": str(event.id),
            "fingerprint": fingerprint}
