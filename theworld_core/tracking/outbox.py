"""A stage's MLflow records, delivered without making training wait on the tracking server.

Every record (params, metrics, tags, the stage output folder, the run's end) is first appended to
`OUTPUT_DIR/tracking-outbox.jsonl`; a background thread sends them to MLflow in order. While the
server cannot be reached the records wait on disk and the thread retries (every 2 s, doubling up
to 30 s), so they arrive when the server returns. What is still undelivered when the stage ends
stays in the file and is sent by the next run in that output folder (`theworld train` again, or
the pipeline's rerun), to the runs the records name. `tracking-outbox.sent` holds the number of the
last record delivered; both files are removed whenever everything is delivered.

A record MLflow refuses (HTTP 4xx: a changed param, a deleted run, a stage output folder that is
gone) is dropped and named in the report; any other failure (connection refused, timeout, 5xx) is
retried.

When the outbox's files cannot be written (a full disk), training still goes on: the records are
kept in memory and sent as usual; only what is undelivered when the process ends is lost, and the
report says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("theworld.tracking")

OUTBOX_FILE = "tracking-outbox.jsonl"
SENT_FILE = "tracking-outbox.sent"
RETRY_FIRST_S = 2.0
RETRY_MAX_S = 30.0
MAX_METRICS_PER_CALL = 1000  # MLflow's log_batch limit


@dataclass(frozen=True)
class TrackingReport:
    """What reached MLflow when the outbox closed."""

    complete: bool
    pending: int
    """Records left in the outbox file (sent by the next run in this output folder)."""
    dropped: int
    """Records MLflow refused (never retried)."""
    issue: str | None
    """Plain words: why tracking is incomplete (None when complete)."""
    stage_output_missing: bool
    """A stage output folder has not reached its run (waiting, or refused)."""


class TrackingOutbox:
    """The outbox of one output folder: `put` appends a record and returns at once; a thread sends."""

    def __init__(self, folder: str | os.PathLike[str]):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path, self.sent_path = self.folder / OUTBOX_FILE, self.folder / SENT_FILE
        self._sent_tmp = self.sent_path.with_suffix(".sent.tmp")
        self._cond = threading.Condition()
        self._queue: list[dict[str, Any]] = self._load_backlog()
        self._seq = max((e["seq"] for e in self._queue), default=self._read_sent())
        self.replayed = len(self._queue)
        self._closing = False  # close() was called: no new attempt starts
        self._failures = 0  # failed delivery attempts so far
        self._retry_now = False  # flush() asks a sender that backs off to try again now
        self.last_error: str | None = None
        self.dropped: list[str] = []
        self.unwritable: str | None = None
        """Why the outbox's files could not be written (records then live in memory only), or None."""
        if self._queue:
            runs = sorted({e["run"] for e in self._queue})
            log.info(
                "tracking outbox %s: %d record(s) of run(s) %s were not delivered before; sending them now",
                self.path,
                len(self._queue),
                ", ".join(runs),
            )
            for run in runs:  # after its backlog: the run says it is whole again
                self.put(
                    run,
                    "batch",
                    tags={
                        "tracking_status": "complete",
                        "tracking_issue": f"outbox replayed {time.strftime('%Y-%m-%d %H:%M:%S')}",
                    },
                )
        self._thread = threading.Thread(target=self._send_loop, name="theworld-tracking-outbox", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ writing

    def put(self, run_id: str, op: str, **fields: Any) -> None:
        """Append one record (op: batch | inputs | artifacts | end) for `run_id`; the thread sends it."""
        with self._cond:
            self._seq += 1
            entry = {"seq": self._seq, "run": run_id, "op": op, **fields}
            if self.unwritable is None:  # after a failed append the file's last line may be cut: stop there
                with self._writing_files(), open(self.path, "a") as out:
                    out.write(json.dumps(entry) + "\n")
            self._queue.append(entry)
            self._cond.notify_all()

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int) -> None:
        stamp = int(time.time() * 1000)
        self.put(run_id, "batch", metrics=[[k, float(v), stamp, int(step)] for k, v in metrics.items()])

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self.put(run_id, "batch", params={k: str(v) for k, v in params.items()})

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.put(run_id, "batch", tags={k: str(v) for k, v in tags.items()})

    def log_inputs(self, run_id: str, datasets: list[tuple[Any, str]]) -> None:
        """`datasets`: (an `mlflow.entities.Dataset`, its input context) pairs."""
        self.put(
            run_id,
            "inputs",
            datasets=[
                {
                    "name": d.name,
                    "digest": d.digest,
                    "source_type": d.source_type,
                    "source": d.source,
                    "schema": d.schema,
                    "profile": d.profile,
                    "context": context,
                }
                for d, context in datasets
            ],
        )

    def log_artifacts(self, run_id: str, local_dir: str | os.PathLike[str], artifact_path: str) -> None:
        self.put(run_id, "artifacts", dir=str(local_dir), path=artifact_path)

    def end_run(self, run_id: str, status: str) -> None:
        self.put(run_id, "end", status=status)

    def pending_ops(self, run_id: str) -> set[str]:
        with self._cond:
            return {e["op"] for e in self._queue if e["run"] == run_id}

    # ------------------------------------------------------------------ waiting

    def flush(self, timeout: float) -> bool:
        """Wait until everything is delivered (True), or the server failed an attempt made after this
        call, or `timeout` passed (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            failures = self._failures
            self._cond.notify_all()  # a sender backing off tries again now
            self._retry_now = True
            while self._queue and self._failures == failures and self._thread.is_alive():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return not self._queue

    def close(self, timeout: float) -> TrackingReport:
        """One last delivery attempt (`flush`, at most `timeout`), then stop the thread; what is left
        stays in the file for the next run."""
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
        with self._cond:
            pending = list(self._queue)
            if not pending or self.unwritable:  # an unwritable file is incomplete: replaying it would mislead
                self._remove_files()
        issue = None
        if pending or self.dropped:
            parts = []
            if pending:
                where = (
                    f"they are lost: {self.unwritable}"
                    if self.unwritable
                    else f"they wait in {self.path} and are sent by the next run in this output folder"
                )
                parts.append(
                    f"{len(pending)} record(s) not delivered ({self.last_error or 'MLflow did not answer'}); {where}"
                )
            if self.dropped:
                parts.append(f"{len(self.dropped)} record(s) refused by MLflow: {'; '.join(self.dropped[:3])}")
            issue = "; ".join(parts)
        return TrackingReport(
            complete=issue is None,
            pending=len(pending),
            dropped=len(self.dropped),
            issue=issue,
            stage_output_missing=any(e["op"] == "artifacts" for e in pending)
            or any(d.startswith("artifacts") for d in self.dropped),
        )

    # ------------------------------------------------------------------ the sender

    def _send_loop(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()  # the store configure_tracking() chose
        backoff = RETRY_FIRST_S
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                entries = self._next_entries()
            try:
                self._deliver(client, entries)
            except Exception as error:  # noqa: BLE001 - classified below
                with self._cond:
                    if _refused(error):
                        self.dropped.append(f"{entries[0]['op']} for run {entries[0]['run']}: {_short(error)}")
                        log.warning("MLflow refused a record (dropped): %s", _short(error))
                        self._mark_sent(entries)
                        continue
                    self._failures += 1
                    if self.last_error is None:
                        log.warning(
                            "MLflow cannot be reached (%s): records wait in %s and are retried",
                            _short(error),
                            self.path,
                        )
                    self.last_error = _short(error)
                    self._retry_now = False
                    self._cond.notify_all()
                    if not self._closing:
                        self._cond.wait_for(lambda: self._closing or self._retry_now, timeout=backoff)
                    backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            with self._cond:
                if self.last_error is not None:
                    log.info("MLflow reachable again: delivering the waiting records")
                self.last_error, backoff = None, RETRY_FIRST_S
                self._mark_sent(entries)

    def _next_entries(self) -> list[dict[str, Any]]:
        """The first record, with the metric-only records of the same run that follow it (one call)."""
        first = self._queue[0]
        if first["op"] != "batch" or set(first) - {"seq", "run", "op", "metrics"}:
            return [first]
        taken, count = [first], len(first["metrics"])
        for entry in self._queue[1:]:
            if (
                entry["op"] != "batch"
                or entry["run"] != first["run"]
                or set(entry) - {"seq", "run", "op", "metrics"}
                or count + len(entry["metrics"]) > MAX_METRICS_PER_CALL
            ):
                break
            taken.append(entry)
            count += len(entry["metrics"])
        return taken

    def _deliver(self, client, entries: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        entry, run = entries[0], entries[0]["run"]
        if entry["op"] == "batch":
            metrics = [Metric(k, v, ts, step) for e in entries for k, v, ts, step in e.get("metrics", [])]
            params = [Param(k, v[:6000]) for k, v in entry.get("params", {}).items()]
            tags = [RunTag(k, v[:5000]) for k, v in entry.get("tags", {}).items()]
            client.log_batch(run, metrics=metrics, params=params, tags=tags, synchronous=True)
        elif entry["op"] == "inputs":
            from mlflow.entities import Dataset, DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            client.log_inputs(
                run,
                datasets=[
                    DatasetInput(
                        Dataset(**{k: v for k, v in d.items() if k != "context"}),
                        tags=[InputTag(MLFLOW_DATASET_CONTEXT, d["context"])],
                    )
                    for d in entry["datasets"]
                ],
            )
        elif entry["op"] == "artifacts":
            if not Path(entry["dir"]).is_dir():
                raise _Refused(f"folder {entry['dir']} is gone")
            client.log_artifacts(run, entry["dir"], artifact_path=entry["path"])
        elif entry["op"] == "end":
            client.set_terminated(run, status=entry["status"])
        else:
            raise _Refused(f"unknown record {entry['op']!r}")

    def _mark_sent(self, entries: list[dict[str, Any]]) -> None:
        """(holding the lock) Remove delivered entries and record the last one's number on disk."""
        del self._queue[: len(entries)]
        last = entries[-1]["seq"]
        with self._writing_files():
            self._sent_tmp.write_text(str(last))
            os.replace(self._sent_tmp, self.sent_path)
        if not self._queue:  # all delivered: the file would only hold history (and take disk space)
            self._remove_files()
        self._cond.notify_all()

    # ------------------------------------------------------------------ the files

    @contextlib.contextmanager
    def _writing_files(self) -> Iterator[None]:
        """(holding the lock) Around a write to the outbox's files. A failure (a full disk) must not stop
        training nor the sender: it is swallowed, the records stay in memory, the first is said once."""
        try:
            yield
        except OSError as error:
            if self.unwritable is None:
                self.unwritable = f"{error.filename or self.path} could not be written ({error.strerror or error})"
                log.warning(
                    "tracking outbox: %s; the records are kept in memory and sent as usual, but any not "
                    "delivered when this process ends are lost",
                    self.unwritable,
                )

    def _read_sent(self) -> int:
        try:
            return int(self.sent_path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _load_backlog(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        sent = self._read_sent()
        backlog = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(entry, dict) and entry.get("seq", 0) > sent and {"run", "op"} <= entry.keys():
                backlog.append(entry)
        return backlog

    def _remove_files(self) -> None:
        for path in (self.path, self.sent_path, self._sent_tmp):
            with self._writing_files():
                path.unlink(missing_ok=True)


class _Refused(Exception):
    """A record that can never be delivered."""


def _refused(error: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(error, _Refused):
        return True
    return isinstance(error, MlflowException) and error.get_http_status_code() < 500


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
