"""Orchestration overhead of the tiny pipeline and the stage-to-stage transition time.

    .venv/bin/python bench/bench_pipeline.py [--stages-yaml stages.yaml] [--profile tiny]

Runs `theworld run` once in a fresh project folder (Prefect's ephemeral API, MLflow in SQLite),
then reads from MLflow where each stage's time went (the trainer and the evaluation step log
`walltime/*` metrics on every child run) and reports:

- wall time of the whole pipeline vs the sum of the stages' training loops (target: overhead
  below 10% of the training time, i.e. of what a user would spend anyway);
- the transition time per stage: the next stage's setup (stage output download from MLflow,
  model rebuild, weights applied) plus the previous stage's final save and upload (target < 5 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages-yaml", default=str(ROOT / "stages.yaml"))
    parser.add_argument("--profile", default="tiny")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        env = {**os.environ, "THEWORLD_PROJECT_DIR": tmp, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": f"{tmp}/prefect"}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("PREFECT_API_URL", None)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "flows.cli", "run", args.stages_yaml, "--profile", args.profile],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        wall = time.perf_counter() - started
        rows = stage_timings(f"sqlite:///{tmp}/mlflow.db")

    train = sum(r["train_s"] for r in rows)
    result = {
        "wall_s": wall,
        "train_loops_s": train,
        "overhead_s": wall - train,
        "overhead_share_of_training": (wall - train) / train,
        "stages": rows,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    print("| stage | setup (download + rebuild) s | training loop s | final save + upload s | evaluation s | transition s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['setup_s']:.2f} | {r['train_s']:.2f} | {r['finish_s']:.2f} | {r['evaluate_s']:.2f} | "
              f"{r['transition_s']:.2f} |")
    print(f"\npipeline wall {wall:.1f} s; training loops {train:.1f} s; everything else {wall - train:.1f} s "
          f"({(wall - train) / train:.0%} of training)")
    print(json.dumps(result))
    return 0


def stage_timings(tracking_uri: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: r.info.start_time)
    rows, previous_finish = [], 0.0
    for run in children:
        m = run.data.metrics
        row = {
            "stage": run.data.tags.get("stage", run.info.run_name),
            "setup_s": m.get("walltime/setup_s", float("nan")),
            "train_s": m.get("walltime/train_s", 0.0),
            "finish_s": m.get("walltime/finish_s", float("nan")),
            "evaluate_s": m.get("walltime/evaluate_s", float("nan")),
        }
        # A transition: the previous stage's final save + upload, then this stage's download + rebuild.
        row["transition_s"] = previous_finish + row["setup_s"]
        previous_finish = row["finish_s"]
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
