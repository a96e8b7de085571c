"""The plateau rule (docs/stages.md#plateau), as a pure function and a tracker.

Input: the stage's evaluation history, `(step, eval_loss)` points with strictly increasing
optimizer steps. With `t` the latest step, `rule` a `PlateauConfig` and `N = MIN_EVALUATIONS` (3),
the stage has plateaued when `t >= rule.min_steps` and at least one of:

- **window rule**: `improvement < rule.min_improvement`, where
  `improvement = (best_before - best_recent) / |best_before|`,
  `best_before` = the lowest loss evaluated at a step `<= t - window_steps` (the best the stage had
  reached when the window opened) and `best_recent` = the lowest loss evaluated at a step in
  `(t - window_steps, t]`; and the window holds at least `N` evaluations (steps in
  `(t - window_steps, t]`, `t` included). The window must be covered: without a (finite)
  evaluation at or before `t - window_steps` this rule does not fire. Computed in float64; an
  improvement of exactly `min_improvement` is enough (no plateau). Using the best value rather than
  the single loss at the window start means a noisy spike at the window start cannot fake an
  improvement, and taking the best of at least `N` evaluations means one noisy evaluation at the
  window's end cannot fake a stall.
- **patience rule**: `t - best_step >= rule.patience_steps` and at least `N` evaluations after the
  best (steps in `(best_step, t]`, none of them a new best), where `best_step` is the step of the
  first evaluation that reached the lowest loss so far (a new best must be strictly lower). One
  evaluation that is not a new best is noise, not a verdict: the rule waits for `N` of them in a
  row, so with evaluations every `eval_steps` the patience acts as
  `max(patience_steps, N * eval_steps)`.

A rule whose numbers say "plateau" but which lacks evaluations does not fire; when that is all that
keeps the stage going, the verdict's code is `too_few_evaluations` and its reason says how many
evaluations there were. The config checks (`TrainingConfig.plateau_cadence_problems`) warn about a
cadence that cannot feed the rule: `window_steps < N * eval_steps` (the window rule never fires) or
`patience_steps < N * eval_steps` (the patience is longer than written).

Non-finite losses (NaN, +-inf) are never a best and never an improvement: they still count as
evaluations (they advance `t`, cover the window and count towards `N`) but are skipped when taking
minima. A window with no finite loss therefore shows no improvement (the window rule fires when it
holds `N` evaluations, `improvement` is None), and a history with no finite loss at all counts
patience from its first evaluation. Detecting divergence is the trainer's job, not this rule's.

Both rules are invariant to multiplying every loss by the same positive constant (exactly so for
powers of two, which do not change float rounding).

`max_steps` and the epochs end a stage in any case; the trainer enforces that. When given
`max_steps`, the verdict says so (`stop` is true, `code` is `max_steps` if the rule did not fire).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from theworld_core.config import PlateauConfig
from theworld_core.config.stage_schema import PLATEAU_MIN_EVALUATIONS

STATE_VERSION = 1

MIN_EVALUATIONS = PLATEAU_MIN_EVALUATIONS
"""Evaluations a rule needs before it may fire: in the window (window rule), after the best
(patience rule)."""

# Verdict codes. Not plateaued: no_history, before_min_steps, window_not_covered, improving,
# too_few_evaluations, max_steps.
PLATEAU_CODES = ("window", "patience", "window_and_patience")


@dataclass(frozen=True)
class PlateauVerdict:
    """The plateau rule's answer at one evaluation, with the numbers behind it."""

    plateaued: bool
    """The plateau rule fired (window or patience) at `step`."""
    reason: str
    """One line, with the numbers (for MLflow tags and the Prefect artifact)."""
    step: int | None
    """Latest evaluated optimizer step `t` (None without history)."""
    best_loss: float | None
    """Lowest finite eval loss so far (None when none is finite)."""
    best_step: int | None
    """Step of the first evaluation that reached `best_loss`."""
    improvement: float | None
    """Relative improvement of the best loss over the window; None when the window is not covered,
    is before `min_steps` and not computable, or holds no finite loss."""
    code: str
    """`no_history`, `before_min_steps`, `window_not_covered`, `improving`, `too_few_evaluations`
    (a rule's numbers say plateau but it lacks evaluations), `window`, `patience`,
    `window_and_patience` or `max_steps`."""
    stop: bool
    """The stage should end now: `plateaued`, or `max_steps` was given and reached."""
    eval_loss: float | None
    """Latest eval loss (may be non-finite)."""
    steps_since_best: int | None
    """`step - best_step` (from the first evaluation when no loss is finite)."""
    window_start_step: int | None
    """`step - window_steps`."""
    window_reference_loss: float | None
    """`best_before`: lowest finite loss evaluated at or before `window_start_step`."""
    window_best_loss: float | None
    """`best_recent`: lowest finite loss evaluated in `(window_start_step, step]`."""
    min_improvement: float
    window_steps: int
    patience_steps: int
    min_steps: int
    max_steps: int | None = None
    window_evaluations: int | None = None
    """Evaluations in `(window_start_step, step]` (the window rule needs `min_evaluations`)."""
    evaluations_since_best: int | None = None
    """Evaluations after `best_step` (after the first evaluation when no loss is finite)."""
    min_evaluations: int = MIN_EVALUATIONS

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats as the strings `nan`, `inf`, `-inf`)."""
        return {k: _json_float(v) for k, v in asdict(self).items()}


def _json_float(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # 'nan', 'inf', '-inf'
    return value


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _pct(value: float) -> str:
    return f"{value * 100:.6g}%"


def _checked_history(history: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    points: list[tuple[int, float]] = []
    for item in history:
        step, loss = item
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"plateau history: step {step!r} must be a non-negative int")
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise ValueError(f"plateau history: eval loss {loss!r} at step {step} must be a number")
        if points and step <= points[-1][0]:
            raise ValueError(f"plateau history: steps must increase strictly, got {step} after {points[-1][0]}")
        points.append((step, float(loss)))
    return points


def plateau_verdict(
    history: Iterable[tuple[int, float]], rule: PlateauConfig, *, max_steps: int | None = None
) -> PlateauVerdict:
    """Apply the plateau rule (module docstring) to a whole evaluation history."""
    points = _checked_history(history)
    numbers = dict(
        min_improvement=rule.min_improvement,
        window_steps=rule.window_steps,
        patience_steps=rule.patience_steps,
        min_steps=rule.min_steps,
        max_steps=max_steps,
    )
    if not points:
        return PlateauVerdict(
            plateaued=False,
            reason="no evaluation yet",
            step=None,
            best_loss=None,
            best_step=None,
            improvement=None,
            code="no_history",
            stop=False,
            eval_loss=None,
            steps_since_best=None,
            window_start_step=None,
            window_reference_loss=None,
            window_best_loss=None,
            **numbers,
        )

    t, last_loss = points[-1]
    best_loss: float | None = None
    best_step: int | None = None
    for step, loss in points:
        if math.isfinite(loss) and (best_loss is None or loss < best_loss):
            best_loss, best_step = loss, step
    anchor = best_step if best_step is not None else points[0][0]
    since = t - anchor
    since_count = sum(1 for step, _ in points if step > anchor)
    best_text = f"best {_fmt(best_loss)} at step {best_step}" if best_step is not None else "no finite eval loss yet"

    window_start = t - rule.window_steps
    window_count = sum(1 for step, _ in points if step > window_start)
    before = [loss for step, loss in points if step <= window_start and math.isfinite(loss)]
    recent = [loss for step, loss in points if step > window_start and math.isfinite(loss)]
    reference = min(before) if before else None
    window_best = min(recent) if recent else None
    covered = reference is not None
    improvement: float | None = None
    if covered and window_best is not None:
        denominator = abs(reference)
        if denominator == 0:
            improvement = 0.0 if window_best >= reference else math.inf
        else:
            improvement = (reference - window_best) / denominator

    max_reached = max_steps is not None and t >= max_steps
    common = dict(
        step=t,
        best_loss=best_loss,
        best_step=best_step,
        eval_loss=last_loss,
        steps_since_best=since,
        window_start_step=window_start,
        window_reference_loss=reference,
        window_best_loss=window_best,
        window_evaluations=window_count,
        evaluations_since_best=since_count,
        min_evaluations=MIN_EVALUATIONS,
        **numbers,
    )

    if t < rule.min_steps:
        reason = f"no plateau before min_steps: step {t} < {rule.min_steps} ({best_text})"
        code = "before_min_steps"
        if max_reached:
            reason = f"max_steps {max_steps} reached at step {t}; " + reason
            code = "max_steps"
        return PlateauVerdict(
            plateaued=False, reason=reason, improvement=improvement, code=code, stop=max_reached, **common
        )

    # What each rule's numbers say, and whether it has the evaluations to say it.
    window_stalled = covered and (improvement is None or improvement < rule.min_improvement)
    patience_ran_out = since >= rule.patience_steps
    window_fired = window_stalled and window_count >= MIN_EVALUATIONS
    patience_fired = patience_ran_out and since_count >= MIN_EVALUATIONS

    if covered and improvement is None:
        window_text = f"no finite eval loss in the last {rule.window_steps} steps (reference {_fmt(reference)})"
    elif covered:
        window_text = (
            f"best loss improved {_pct(improvement)} over the last {rule.window_steps} steps "
            f"({_fmt(reference)} -> {_fmt(window_best)}, threshold {_pct(rule.min_improvement)})"
        )
    else:
        window_text = (
            f"window of {rule.window_steps} steps not covered (first evaluation at step {points[0][0]}, "
            f"needs one at or before step {window_start})"
        )
    if window_stalled and not window_fired:
        window_text += f", but only {_evaluations(window_count)} in the window (the rule needs {MIN_EVALUATIONS})"
    patience_text = f"no new best for {since} steps ({best_text}, patience {rule.patience_steps})"
    if patience_ran_out and not patience_fired:
        patience_text += f", but only {_evaluations(since_count)} since the best (the rule needs {MIN_EVALUATIONS})"

    if window_fired and patience_fired:
        code, reason = "window_and_patience", f"plateau: {window_text}; {patience_text}"
    elif window_fired:
        code, reason = "window", f"plateau: {window_text}"
    elif patience_fired:
        code, reason = "patience", f"plateau: {patience_text}"
    else:
        if window_stalled or patience_ran_out:
            code = "too_few_evaluations"
        else:
            code = "improving" if covered else "window_not_covered"
        reason = f"no plateau: {window_text}; {patience_text}"
    plateaued = window_fired or patience_fired
    if max_reached:
        if plateaued:
            reason += f"; max_steps {max_steps} reached"
        else:
            code, reason = (
                "max_steps",
                f"max_steps {max_steps} reached at step {t} without a plateau: {reason.removeprefix('no plateau: ')}",
            )
    return PlateauVerdict(
        plateaued=plateaued, reason=reason, improvement=improvement, code=code, stop=plateaued or max_reached, **common
    )


def _evaluations(count: int) -> str:
    return f"{count} evaluation" + ("" if count == 1 else "s")


class PlateauTracker:
    """Feeds evaluations one at a time; each `update` gives the verdict on the history so far.

    Deterministic: the verdict depends only on the history and the rule (it equals
    `plateau_verdict(tracker.history, rule, max_steps=...)`). `state_dict()` is JSON-serialisable
    and goes into the resume state; the rule itself is not saved (the stage config provides it).
    """

    def __init__(self, rule: PlateauConfig, *, max_steps: int | None = None) -> None:
        self.rule = rule
        self.max_steps = max_steps
        self._history: list[tuple[int, float]] = []

    @property
    def history(self) -> tuple[tuple[int, float], ...]:
        return tuple(self._history)

    def update(self, step: int, eval_loss: float) -> PlateauVerdict:
        """Record the eval loss at `step` (steps must increase strictly) and return the verdict."""
        (point,) = _checked_history([(step, eval_loss)])
        if self._history and point[0] <= self._history[-1][0]:
            raise ValueError(f"plateau tracker: steps must increase strictly, got {step} after {self._history[-1][0]}")
        self._history.append(point)
        return self.verdict()

    def verdict(self) -> PlateauVerdict:
        """The verdict on the history recorded so far."""
        return plateau_verdict(self._history, self.rule, max_steps=self.max_steps)

    def state_dict(self) -> dict[str, Any]:
        """`{"version": 1, "history": [[step, loss], ...]}`; non-finite losses as `"nan"`/`"inf"`/`"-inf"`."""
        return {"version": STATE_VERSION, "history": [[step, _json_float(loss)] for step, loss in self._history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the history saved by `state_dict` (replaces the current one)."""
        if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"plateau tracker state: expected a mapping with version {STATE_VERSION}, got {state!r:.200}"
            )
        points = []
        for item in state.get("history", []):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(f"plateau tracker state: history entries are [step, loss], got {item!r}")
            step, loss = item
            if isinstance(loss, str):
                if loss not in ("nan", "inf", "-inf"):
                    raise ValueError(f"plateau tracker state: loss {loss!r} at step {step} is not a number")
                loss = float(loss)
            points.append((step, loss))
        self._history = _checked_history(points)
