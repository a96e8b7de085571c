"""Local sources: an image folder with `metadata.jsonl` / `metadata.csv`, or a `.jsonl` / `.csv` file.

Both are a table of rows naming an image (relative to the table's folder) and its caption:

    image column:  file_name | image | path       (first one present and non-empty)
    caption:       text | caption
    optional:      prompt, id | uid

The sample id is the `id`/`uid` value when present, else the image path as written (normalised to
forward slashes). When one image is listed several times (several captions) later rows get
`#2`, `#3`, ... appended, and all of them share the image path as split group, so an image's
captions never straddle train and eval. Rows that cannot be parsed become bad samples with reason
`bad_record`; rows without a caption get `missing_text`.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from theworld_core.data.types import Source, SourceRecord

IMAGE_COLUMNS = ("file_name", "image", "path")
TEXT_COLUMNS = ("text", "caption")
ID_COLUMNS = ("id", "uid")
PROMPT_COLUMN = "prompt"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
TABLE_SUFFIXES = (".jsonl", ".csv")

Row = dict[str, Any] | str
"""A parsed row, or the message saying why it could not be parsed."""


def imagefolder_source(folder: Path) -> Source:
    """An image folder in the Hugging Face `imagefolder` layout (metadata file at its root)."""
    for name in METADATA_FILES:
        table = folder / name
        if table.is_file():
            _check_table(table)
            return Source(
                kind="imagefolder",
                description=f"image folder {folder} ({name})",
                records=partial(_records, table),
            )
    raise ValueError(
        f"dataset_name={str(folder)!r} is a folder without {' or '.join(METADATA_FILES)}: an image folder "
        f"needs a metadata file at its root with a `file_name` and a `text` column"
    )


def table_source(table: Path) -> Source:
    """A `.jsonl` or `.csv` file of image paths (relative to the file) and captions."""
    _check_table(table)
    kind = table.suffix.lower().lstrip(".")
    return Source(kind=kind, description=f"{kind} file {table}", records=partial(_records, table))


def _check_table(table: Path) -> None:
    """Refuse a CSV whose header lacks an image or caption column up front (one clear error rather
    than every row counted bad). JSONL rows are free-form, so they are checked row by row."""
    if table.suffix.lower() != ".csv":
        return
    with table.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), [])
    for wanted in (IMAGE_COLUMNS, TEXT_COLUMNS):
        if not any(column in header for column in wanted):
            raise ValueError(
                f"{table}: the CSV header {header} has none of the columns {list(wanted)}; "
                f"expected an image column ({'/'.join(IMAGE_COLUMNS)}) and a caption column ({'/'.join(TEXT_COLUMNS)})"
            )


def _read_rows(table: Path) -> Iterator[tuple[int, Row]]:
    """(line or row number, row) in file order, streamed (never the whole file in memory)."""
    if table.suffix.lower() == ".csv":
        with table.open(newline="", encoding="utf-8-sig") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):  # line 1 is the header
                yield number, row
        return
    with table.open(encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, f"invalid JSON: {error.msg} at column {error.colno}"
                continue
            yield number, row if isinstance(row, dict) else f"expected a JSON object, got {type(row).__name__}"


def _first(row: dict[str, Any], columns: tuple[str, ...]) -> str | None:
    """The first of `columns` that holds a non-empty scalar, as a string."""
    for column in columns:
        value = row.get(column)
        if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value).strip():
            return str(value)
    return None


def _read_file(path: Path) -> bytes:
    return path.read_bytes()


def _records(table: Path) -> Iterator[SourceRecord]:
    """The table's rows as records, in file order."""
    base = table.parent
    repeats: Counter[str] = Counter()  # one entry per distinct image path, to keep ids unique
    for number, row in _read_rows(table):
        where = f"{table.name}:{number}"
        if isinstance(row, str):
            yield SourceRecord(id=where, group=where, text=None, prompt=None, load=None, problem="bad_record", detail=row)
            continue
        explicit_id = _first(row, ID_COLUMNS)
        image = _first(row, IMAGE_COLUMNS)
        if image is None:
            sample_id = explicit_id or where
            detail = f"no image column ({'/'.join(IMAGE_COLUMNS)})"
            yield SourceRecord(
                id=sample_id, group=sample_id, text=None, prompt=None, load=None, problem="bad_record", detail=detail
            )
            continue
        relative = PurePosixPath(image.replace("\\", "/")).as_posix()
        repeats[relative] += 1
        sample_id = explicit_id or (relative if repeats[relative] == 1 else f"{relative}#{repeats[relative]}")
        text = _first(row, TEXT_COLUMNS)
        yield SourceRecord(
            id=sample_id,
            group=relative,
            text=text,
            prompt=_first(row, (PROMPT_COLUMN,)),
            load=partial(_read_file, base / relative),
            problem=None if text is not None else "missing_text",
            detail="" if text is not None else f"no caption column ({'/'.join(TEXT_COLUMNS)})",
        )
