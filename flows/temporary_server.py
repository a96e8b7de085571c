"""A Prefect API server for one `theworld run` when PREFECT_API_URL is not set.

Prefect would start the same server itself (its "ephemeral" mode: `uvicorn` on
`prefect.server.api.server:create_app`, SQLite in PREFECT_HOME) on the flow's first API call,
after importing its server package into this process (3-5 s) and then waiting for the subprocess
to import it again and migrate its database (3 s, 8-11 s on a new PREFECT_HOME). Started here
first thing, the subprocess boots on the other core while this process imports torch, MLflow and
the flow; PREFECT_API_URL then points at it, so Prefect's client never imports its server package.
It stops when the process exits (atexit, registered before Prefect's own log and event workers
register theirs, so they send their last lines first), or with it when it is killed (Linux).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("theworld.prefect")


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent_hook():
    """A `preexec_fn` for the child (Linux): SIGTERM when the `theworld run` process dies, however it
    dies. libc is loaded here, in the parent, so that the child only makes the one system call."""
    if sys.platform != "linux":
        return None
    import ctypes
    import signal

    prctl, pr_set_pdeathsig = ctypes.CDLL("libc.so.6", use_errno=True).prctl, 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGTERM)


class TemporaryPrefectServer:
    """`start()` spawns the server and sets PREFECT_API_URL (before Prefect is imported: Prefect reads
    its settings once); `wait_ready()` before the first API call; `stop()` at exit."""

    def __init__(self) -> None:
        self.port: int | None = None
        self.process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> None:
        self.port = _free_port()
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent  # without importing it
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"})
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                str(prefect_dir.parent),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent_hook(),  # noqa: PLW1509  (one system call, no locks taken in the child)
        )

    def start(self) -> str:
        atexit.register(self.stop)
        self._spawn()
        os.environ["PREFECT_API_URL"] = self.api_url
        log.info(
            "Prefect: a temporary API server on %s for this run (PREFECT_API_URL unset; set it to use a "
            "running server and keep the runs' history in its UI)",
            self.api_url,
        )
        return self.api_url

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_ready(self, timeout_s: float, meanwhile: Iterable[Callable[[], object]] = ()) -> None:
        """Return once the server answers. `meanwhile`: work the run needs later anyway, done one
        piece at a time while the server is not ready yet (what is left when it is, is left)."""
        assert self.process is not None, "start() first"
        for work in meanwhile:
            if self.process.poll() is not None or self.ready():
                break
            try:
                work()
            except Exception as error:  # noqa: BLE001  (the flow meets the same problem and reports it properly)
                log.debug("warm-up %r failed: %s", work, error)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                # (status 3 is uvicorn's start-up failure, e.g. the port taken since it was chosen; Prefect
                # has read PREFECT_API_URL by now, so another port cannot be given to it)
                raise RuntimeError(
                    f"the temporary Prefect server on {self.api_url} exited with status {code} "
                    f"before it answered (PREFECT_HOME={os.environ.get('PREFECT_HOME')}; its error "
                    "is above): run again, or set PREFECT_API_URL to a running Prefect server"
                )
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"the temporary Prefect server on {self.api_url} did not answer within {timeout_s:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
