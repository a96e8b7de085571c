"""The served deployment's latency: `prefect deployment run` -> first training step, and the
"no new data" rerun's wall time (tiny profile, CPU).

    .venv/bin/python bench/bench_deploy.py                 # 3 training runs, 3 no-new-data reruns
    .venv/bin/python bench/bench_deploy.py --write         # and write the section of bench/RESULTS.md

Set-up (not timed): a Prefect server on a free 127.0.0.1 port (own PREFECT_HOME), MLflow on a SQLite
store, a local image folder of 96 tiny images, a two-stage pipeline (the tiny profile's models,
20 steps a stage, `logging_steps: 1`), and `theworld serve` with `PREFECT_RUNNER_POLL_FREQUENCY=1`.
A first run warms the caches (tiny models, data table, MLflow schema) and is reported apart.

Each training run: one image is added to the folder (new data, so the run trains), then
`prefect deployment run multistage/full` is invoked; the clock starts just before the CLI starts.
Points on the way (all on this machine's clock):
- `created`: the CLI has created the flow run (its own start-up is most of this);
- `running`: the flow run's start time in Prefect (the served runner picked it up and started the
  flow-run process);
- `stage 1`: the stage-1 MLflow child run started (data fingerprinted, "new data?" checked);
- `first step`: the first `train/loss` point of stage 1 (step 1: model loaded, first optimizer step);
- `done`: the flow run's end time.
"No new data" reruns: `prefect deployment run` right after a completed run with unchanged data,
wall time from invoking the CLI until the client sees the flow run Completed (polled every 0.2 s),
and Prefect's own run time of the flow run.

Prints a Markdown table and one JSON line (prefixed `JSON `).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SECTION = "## Deployment (tiny profile, CPU)"


def free_port() -> int:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen, grace: float = 10) -> None:
    """SIGTERM the process group, then SIGKILL it (`theworld serve` ignores a single SIGTERM)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def env_for(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        {
            "DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def pipeline_doc(images: Path, output_root: Path) -> dict:
    return {
        "model": {
            "model_name": "tiny",
            "cosmos_model_name": "tiny",
            "world_tokens": 4,
            "world_image_size": 32,
            "max_seq_length": 128,
        },
        "data": {"dataset_name": str(images), "streaming": False, "eval_fraction": 0.1},
        "defaults": {
            "batch_size": 8,
            "gradient_accumulation_steps": 1,
            "max_steps": 20,
            "eval_steps": 10,
            "save_steps": 10,
            "logging_steps": 1,
            "mixed_precision": "no",
            "eval_max_samples": 8,
            "divergence_grad_norm": None,
            "warmup_steps": 5,
        },
        "stages": [
            {"name": "projection", "learning_rate": 3.0e-2},
            {"name": "vision", "freeze_gemma_vision": False, "learning_rate": 5.0e-3},
        ],
        "plateau": {"window_steps": 10, "patience_steps": 10, "min_steps": 10},
        "gate": {"regression_tolerance": 10.0, "diverged_warmup_steps": 10},
        "schedule": {"cron": None, "only_on_new_data": True, "warm_start_from_champion": False},
        "mlflow": {"experiment": "bench-deploy", "registered_model": "bench-deploy", "log_system_metrics": False},
        "output_root": str(output_root),
        "eval_generations": 1,
        "eval_task_samples": 2,
        "profiles": {"tiny": {}},
    }


def add_image(images: Path, index: int, caption: str | None = None) -> None:
    from theworld_core.data.add import add_images
    from theworld_core.data.synthetic import render_png, shape_spec

    spec = shape_spec(11, index)
    src = images.parent / "incoming" / f"shape{index:04d}.png"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(render_png(spec, 32))
    add_images([str(src)], images, caption=caption or spec.caption)


def deployment_run(env: dict[str, str], cwd: Path) -> str:
    out = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "multistage/full"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", out.stdout)
    if out.returncode != 0 or not found:
        raise RuntimeError(out.stdout + out.stderr)
    return found.group(1)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    mem = next(
        (
            int(line.split()[1]) / 2**20
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}, no GPU used"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="timed training runs (after one warm-up run)")
    parser.add_argument("--reruns", type=int, default=3, help='"no new data" reruns')
    parser.add_argument("--write", action="store_true", help=f"write the section '{SECTION}' of bench/RESULTS.md")
    args = parser.parse_args()

    for key, value in env_for().items():
        os.environ.setdefault(key, value)
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    images, port = root / "images", free_port()
    from theworld_core.data.synthetic import render_png, shape_spec

    images.mkdir()
    rows = []
    for index in range(96):
        spec = shape_spec(11, index)
        (images / f"shape{index:04d}.png").write_bytes(render_png(spec, 32))
        rows.append({"file_name": f"shape{index:04d}.png", "text": spec.caption})
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import yaml

    stages_yaml = root / "pipeline.yaml"
    stages_yaml.write_text(yaml.safe_dump(pipeline_doc(images, root / "stages"), sort_keys=False))
    api = f"http://127.0.0.1:{port}/api"
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    (root / "server-home").mkdir()
    server = subprocess.Popen(
        [
            str(BIN / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-ui",
            "--analytics-off",
        ],
        cwd=root,
        start_new_session=True,
        env=env_for(PREFECT_HOME=str(root / "server-home"), PREFECT_SERVER_UI_ENABLED="false"),
        stdout=open(root / "server.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    client_env = env_for(
        PREFECT_API_URL=api,
        PREFECT_HOME=str(root / "client-home"),
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        MLFLOW_TRACKING_URI=tracking,
        THEWORLD_PROJECT_DIR=str(root / "project"),
    )
    serve = None
    load_start = os.getloadavg()
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(api + "/health", timeout=2).status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("Prefect server did not start:\n" + (root / "server.log").read_text()[-3000:])
            time.sleep(0.3)
        serve = subprocess.Popen(
            [str(BIN / "theworld"), "serve", str(stages_yaml), "--profile", "tiny"],
            cwd=root,
            env=client_env,
            start_new_session=True,
            stdout=open(root / "serve.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        os.environ["MLFLOW_TRACKING_URI"] = tracking
        from mlflow.tracking import MlflowClient

        mlflow = MlflowClient(tracking_uri=tracking)
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as prefect:
            deadline = time.monotonic() + 180
            while True:
                try:
                    prefect.read_deployment_by_name("multistage/full")
                    break
                except Exception:  # noqa: BLE001 - not registered yet
                    if time.monotonic() > deadline or serve.poll() is not None:
                        raise RuntimeError(
                            "theworld serve did not register the deployment:\n"
                            + (root / "serve.log").read_text()[-3000:]
                        ) from None
                    time.sleep(0.5)

            def wait(run_id: str, timeout: float = 600):
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    flow_run = prefect.read_flow_run(uuid.UUID(run_id))
                    if flow_run.state and flow_run.state.is_final():
                        if not flow_run.state.is_completed():
                            raise RuntimeError(f"{flow_run.state}\n" + (root / "serve.log").read_text()[-4000:])
                        return flow_run, time.time()
                    time.sleep(0.2)
                raise RuntimeError(f"flow run {run_id} did not finish")

            def training_run(index: int) -> dict[str, float]:
                add_image(images, 1000 + index)
                t0 = time.time()
                run_id = deployment_run(client_env, root)
                created = time.time()
                flow_run, _ = wait(run_id)
                experiment = mlflow.get_experiment_by_name("bench-deploy").experiment_id
                parent = mlflow.search_runs(
                    [experiment],
                    filter_string=(f"tags.prefect_flow_run_id = '{run_id}' and tags.run_kind = 'pipeline'"),
                )[0]
                child = mlflow.search_runs(
                    [experiment],
                    filter_string=(f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.stage = 'projection'"),
                )[0]
                first = min(m.timestamp for m in mlflow.get_metric_history(child.info.run_id, "train/loss")) / 1000
                return {
                    "created": created - t0,
                    "running": flow_run.start_time.timestamp() - t0,
                    "stage 1": child.info.start_time / 1000 - t0,
                    "first step": first - t0,
                    "done": flow_run.end_time.timestamp() - t0,
                }

            def rerun() -> dict[str, float]:
                t0 = time.time()
                run_id = deployment_run(client_env, root)
                flow_run, seen = wait(run_id)
                if not (flow_run.state.message or "").startswith("no new data"):
                    raise RuntimeError(f"expected 'no new data', got {flow_run.state}")
                return {
                    "wall": seen - t0,
                    "prefect run time": flow_run.total_run_time.total_seconds(),
                    "start to end": (flow_run.end_time - flow_run.start_time).total_seconds(),
                }

            warmup = training_run(0)
            runs = [training_run(i + 1) for i in range(args.runs)]
            reruns = [rerun() for _ in range(args.reruns)]
    finally:
        if serve is not None:
            stop(serve)
        stop(server)
    load_end = os.getloadavg()

    def med(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} s" + (
            f" ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else ""
        )

    keys = ["created", "running", "stage 1", "first step", "done"]
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION,
        "",
        f"`bench/bench_deploy.py --runs {args.runs} --reruns {args.reruns}` on {date}: {machine()}; load average "
        f"{load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end. "
        "`theworld serve` (runner polling every 1 s) against a local Prefect server, MLflow on SQLite, a two-stage "
        "pipeline on the tiny models (20 steps a stage, batch 8) over a 96-image local folder; every timed run "
        "first adds one image so that it trains. Seconds from invoking `prefect deployment run multistage/full`; "
        "median (min-max) of the timed runs, the warm-up run (first flow run of the server and store) apart.",
        "",
        "| point | timed runs | warm-up run |",
        "|---|---:|---:|",
    ]
    labels = {
        "created": "flow run created (the CLI's start-up)",
        "running": "flow run Running (runner picked it up)",
        "stage 1": "stage 1 MLflow run started (fingerprint + new-data check done)",
        "first step": "**first training step** (first `train/loss`, step 1)",
        "done": "flow run Completed (2 stages)",
    }
    for key in keys:
        lines.append(f"| {labels[key]} | {med([r[key] for r in runs])} | {warmup[key]:.1f} s |")
    lines += [
        "",
        f'"No new data" rerun (unchanged data, {args.reruns} reruns): **{med([r["wall"] for r in reruns])}** from invoking '
        f"`prefect deployment run` until the client sees it Completed; the flow run itself "
        f"{med([r['start to end'] for r in reruns])} from Running to Completed (data fingerprint, one MLflow search, "
        "the markdown artifact).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    print(
        "JSON "
        + json.dumps(
            {
                "date": date,
                "machine": machine(),
                "load": [load_start[0], load_end[0]],
                "warmup": warmup,
                "runs": runs,
                "reruns": reruns,
            }
        )
    )
    if args.write:
        results = REPO / "bench" / "RESULTS.md"
        old = results.read_text() if results.exists() else "# Benchmark results\n"
        pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
        new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
        results.write_text(new if new.endswith("\n") else new + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
