"""`theworld`: the core commands (theworld_core/cli.py) plus the pipeline's: run, serve, data, deployment."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
from pathlib import Path

from theworld_core import cli as core_cli


def _prefect_env() -> None:
    """Local defaults for Prefect before it is imported: state under the project folder, no telemetry,
    the library's log lines (`theworld.*`: the trainer's) in the flow run's logs in the Prefect UI
    (outside a flow run they go to the console only).

    `PREFECT_API_URL`, when set, wins (a real server); otherwise `theworld run` starts a temporary
    API server on SQLite in PREFECT_HOME (flows/temporary_server.py).
    """
    from theworld_core.tracking.mlflow_runs import project_dir

    os.environ.setdefault("PREFECT_HOME", str(project_dir() / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(
        parents=True, exist_ok=True
    )  # Prefect makes only the last level
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "theworld")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def _name_lines_by_run() -> None:
    """Console lines of the library's loggers (the trainer's) logged inside a Prefect task run carry
    its name (`train-projection`), as Prefect's own lines do (theworld_core/logs.py prints it)."""
    import logging

    from prefect.context import TaskRunContext

    from theworld_core.logs import ConsoleHandler

    def add_task_run_name(record: logging.LogRecord) -> bool:
        if not hasattr(record, "task_run_name"):
            context = TaskRunContext.get()
            if context is not None and context.task_run is not None:
                record.task_run_name = context.task_run.name
        return True

    for handler in logging.getLogger().handlers:
        if isinstance(handler, ConsoleHandler):
            handler.addFilter(add_task_run_name)


def _open_mlflow_store() -> None:
    """The new-data check's first MLflow call: on a new local store it creates the database (about
    10 s of migrations on 2 cores)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    if mlflow.get_tracking_uri().startswith("sqlite:"):  # a server: nothing to create, maybe slow to answer
        MlflowClient().search_experiments(max_results=1)


@contextlib.contextmanager
def _collector_paused():
    """No cyclic garbage collection while the command imports its libraries (their hundreds of
    thousands of objects are kept anyway; collecting them costs 10-30 % of the imports), then those
    objects frozen out of later collections (`gc.freeze`)."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _import(*modules: str):
    import importlib

    return lambda: [importlib.import_module(module) for module in modules]


_WARM_UP = (
    _open_mlflow_store,
    # What the first stage imports to build the model (2 s idle, 5 s on a busy machine), a piece at a
    # time: once the server answers the flow starts, and a run that trains nothing ("no new data")
    # does not wait for the rest.
    _import("transformers.models.gemma3.modeling_gemma3"),
    _import("diffusers.models.autoencoders.autoencoder_kl_wan"),
    _import("theworld_core.training.trainer", "theworld_core.model.theworld"),
)
"""Work a run needs anyway, done while the temporary Prefect server boots (flows/temporary_server.py)."""


def _without_heartbeats():
    """Prefect's flow-run heartbeats (one every 180 s by default) let a lasting server mark a run whose
    process died as crashed. A temporary server dies with the run, so for it they only cost time: the
    engine joins the heartbeat thread when the flow ends, up to 1 s of that thread's sleep."""
    from prefect.settings import temporary_settings

    return temporary_settings(updates={"flows.heartbeat_frequency": None})


def _cmd_run(args) -> int:
    from theworld_core.config import load_pipeline_config

    load_pipeline_config(args.stages_yaml, profile=args.profile)  # bad files stop here: nothing has started
    _prefect_env()
    with _collector_paused():
        server = None
        if not os.environ.get("PREFECT_API_URL", "").strip():
            from flows.temporary_server import TemporaryPrefectServer

            server = TemporaryPrefectServer()
            server.start()  # boots while the imports below run; stops at exit, after Prefect's last log lines
        from flows.multistage import multistage
        from theworld_core.model import inputs  # noqa: F401  (torch, datasets: the flow's first task needs them)
        from theworld_core.tracking.mlflow_runs import configure_tracking, ui_command

        configure_tracking()
        _name_lines_by_run()
        if server is not None:
            server.wait_ready(float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]), meanwhile=_WARM_UP)
    with _without_heartbeats() if server is not None else contextlib.nullcontext():
        result = multistage(stages_yaml=str(Path(args.stages_yaml).resolve()), profile=args.profile, force=args.force)
    # The interpreter's exit then skips collecting the run's objects (4 s on 2 busy cores); the exit
    # handlers (Prefect's last log lines, the temporary server's stop) run as before.
    gc.freeze()
    if result.get("no_new_data"):
        print(
            f"\n{result['reason']}\nnothing trained (schedule.only_on_new_data); to train regardless: "
            "theworld run --force"
        )
        return 0
    print()
    print(f"{'stage':<12}{'attempt':>8}  {'status':<11}{'steps':>6}  {'eval loss':>9}  {'task acc':>8}  decision")
    for row in result["stages"]:
        loss = "-" if row["eval_loss"] is None else f"{row['eval_loss']:.4f}"
        acc = "-" if row["task_accuracy"] is None else f"{row['task_accuracy']:.3f}"
        print(
            f"{row['stage']:<12}{row['attempt']:>8}  {row['status']:<11}{row['steps']:>6}  {loss:>9}  {acc:>8}  "
            f"{row['decision']}: {row['decision_reason']}"
        )
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
                     the same deployment on the process work pool `theworld`, generated from
                     stages.yaml (`theworld deployment prefect-yaml --help`; base config, no profile):
                       prefect work-pool create theworld --type process
                       prefect --no-prompt deploy --name full
                       prefect worker start --pool theworld
                     (change the pool's type to docker/kubernetes and add an image for containers).
Use one route per deployment, not both.
"""

DATA_ADD_HELP = """\
Copy images into a local image folder (Hugging Face imagefolder layout: images + metadata.jsonl with
file_name and text columns), the layout a stages.yaml `data.dataset_name: <folder>` reads (profile
`local` reads ./data/images).
Images are copied under temporary names and renamed; metadata.jsonl is rewritten to a temporary
file and replaced, after the images, so a pipeline run reading the folder meanwhile sees the old or
the new data, never half of it. With --notify the new-data event follows (see `data notify`); the
folder must then be the one the config (with --profile) reads, else nothing would train on it.
"""

DATA_SAMPLE_HELP = """\
Write COUNT synthetic images (a coloured shape on a plain background, PNG) and their captions to
OUT_DIR/captions.jsonl, for trying the pipeline without images of your own:
  theworld data sample new --count 48
  theworld data add new/*.png --to data/images --captions new/captions.jsonl
Sample i is the same on every machine; --start picks other samples (new data for a second add).
"""

PREFECT_YAML_HELP = """\
Write prefect.yaml (the work-pool route: `prefect deploy`) for the deployment multistage/full from a
stages.yaml, from the same settings `theworld serve` gives it: schedule.cron in schedule.timezone,
a trigger on schedule.new_data_event about the config's dataset, concurrency 1 (ENQUEUE), and
parameters stages_yaml (as given, relative to the worker's folder), profile, force=false.
The committed prefect.yaml is the base config's (no profile: the full-size models, for GPUs):
  theworld deployment prefect-yaml stages.yaml --out prefect.yaml
--check compares instead of writing: exit 1 with the difference when the file has drifted.
"""

DATA_NOTIFY_HELP = """\
Emit the config's schedule.new_data_event (e.g. theworld.data.updated) about the resource
theworld.data.<dataset> with the data fingerprint as payload, to the Prefect API in
PREFECT_API_URL. The deployment served by `theworld serve` (or deployed from prefect.yaml) starts
a run on it; that run trains when the fingerprint differs from the last successful run's.
"""


def _notify_arguments(parser: argparse.ArgumentParser, profiles: str) -> None:
    parser.add_argument(
        "--stages-yaml",
        default="stages.yaml",
        help="pipeline config naming the event and dataset (default ./stages.yaml)",
    )
    parser.add_argument("--profile", help=core_cli.profile_option_help(profiles))


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
    from theworld_core.model.inputs import prepare_stage_data

    require_api_url()  # before the (possibly long) fingerprint
    fingerprint = prepare_stage_data(cfg.resolved_stages()[0]).fingerprint  # as the flow computes it
    sent = notify_new_data(cfg, fingerprint)
    print(f"emitted {sent['event']} about {sent['resource']} (fingerprint {fingerprint[:16]}, event {sent['id']})")
    return 0


def _cmd_data_add(args) -> int:
    from theworld_core.data.add import add_images

    if args.notify:  # a bad config, another folder or a missing API stops before anything is copied
        from theworld_core.config import load_pipeline_config

        cfg = load_pipeline_config(args.stages_yaml, profile=args.profile)
        _check_notified_folder(cfg.data.dataset_name, args.to, args.stages_yaml, args.profile)
        _prefect_env()
        from flows.deployment import require_api_url

        require_api_url()
    added = add_images(args.sources, args.to, caption=args.caption, captions_file=args.captions)
    for item in added:
        print(f"{'already there' if item.skipped else 'added'}: {item.source} -> {Path(args.to) / item.file_name}")
    print(f"{sum(not a.skipped for a in added)} image(s) added to {args.to}")
    return _notify(args.stages_yaml, args.profile) if args.notify else 0


def _check_notified_folder(dataset_name: str, folder: str, stages_yaml: str, profile: str | None) -> None:
    """`data add --notify` into a folder the config does not read would start a run that trains on
    other data (or fails on a hub dataset): refuse it, naming the profiles to choose from."""
    if Path(folder).expanduser().resolve() == Path(dataset_name).expanduser().resolve():
        return
    config = f"{stages_yaml}" + (f" with --profile {profile}" if profile else " (no --profile)")
    names = core_cli.profile_names(stages_yaml) or []
    raise ValueError(
        f"--to {folder} is not the data {config} reads (data.dataset_name: {dataset_name!r}), so the new-data "
        f"event would start a run that does not read these images. Add to {dataset_name} or pick the profile "
        f"that reads {folder} (profile `local` reads ./data/images; profiles in {stages_yaml}: "
        f"{', '.join(names) or 'none'})"
    )


def _cmd_data_notify(args) -> int:
    return _notify(args.stages_yaml, args.profile)


def write_sample_images(out_dir: Path, count: int, *, start: int = 0, size: int = 32, seed: int = 0) -> Path:
    """`count` synthetic shape images (PNG, `size` px) into `out_dir`, captions in `out_dir/captions.jsonl`
    (rows of earlier samples into the same folder are kept). Each file is written to a temporary name
    and renamed. Returns the captions file."""
    import json
    import tempfile

    from theworld_core.data.synthetic import render_png, shape_spec

    def write_atomically(target: Path, data: bytes) -> None:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    out_dir.mkdir(parents=True, exist_ok=True)
    captions = out_dir / "captions.jsonl"
    rows: dict[str, str] = {}
    if captions.is_file():
        for line in captions.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["file_name"]] = row["text"]
    for index in range(start, start + count):
        spec = shape_spec(seed, index)
        name = f"shape-{seed}-{index:05d}.png"
        write_atomically(out_dir / name, render_png(spec, size))
        rows[name] = spec.caption
    text = "".join(json.dumps({"file_name": name, "text": caption}) + "\n" for name, caption in rows.items())
    write_atomically(captions, text.encode())
    return captions


def _cmd_data_sample(args) -> int:
    captions = write_sample_images(Path(args.out_dir), args.count, start=args.start, size=args.size, seed=args.seed)
    print(f"{args.count} synthetic image(s) written to {args.out_dir}, captions in {captions}")
    return 0


def _cmd_prefect_yaml(args) -> int:
    from theworld_core.config import load_pipeline_config

    cfg = load_pipeline_config(args.stages_yaml, profile=args.profile)
    from flows.deployment import prefect_yaml_command, prefect_yaml_text

    out = args.out or "prefect.yaml"
    text = prefect_yaml_text(cfg, args.stages_yaml, args.profile, out)
    if args.check:
        import difflib

        try:
            current = Path(out).read_text(encoding="utf-8")
        except FileNotFoundError:
            current = ""
        if current == text:
            print(
                f"{out} is up to date with {args.stages_yaml}" + (f" (profile {args.profile})" if args.profile else "")
            )
            return 0
        diff = difflib.unified_diff(
            current.splitlines(keepends=True),
            text.splitlines(keepends=True),
            fromfile=f"{out} (as it is)",
            tofile=f"{out} (generated)",
        )
        sys.stdout.writelines(diff)
        print(
            f"\n{out} differs from what {args.stages_yaml} generates: run "
            f"`{prefect_yaml_command(args.stages_yaml, args.profile, out)}`",
            file=sys.stderr,
        )
        return 1
    if args.out is None:
        sys.stdout.write(text)
        return 0
    import tempfile

    target = Path(out)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent.resolve())
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, target)
    print(f"wrote {out} from {args.stages_yaml}" + (f" (profile {args.profile})" if args.profile else ""))
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be 1 or more")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: must be 0 or more")
    return value


def add_pipeline_commands(sub, profiles: str) -> None:
    """run, serve, data, deployment; `profiles` lists the profiles in their --profile help."""
    run = sub.add_parser("run", help="run the multistage pipeline (Prefect flow, MLflow tracking)")
    run.add_argument("stages_yaml", nargs="?", default="stages.yaml", help="pipeline config (default ./stages.yaml)")
    run.add_argument("--profile", help=core_cli.profile_option_help(profiles))
    run.add_argument(
        "--force",
        action="store_true",
        help='train even when the data is unchanged since the last successful run ("no new data")',
    )
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser(
        "serve",
        help="serve the deployment multistage/full: schedule, new-data trigger, runs them",
        description=SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("stages_yaml", nargs="?", default="stages.yaml", help="pipeline config (default ./stages.yaml)")
    serve.add_argument("--profile", help=core_cli.profile_option_help(profiles))
    serve.set_defaults(func=_cmd_serve)

    data = sub.add_parser(
        "data",
        help="add images to a local image folder; tell the deployment that data changed",
        epilog=f"--profile (of add, notify): {profiles}",
    )
    data_sub = data.add_subparsers(dest="data_command", required=True)
    add = data_sub.add_parser(
        "add",
        help="copy images into an image folder (metadata.jsonl layout), atomically",
        description=DATA_ADD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add.add_argument("sources", nargs="+", metavar="SRC", help="image files, or folders of images")
    add.add_argument("--to", required=True, metavar="FOLDER", help="the image folder (created when missing)")
    captions = add.add_mutually_exclusive_group()
    captions.add_argument("--caption", metavar="TEXT", help="caption of every added image")
    captions.add_argument(
        "--captions", metavar="FILE.jsonl", help='one {"file_name": SRC or its name, "text": CAPTION} row per image'
    )
    add.add_argument("--notify", action="store_true", help="then emit the new-data event (as `theworld data notify`)")
    _notify_arguments(add, profiles)
    add.set_defaults(func=_cmd_data_add)
    notify = data_sub.add_parser(
        "notify",
        help="emit the config's new-data event to PREFECT_API_URL",
        description=DATA_NOTIFY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _notify_arguments(notify, profiles)
    notify.set_defaults(func=_cmd_data_notify)
    sample = data_sub.add_parser(
        "sample",
        help="write synthetic images + captions.jsonl (to try `data add` with)",
        description=DATA_SAMPLE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sample.add_argument("out_dir", metavar="OUT_DIR", help="folder to write into (created when missing)")
    sample.add_argument("--count", type=_positive, default=32, help="how many images (default 32)")
    sample.add_argument("--start", type=_non_negative, default=0, help="index of the first sample (default 0)")
    sample.add_argument("--size", type=_positive, default=32, help="image side in pixels (default 32)")
    sample.add_argument("--seed", type=_non_negative, default=0, help="generator seed (default 0)")
    sample.set_defaults(func=_cmd_data_sample)

    deployment = sub.add_parser("deployment", help="the deployment's files: prefect.yaml generated from stages.yaml")
    deployment_sub = deployment.add_subparsers(dest="deployment_command", required=True)
    prefect_yaml = deployment_sub.add_parser(
        "prefect-yaml",
        help="write prefect.yaml (work-pool route) from a stages.yaml",
        description=PREFECT_YAML_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prefect_yaml.add_argument(
        "stages_yaml",
        nargs="?",
        default="stages.yaml",
        help="pipeline config (default stages.yaml), written into the file as given",
    )
    prefect_yaml.add_argument("--profile", help=core_cli.profile_option_help(profiles))
    prefect_yaml.add_argument(
        "--out", metavar="FILE", help="file to write (default: print; with --check: prefect.yaml)"
    )
    prefect_yaml.add_argument(
        "--check", action="store_true", help="compare with --out instead of writing; exit 1 on a difference"
    )
    prefect_yaml.set_defaults(func=_cmd_prefect_yaml)


def main(argv: list[str] | None = None) -> int:
    return core_cli.main(argv, extend=add_pipeline_commands)


if __name__ == "__main__":
    sys.exit(main())
