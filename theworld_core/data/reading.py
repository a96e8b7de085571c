"""Reading one record: its image bytes (read ahead on a pool for network sources), its split
group, its length check and the row `prepare_data` stores for it. Shared by both modes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from functools import partial
from itertools import islice
from typing import Any

from theworld_core.data.images import normalise_image, read_image_bytes
from theworld_core.data.split import content_group, split_score
from theworld_core.data.types import SAMPLE_COLUMNS, SampleProblem, SequenceLimit, Source, SourceRecord

Read = bytes | SampleProblem | None
"""A record's image bytes, why there are none, or None for a record the pass does not read."""


def measured_records(
    records: Callable[[], Iterator[SourceRecord]], limit: SequenceLimit, default_prompt: str
) -> Iterator[SourceRecord]:
    """The records, those that do not fit the model marked `too_long` (before any image is read)."""
    return measure(records(), limit, default_prompt)


def measure(records: Iterable[SourceRecord], limit: SequenceLimit, default_prompt: str) -> Iterator[SourceRecord]:
    for record in records:
        if record.problem is None:
            problem = limit.problem(record.prompt or default_prompt, record.text or "")
            if problem is not None:
                detail = f"{record.where}: {problem}" if record.where else problem
                record = replace(record, problem="too_long", detail=detail, load=None)
        yield record


def shard_records(source: Source, num_samples: int | None, index: int, count: int) -> Iterator[SourceRecord]:
    """The records at positions index, index + count, ... of the source's first `num_samples`.

    Only these are measured against the sequence limit (a measured source lists its raw records
    and measures the picked ones), so a shard costs 1/count of the tokenizing, besides the listing.
    """
    records = source.records
    if isinstance(records, partial) and records.func is measured_records:
        raw, limit, default_prompt = records.args
        return measure(islice(raw(), index, num_samples, count), limit, default_prompt)
    return islice(records(), index, num_samples, count)


def split_group(record: SourceRecord, read: Read) -> str:
    """The record's split group: its image's sha256 when grouped by content and readable, else `group`."""
    if record.group_by_content and isinstance(read, bytes):
        return content_group(read)
    return record.group


def needs_read_for_side(record: SourceRecord) -> bool:
    """Whether the record's side can only be known from its image (grouped by content, no problem)."""
    return record.group_by_content and record.problem is None


def read_or_problem(record: SourceRecord) -> bytes | SampleProblem:
    """The record's image bytes, or why there are none (malformed record, missing file, ...)."""
    try:
        if record.problem is not None or record.load is None:
            raise SampleProblem(record.problem or "bad_record", record.detail)
        return read_image_bytes(record.load)
    except SampleProblem as problem:
        return problem


def with_reads(
    source: Source, records: Iterable[SourceRecord], wanted: Callable[[SourceRecord], bool] | None = None
) -> Iterator[tuple[SourceRecord, Read]]:
    """(record, read) in source order; only `wanted` records (default: all) are read.

    Sources with `read_concurrency > 1` (URL lists) are read ahead on a thread pool, at most
    `2 x read_concurrency` records ahead of the consumer: concurrent fetches in constant memory
    however long the source. Leaving the loop early cancels what was not started yet.
    """
    if source.read_concurrency <= 1:
        for record in records:
            yield record, read_or_problem(record) if wanted is None or wanted(record) else None
        return
    window: deque[tuple[SourceRecord, Future[bytes | SampleProblem] | None]] = deque()
    pool = ThreadPoolExecutor(source.read_concurrency, thread_name_prefix=f"read-{source.kind}")
    try:
        for record in records:
            needed = (wanted is None or wanted(record)) and record.problem is None
            window.append((record, pool.submit(read_or_problem, record) if needed else None))
            if len(window) > 2 * source.read_concurrency:
                yield _settle(window.popleft(), source.read_timeout_s, wanted)
        while window:
            yield _settle(window.popleft(), source.read_timeout_s, wanted)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _settle(
    record_and_future: tuple[SourceRecord, Future[bytes | SampleProblem] | None],
    timeout_s: float | None,
    wanted: Callable[[SourceRecord], bool] | None,
) -> tuple[SourceRecord, Read]:
    record, future = record_and_future
    if future is None:  # not read, or a record that is bad by itself
        return record, read_or_problem(record) if record.problem is not None and (
            wanted is None or wanted(record)
        ) else None
    try:
        return record, future.result(timeout=timeout_s)
    except FutureTimeout:
        future.cancel()
        return record, SampleProblem("timeout", f"no image within {timeout_s:g}s")


def make_row(record: SourceRecord, default_prompt: str, read: Read = None) -> dict[str, Any]:
    """The full row (sample columns + bookkeeping) of one record; `read` avoids a second read."""
    if read is None:
        read = read_or_problem(record)
    row: dict[str, Any] = {
        "id": record.id,
        "prompt": record.prompt or default_prompt,
        "text": record.text or "",
        "split_score": split_score(split_group(record, read)),
        "image": None,
        "bad_reason": None,
        "bad_detail": None,
    }
    try:
        if isinstance(read, SampleProblem):
            raise read
        row["image"] = {"bytes": normalise_image(read), "path": None}
    except SampleProblem as problem:
        row["bad_reason"], row["bad_detail"] = problem.reason, problem.detail
    return row


def sample_of(row: dict[str, Any]) -> dict[str, Any]:
    return {column: row[column] for column in SAMPLE_COLUMNS}


def example_of(row: dict[str, Any]) -> tuple[str, str]:
    detail = f": {row['bad_detail']}" if row.get("bad_detail") else ""
    return row["id"], f"{row['bad_reason']}{detail}"
