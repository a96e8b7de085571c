"""The compose stack's servers on PostgreSQL, end to end, without Docker.

The Prefect server and the MLflow server run as docker/compose.yaml configures them: Prefect on
`postgresql+asyncpg` (the database given as parts), MLflow on `postgresql+psycopg` with one worker,
no job runner, proxied artifacts and the `basic-auth` app (its users in the same Postgres database,
the settings from docker/mlflow/basic_auth.ini), both with basic auth. Each server migrates its
schema on start. Against them, `theworld serve` serves `multistage/full` on a two-stage tiny
pipeline and `prefect deployment run` fires two runs at once.

Both databases are created for this test under unique names in the PostgreSQL on 127.0.0.1:5432
(trust auth) and dropped at the end; without that PostgreSQL the test is skipped. Every process
runs in its own process group and is stopped by that group's id (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import configparser
import contextlib
import json
import secrets
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from servers import (  # noqa: E402
    LOCALHOST,
    Server,
    _base_env,
    _bin,
    free_port,
    prefect_server_spec,
    start_theworld,
    stop_process_group,
)
from test_deploy import base_env, deployment_run, far_cron, make_images, pipeline_doc, tail  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PG_HOST, PG_PORT, PG_USER = LOCALHOST, 5432, "postgres"
ADMIN_DSN = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=test connect_timeout=3"


# --- PostgreSQL -------------------------------------------------------------------------------------


def _admin_connection():
    psycopg = pytest.importorskip("psycopg", reason="psycopg (the `server` extra) is needed to reach PostgreSQL")
    try:
        return psycopg.connect(ADMIN_DSN, autocommit=True)
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL on {PG_HOST}:{PG_PORT}: {str(exc).strip()[:200]}")


def query(dbname: str, sql: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={dbname} connect_timeout=5") as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture
def pg_databases():
    """Two fresh databases (Prefect's and MLflow's), dropped (with any session left on them) afterwards."""
    pytest.importorskip("asyncpg", reason="asyncpg (the Prefect server's Postgres driver) is needed")
    pytest.importorskip("flask_wtf", reason="mlflow[auth] (the `server` extra) is needed for --app-name basic-auth")
    conn = _admin_connection()
    stem = f"theworld_pg_{uuid.uuid4().hex[:10]}"
    names = {"prefect": f"{stem}_prefect", "mlflow": f"{stem}_mlflow"}
    try:
        for name in names.values():
            conn.execute(f'CREATE DATABASE "{name}"')
        yield names
    finally:
        for name in names.values():
            with contextlib.suppress(Exception):
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


# --- the servers, as compose.yaml runs them ------------------------------------------------------------


def prefect_on_postgres(root: Path, dbname: str, auth_string: str) -> Server:
    """`prefect server start` on Postgres through asyncpg, the database as parts, basic auth on the API."""
    spec = prefect_server_spec(root)
    spec.env.update(
        {
            "PREFECT_SERVER_DATABASE_DRIVER": "postgresql+asyncpg",
            "PREFECT_SERVER_DATABASE_HOST": PG_HOST,
            "PREFECT_SERVER_DATABASE_PORT": str(PG_PORT),
            "PREFECT_SERVER_DATABASE_NAME": dbname,
            "PREFECT_SERVER_DATABASE_USER": PG_USER,
            "PREFECT_SERVER_DATABASE_PASSWORD": "unused-trust-auth",
            "PREFECT_SERVER_API_AUTH_STRING": auth_string,
            # an enqueued run retries its concurrency slot every 2 s (as in test_deploy)
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        }
    )
    return spec


def mlflow_on_postgres(root: Path, dbname: str, admin_password: str) -> Server:
    """`mlflow server` as the compose service: --workers 1, basic-auth app with its users on Postgres,
    proxied artifacts, allowed hosts, no job runner, backend `postgresql+psycopg://`."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{dbname}"
    # the stack's own auth settings, pointed at this test's database
    ini = configparser.ConfigParser()
    ini.read(REPO / "docker" / "mlflow" / "basic_auth.ini")
    assert ini["mlflow"]["database_uri"].startswith("postgresql+psycopg://"), dict(ini["mlflow"])
    ini["mlflow"]["database_uri"] = uri
    auth_ini = root / "basic_auth.ini"
    with open(auth_ini, "w") as out:
        ini.write(out)
    cmd = [
        _bin("mlflow"),
        "server",
        f"--host={LOCALHOST}",
        f"--port={port}",
        "--workers=1",
        "--app-name=basic-auth",
        "--serve-artifacts",
        f"--artifacts-destination={root / 'artifacts'}",
        f"--backend-store-uri={uri}",
        f"--allowed-hosts={LOCALHOST}:{port},localhost:{port}",
    ]
    env = _base_env(
        {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(24),
        }
    )
    url = f"http://{LOCALHOST}:{port}"
    return Server("mlflow", url, f"{url}/health", port, cmd, env, root, root / "mlflow-server.log")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


class AuthedPrefect:
    """A synchronous Prefect client with the API URL and auth string of the test's server."""

    def __init__(self, url: str, auth_string: str):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

        self._settings = temporary_settings(updates={PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: auth_string})
        self._settings.__enter__()
        self._client_cm = get_client(sync_client=True)
        self.client = self._client_cm.__enter__()

    def close(self) -> None:
        self._client_cm.__exit__(None, None, None)
        self._settings.__exit__(None, None, None)

    def wait_final(self, run_id: str, timeout: float, log: Path):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            flow_run = self.client.read_flow_run(uuid.UUID(run_id))
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            time.sleep(0.5)
        raise AssertionError(f"flow run {run_id} not final after {timeout} s:\n{tail(log)}")

    def state_names(self, run_id: str) -> list[str]:
        return [s.name for s in self.client.read_flow_run_states(uuid.UUID(run_id))]


# --- the test ------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_stack_on_postgres_serves_two_overlapping_runs(pg_databases, tmp_path, monkeypatch):
    """Both servers on Postgres with basic auth; `theworld serve` + two `prefect deployment run` at
    once: the concurrency limit (1, ENQUEUE) makes the second wait for the first, which trains and
    registers the champion; the second then finds the same data and config already trained and ends
    with "no new data". MLflow's and Prefect's rows are read back from Postgres directly."""
    from theworld_core.model.tiny import ensure_tiny_models

    timings: dict[str, float] = {}
    auth_string = f"admin:{secrets.token_hex(16)}"
    mlflow_password = secrets.token_hex(16)
    start = time.monotonic()
    prefect_srv = prefect_on_postgres(tmp_path / "prefect-server", pg_databases["prefect"], auth_string)
    mlflow_srv = mlflow_on_postgres(tmp_path / "mlflow-server", pg_databases["mlflow"], mlflow_password)
    serve = None
    prefect = None
    try:
        prefect_srv.launch()
        mlflow_srv.launch()
        # while the servers migrate: the tiny models, the images and the pipeline file
        theworld_home = tmp_path / "theworld-home"
        ensure_tiny_models(theworld_home / "tiny")
        images = tmp_path / "images"
        rows = make_images(images, 0, 96)
        (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        experiment = f"pg-stack-{uuid.uuid4().hex[:6]}"
        doc = pipeline_doc(images, tmp_path / "stages", experiment, far_cron())
        doc["profiles"]["tiny"]["defaults"].update(max_steps=15, eval_steps=15, save_steps=15)
        doc["profiles"]["tiny"]["eval_task_samples"] = 4
        stages_yaml = tmp_path / "pipeline.yaml"
        stages_yaml.write_text(yaml.safe_dump(doc, sort_keys=False))

        prefect_srv.wait_healthy(180)
        mlflow_srv.wait_healthy(180)
        timings["servers up (migrated)"] = time.monotonic() - start

        # basic auth is on: no credentials, no API (health stays open)
        assert http_status(f"{prefect_srv.url}/admin/version") == 401, "Prefect API open without credentials"
        assert http_status(f"{mlflow_srv.url}/api/2.0/mlflow/experiments/search?max_results=1") == 401, (
            "MLflow API open"
        )

        env = base_env(
            PREFECT_API_URL=prefect_srv.url,
            PREFECT_API_AUTH_STRING=auth_string,
            PREFECT_HOME=str(tmp_path / "prefect-home"),
            PREFECT_RUNNER_POLL_FREQUENCY="1",
            PREFECT_RUNNER_HEARTBEAT_FREQUENCY="30",
            MLFLOW_TRACKING_URI=mlflow_srv.url,
            MLFLOW_TRACKING_USERNAME="admin",
            MLFLOW_TRACKING_PASSWORD=mlflow_password,
            THEWORLD_PROJECT_DIR=str(tmp_path / "project"),
            THEWORLD_HOME=str(theworld_home),
        )
        log = tmp_path / "serve.log"
        serve = start_theworld(["serve", str(stages_yaml), "--profile", "tiny"], env, tmp_path, log)
        prefect = AuthedPrefect(prefect_srv.url, auth_string)
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None:
            assert serve.poll() is None, f"theworld serve exited {serve.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"multistage/full never appeared:\n{tail(log)}"
            try:
                deployment = prefect.client.read_deployment_by_name("multistage/full")
            except Exception:  # noqa: BLE001 - ObjectNotFound until serve has registered it
                time.sleep(0.5)
        assert deployment.global_concurrency_limit.limit == 1
        assert deployment.concurrency_options.collision_strategy.value == "ENQUEUE"

        # two runs at once
        t0 = time.monotonic()
        fired = [deployment_run(env, tmp_path), deployment_run(env, tmp_path)]
        runs = {r: prefect.wait_final(r, 300, log) for r in fired}
        timings["two overlapping runs"] = time.monotonic() - t0
        assert all(fr.state.is_completed() for fr in runs.values()), (
            f"{[fr.state for fr in runs.values()]}:\n{tail(log)}"
        )
        earlier, later = sorted(runs.values(), key=lambda fr: fr.start_time)
        assert later.start_time >= earlier.end_time, (earlier.start_time, earlier.end_time, later.start_time)
        assert "AwaitingConcurrencySlot" in prefect.state_names(str(later.id))
        assert not (earlier.state.message or "").startswith("no new data"), earlier.state
        assert (later.state.message or "").startswith("no new data"), later.state

        # MLflow through the authenticated API: one pipeline run (the earlier flow run), the champion
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            monkeypatch.setenv(key, env[key])
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_srv.url, registry_uri=mlflow_srv.url)
        exp = client.get_experiment_by_name(experiment)
        parents = client.search_runs([exp.experiment_id], filter_string="tags.run_kind = 'pipeline'")
        assert [(p.data.tags["prefect_flow_run_id"], p.info.status) for p in parents] == [(str(earlier.id), "FINISHED")]
        assert parents[0].info.run_id in later.state.message
        champion = client.get_model_version_by_alias(f"{experiment}-model", "champion")
        assert champion.run_id, champion
        assert (tmp_path / "mlflow-server" / "artifacts").is_dir() and any(
            (tmp_path / "mlflow-server" / "artifacts").rglob("model.safetensors")
        ), "no stage output in the server's artifacts destination"

        # ... and the rows are really in Postgres
        mdb = pg_databases["mlflow"]
        assert query(mdb, "SELECT count(*) FROM runs")[0][0] >= 3  # the pipeline run and its two stage runs
        pipeline_rows = query(
            mdb,
            "SELECT r.run_uuid, r.status FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'run_kind' AND t.value = 'pipeline'",
        )
        assert pipeline_rows == [(parents[0].info.run_id, "FINISHED")]
        aliases = query(
            mdb, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", (f"{experiment}-model",)
        )
        assert aliases == [("champion", int(champion.version))]
        assert query(mdb, "SELECT count(*) FROM users WHERE username = 'admin' AND is_admin")[0][0] == 1
        assert query(mdb, "SELECT count(*) FROM alembic_version_auth")[0][0] == 1
        pdb = pg_databases["prefect"]
        flow_rows = dict(
            query(pdb, "SELECT id::text, state_name FROM flow_run WHERE deployment_id = %s", (deployment.id,))
        )
        # the earlier run trained (Completed); the later found no new data (Completed, named Skipped)
        assert {r: flow_rows.get(r) for r in fired} == {str(earlier.id): "Completed", str(later.id): "Skipped"}, (
            flow_rows
        )
    finally:
        if prefect is not None:
            prefect.close()
        if serve is not None:
            stop_process_group(serve, grace=10)
        mlflow_srv.stop()
        prefect_srv.stop()
        print("timings (s):", {k: round(v, 1) for k, v in timings.items()})
