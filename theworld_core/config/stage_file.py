"""Stage JSON files: JSON with `//` and `/* */` comments, trailing commas and `"_comment"` keys
(docs/configuration.md#stage-json-files).

`load_stage_config(path)` reads one into a `StageConfig`. The comments are blanked out in place
(every other character keeps its position) and the standard `json` module parses the rest, so a
syntax error's line and column point into the file as written; duplicate keys are refused.
"""

from __future__ import annotations

import json
import os
from typing import Any

from theworld_core.config.errors import ConfigError, read_config_file, render_value, validate_config
from theworld_core.config.stage_schema import StageConfig


class _CommentError(Exception):
    """An unterminated `/*` comment, at its line and column."""

    def __init__(self, line: int, column: int):
        super().__init__("unterminated /* comment")
        self.line = line
        self.column = column


def strip_json_comments(text: str) -> str:
    """Blank out `//` line comments, `/* */` block comments and trailing commas (before `}` or `]`)
    outside strings, keeping every other character in place so JSON error positions still point
    into the original text. `//` inside strings (`"https://..."`) is kept."""
    out = list(text)
    i, n = 0, len(text)
    in_string = False
    last_comma: int | None = None  # index of a comma with only blanks/comments after it so far
    while i < n:
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
            continue
        if ch == '"':
            in_string = True
            last_comma = None
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end == -1 else end
            for j in range(i, end):
                if out[j] != "\r":
                    out[j] = " "
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                line = text.count("\n", 0, i) + 1
                column = i - (text.rfind("\n", 0, i) + 1) + 1
                raise _CommentError(line, column)
            for j in range(i, end + 2):
                if out[j] not in "\r\n":
                    out[j] = " "
            i = end + 2
        elif ch == ",":
            last_comma = i
            i += 1
        elif ch in "}]":
            if last_comma is not None:
                out[last_comma] = " "
            last_comma = None
            i += 1
        elif ch in " \t\r\n":
            i += 1
        else:
            last_comma = None
            i += 1
    return "".join(out)


def parse_json_with_comments(text: str, source: str | None = None) -> Any:
    """Parse the stage files' JSON dialect (JSON plus `//` and `/* */` comments and trailing commas).
    Duplicate keys and syntax errors raise `ConfigError` (syntax errors with line and column)."""
    try:
        cleaned = strip_json_comments(text)
    except _CommentError as exc:
        raise ConfigError([f"invalid JSON: {exc}"], source, line=exc.line, column=exc.column) from None
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen and not key.startswith("_"):
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        data = json.loads(cleaned, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        line_text = text.splitlines()[exc.lineno - 1] if 0 < exc.lineno <= len(text.splitlines()) else ""
        detail = f"invalid JSON: {exc.msg}"
        if line_text.strip():
            detail += f" (line {exc.lineno}: {line_text.strip()[:100]!r})"
        raise ConfigError([detail], source, line=exc.lineno, column=exc.colno) from None
    if duplicates:
        raise ConfigError(
            [f"{key}: duplicate key: it appears more than once (JSON would silently keep the last)" for key in duplicates],
            source,
        )
    return data


def load_stage_config(path: str | os.PathLike[str]) -> StageConfig:
    """Read one stage file (configs/seed/ style: `//` comments, `"_comment"` keys) into a
    `StageConfig`. Every problem is reported at once in a `ConfigError` naming the file."""
    source, text = read_config_file(path)
    try:
        blank = not strip_json_comments(text).strip()
    except _CommentError:
        blank = False  # parse_json_with_comments reports it with its position
    if blank:
        raise ConfigError(["the file is empty: a stage config is a JSON object ({} for all defaults)"], source)
    data = parse_json_with_comments(text, source)
    if not isinstance(data, dict):
        raise ConfigError(
            [f"(top level): {render_value(data)} is not allowed: must be a JSON object of config keys"], source
        )
    return validate_config(StageConfig, data, source)
