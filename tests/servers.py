"""Real MLflow and Prefect servers on 127.0.0.1 for the pipeline tests, and helpers to run the CLI
against them.

Each server is started in its own process group (`start_new_session=True`) on a free port, waited
for on its health endpoint, and stopped by process-group id: SIGTERM, a grace period, then SIGKILL.
Nothing here talks to anything but 127.0.0.1.

Fixtures (session-scoped; import them into a test module or `conftest.py`):

- `launched_servers`: both servers started side by side, not yet waited for (ask for it first to
  overlap their start-up with other slow set-up)
- `mlflow_server` -> `Server` (`.url` is the tracking URI), healthy
- `prefect_server` -> `Server` (`.url` is the API URL, ending in `/api`), healthy

`Server.ensure_running()` restarts a server that something outside the tests stopped (same port,
same stores).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
LOCALHOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((LOCALHOST, 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    candidate = VENV_BIN / name
    return str(candidate) if candidate.exists() else name


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> int | None:
    """Stop `proc` and everything in its process group: SIGTERM, wait `grace` s, then SIGKILL.

    `proc` must have been started with `start_new_session=True` (its pid is its group id)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # children may outlive the leader: the group gets a SIGKILL in any case
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    return proc.returncode


def kill_process_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`'s whole process group at once (a crash, no clean-up) and reap the leader."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_http_ok(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    """Poll `url` until it answers 200; fail with the server's log when it exits or times out."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} was healthy:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
                last = f"HTTP {response.status}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = repr(exc)
        time.sleep(0.3)
    raise RuntimeError(f"{url} not healthy after {timeout:.0f} s (last: {last}):\n{_tail(log)}")


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


@dataclass
class Server:
    """A server process (its own process group) and how to reach and restart it."""

    name: str
    url: str
    health_url: str
    port: int
    cmd: list[str]
    env: dict[str, str]
    root: Path
    log: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0

    def launch(self) -> Server:
        """Start the process (does not wait for it to be healthy)."""
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=self.root,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def wait_healthy(self, timeout: float = 120.0) -> Server:
        assert self.proc is not None, "launch() first"
        try:
            wait_http_ok(self.health_url, self.proc, self.log, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(self.health_url, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def ensure_running(self, timeout: float = 120.0) -> Server:
        """Restart the server (same port, same stores) when something outside the tests stopped it."""
        if self.alive():
            return self
        import warnings

        warnings.warn(
            f"{self.name} server at {self.url} was not running (exit {self.proc and self.proc.poll()}); "
            f"restarting it on the same stores. Its log:\n{self.log_tail(1500)}",
            stacklevel=2,
        )
        if self.proc is not None:
            self.stop()
        self.restarts += 1
        return self.launch().wait_healthy(timeout)

    def stop(self) -> int | None:
        return stop_process_group(self.proc) if self.proc is not None else None

    def log_tail(self, chars: int = 4000) -> str:
        return _tail(self.log, chars)


def _base_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(
        {
            "DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
    )
    env.update(extra)
    return env


def mlflow_server_spec(root: Path) -> Server:
    """`mlflow server` with one worker, no job runner, SQLite backend and proxied artifacts under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        _bin("mlflow"),
        "server",
        "--host",
        LOCALHOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    url = f"http://{LOCALHOST}:{port}"
    env = _base_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    return Server("mlflow", url, f"{url}/health", port, cmd, env, root, root / "mlflow-server.log")


def prefect_server_spec(root: Path) -> Server:
    """`prefect server start` with its own PREFECT_HOME (its SQLite database in it), no UI, no analytics."""
    home = root / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [_bin("prefect"), "server", "start", "--host", LOCALHOST, "--port", str(port), "--no-ui", "--analytics-off"]
    env = _base_env(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_UI_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
        }
    )
    url = f"http://{LOCALHOST}:{port}/api"
    return Server("prefect", url, f"{url}/health", port, cmd, env, root, root / "prefect-server.log")


def start_mlflow_server(root: Path, timeout: float = 120.0) -> Server:
    return mlflow_server_spec(root).launch().wait_healthy(timeout)


def start_prefect_server(root: Path, timeout: float = 120.0) -> Server:
    return prefect_server_spec(root).launch().wait_healthy(timeout)


@pytest.fixture(scope="session")
def launched_servers(tmp_path_factory):
    """Both servers started side by side (not yet waited for); stopped at the end of the session."""
    servers = {
        "mlflow": mlflow_server_spec(tmp_path_factory.mktemp("mlflow-server")),
        "prefect": prefect_server_spec(tmp_path_factory.mktemp("prefect-server")),
    }
    try:
        for server in servers.values():
            server.launch()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="session")
def mlflow_server(launched_servers) -> Server:
    """A real MLflow tracking server (SQLite + proxied artifacts) for the whole test session."""
    return launched_servers["mlflow"].wait_healthy()


@pytest.fixture(scope="session")
def prefect_server(launched_servers) -> Server:
    """A real Prefect API server for the whole test session."""
    return launched_servers["prefect"].wait_healthy()


# --- running the CLI against the servers ---------------------------------------------------------


def client_env(
    *,
    mlflow: Server,
    prefect: Server,
    project_dir: Path,
    prefect_home: Path,
    theworld_home: Path | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment of a `theworld run` client process: the two servers, offline Hugging Face, its own
    project folder and its own PREFECT_HOME (so Prefect's task cache records and results, under
    `PREFECT_LOCAL_STORAGE_PATH`, belong to this client alone)."""
    prefect_home.mkdir(parents=True, exist_ok=True)
    project_dir.mkdir(parents=True, exist_ok=True)
    env = _base_env(
        {
            "PREFECT_API_URL": prefect.url,
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_LOCAL_STORAGE_PATH": str(prefect_home / "storage"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": mlflow.url,
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "THEWORLD_PROJECT_DIR": str(project_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )
    if theworld_home is not None:
        env["THEWORLD_HOME"] = str(theworld_home)
    env.update(extra or {})
    return env


def theworld_command(*args: str) -> list[str]:
    exe = VENV_BIN / "theworld"
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "flows.cli", *args]


def start_theworld(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start `theworld ARGS` in its own process group, output to `log`."""
    out = open(log, "ab")  # noqa: SIM115 - closed with the process by the caller's wait
    try:
        return subprocess.Popen(
            theworld_command(*args),
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        out.close()


@dataclass
class CliResult:
    returncode: int
    output: str
    seconds: float


def run_theworld(args: list[str], env: dict[str, str], cwd: Path, log: Path, timeout: float = 300.0) -> CliResult:
    """Run `theworld ARGS` to its end (killing its process group on timeout)."""
    start = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    proc = start_theworld(args, env, cwd, log)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc, grace=5)
        raise AssertionError(f"theworld {' '.join(args)} ran over {timeout:.0f} s:\n{_tail(log, 6000)}") from None
    finally:
        if proc.poll() is None:
            stop_process_group(proc, grace=5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # nothing of it may linger
    output = log.read_bytes()[offset:].decode(errors="replace")
    return CliResult(proc.returncode, output, time.monotonic() - start)
