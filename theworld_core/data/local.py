"""Local sources: an image folder with `metadata.jsonl` / `metadata.csv`, or a `.jsonl` / `.csv` file.

Both are a table of rows naming an image (relative to the table's folder) and its caption:

    image column:  file_name | image | path       (first one present and non-empty)
    caption:       text | caption
    optional:      prompt, id | uid

The sample id is the `id`/`uid` value when present, else the image path relative to the table's
folder with its folders resolved (forward slashes; `.`, `..` and symlinked folders resolved, so
`sub/../a.png` is `a.png`; the file name itself is kept, even when it is a symlink). When one path is listed several times
(several captions) later rows get `#2`, `#3`, ... appended. The split groups samples by the sha256
of their image bytes (see split.py): an image's captions, and byte-identical copies under other
names, never straddle train and eval.

Rows that cannot be parsed (invalid JSON, invalid UTF-8, no image column) become bad samples with
reason `bad_record`, named `<table>:<line>`; one bad line never makes the rest of the table
unreadable. Rows without a caption get `missing_text`.
"""

from __future__ import annotations

import csv
import json
import posixpath
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
                kind="imagefolder", description=f"image folder {folder} ({name})", records=partial(_records, table)
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
    with table.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
        header = next(csv.reader(handle), [])
    for wanted in (IMAGE_COLUMNS, TEXT_COLUMNS):
        if not any(column in header for column in wanted):
            raise ValueError(
                f"{table}: the CSV header {header} has none of the columns {list(wanted)}; "
                f"expected an image column ({'/'.join(IMAGE_COLUMNS)}) and a caption column ({'/'.join(TEXT_COLUMNS)})"
            )


def _invalid_utf8(text: str) -> str | None:
    """Why `text` (decoded with `surrogateescape`) is not valid UTF-8, or None when it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        byte = ord(text[error.start]) - 0xDC00 if 0xDC80 <= ord(text[error.start]) <= 0xDCFF else None
        shown = f" (byte 0x{byte:02x})" if byte is not None else ""
        return f"invalid UTF-8 at column {error.start + 1}{shown}"
    return None


def _read_rows(table: Path) -> Iterator[tuple[int, Row]]:
    """(line or row number, row) in file order, streamed (never the whole file in memory).

    Bytes that are not UTF-8 are kept as surrogates while reading, so that only their own row is
    refused, with its number, and every other row still reads.
    """
    if table.suffix.lower() == ".csv":
        with table.open(newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):  # line 1 is the header
                bad = next(filter(None, (_invalid_utf8(str(v)) for v in row.values() if v is not None)), None)
                yield number, f"{bad} in a value" if bad else row
        return
    with table.open(encoding="utf-8-sig", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            bad = _invalid_utf8(line)
            if bad is not None:
                yield number, bad
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
    base = table.parent.resolve()
    folders: dict[str, Path] = {}  # folder as written -> resolved: one resolve per folder, not per row
    repeats: Counter[str] = Counter()  # one entry per distinct image path, to keep ids unique
    for number, row in _read_rows(table):
        where = f"{table.name}:{number}"
        if isinstance(row, str):
            yield SourceRecord(
                id=where, group=where, text=None, prompt=None, load=None, problem="bad_record", detail=row, where=where
            )
            continue
        explicit_id = _first(row, ID_COLUMNS)
        image = _first(row, IMAGE_COLUMNS)
        if image is None:
            sample_id = explicit_id or where
            detail = f"{where + ': ' if explicit_id else ''}no image column ({'/'.join(IMAGE_COLUMNS)})"
            yield SourceRecord(
                id=sample_id,
                group=sample_id,
                text=None,
                prompt=None,
                load=None,
                problem="bad_record",
                detail=detail,
                where=where,
            )
            continue
        relative, path = _resolved(base, image, folders)
        repeats[relative] += 1
        sample_id = explicit_id or (relative if repeats[relative] == 1 else f"{relative}#{repeats[relative]}")
        text = _first(row, TEXT_COLUMNS)
        yield SourceRecord(
            id=sample_id,
            group=relative,  # only for an unreadable file: a readable one is grouped by its bytes
            text=text,
            prompt=_first(row, (PROMPT_COLUMN,)),
            load=partial(_read_file, path),
            problem=None if text is not None else "missing_text",
            detail="" if text is not None else f"no caption column ({'/'.join(TEXT_COLUMNS)})",
            group_by_content=True,
            where=where,
        )


def _resolved(base: Path, image: str, folders: dict[str, Path]) -> tuple[str, Path]:
    """(id path, file) of an image path as written in a table in `base` (resolved).

    The folder part is resolved (`.`, `..`, symlinked folders), the file name kept, so one file
    written two ways is one id. Outside `base`, the id is the written path normalised lexically.
    """
    written = PurePosixPath(image.replace("\\", "/"))
    folder = folders.get(str(written.parent))
    if folder is None:
        folder = folders[str(written.parent)] = (base / written.parent).resolve()
    path = folder / written.name
    try:
        return path.relative_to(base).as_posix(), path
    except ValueError:
        return posixpath.normpath(written.as_posix()), path
