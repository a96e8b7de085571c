"""Hub datasets: `datasets.load_dataset(id, split=dataset_split, streaming=...)` as a source.

Names that mean a hub dataset: `hf:<id or local dataset folder>`, a bare `owner/name` that is not
a local path, and the aliases in `HUB_ALIASES` (`datacomp`, the stage JSON files' dataset).

Two layouts are understood, from the dataset's columns:

- **images**: an `image` column (an `Image` feature; its encoded bytes are used as stored, never
  decoded and re-encoded) and a caption in `text` or `caption`; optional `id`/`uid`/`key`, `prompt`.
  Fingerprinted and split by content, like local files.
- **URL list** (DataComp's layout): `url`, `text` or `caption`, optional `uid`; see urls.py. Images
  are fetched while the samples are read; the list is fingerprinted, not the images.

The dataset is opened with `streaming=True` when `cfg.streaming` is set, and also when
`num_samples` is: taking the first thousand rows of a 1.4-billion-row list should not download
the list. The samples are then materialised or streamed by `prepare_data` as `cfg.streaming` says.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from theworld_core.config import DataConfig
from theworld_core.data.local import PROMPT_COLUMN, TEXT_COLUMNS, _first
from theworld_core.data.types import Source, SourceRecord
from theworld_core.data.urls import URL_COLUMN, URL_LIST_COLUMNS, url_list_source

HUB_PREFIX = "hf:"
HUB_ALIASES: dict[str, str] = {"datacomp": "mlfoundations/datacomp_1b"}
"""Short names for hub datasets. `datacomp`: "DataComp-1B", the 1.4B-sample
filtered subset of DataComp's 12.8B pool, published as the URL list `mlfoundations/datacomp_1b`
(columns `uid`, `url`, `text`, ...; parquet, CC-BY-4.0). The smaller pools
(`mlfoundations/datacomp_small`, 12.8M) can be named directly."""
IMAGE_COLUMN = "image"
HUB_ID_COLUMNS = ("id", "uid", "key")
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
"""`owner/name`: read as a hub id when no local path has that name."""


def hub_dataset_id(dataset_name: str) -> str:
    """The id `load_dataset` gets for a `dataset_name` (alias resolved, `hf:` removed)."""
    name = dataset_name.removeprefix(HUB_PREFIX)
    return HUB_ALIASES.get(name, name)


def looks_like_hub_id(dataset_name: str) -> bool:
    return bool(HUB_REPO_ID.match(dataset_name))


def hub_source(cfg: DataConfig) -> Source:
    """Open `cfg.dataset_name` with `datasets.load_dataset` and pick the layout from its columns."""
    from datasets import Image, load_dataset

    dataset_id = hub_dataset_id(cfg.dataset_name)
    streaming = cfg.streaming or cfg.num_samples is not None
    where = f"hub dataset {dataset_id!r} (split {cfg.dataset_split!r})"
    try:
        dataset = load_dataset(dataset_id, split=cfg.dataset_split, streaming=streaming)
    except Exception as error:  # noqa: BLE001 - offline, unknown id, gated, bad split: one clear message
        raise ValueError(
            f"dataset_name={cfg.dataset_name!r}: could not open the {where}: {type(error).__name__}: {error}. "
            f"A hub dataset needs network access (or the `datasets` cache when HF_DATASETS_OFFLINE=1)"
        ) from error
    columns = list(dataset.column_names or next(iter(dataset), {}).keys())
    if IMAGE_COLUMN in columns:
        keep = [name for name in (IMAGE_COLUMN, *HUB_ID_COLUMNS, *TEXT_COLUMNS, PROMPT_COLUMN) if name in columns]
        dataset = dataset.select_columns(keep).cast_column(IMAGE_COLUMN, Image(decode=False))
        return Source(kind="hub", description=where, records=partial(_image_records, dataset, dataset_id))
    if URL_COLUMN in columns:
        dataset = dataset.select_columns([name for name in URL_LIST_COLUMNS if name in columns])
        return url_list_source(cfg, "hub-urls", f"{where}, a URL list", partial(_hub_rows, dataset, dataset_id))
    raise ValueError(
        f"dataset_name={cfg.dataset_name!r}: the {where} has neither an {IMAGE_COLUMN!r} column (images) "
        f"nor a {URL_COLUMN!r} column (a URL list); its columns are {columns}"
    )


def _hub_rows(dataset: Any, dataset_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for index, row in enumerate(dataset):
        yield f"{dataset_id}:{index}", row


def _image_records(dataset: Any, dataset_id: str) -> Iterator[SourceRecord]:
    for index, row in enumerate(dataset):
        where = f"{dataset_id}:{index}"
        sample_id = _first(row, HUB_ID_COLUMNS) or str(index)
        text = _first(row, TEXT_COLUMNS)
        image = row.get(IMAGE_COLUMN) or {}
        data = image.get("bytes") if isinstance(image, dict) else None
        path = image.get("path") if isinstance(image, dict) else None
        if data:
            load, problem, detail = partial(_constant, data), None, ""
        elif path:
            load, problem, detail = partial(_read_path, path), None, ""
        else:
            load, problem, detail = None, "bad_record", f"{where}: no image bytes or path"
        if problem is None and text is None:
            problem, detail = "missing_text", f"no caption column ({'/'.join(TEXT_COLUMNS)})"
        yield SourceRecord(
            id=sample_id,
            group=sample_id,  # only when the image cannot be read: a readable one is grouped by its bytes
            text=text,
            prompt=_first(row, (PROMPT_COLUMN,)),
            load=load,
            problem=problem,
            detail=detail,
            group_by_content=True,
            where=where,
        )


def _constant(data: bytes) -> bytes:
    return data


def _read_path(path: str) -> bytes:
    """An image the dataset stores as a path: a local file, or a remote one (`hf://...` in streamed
    image folders) through fsspec."""
    if "://" in path:
        import fsspec

        with fsspec.open(path, "rb") as handle:
            return handle.read()
    return Path(path).read_bytes()
