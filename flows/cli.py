"""`theworld`: the core commands (theworld_core/cli.py) plus the pipeline's: run, serve, data."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from theworld_core import cli as core_cli


def _prefect_env() -> None:
    """Local defaults for Prefect before it is imported: state under the project folder, no telemetry.

    `PREFECT_API_URL`, when set, wins (a real server); otherwise the flow starts Prefect's
    ephemeral API on SQLite in PREFECT_HOME.
    """
    from theworld_core.tracking.mlflow_runs import project_dir

    os.environ.setdefault("PREFECT_HOME", str(project_dir() / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # Prefect makes only the last level
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _cmd_run(args) -> int:
    from theworld_core.config import load_pipeline_config

    load_pipeline_config(args.stages_yaml, profile=args.profile)  # bad files stop here: nothing has started
    _prefect_env()
    from flows.multistage import multistage
    from theworld_core.tracking.mlflow_runs import configure_tracking, ui_command

    configure_tracking()
    result = multistage(stages_yaml=str(Path(args.stages_yaml).resolve()), profile=args.profile, force=args.force)
    if result.get("no_new_data"):
        print(f"\n{result['reason']}\nnothing trained (schedule.only_on_new_data); to train regardless: "
              "theworld run --force")
        return 0
    print()
    print(f"{'stage':<12}{'attempt':>8}  {'status':<11}{'steps':>6}  {'eval loss':>9}  {'task acc':>8}  decision")
    for row in result["stages"]:
        loss = "-" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
        acc = "-" if row["task_accuracy"] is None else f"{row['task_accuracy']:.3f}"
        print(f"{row['stage']:<12}{row['attempt']:>8}  {row['status']:<11}{row['steps']:>6}  {loss:>9}  {acc:>8}  "
              f"{row['decision']}: {row['decision_reason']}")
    print(f"\nchampion: {result['champion']} (registered model version {result['model_version']})")
    print(f"MLflow parent run: {result['parent_run_id']}")
    print(f"open the MLflow UI: {ui_command()}")
    return 0


SERVE_HELP = """\
Serve the deployment `multistage/full` against the Prefect API in PREFECT_API_URL (required).

One long-running process registers the deployment and runs its flow runs itself, as subprocesses
on this machine, until stopped (Ctrl-C / SIGTERM; the deployment is then paused until served again).
The deployment gets, from the config:
  parameters   stages_yaml (absolute path), profile, force=false
  schedule     schedule.cron read in schedule.timezone (none when cron is null)
  trigger      the event schedule.new_data_event about the config's dataset
               (`theworld data notify`, or `theworld data add ... --notify`)
  concurrency  1 run at a time; a run that fires meanwhile waits (collision strategy ENQUEUE)
A run whose data is unchanged since the last successful run of the same config ends at once with
"no new data" (schedule.only_on_new_data); start one regardless with
  prefect deployment run multistage/full --param force=true

serve or a work pool?
  theworld serve     the simplest: one process on the machine that trains (a workstation, one GPU
                     box, a VM). Nothing else to run besides the Prefect server. Runs stop when it
                     stops.
  work pool          for Docker/Kubernetes in production, or when the server should schedule runs
                     onto machines it does not run on: `prefect.yaml` at the repository root holds
                     the same deployment on the process work pool `theworld`:
                       prefect work-pool create theworld --type process
                       prefect --no-prompt deploy --name full
                       prefect worker start --pool theworld
                     (change the pool's type to docker/kubernetes and add an image for containers).
Use one route per deployment, not both.
"""

DATA_ADD_HELP = """\
Copy images into a local image folder (Hugging Face imagefolder layout: images + metadata.jsonl with
file_name and text columns), the layout a stages.yaml `data.dataset_name: <folder>` reads.
Images are copied under temporary names and renamed; metadata.jsonl is rewritten to a temporary
file and replaced, after the images, so a pipeline run reading the folder meanwhile sees the old or
the new data, never half of it. With --notify the new-data event follows (see `data notify`).
"""

DATA_NOTIFY_HELP = """\
Emit the config's schedule.new_data_event (e.g. theworld.data.updated) about the resource
theworld.data.<dataset> with the data fingerprint as payload, to the Prefect API in
PREFECT_API_URL. The deployment served by `theworld serve` (or deployed from prefect.yaml) starts
a run on it; that run trains when the fingerprint differs from the last successful run's.
"""


def _notify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages-yaml", default="stages.yaml", help="pipeline config naming the event and dataset "
                                                                     "(default ./stages.yaml)")
    parser.add_argument("--profile", help="profile of the stages.yaml to apply")


def _cmd_serve(args) -> int:
    from theworld_core.config import load_pipeline_config

    load_pipeline_config(args.stages_yaml, profile=args.profile)  # a bad file stops here
    _prefect_env()
    from flows.deployment import serve

    serve(args.stages_yaml, args.profile)
    return 0


def _notify(stages_yaml: str, profile: str | None) -> int:
    from theworld_core.config import load_pipeline_config

    cfg = load_pipeline_config(stages_yaml, profile=profile)
    _prefect_env()
    from flows.deployment import notify_new_data, require_api_url
    from theworld_core.data import prepare_data

    require_api_url()  # before the (possibly long) fingerprint
    fingerprint = prepare_data(cfg.resolved_stages()[0].data_part()).fingerprint  # as the flow computes it
    sent = notify_new_data(cfg, fingerprint)
    print(f"emitted {sent['event']} about {sent['resource']} (fingerprint {fingerprint[:16]}, event {sent['id']})")
    return 0


def _cmd_data_add(args) -> int:
    from theworld_core.data.add import add_images

    if args.notify:  # a bad config or missing API stops before anything is copied
        from theworld_core.config import load_pipeline_config

        load_pipeline_config(args.stages_yaml, profile=args.profile)
        _prefect_env()
        from flows.deployment import require_api_url

        require_api_url()
    added = add_images(args.sources, args.to, caption=args.caption, captions_file=args.captions)
    for item in added:
        print(f"{'already there' if item.skipped else 'added'}: {item.source} -> {Path(args.to) / item.file_name}")
    print(f"{sum(not a.skipped for a in added)} image(s) added to {args.to}")
    return _notify(args.stages_yaml, args.profile) if args.notify else 0


def _cmd_data_notify(args) -> int:
    return _notify(args.stages_yaml, args.profile)


def add_pipeline_commands(sub) -> None:
    run = sub.add_parser("run", help="run the multistage pipeline (Prefect flow, MLflow tracking)")
    run.add_argument("stages_yaml", nargs="?", default="stages.yaml", help="pipeline config (default ./stages.yaml)")
    run.add_argument("--profile", help="profile of the stages.yaml to apply, e.g. tiny")
    run.add_argument("--force", action="store_true",
                     help='train even when the data is unchanged since the last successful run ("no new data")')
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser("serve", help="serve the deployment multistage/full: schedule, new-data trigger, runs them",
                           description=SERVE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("stages_yaml", nargs="?", default="stages.yaml", help="pipeline config (default ./stages.yaml)")
    serve.add_argument("--profile", help="profile of the stages.yaml to apply, e.g. tiny")
    serve.set_defaults(func=_cmd_serve)

    data = sub.add_parser("data", help="add images to a local image folder; tell the deployment that data changed")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    add = data_sub.add_parser("add", help="copy images into an image folder (metadata.jsonl layout), atomically",
                              description=DATA_ADD_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add.add_argument("sources", nargs="+", metavar="SRC", help="image files, or folders of images")
    add.add_argument("--to", required=True, metavar="FOLDER", help="the image folder (created when missing)")
    captions = add.add_mutually_exclusive_group()
    captions.add_argument("--caption", metavar="TEXT", help="caption of every added image")
    captions.add_argument("--captions", metavar="FILE.jsonl",
                          help='one {"file_name": SRC or its name, "text": CAPTION} row per image')
    add.add_argument("--notify", action="store_true", help="then emit the new-data event (as `theworld data notify`)")
    _notify_arguments(add)
    add.set_defaults(func=_cmd_data_add)
    notify = data_sub.add_parser("notify", help="emit the config's new-data event to PREFECT_API_URL",
                                 description=DATA_NOTIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _notify_arguments(notify)
    notify.set_defaults(func=_cmd_data_notify)



def main(argv: list[str] | None = None) -> int:
    return core_cli.main(argv, extend=add_pipeline_commands)


if __name__ == "__main__":
    sys.exit(main())
