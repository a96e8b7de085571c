"""`theworld ...`: the command line. Each command is a thin call into the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    from theworld_core.model.plan import format_plan, plan

    overrides = {k: v for k, v in {"model_name": args.gemma, "cosmos_model_name": args.cosmos}.items() if v}
    stages = None
    if args.stages:
        from theworld_core.config import load_pipeline_config

        pipeline = load_pipeline_config(args.stages, profile=args.profile)
        stages = {s.name: s.freeze_flags for s in pipeline.resolved_stages()}
        overrides = {**pipeline.model.model_dump(include={"model_name", "cosmos_model_name"}), **overrides}
    result = plan(ModelConfig(**overrides), stages)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _cmd_train(args) -> int:
    from theworld_core.config import load_stage_config
    from theworld_core.training.trainer import train_stage

    cfg = load_stage_config(args.config)
    result = train_stage(cfg, fresh=args.fresh)
    print(json.dumps(result.to_dict(), indent=2) if args.json else
          f"{result.status}: {result.reason}\nstage output: {result.stage_output}\nMLflow run: {result.mlflow_run_id}")
    return 0 if result.status in ("completed", "plateaued") else 1


def _prefect_env() -> None:
    """Local defaults for Prefect before it is imported: state under the project folder, no telemetry.

    `PREFECT_API_URL`, when set, wins (a real server); otherwise the flow starts Prefect's
    ephemeral API on SQLite in PREFECT_HOME.
    """
    import os

    from theworld_core.tracking.mlflow_runs import project_dir

    os.environ.setdefault("PREFECT_HOME", str(project_dir() / "prefect"))
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
    result = multistage(stages_yaml=str(Path(args.stages_yaml).resolve()), profile=args.profile)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="theworld", description="Train TheWorld through progressive unfreezing stages.")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny", help="build (once) the embedded tiny Gemma 3 and Cosmos VAE and print their folders")
    tiny.add_argument("--out", help="folder to build into (default: $THEWORLD_HOME/tiny)")
    tiny.add_argument("--json", action="store_true", help='print {"gemma": PATH, "cosmos": PATH}')
    tiny.set_defaults(func=_cmd_tiny)

    plan = sub.add_parser("plan", help="trainable parameters per component and stage (meta device: no weights, no GPU)")
    plan.add_argument("stages", nargs="?", help="a stages.yaml (default: the seed's four stages)")
    plan.add_argument("--profile", help="profile of the stages.yaml to apply")
    plan.add_argument("--gemma", help="Gemma 3: hub id, model folder or config.json")
    plan.add_argument("--cosmos", help="Cosmos: hub id, folder (with vae/) or the VAE's config.json")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=_cmd_plan)
    run = sub.add_parser("run", help="run the multistage pipeline (Prefect flow, MLflow tracking)")
    run.add_argument("stages_yaml", nargs="?", default="stages.yaml", help="pipeline config (default ./stages.yaml)")
    run.add_argument("--profile", help="profile of the stages.yaml to apply, e.g. tiny")
    run.set_defaults(func=_cmd_run)

    train = sub.add_parser("train", help="train one stage from a stage config (the seed's JSON files as written)")
    train.add_argument("--config", required=True, help="stage config JSON (// comments and _comment keys allowed)")
    train.add_argument("--fresh", action="store_true",
                       help="ignore resume states in output_dir and start the stage afresh (default: continue the newest)")
    train.add_argument("--json", action="store_true", help="print the stage result as JSON")
    train.set_defaults(func=_cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input: one clear line, no traceback.
        print(f"theworld {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
