"""Which source a `dataset_name` means: the one place to register a new kind of source.

Resolution order:
1. an exact name in `SOURCES` (`synthetic`, `datacomp`);
2. a `scheme:` prefix registered in `SOURCES` (`hf:<hub id or local dataset folder>`);
3. a local folder with a metadata file; a local `.parquet` file (a URL list); a local `.jsonl` /
   `.csv` file: a URL list when its rows have a `url` and no image-path column, else image paths;
4. `owner/name` that is no local path: a hub dataset (see hub.py).

A new source is one function `(DataConfig) -> Source` plus one entry here; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from theworld_core.config import DataConfig
from theworld_core.data.hub import HUB_ALIASES, HUB_PREFIX, hub_source, looks_like_hub_id
from theworld_core.data.local import METADATA_FILES, TABLE_SUFFIXES, imagefolder_source, table_source
from theworld_core.data.synthetic import synthetic_source
from theworld_core.data.types import Source
from theworld_core.data.urls import is_url_table, local_url_list_source

SourceFactory = Callable[[DataConfig], Source]

SOURCES: dict[str, SourceFactory] = {
    "synthetic": synthetic_source,
    HUB_PREFIX: hub_source,
    **{alias: hub_source for alias in HUB_ALIASES},
}
"""Named sources; a key ending in ':' matches every `dataset_name` starting with it."""


def data_source_for(cfg: DataConfig) -> Source:
    """Open the source named by `cfg.dataset_name`, or explain what is accepted."""
    name = cfg.dataset_name
    if name in SOURCES:
        return SOURCES[name](cfg)
    scheme, colon, _ = name.partition(":")
    if colon and f"{scheme}:" in SOURCES:
        return SOURCES[f"{scheme}:"](cfg)
    path = Path(name).expanduser()
    if path.is_dir():
        return imagefolder_source(path)
    if path.is_file() and path.suffix.lower() == ".parquet":
        return local_url_list_source(cfg, path)
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return local_url_list_source(cfg, path) if is_url_table(path) else table_source(path)
    if not path.exists() and looks_like_hub_id(name):
        return hub_source(cfg)
    raise ValueError(_unknown_source_message(name, path))


def _unknown_source_message(name: str, path: Path) -> str:
    named = ", ".join(repr(key) for key in SOURCES)
    problem = (
        f"the file exists but its suffix {path.suffix!r} is not one of {[*TABLE_SUFFIXES, '.parquet']}"
        if path.is_file()
        else "no such source name and no such local path"
    )
    return (
        f"dataset_name={name!r} is not a usable data source ({problem}). Allowed: a registered source "
        f"({named}), a local folder with {' or '.join(METADATA_FILES)}, a local "
        f"{' / '.join(TABLE_SUFFIXES)} file of image paths or URLs and captions, a local .parquet URL list "
        f"(uid, url, text), or a hub dataset id (owner/name or hf:owner/name)"
    )
