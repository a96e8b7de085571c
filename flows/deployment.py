"""The `multistage/full` deployment: schedule, new-data trigger, concurrency limit; the new-data event.

Two ways to run it, the same deployment either way:

- `theworld serve` (`serve()` here): one long-running process registers the deployment and runs its
  flow runs itself, as subprocesses on this machine.
- `prefect.yaml` at the repository root + `prefect deploy --name full` + `prefect worker start --pool
  theworld`: a work pool's worker runs them (process, Docker or Kubernetes pools). That file is
  generated from the config by `prefect_yaml_text` (`theworld deployment prefect-yaml`), from the
  same `deployment_settings` `serve()` uses, so the two routes cannot drift apart.

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
FLOW_ENTRYPOINT = "flows/multistage.py:multistage"  # relative to the repository root
RESOURCE_PREFIX = "theworld.data."
WORK_POOL = "theworld"
PROJECT_NAME = "theworld-multistage"
SERVE_API_WAIT_S = 60  # `theworld serve` waits this long for a Prefect server that is still starting


class PrefectApiMissing(ValueError):
    """PREFECT_API_URL is not set, or nothing answers there."""


def dataset_resource_id(cfg: PipelineConfig) -> str:
    """The Prefect resource id of the config's dataset: `theworld.data.<name>` (a folder's or file's
    name for local data, the source name otherwise)."""
    name = cfg.data.dataset_name
    short = Path(name).name if ("/" in name or os.sep in name) else name
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in short) or "data"
    return RESOURCE_PREFIX + safe


def require_api_url(wait_s: float = 0) -> str:
    """PREFECT_API_URL, checked to answer `/health`; a clear error otherwise.

    `wait_s`: how long to keep trying while nothing listens there yet (a server just started in the
    background, as in the README's lines)."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if not url:
        raise PrefectApiMissing(
            "PREFECT_API_URL is not set: point it at a Prefect server, e.g. start one with "
            "`prefect server start --host 127.0.0.1 --port 4200` and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    import time

    import httpx

    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            response = httpx.get(url.rstrip("/") + "/health", timeout=10)
            response.raise_for_status()
            return url
        except httpx.TransportError as error:  # nothing answers (yet)
            if time.monotonic() >= deadline:
                raise PrefectApiMissing(f"no Prefect API answers at PREFECT_API_URL={url} ({error})") from None
            if not said:
                print(f"waiting up to {wait_s:.0f} s for the Prefect API at {url} ...", flush=True)
                said = True
            time.sleep(1)
        except httpx.HTTPError as error:
            raise PrefectApiMissing(f"no Prefect API answers at PREFECT_API_URL={url} ({error})") from None


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
        "triggers": [
            DeploymentEventTrigger(
                name="new data",
                description=f"{schedule.new_data_event} about {dataset_resource_id(cfg)}: rerun (trains if the data changed)",
                expect={schedule.new_data_event},
                match={"prefect.resource.id": dataset_resource_id(cfg)},
            )
        ],
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
    require_api_url(wait_s=SERVE_API_WAIT_S)
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
    return {
        "event": cfg.schedule.new_data_event,
        "resource": resource["prefect.resource.id"],
        "id": str(event.id),
        "fingerprint": fingerprint,
    }


# --- prefect.yaml (the work-pool route), generated ------------------------------------------------

_PREFECT_YAML_USAGE = """\
# The work-pool route to the `multistage/full` deployment (the other route is `theworld serve`, one
# process that registers the deployment and runs the flow runs itself; see `theworld serve --help`).
#
#   export PREFECT_API_URL=http://127.0.0.1:4200/api        # the Prefect server
#   prefect work-pool create theworld --type process         # once
#   prefect --no-prompt deploy --prefect-file {out} --name full   # from the repository root
#   prefect worker start --pool theworld                     # on the machine that trains (runs in this folder)
#   prefect deployment run multistage/full                   # a run now
#   prefect deployment run multistage/full --param force=true  # a run even when the data is unchanged
#
# Process pool: the worker runs each flow run as a subprocess on its own machine, in the folder
# `prefect deploy` ran in (no `pull:` section: it records a set_working_directory step; the worker
# needs the same checkout and virtual environment). For Docker or Kubernetes, create the pool with
# `--type docker` / `--type kubernetes` and add `image: <an image with this repository installed>` to
# job_variables (docker/ holds the Dockerfiles).
#
# schedules, triggers, concurrency_limit and parameters come from {stages_yaml}'s `schedule:` and data
# (the same settings `theworld serve` gives the deployment): the cron in its time zone, the new-data
# event about this config's dataset, one run at a time (ENQUEUE: a run that fires during another
# waits for it).
"""


def prefect_yaml_command(stages_yaml: str, profile: str | None, out: str) -> str:
    """The command line that writes this file (in its header and in --check's message)."""
    return (
        f"theworld deployment prefect-yaml {stages_yaml}"
        + (f" --profile {profile}" if profile else "")
        + f" --out {out}"
    )


def prefect_yaml_document(cfg: PipelineConfig, stages_yaml: str, profile: str | None) -> dict[str, Any]:
    """`prefect.yaml` for `multistage/full` on the process pool `theworld`, from `deployment_settings`.

    `stages_yaml` is written as given: the flow run reads it relative to the worker's working folder."""
    settings = deployment_settings(cfg, stages_yaml, profile)
    triggers = []
    for trigger in settings["triggers"]:
        spec = trigger.model_dump(mode="json", exclude_unset=True)
        triggers.append(
            {
                "type": trigger.type,
                "enabled": True,
                "name": spec.pop("name"),
                "description": spec.pop("description"),
                **spec,
            }
        )
    limit = settings["global_limit"]
    deployment = {
        "name": settings["name"],
        "description": f"TheWorld multistage pipeline: {stages_yaml}" + (f" (profile {profile})" if profile else ""),
        "entrypoint": FLOW_ENTRYPOINT,
        "tags": settings["tags"],
        "parameters": {**settings["parameters"], "stages_yaml": stages_yaml},
        "work_pool": {
            "name": WORK_POOL,
            "work_queue_name": "default",
            # the trainer's own log lines in the flow run's logs, as `serve()` sets
            "job_variables": {"env": {"PREFECT_LOGGING_EXTRA_LOGGERS": "theworld"}},
        },
        "schedules": [{"cron": s.cron, "timezone": s.timezone, "active": True} for s in settings["schedules"]],
        "triggers": triggers,
        "concurrency_limit": {"limit": limit.limit, "collision_strategy": limit.collision_strategy.value},
    }
    return {"name": PROJECT_NAME, "build": None, "push": None, "deployments": [deployment]}


def prefect_yaml_text(cfg: PipelineConfig, stages_yaml: str, profile: str | None, out: str = "prefect.yaml") -> str:
    """The whole generated file: a header saying what it is for and how to regenerate it, then the YAML."""
    import yaml

    which = (
        f"profile {profile}"
        if profile
        else f"no profile (the full-size base: {cfg.model.model_name} on {cfg.data.dataset_name}, for GPU machines)"
    )
    schedule = (
        f"cron {cfg.schedule.cron!r} in {cfg.schedule.timezone}" if cfg.schedule.cron else "no schedule (cron: null)"
    )
    header = (
        f"# GENERATED by `{prefect_yaml_command(stages_yaml, profile, out)}`; do not edit by hand.\n"
        f"# Config: {stages_yaml}, {which}.\n"
        f"# Deployment multistage/full: {schedule}; new-data trigger on {dataset_resource_id(cfg)}.\n"
        f"# After changing {stages_yaml}, run the command again: with `--check` it exits 1 while this file\n"
        "# differs (tests/test_operating.py runs it). Another profile into another file, e.g.\n"
        f"#   {prefect_yaml_command(stages_yaml, 'local', 'prefect.local.yaml')}\n#\n"
    )
    body = yaml.safe_dump(
        prefect_yaml_document(cfg, stages_yaml, profile), sort_keys=False, default_flow_style=False, width=120
    )
    return header + _PREFECT_YAML_USAGE.format(out=out, stages_yaml=stages_yaml) + "\n" + body
