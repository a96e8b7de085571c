"""Cron expressions of the pipeline's schedule (`schedule.cron`).

The schedule is run by Prefect, whose (vendored) croniter reads it; `cronsim`, the maintained
parser that Prefect's task queue (pydocket) depends on, evaluates it here. The two dialects differ
at the edges (a 6th field is seconds-last in croniter and seconds-first in cronsim; cronsim accepts
`LW` and `5L`, croniter does not), so only their common core is accepted: five fields, each `*`, a
number, a range `a-b`, any of these with a step `/n`, or a comma list of them, with month and
weekday names. Each field is checked here (so a problem names the field and what it allows);
cronsim then refuses what parses but never fires (`0 0 31 2 *`: there is no 31 February).
"""

from __future__ import annotations

from datetime import datetime

from cronsim import CronSim, CronSimError

_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_WEEKDAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_NAMES: dict[str, dict[str, int]] = {
    "month": {name: number for number, name in enumerate(_MONTHS, 1)},
    "day of week": {name: number for number, name in enumerate(_WEEKDAYS)},
}
_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)


def _field_problem(text: str, label: str, low: int, high: int) -> str | None:
    """Why one field of a cron expression is not allowed (None when it is)."""
    names = _NAMES.get(label, {})

    def number(token: str) -> int | None:
        if token.isdigit():
            return int(token)
        return names.get(token.lower())

    for part in text.split(","):
        base, slash, step = part.partition("/")
        if slash and not (step.isdigit() and int(step) >= 1):
            return f"{label} field {text!r}: the step after '/' must be a whole number >= 1"
        if base == "*":
            continue
        first, dash, last = base.partition("-")
        a = number(first)
        b = number(last) if dash else a
        if a is None or b is None:
            return f"{label} field {text!r}: {part!r} is not '*', a number, a range 'a-b' or a step '/n'" + (
                " (names like 'mon' or 'jan' are allowed)" if names else ""
            )
        if not (low <= a <= high and low <= b <= high):
            return f"{label} field {text!r}: values must be in {low}-{high}"
        if a > b:
            return f"{label} field {text!r}: range {base!r} runs backwards"
    return None


def cron_problem(expression: str) -> str | None:
    """Why `expression` is not a standard 5-field cron expression that fires (None when it is one).

    Each field is `*`, a number, a range `a-b`, any of these with a step `/n`, or a comma list of
    them; months and weekdays may be written as names (`jan`, `mon`); weekday 0 and 7 are Sunday.
    """
    fields = expression.split()
    if len(fields) != 5:
        return (
            f"must be a cron expression of 5 fields (minute hour day-of-month month day-of-week), "
            f"e.g. '0 3 * * *' (03:00 daily); this has {len(fields)}"
        )
    for text, (label, low, high) in zip(fields, _FIELDS, strict=True):
        problem = _field_problem(text, label, low, high)
        if problem:
            return problem
    try:
        CronSim(" ".join(fields), datetime(2000, 1, 1))
    except CronSimError as exc:
        if str(exc) == "Bad day-of-month":  # the fields are well formed: no chosen month has that day
            return f"day of month field {fields[2]!r}: no such day in month field {fields[3]!r}, so the schedule never fires"
        return f"not accepted by the cron parser: {exc}"
    return None
