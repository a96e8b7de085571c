"""Stage JSON files: JSON with `//` and `/* */` comments, trailing commas and `"_comment"` keys
(docs/configuration.md#stage-json-files).

`load_stage_config(path)` reads one into a `StageConfig`. The comments are blanked out in place
(every other character keeps its position) and the standard `json` module parses the rest, so a
syntax error's line and column point into the file as written; duplicate keys are refused.

`plateau_cadence_problems(cfg)`: where a stage's evaluation cadence cannot feed the plateau rule;
a stage file with such a cadence loads with a `PlateauCadenceWarning` per problem (the pipeline
file warns the same, with key paths: `cadence_lines`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from typing import Any

from theworld_core.config.errors import ConfigError, read_config_file, render_value, validate_config
from theworld_core.config.stage_schema import PLATEAU_MIN_EVALUATIONS, StageConfig, TrainingConfig


class PlateauCadenceWarning(UserWarning):
    """The evaluation cadence cannot feed the plateau rule as written (docs/stages.md#plateau)."""


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
            [
                f"{key}: duplicate key: it appears more than once (JSON would silently keep the last)"
                for key in duplicates
            ],
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
    config = validate_config(StageConfig, data, source)
    for key, value, why in plateau_cadence_problems(config):
        warnings.warn(f"{source}: {key}: {value} {why}", PlateauCadenceWarning, stacklevel=2)
    return config


# --- the evaluation cadence the plateau rule needs ----------------------------------------------


def plateau_cadence_problems(cfg: TrainingConfig) -> list[tuple[str, Any, str]]:
    """Where the evaluation cadence cannot feed the plateau rule (docs/stages.md#plateau), as
    `(key, value, what happens and what would do)`. The rule needs 3 evaluations
    (`PLATEAU_MIN_EVALUATIONS`) in its window and 3 since the best, so with evaluations every
    `eval_steps`:

    - `plateau_window_steps < 3 x eval_steps`: the window rule never fires;
    - `plateau_patience_steps < 3 x eval_steps`: the patience acts as 3 x `eval_steps`, longer than written.

    Warnings, not refusals: a sparse cadence makes the rule decline, it never ends a stage early
    (the stage trains on to max_steps / the epochs). Empty without evaluation (`do_eval` false) or
    when `max_steps` ends the stage before the rule may fire (`min_steps`)."""
    need, every, rule = PLATEAU_MIN_EVALUATIONS, cfg.eval_steps, cfg.plateau
    if not cfg.do_eval or (cfg.max_steps is not None and cfg.max_steps < rule.min_steps):
        return []
    effect = {
        "window": f"holds {rule.window_steps // every} of the {need} evaluations the window rule needs, so it never fires",
        "patience": f"the patience rule also waits for {need} evaluations without a new best: it acts as {need * every} steps",
    }
    return [
        (
            f"plateau_{name}_steps",
            steps,
            (
                f"is shorter than {need} evaluations at eval_steps {every} ({effect[name]}): set eval_steps to at most "
                f"{max(1, steps // need)} or plateau_{name}_steps to at least {need * every}"
            ),
        )
        for name, steps in (("window", rule.window_steps), ("patience", rule.patience_steps))
        if steps < need * every
    ]


def cadence_lines(
    stages: list[tuple[StageConfig, dict[str, tuple[Any, ...]], int]], where: Callable[[tuple[Any, ...]], str]
) -> list[str]:
    """`plateau_cadence_problems` of a pipeline's resolved stages `(stage, key -> path it was written
    at, index)`, one line per problem written in one place, with its key paths and the stages it
    concerns, e.g. `plateau.window_steps: 5000 is shorter than 3 evaluations at defaults.eval_steps
    5000 (...): ... (stages 'projection', 'vision')`."""
    lines: dict[str, list[str]] = {}
    for stage, origin, index in stages:
        paths = {key: where(loc) for key, loc in origin.items()}
        for key, value, why in plateau_cadence_problems(stage):
            eval_path = paths.get("eval_steps", "eval_steps (default)")
            why = why.replace(f"at eval_steps {stage.eval_steps}", f"at {eval_path} {stage.eval_steps}", 1)
            line = f"{paths.get(key, f'{key} (default)')}: {value} {why}"
            lines.setdefault(line, []).append(repr(stage.name) if stage.name else f"stages[{index}]")
    return [f"{line} (stage{'s' if len(names) > 1 else ''} {', '.join(names)})" for line, names in lines.items()]
