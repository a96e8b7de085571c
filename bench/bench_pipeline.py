"""Where the tiny pipeline's time goes: first run, forced rerun, "no new data" run.

    .venv/bin/python bench/bench_pipeline.py [--stages-yaml stages.yaml] [--profile tiny] [--by-hand]

Runs `theworld run` three times in one fresh project folder (no PREFECT_API_URL: the command's
temporary Prefect server; MLflow in SQLite), as a new user would:

1. the first run (it creates the Prefect and MLflow databases and the datasets cache);
2. `--force`: every stage retrains, with the databases in place (the steady state);
3. unchanged data: "no new data", nothing trains.

For each it reads the timestamps Prefect recorded (flow run and task runs, in the project's
prefect.db) and the `walltime/*` metrics the trainer and the evaluation log on every stage run, and
reports: wall time; the stages' training loops (`walltime/train_s`: the steps with their periodic
evaluation and resume states) and the whole train tasks (model build, loop, final save and upload);
the post-stage evaluation (`walltime/evaluate_s`, wherever it ran: the training process or the
evaluate task); start-up (command start to flow run start: imports and the Prefect server); and
the rest (the other tasks, state round trips, registration, the exit). Targets: the whole four-stage pipeline within 180 s
on 2 idle cores, and its wall time within 1.3x the stages' training time.

Beside them, two references for that ratio: the flow run as Prefect records it (Running to
Completed: the pipeline without the command's start-up), and the floor any program training these
stages has, orchestrated or not: a bare Python process importing only what a stage's training needs
(torch, datasets, PIL, Gemma 3's modeling, the Wan VAE), timed apart (median of 3), added to the
training loops. `--by-hand` adds the way users train the stages today: one `theworld train` per
stage, each from the previous stage's output, in a folder of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench_env import OFFLINE_ENV, ROOT


def _env(project: str) -> dict[str, str]:
    """A new user's: everything under the project folder, offline."""
    env = {**os.environ, **OFFLINE_ENV, "THEWORLD_PROJECT_DIR": project, "PYTHONPATH": str(ROOT)}
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME"):
        env.pop(key, None)
    return env


def run_once(args, project: str, extra: list[str], log: Path) -> dict:
    started_at = time.time()
    started = time.perf_counter()
    with open(log, "ab") as out:
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", args.stages_yaml, "--profile", args.profile, *extra],
            env=_env(project),
            check=True,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=project,
        )
    return {"wall_s": time.perf_counter() - started, "started_at": started_at}


BARE_TRAINING_IMPORTS = (
    "import torch, datasets, PIL.Image, transformers.models.gemma3.modeling_gemma3, "
    "diffusers.models.autoencoders.autoencoder_kl_wan"
)


def bare_import_seconds(rounds: int = 3) -> float:
    """Median seconds of a fresh interpreter importing what a stage's training needs, and nothing else."""
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", BARE_TRAINING_IMPORTS], check=True, env={**os.environ, **OFFLINE_ENV})
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[len(seconds) // 2]


def by_hand(args, project: str, log: Path) -> dict:
    """The same stages the way users train them without the pipeline: one `theworld train` per stage,
    each starting from the previous stage's output (no evaluation, gate, registration or comparison)."""
    from theworld_core.config import load_pipeline_config

    upstream, wall = None, 0.0
    for stage in load_pipeline_config(args.stages_yaml, profile=args.profile).resolved_stages():
        config = {**stage.model_dump(mode="json"), "output_dir": str(Path(project) / "by-hand" / stage.name)}
        if upstream:
            config["resume_from_checkpoint"] = upstream
        path = Path(project) / f"{stage.name}.json"
        path.write_text(json.dumps(config))
        started = time.perf_counter()
        with open(log, "ab") as err:
            out = subprocess.run(
                [sys.executable, "-m", "theworld_core.cli", "train", "--config", str(path), "--json"],
                env=_env(project),
                check=True,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=project,
            )
        wall += time.perf_counter() - started
        upstream = json.loads(out.stdout)["stage_output"]

    loops = sum(r.data.metrics.get("walltime/train_s", 0.0) for r in all_runs(f"sqlite:///{project}/mlflow.db"))
    return {"wall_s": wall, "train_loops_s": loops, "wall_over_train_loops": wall / loops}


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def prefect_timeline(project: str) -> list[dict]:
    """Flow runs, oldest first, each with its start/end and its task runs' durations."""
    db = sqlite3.connect(Path(project) / "prefect" / "prefect.db")
    flows = db.execute("select id, name, start_time, end_time, state_name from flow_run order by start_time").fetchall()
    out = []
    for flow_id, name, start, end, state in flows:
        tasks = db.execute(
            "select name, start_time, end_time from task_run where flow_run_id = ? order by start_time", (flow_id,)
        ).fetchall()
        out.append(
            {
                "name": name,
                "state": state,
                "start": _epoch(start),
                "end": _epoch(end),
                "tasks": [(t, _epoch(e) - _epoch(s)) for t, s, e in tasks if s and e],
            }
        )
    return out


def all_runs(tracking_uri: str) -> list:
    """Every run of every experiment in the store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def stage_timings(tracking_uri: str) -> dict[str, list[dict]]:
    """Per parent run id: its stage runs' `walltime/*` metrics, oldest first."""
    children = sorted(
        (r for r in all_runs(tracking_uri) if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.start_time
    )
    by_parent: dict[str, list[dict]] = {}
    for run in children:
        m = run.data.metrics
        by_parent.setdefault(run.data.tags["mlflow.parentRunId"], []).append(
            {
                "stage": run.data.tags.get("stage", run.info.run_name),
                "setup_s": m.get("walltime/setup_s", 0.0),
                "train_s": m.get("walltime/train_s", 0.0),
                "finish_s": m.get("walltime/finish_s", 0.0),
                "evaluate_s": m.get("walltime/evaluate_s", 0.0),
                "start": run.info.start_time / 1000,
            }
        )
    return by_parent


def summarise(label: str, run: dict, flow: dict, stages: list[dict], bare_imports_s: float) -> dict:
    train_loops = sum(s["train_s"] for s in stages)
    # The post-stage evaluation's own time (`walltime/evaluate_s`), in the train task when the training
    # process ran it, else in the evaluate task: counted as evaluation either way, never as training.
    evaluation = sum(s["evaluate_s"] for s in stages)
    evaluate_tasks = sum(d for name, d in flow["tasks"] if name.startswith("evaluate-"))
    in_training = max(evaluation - evaluate_tasks, 0.0)
    train_tasks = sum(d for name, d in flow["tasks"] if name.startswith("train-")) - in_training
    startup = flow["start"] - run["started_at"]
    row = {
        "run": label,
        "state": flow["state"],
        "wall_s": run["wall_s"],
        "startup_s": startup,
        "train_loops_s": train_loops,
        "train_tasks_s": train_tasks,
        "evaluate_s": evaluation,
        "rest_s": run["wall_s"] - startup - train_tasks - max(evaluation, evaluate_tasks),
        "wall_over_train_loops": run["wall_s"] / train_loops if train_loops else None,
        "wall_over_train_tasks": run["wall_s"] / train_tasks if train_tasks else None,
        "flow_run_s": flow["end"] - flow["start"],
        "flow_run_over_train_loops": (flow["end"] - flow["start"]) / train_loops if train_loops else None,
        "floor_over_train_loops": (train_loops + bare_imports_s) / train_loops if train_loops else None,
        "tasks": flow["tasks"],
    }
    return row


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages-yaml", default=str(ROOT / "stages.yaml"))
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--log", help="console of the three runs (default: discarded with the project folder)")
    parser.add_argument(
        "--by-hand", action="store_true", help="also train the stages as one `theworld train` each (another folder)"
    )
    args = parser.parse_args()

    load_at_start = os.getloadavg()
    bare_imports_s = bare_import_seconds()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as project:
        log = Path(args.log) if args.log else Path(project) / "console.log"
        runs = [
            ("first run", run_once(args, project, [], log)),
            ("--force", run_once(args, project, ["--force"], log)),
            ("no new data", run_once(args, project, [], log)),
        ]
        flows = prefect_timeline(project)
        by_parent = stage_timings(f"sqlite:///{project}/mlflow.db")
    hand = None
    if args.by_hand:
        with tempfile.TemporaryDirectory(prefix="bench-by-hand-") as project:
            hand = by_hand(args, project, Path(args.log) if args.log else Path(project) / "console.log")
    parents = list(by_parent.values())  # the first and the forced run, oldest first
    rows = [
        summarise(label, run, flow, parents[i] if i < len(parents) else [], bare_imports_s)
        for i, ((label, run), flow) in enumerate(zip(runs, flows))
    ]

    print(
        "| run | state | wall s | start-up s | train loops s | train tasks s | evaluation s | rest s | "
        "wall / train loops | wall / train tasks | flow run / train loops | floor / train loops |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['run']} | {r['state']} | {r['wall_s']:.1f} | {r['startup_s']:.1f} | {r['train_loops_s']:.1f} | "
            f"{r['train_tasks_s']:.1f} | {r['evaluate_s']:.1f} | {r['rest_s']:.1f} | "
            f"{_ratio(r['wall_over_train_loops'])} | {_ratio(r['wall_over_train_tasks'])} | "
            f"{_ratio(r['flow_run_over_train_loops'])} | {_ratio(r['floor_over_train_loops'])} |"
        )
    if hand:
        print(
            f"| by hand (one `theworld train` a stage) | - | {hand['wall_s']:.1f} | - | {hand['train_loops_s']:.1f} "
            f"| - | - | - | {_ratio(hand['wall_over_train_loops'])} | - | - | - |"
        )
    print(f"\nbare training imports (floor): {bare_imports_s:.1f} s; flow run: Prefect's Running to Completed")
    print(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "load_average_at_start": load_at_start,
                "load_average_at_end": os.getloadavg(),
                "bare_training_imports_s": bare_imports_s,
                "runs": rows,
                "by_hand": hand,
                "stages": parents,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
