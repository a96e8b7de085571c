"""URL-list sources: rows naming an image URL and its caption, in DataComp's column layout.

    url:      url                      (required)
    caption:  text | caption
    optional: uid | id, prompt

From a local `.parquet` file (always a URL list), a local `.jsonl` / `.csv` file whose rows have a
`url` column and no image-path column, or a hub dataset with a `url` column (see hub.py).

The sample id is the `uid`/`id` value, else the URL; the split group is the URL, so samples showing
the same image never straddle train and eval. The fingerprint hashes the list (id, caption,
prompt, URL), not the image bytes (`SourceRecord.content_key`): preparing a stream downloads
nothing but the eval images, and the train images are fetched while training reads them. Images
are fetched concurrently (`fetch_concurrency` read-ahead in `prepare_data`), with the timeouts,
retries, size limit and disk cache of fetch.py.

Rows are read in batches (parquet: `iter_batches`; JSONL/CSV: line by line); no list of all rows
is ever held, so a list of any length streams in constant memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from theworld_core.config import DataConfig
from theworld_core.data.fetch import FetchSettings, fetch_image
from theworld_core.data.local import IMAGE_COLUMNS, PROMPT_COLUMN, TEXT_COLUMNS, _first, _read_rows
from theworld_core.data.types import Source, SourceRecord

URL_COLUMN = "url"
URL_ID_COLUMNS = ("uid", "id")
URL_LIST_COLUMNS = (URL_COLUMN, *URL_ID_COLUMNS, *TEXT_COLUMNS, PROMPT_COLUMN)
"""The columns a URL list is read for (DataComp's other columns are never loaded)."""
PARQUET_BATCH_ROWS = 1024
DEFAULT_IMAGE_CACHE = "~/.cache/theworld/url-images"
"""Where fetched images are cached when `image_cache_dir` is unset (`$XDG_CACHE_HOME` honoured)."""


def fetch_settings(cfg: DataConfig) -> FetchSettings:
    """The fetch keys of a data config, with the cache folder resolved."""
    if cfg.image_cache_dir:
        cache_dir = Path(cfg.image_cache_dir).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        cache_dir = Path(os.environ["XDG_CACHE_HOME"]) / "theworld" / "url-images"
    else:
        cache_dir = Path(DEFAULT_IMAGE_CACHE).expanduser()
    return FetchSettings(
        cache_dir=str(cache_dir),
        timeout_s=cfg.fetch_timeout_s,
        retries=cfg.fetch_retries,
        backoff_s=cfg.fetch_backoff_s,
        max_bytes=cfg.fetch_max_bytes,
        concurrency=cfg.fetch_concurrency,
    )


def url_list_source(
    cfg: DataConfig, kind: str, description: str, rows: Callable[[], Iterable[tuple[str, dict[str, Any] | str]]]
) -> Source:
    """A source over `rows()`: fresh (where, row or parse-error message) pairs in list order.

    `rows` must be picklable (a partial of a module-level function): streaming ships it to workers.
    """
    settings = fetch_settings(cfg)
    return Source(
        kind=kind,
        description=f"{description} (images fetched to {settings.cache_dir})",
        records=partial(_url_records, rows, settings),
        read_concurrency=settings.concurrency,
        read_timeout_s=settings.max_duration_s,
    )


def local_url_list_source(cfg: DataConfig, table: Path) -> Source:
    """A local `.parquet`, `.jsonl` or `.csv` URL list."""
    suffix = table.suffix.lower()
    if suffix == ".parquet":
        _check_parquet(table)
        rows = partial(_parquet_rows, str(table))
    else:
        rows = partial(_table_rows, table)
    kind = f"urls-{suffix.lstrip('.')}"
    return url_list_source(cfg, kind, f"URL list {table}", rows)


def is_url_table(table: Path) -> bool:
    """Whether a local `.jsonl` / `.csv` file lists URLs (a `url` column, no image-path column)
    rather than local image paths: decided from its first row."""
    for _, row in _read_rows(table):
        if isinstance(row, str):
            return False
        return bool(_first(row, (URL_COLUMN,))) and _first(row, IMAGE_COLUMNS) is None
    return False


def _check_parquet(table: Path) -> None:
    import pyarrow.parquet as pq

    names = pq.ParquetFile(table).schema_arrow.names
    if URL_COLUMN not in names:
        raise ValueError(
            f"{table}: a parquet data file is read as a URL list and needs a {URL_COLUMN!r} column "
            f"(DataComp layout: uid, url, text); its columns are {names}"
        )


def _parquet_rows(table: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a parquet file, a batch at a time, only the URL-list columns."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(table) as handle:
        columns = [name for name in URL_LIST_COLUMNS if name in handle.schema_arrow.names]
        number = 0
        for batch in handle.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for row in batch.to_pylist():
                number += 1
                yield f"{Path(table).name}:{number}", row


def _table_rows(table: Path) -> Iterator[tuple[str, dict[str, Any] | str]]:
    for number, row in _read_rows(table):
        yield f"{table.name}:{number}", row


def _url_records(
    rows: Callable[[], Iterable[tuple[str, dict[str, Any] | str]]], settings: FetchSettings
) -> Iterator[SourceRecord]:
    for where, row in rows():
        yield url_record(where, row, settings)


def url_record(where: str, row: dict[str, Any] | str, settings: FetchSettings) -> SourceRecord:
    """One URL-list row as a record whose `load` fetches the image (cache first)."""
    if isinstance(row, str):
        return SourceRecord(
            id=where, group=where, text=None, prompt=None, load=None, problem="bad_record", detail=row, where=where
        )
    url = _first(row, (URL_COLUMN,))
    sample_id = _first(row, URL_ID_COLUMNS) or url or where
    if url is None:
        return SourceRecord(
            id=sample_id,
            group=sample_id,
            text=None,
            prompt=None,
            load=None,
            problem="bad_record",
            detail=f"{where}: no {URL_COLUMN!r} value",
            where=where,
        )
    url = url.strip()
    text = _first(row, TEXT_COLUMNS)
    return SourceRecord(
        id=sample_id,
        group=url,
        text=text,
        prompt=_first(row, (PROMPT_COLUMN,)),
        load=partial(fetch_image, url, settings),
        problem=None if text is not None else "missing_text",
        detail="" if text is not None else f"no caption column ({'/'.join(TEXT_COLUMNS)})",
        content_key=url,
        where=where,
    )
