"""The core of `theworld ...`: commands that need no orchestrator (tiny, plan, train).

The installed `theworld` command is `flows/cli.py`, which adds the pipeline's commands (run, serve,
data) on top of these; this module stays free of Prefect, and `python -m theworld_core.cli train`
is what multi-process launches run on every rank.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_STAGES_YAML = "stages.yaml"


def _cmd_tiny(args) -> int:
    from theworld_core.model.tiny import ensure_tiny_models

    paths = ensure_tiny_models(Path(args.out) if args.out else None)
    if args.json:
        print(json.dumps(paths.as_dict()))
    else:
        print(f"gemma:  {paths.gemma}\ncosmos: {paths.cosmos}")
    return 0


def _cmd_plan(args) -> int:
    from theworld_core.config import ModelConfig
    from theworld_core.model.plan import format_plan, plan, stages_that_do_not_fit

    overrides = {k: v for k, v in {"model_name": args.gemma, "cosmos_model_name": args.cosmos}.items() if v}
    stages, num_samples = None, None
    if args.stages:
        from theworld_core.config import load_pipeline_config

        pipeline = load_pipeline_config(args.stages, profile=args.profile)
        stages = {s.name: s for s in pipeline.resolved_stages()}
        overrides = {**pipeline.model.model_dump(), **overrides}
        num_samples = pipeline.data.num_samples
    if args.seq_len not in (None, "max") and not (args.seq_len.isdigit() and int(args.seq_len) > 0):
        raise ValueError(f"--seq-len {args.seq_len!r} is not allowed: a positive number of tokens, or max")
    if args.gpu_memory is not None and args.gpu_memory <= 0:
        raise ValueError(f"--gpu-memory {args.gpu_memory:g} is not allowed: GiB of one device, greater than 0")
    result = plan(
        ModelConfig(**overrides), stages, seq_len=args.seq_len, gpu_memory_gib=args.gpu_memory, num_samples=num_samples
    )
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    over = stages_that_do_not_fit(result)
    for line in over:
        print(f"theworld plan: does not fit: {line}", file=sys.stderr)
    return 1 if over else 0


def _cmd_train(args) -> int:
    from theworld_core.config import load_stage_config
    from theworld_core.training.launch import die_with_parent, in_distributed_launch, train_stage

    if in_distributed_launch():
        die_with_parent()  # a rank never outlives its launcher
    cfg = load_stage_config(args.config)
    if args.num_processes is not None:
        cfg = cfg.with_changes(num_processes=args.num_processes)
    from theworld_core.model.stage_output import DiskFullError
    from theworld_core.tracking.hub_push import EXIT_HUB_PUSH_FAILED, HUB_EVIDENCE_KEY, push_failure

    try:
        result = train_stage(
            cfg,
            accelerate_config=args.accelerate_config,
            fresh=args.fresh,
            mlflow_run_id=args.mlflow_run_id,
            global_step_offset=args.global_step_offset,
        )
    except DiskFullError as exc:  # one line, no traceback; the earlier resume states are kept
        print(f"theworld train: error: {exc}", file=sys.stderr)
        return 1
    if int(__import__("os").environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    if args.result_file:  # launched by run_distributed: the parent process reports
        Path(args.result_file).write_text(json.dumps(result.to_dict()))
        return 0
    print(
        json.dumps(result.to_dict(), indent=2)
        if args.json
        else f"{result.status}: {result.reason}\nstage output: {result.stage_output}\nMLflow run: {result.mlflow_run_id}"
        + (f"\ntracking incomplete: {result.tracking_incomplete}" if result.tracking_incomplete else "")
    )
    if result.exit_status:  # failed (1), or trained but its output not in MLflow (4)
        return result.exit_status
    failure = push_failure(result.evidence.get(HUB_EVIDENCE_KEY))
    if failure:  # trained and saved, but not on the hub: not a silent success
        print(f"theworld train: error: {failure}", file=sys.stderr)
        return EXIT_HUB_PUSH_FAILED
    return 0


# --- version and profile names (help texts) --------------------------------------------------------


class _VersionAction(argparse.Action):
    """`--version`: the package release and the code version that keys cached stages (computed only
    when asked: it hashes the library's source)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from theworld_core.version import PACKAGE, code_version

        code = code_version()
        print(f"{parser.prog} {code.split('+', 1)[0]} ({PACKAGE}, code {code})")
        parser.exit()


def profile_names(stages_yaml: str | Path) -> list[str] | None:
    """The names under `profiles:` of a pipeline file, or None when it cannot be read.

    For help texts only: no validation (load_pipeline_config checks the file and names the allowed
    profiles when one is unknown)."""
    import yaml

    try:
        document = yaml.safe_load(Path(stages_yaml).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(document, dict):
        return None
    profiles = document.get("profiles")
    return [str(name) for name in profiles] if isinstance(profiles, dict) else []


def stages_yaml_named_in(argv: Sequence[str]) -> str:
    """The pipeline file a command line names (the value of --stages-yaml, or the first existing
    .yaml/.yml argument), else ./stages.yaml: whose profiles `--help` lists."""
    args = list(argv)
    for index, arg in enumerate(args):
        if arg == "--stages-yaml" and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith("--stages-yaml="):
            return arg.split("=", 1)[1]
    for arg in args:
        if not arg.startswith("-") and arg.endswith((".yaml", ".yml")) and Path(arg).is_file():
            return arg
    return DEFAULT_STAGES_YAML


def profile_listing(stages_yaml: str | Path) -> str:
    """`in stages.yaml: tiny, local` (for help texts), or why the names cannot be listed."""
    names = profile_names(stages_yaml)
    if names is None:
        return f"profiles: {stages_yaml} not readable here"
    return f"profiles in {stages_yaml}: {', '.join(names) if names else 'none'}"


def profile_option_help(listing: str) -> str:
    """Help of a `--profile` option, with the `profile_listing`."""
    return f"profile of the stages.yaml to apply ({listing})".replace("%", "%%")


def build_parser(extend: Callable | None = None, argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The core commands (tiny, plan, train); `extend(subparsers, profiles)` adds more (the pipeline's,
    in flows/cli.py), `profiles` being the `profile_listing` of the pipeline file `argv` names (or
    ./stages.yaml), shown in the help of every --profile."""
    profiles = profile_listing(stages_yaml_named_in(argv))
    parser = argparse.ArgumentParser(
        prog="theworld", description="Train TheWorld through progressive unfreezing stages."
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version (release and code hash) and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    if extend is not None:
        extend(sub, profiles)

    tiny = sub.add_parser("tiny", help="build (once) the embedded tiny Gemma 3 and Cosmos VAE and print their folders")
    tiny.add_argument("--out", help="folder to build into (default: $THEWORLD_HOME/tiny)")
    tiny.add_argument("--json", action="store_true", help='print {"gemma": PATH, "cosmos": PATH}')
    tiny.set_defaults(func=_cmd_tiny)

    plan = sub.add_parser(
        "plan",
        help="trainable parameters and estimated memory per stage (meta device: no weights, no GPU)",
        description="Trainable parameters per component and stage, and the estimated memory of one device per "
        "stage (weights, gradients, optimizer, activations; docs/stages.md#memory), computed on the meta device. "
        "Exit status: 0; 1 when --gpu-memory is given and a stage does not fit (each such stage named on "
        "stderr, with how much it is over); 2 on bad input.",
    )
    plan.add_argument("stages", nargs="?", help="a stages.yaml (default: the four stages of docs/stages.md)")
    plan.add_argument("--profile", help=profile_option_help(profiles))
    plan.add_argument("--gemma", help="Gemma 3: hub id, model folder or config.json")
    plan.add_argument("--cosmos", help="Cosmos: hub id, folder (with vae/) or the VAE's config.json")
    plan.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (per stage: memory_gib with weights, gradients, optimizer, activations, total)",
    )
    plan.add_argument(
        "--gpu-memory",
        type=float,
        metavar="GIB",
        help="memory of one device in GiB: say which stages fit; exit 1 when one does not",
    )
    plan.add_argument(
        "--seq-len",
        metavar="TOKENS|max",
        help="tokens per sample for the activations (default: a typical sample, 400 on Gemma 3 4B; "
        "max: the model's max_seq_length)",
    )
    plan.set_defaults(func=_cmd_plan)
    train = sub.add_parser(
        "train",
        help="train one stage from a stage JSON file (e.g. configs/seed/*.json)",
        epilog="exit status: 0 trained (completed or plateaued); 1 diverged, out of memory or out of "
        "disk space; 2 bad input; 3 trained, but the stage output did not reach the hub "
        "(push_to_hub); 4 trained, but the stage output did not reach its MLflow run "
        "(rerun once the tracking server is back)",
    )
    train.add_argument("--config", required=True, help="stage config JSON (// comments and _comment keys allowed)")
    train.add_argument(
        "--fresh",
        action="store_true",
        help="ignore resume states in output_dir and start the stage afresh (default: continue the newest)",
    )
    train.add_argument("--json", action="store_true", help="print the stage result as JSON")
    train.add_argument(
        "--num-processes",
        type=int,
        help="data-parallel processes (overrides the config's num_processes): one per GPU, or CPU processes over gloo",
    )
    train.add_argument(
        "--accelerate-config", help="an accelerate config file (configs/accelerate/: ddp, fsdp, deepspeed)"
    )
    train.add_argument("--mlflow-run-id", help=argparse.SUPPRESS)  # the pipeline's child run
    train.add_argument("--global-step-offset", type=int, default=0, help=argparse.SUPPRESS)
    train.add_argument("--result-file", help=argparse.SUPPRESS)  # where rank 0 writes the StageResult
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None, extend: Callable | None = None) -> int:
    from theworld_core.logs import configure_console

    configure_console()  # one line per event; before Prefect is imported (theworld_core/logs.py)
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(extend, argv).parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input: one clear line, no traceback.
        print(f"theworld {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
