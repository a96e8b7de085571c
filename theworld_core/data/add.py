"""`theworld data add`: copy images into a local image folder (`metadata.jsonl` layout).

The folder is the Hugging Face `imagefolder` layout the local source reads: images plus a
`metadata.jsonl` at its root, one `{"file_name": ..., "text": ...}` row per image. Adding is safe
against readers and other writers:
- each image is copied to a temporary name and renamed into place;
- the metadata file is rewritten whole to a temporary file and `os.replace`d, after the images, so a
  reader sees either the old table or the new one, never a row whose image is missing;
- an `fcntl` lock on `metadata.jsonl.lock` serialises concurrent `add`s (no lost rows).

A caption that cannot fit the model is caught here rather than at training: with a
`sequence_limit` (the model's `max_seq_length`, see `model.inputs.ModelSequenceLimit`) it is refused,
naming the file and the token count; without one, a caption over `LONG_CAPTION_CHARS` characters is
added with a warning naming the file and its length (preparation will count it `too_long` if it
does not fit).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from theworld_core.data.images import normalise_image
from theworld_core.data.types import DEFAULT_PROMPT, SequenceLimit

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"
LONG_CAPTION_CHARS = 2000
"""Captions longer than this get a warning when no `sequence_limit` can say whether they fit:
image captions are rarely over a few hundred characters, and 2,000 is a few hundred tokens."""


@dataclass(frozen=True)
class Added:
    source: str
    file_name: str
    text: str
    skipped: bool = False
    """The same bytes were already in the folder under this name with this caption (nothing written)."""
    warning: str | None = None
    """Something to tell the user about this image (a caption that may be too long)."""


def expand_sources(sources: list[str]) -> list[Path]:
    """Files as given; a folder stands for its image files (sorted, not recursive)."""
    files: list[Path] = []
    for text in sources:
        path = Path(text).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"{path} is a folder without image files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{text}: no such file or folder")
    return files


def read_captions(path: str | Path) -> dict[str, str]:
    """A JSONL file of `{"file_name": <source path or its name>, "text" | "caption": ...}` rows."""
    captions: dict[str, str] = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: invalid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: invalid JSON ({error.msg})") from None
            name = row.get("file_name") or row.get("image") or row.get("path") if isinstance(row, dict) else None
            text = (row.get("text") or row.get("caption")) if isinstance(row, dict) else None
            if not isinstance(name, str) or not isinstance(text, str) or not text.strip():
                raise ValueError(f'{path}:{number}: expected {{"file_name": ..., "text": ...}} with a non-empty text')
            captions[name] = text
    return captions


def _caption_for(source: Path, given: str, caption: str | None, captions: dict[str, str] | None) -> str | None:
    if caption is not None:
        return caption
    captions = captions or {}
    for key in (given, str(source), source.name):
        if key in captions:
            return captions[key]
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def _locked(folder: Path):
    with open(folder / f"{METADATA}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write(target: Path, data: bytes) -> None:
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_copy(source: Path, target: Path) -> None:
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _caption_length_problem(
    source: Path, text: str, limit: SequenceLimit | None, prompt: str
) -> tuple[str | None, str | None]:
    """(refusal, warning) for one caption: refused when it does not fit `limit`; without a limit,
    a warning when it is longer than `LONG_CAPTION_CHARS`."""
    if limit is not None:
        problem = limit.problem(prompt, text)
        return (f"{source}: {problem}" if problem else None), None
    if len(text) > LONG_CAPTION_CHARS:
        return None, (
            f"{source}: caption of {len(text):,} characters (over {LONG_CAPTION_CHARS:,}); a sample that does not "
            f"fit max_seq_length is counted too_long at preparation and not trained on"
        )
    return None, None


def add_images(
    sources: list[str],
    folder: str | Path,
    *,
    caption: str | None = None,
    captions_file: str | Path | None = None,
    sequence_limit: SequenceLimit | None = None,
    prompt: str = DEFAULT_PROMPT,
) -> list[Added]:
    """Copy `sources` (image files, or folders of them) into the image folder `folder` (created when
    missing) and append their rows to its `metadata.jsonl`.

    Every image needs a caption: `caption` for all of them, or a row of `captions_file` matching the
    source as given, its path or its file name. Unreadable images, missing captions and (with a
    `sequence_limit`; `prompt` is the prompt training will use) captions that do not fit the model are
    refused before anything is written. A name already taken by other bytes gets a `-N` suffix; the
    same bytes with the same caption already listed are skipped.
    """
    if caption is not None and captions_file is not None:
        raise ValueError("give --caption or --captions, not both")
    if caption is not None and not caption.strip():
        raise ValueError("--caption must not be empty")
    captions = read_captions(captions_file) if captions_file is not None else None
    given = [str(s) for s in sources]
    files = expand_sources(given)
    planned: list[tuple[Path, str]] = []
    missing, unreadable, too_long = [], [], []
    warnings: dict[Path, str] = {}
    for source in files:
        origin = next((g for g in given if Path(g).expanduser() == source), str(source))
        text = _caption_for(source, origin, caption, captions)
        if text is None:
            missing.append(str(source))
            continue
        refusal, warning = _caption_length_problem(source, text, sequence_limit, prompt)
        if refusal is not None:
            too_long.append(refusal)
            continue
        if warning is not None:
            warnings[source] = warning
            log.warning("%s", warning)
        try:
            normalise_image(source.read_bytes())
        except Exception as error:  # noqa: BLE001 - any decoding failure means "not an image"
            unreadable.append(f"{source} ({type(error).__name__}: {error})")
            continue
        planned.append((source, text))
    if missing:
        raise ValueError(f"no caption for {', '.join(missing)}: pass --caption TEXT or --captions FILE.jsonl")
    if unreadable:
        raise ValueError(f"not readable as images: {'; '.join(unreadable)}")
    if too_long:
        raise ValueError(f"captions too long for the model: {'; '.join(too_long)}")

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "metadata.csv").exists() and not (folder / METADATA).exists():
        raise ValueError(f"{folder} keeps its captions in metadata.csv; `theworld data add` writes {METADATA} only")
    added: list[Added] = []
    with _locked(folder):
        table = folder / METADATA
        old = table.read_bytes() if table.exists() else b""
        listed = set()
        # A line that is not UTF-8 or JSON is one bad row (preparation counts it), not a reason to
        # refuse adding to the folder.
        for line in old.decode("utf-8-sig", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError, AttributeError):
                row = json.loads(line)
                listed.add((row.get("file_name"), row.get("text") or row.get("caption")))
        rows = []
        for source, text in planned:
            name, digest = source.name, _sha256(source)
            target, n = folder / name, 1
            while target.exists() and _sha256(target) != digest:
                target = folder / f"{source.stem}-{n}{source.suffix}"
                n += 1
            if target.exists() and (target.name, text) in listed:
                added.append(Added(str(source), target.name, text, skipped=True))
                continue
            if not target.exists():
                _atomic_copy(source, target)
            rows.append({"file_name": target.name, "text": text})
            listed.add((target.name, text))
            added.append(Added(str(source), target.name, text, warning=warnings.get(source)))
        if rows:
            prefix = old if not old or old.endswith(b"\n") else old + b"\n"
            new = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
            _atomic_write(table, prefix + new)
    return added
