"""The gate between stages (docs/stages.md#gate), as a pure function.

After each stage attempt the pipeline calls `decide(outcome, earlier, gate, retries_used=...,
is_last_stage=...)` and gets one `GateDecision`:

- `retry`: the stage diverged or ran out of memory and a retry of that kind is left; the decision's
  `retry_changes` are the stage-config changes to retry with (keys are `StageConfig` keys, for
  `StageConfig.with_changes`).
- `stop_failed`: it diverged / ran out of memory with no retry left (or a batch of 1 cannot shrink),
  or it finished without a usable metric; the champion stays the best earlier stage.
- `stop_regressed`: its metric is worse than the best earlier stage's by more than
  `regression_tolerance` (relative): stop and keep (roll back to) the best earlier stage.
- `stop_good_enough`: its metric meets `target`: stop and deploy the champion.
- `next`: go on to the next stage (on the last stage: the pipeline is complete).

Rules, in this order:

1. **diverged**: while `retries_used < max_diverged_retries`, retry with the divergence recipe
   (docs/stages.md#retries): `learning_rate * diverged_lr_factor` (every
   `learning_rates` entry too, when the stage gave per-component rates), `max_grad_norm =
   min(current, diverged_max_grad_norm)` and `warmup_steps = max(current, diverged_warmup_steps)`
   clamped to `max_steps` (the config refuses a warmup longer than the stage). The recipe only ever
   tightens: it never raises the clipping norm nor shortens the warmup a stage already had.
2. **oom**: while `batch_size > 1` and `retries_used < max_oom_retries`, retry with
   `batch_size // 2` and `gradient_accumulation_steps * 2` (docs/stages.md#retries): the
   effective batch is kept when the batch size is even and shrinks when it is odd (3 -> 1 x 2).
3. **completed / plateaued** without a finite metric (None, NaN, inf): `stop_failed`.
4. **regression first**: with `best` the best earlier stage (`best_stage(earlier)`), the stage has
   regressed when its relative degradation `(value - best) / |best|` (eval_loss, lower is better) or
   `(best - value) / |best|` (task_accuracy, higher is better) exceeds `regression_tolerance`. A
   degradation of exactly the tolerance is allowed. With `best == 0` the degradation is 0 for an equal
   value and +-inf otherwise (any worse value regresses: there is no scale to be relative to).
5. **target** (when set): met when `value <= target` (loss) / `value >= target` (accuracy).
6. otherwise **next**.

**Champion** (the stage to deploy after the decision): the best successful stage among `earlier`
and, when it succeeded with a finite metric, this one. A later stage takes the title only when it is
strictly better: a tie, or a stage within tolerance but slightly worse, keeps the earlier champion
(like the plateau rule, where a new best must be strictly lower). On `stop_good_enough` the champion
is therefore also the best of earlier and this stage; an earlier stage strictly better than a stage
that meets the target would have met the target itself, so in a consistent run it is this stage.

Decisions are invariant to multiplying every loss (and the target) by the same positive constant
(exactly so for powers of two), and an accuracy decision equals the loss decision on negated values
and target. The gate does not look at `attempt` or `steps`; they are carried into `numbers` only.

No torch, MLflow or Prefect here: the pipeline turns a trainer's `StageResult` into a `StageOutcome`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

STATUSES = ("completed", "plateaued", "diverged", "oom")
SUCCESS_STATUSES = ("completed", "plateaued")
ACTIONS = ("next", "stop_good_enough", "stop_regressed", "retry", "stop_failed")
METRICS = ("eval_loss", "task_accuracy")
LOWER_IS_BETTER = {"eval_loss": True, "task_accuracy": False}


class GateSettings(Protocol):
    """What `decide` reads from the gate config (`theworld_core.config.GateConfig` fits it)."""

    metric: str
    target: float | None
    regression_tolerance: float
    max_diverged_retries: int
    max_oom_retries: int
    diverged_lr_factor: float
    diverged_max_grad_norm: float
    diverged_warmup_steps: int


@dataclass(frozen=True)
class StageOutcome:
    """One attempt of one stage, as the gate sees it: its status, metrics and the config it ran with."""

    name: str
    attempt: int
    """1 for the first try of this stage, 2 for the first retry, ..."""
    status: str
    """completed | plateaued | diverged | oom."""
    eval_loss: float | None
    task_accuracy: float | None
    steps: int
    batch_size: int
    gradient_accumulation_steps: int
    learning_rate: float
    max_grad_norm: float
    warmup_steps: int
    max_steps: int | None
    stage_output_uri: str | None = None
    reason: str = ""
    """The trainer's one-line reason (plateau verdict, divergence evidence, ...)."""
    evidence: dict = field(default_factory=dict)
    learning_rates: dict | None = None
    """Per-component peak learning rates the stage was given (None when it used `learning_rate` only)."""

    @property
    def succeeded(self) -> bool:
        return self.status in SUCCESS_STATUSES


@dataclass(frozen=True)
class GateDecision:
    """The gate's decision after one stage attempt, with its numbers and a one-line reason."""

    action: str
    """next | stop_good_enough | stop_regressed | retry | stop_failed."""
    reason: str
    """One line, with the numbers (for MLflow tags and the Prefect artifact)."""
    numbers: dict
    """The numbers the decision used (metric, value, target, best earlier stage and value, tolerance,
    relative degradation, retries used/allowed, ...)."""
    champion: str | None
    """Name of the champion stage after this decision (None while no stage has succeeded)."""
    retry_changes: dict | None = None
    """Stage-config changes for a retry (keys are `StageConfig` keys); None unless action is retry."""

    @property
    def stops(self) -> bool:
        """The pipeline ends with this decision (a `next` on the last stage ends it too; see `numbers`)."""
        return self.action.startswith("stop_")

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (non-finite floats as the strings `nan`, `inf`, `-inf`)."""
        return _json_safe(asdict(self))


# --- helpers ------------------------------------------------------------------------------------


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # 'nan', 'inf', '-inf'
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _pct(value: float) -> str:
    return f"{value * 100:.3g}%"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _evidence_text(outcome: StageOutcome) -> str:
    """The trainer's reason, else the evidence as `key=value` pairs."""
    if outcome.reason.strip():
        return _one_line(outcome.reason)
    if outcome.evidence:
        return ", ".join(
            f"{k}={_fmt(v) if isinstance(v, float) else _one_line(str(v))}" for k, v in outcome.evidence.items()
        )
    return "no evidence given"


def _check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"gate metric {metric!r} is not one of {list(METRICS)}")
    return metric


def metric_value(outcome: StageOutcome, metric: str) -> float | None:
    """The outcome's value of `metric` (`eval_loss` or `task_accuracy`), as given: may be None or non-finite."""
    value = getattr(outcome, _check_metric(metric))
    return None if value is None else float(value)


def _usable(outcome: StageOutcome, metric: str) -> float | None:
    value = metric_value(outcome, metric)
    if not outcome.succeeded or value is None or not math.isfinite(value):
        return None
    return value


def _better(a: float, b: float, metric: str) -> bool:
    """`a` strictly better than `b`."""
    return a < b if LOWER_IS_BETTER[metric] else a > b


def best_stage(outcomes: Iterable[StageOutcome], metric: str) -> StageOutcome | None:
    """The successful (completed / plateaued) outcome with the best finite `metric`; on a tie the
    first in order (a later stage must be strictly better). None when no outcome qualifies."""
    _check_metric(metric)
    best: StageOutcome | None = None
    best_value = math.nan
    for outcome in outcomes:
        value = _usable(outcome, metric)
        if value is not None and (best is None or _better(value, best_value, metric)):
            best, best_value = outcome, value
    return best


def degradation(value: float, best: float, metric: str) -> float:
    """Relative amount by which `value` is worse than `best` (negative when better).

    `(value - best) / |best|` for eval_loss, `(best - value) / |best|` for task_accuracy; with
    `best == 0`: 0 when equal, +inf when worse, -inf when better."""
    diff = (value - best) if LOWER_IS_BETTER[_check_metric(metric)] else (best - value)
    if best == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / abs(best)


def target_met(value: float, target: float, metric: str) -> bool:
    """`value <= target` for eval_loss, `value >= target` for task_accuracy."""
    return value <= target if LOWER_IS_BETTER[_check_metric(metric)] else value >= target


# --- the gate -------------------------------------------------------------------------------------


def decide(
    outcome: StageOutcome,
    earlier: Sequence[StageOutcome],
    gate: GateSettings,
    *,
    retries_used: int,
    is_last_stage: bool,
) -> GateDecision:
    """The gate's decision on `outcome` (module docstring for the rules).

    `earlier`: the successful outcomes of the earlier stages (their final attempts; unsuccessful or
    metric-less ones are ignored). `retries_used`: retries of this stage already spent on this
    failure kind (diverged or oom). `is_last_stage`: only changes the wording of `next`.
    """
    metric = _check_metric(gate.metric)
    if outcome.status not in STATUSES:
        raise ValueError(f"stage {outcome.name!r}: status {outcome.status!r} is not one of {list(STATUSES)}")
    if isinstance(retries_used, bool) or not isinstance(retries_used, int) or retries_used < 0:
        raise ValueError(f"retries_used {retries_used!r} must be a non-negative int")

    earlier = list(earlier)
    best_earlier = best_stage(earlier, metric)
    best_earlier_value = metric_value(best_earlier, metric) if best_earlier is not None else None
    name = outcome.name
    numbers: dict[str, Any] = {
        "stage": name,
        "attempt": outcome.attempt,
        "status": outcome.status,
        "steps": outcome.steps,
        "metric": metric,
        "value": metric_value(outcome, metric),
        "target": gate.target,
        "best_earlier_stage": best_earlier.name if best_earlier is not None else None,
        "best_earlier_value": best_earlier_value,
        "regression_tolerance": gate.regression_tolerance,
        "is_last_stage": is_last_stage,
    }
    keep = f"keep '{best_earlier.name}'" if best_earlier is not None else "no champion"
    keep_name = best_earlier.name if best_earlier is not None else None

    if outcome.status == "diverged":
        return _diverged(outcome, gate, retries_used, numbers, keep, keep_name)
    if outcome.status == "oom":
        return _oom(outcome, gate, retries_used, numbers, keep, keep_name)

    # completed / plateaued
    value = numbers["value"]
    if value is None or not math.isfinite(value):
        shown = "missing" if value is None else _fmt(value)
        return GateDecision(
            "stop_failed",
            f"'{name}' {outcome.status} after {outcome.steps} steps but its {metric} is {shown}: "
            f"cannot judge it, stop, {keep}",
            numbers,
            keep_name,
        )

    champion = best_stage([*earlier, outcome], metric)
    champion_name = champion.name if champion is not None else None
    lead = f"{metric} {_fmt(value)} of '{name}'"

    if best_earlier is not None:
        worse = degradation(value, best_earlier_value, metric)
        numbers["degradation"] = worse
        compared = (
            f"{_pct(worse)} worse than" if worse > 0 else f"{_pct(-worse)} better than" if worse < 0 else "equal to"
        )
        comparison = (
            f"{lead} is {compared} {_fmt(best_earlier_value)} of '{best_earlier.name}' "
            f"(tolerance {_pct(gate.regression_tolerance)})"
        )
        if worse > gate.regression_tolerance:
            return GateDecision("stop_regressed", f"{comparison}: stop, {keep}", numbers, best_earlier.name)
    else:
        comparison = f"{lead} (no earlier stage to compare)"

    if gate.target is not None:
        met = target_met(value, gate.target, metric)
        numbers["target_met"] = met
        sign = "<=" if LOWER_IS_BETTER[metric] else ">="
        if met:
            return GateDecision(
                "stop_good_enough",
                f"{comparison}; meets target {sign} {_fmt(gate.target)}: stop, deploy '{champion_name}'",
                numbers,
                champion_name,
            )
        comparison += f"; target {sign} {_fmt(gate.target)} not met"

    then = "last stage: pipeline complete" if is_last_stage else "next stage"
    title = f"champion '{champion_name}'" if champion_name == name else f"keep champion '{champion_name}'"
    return GateDecision("next", f"{comparison}: {then}, {title}", numbers, champion_name)


def _diverged(
    outcome: StageOutcome, gate: GateSettings, retries_used: int, numbers: dict, keep: str, keep_name: str | None
) -> GateDecision:
    allowed = gate.max_diverged_retries
    numbers.update(retries_used=retries_used, retries_allowed=allowed, evidence=dict(outcome.evidence))
    what = f"'{outcome.name}' diverged ({_evidence_text(outcome)}) on attempt {outcome.attempt}"
    if retries_used >= allowed:
        return GateDecision(
            "stop_failed",
            f"{what}; diverged retries used up ({retries_used}/{allowed}): stop, {keep}",
            numbers,
            keep_name,
        )
    factor = gate.diverged_lr_factor
    wanted = max(outcome.warmup_steps, gate.diverged_warmup_steps)
    warmup = min(wanted, outcome.max_steps) if outcome.max_steps else wanted
    changes: dict[str, Any] = {
        "learning_rate": outcome.learning_rate * factor,
        "max_grad_norm": min(outcome.max_grad_norm, gate.diverged_max_grad_norm),
        "warmup_steps": warmup,
    }
    if outcome.learning_rates:
        changes["learning_rates"] = {k: v * factor for k, v in outcome.learning_rates.items()}
    before = {
        "learning_rate": outcome.learning_rate,
        "max_grad_norm": outcome.max_grad_norm,
        "warmup_steps": outcome.warmup_steps,
    }
    parts = [f"{k} {_fmt(before[k])} -> {_fmt(changes[k])}" for k in before]
    if "learning_rates" in changes:
        parts.append(f"learning_rates x{_fmt(factor)}")
    clamp = f" (warmup clamped to max_steps {outcome.max_steps})" if warmup < wanted else ""
    return GateDecision(
        "retry",
        f"{what}: retry {retries_used + 1}/{allowed} with {', '.join(parts)}{clamp}",
        numbers,
        keep_name,
        changes,
    )


def _oom(
    outcome: StageOutcome, gate: GateSettings, retries_used: int, numbers: dict, keep: str, keep_name: str | None
) -> GateDecision:
    allowed = gate.max_oom_retries
    batch, accumulation = outcome.batch_size, outcome.gradient_accumulation_steps
    numbers.update(
        retries_used=retries_used,
        retries_allowed=allowed,
        batch_size=batch,
        gradient_accumulation_steps=accumulation,
        evidence=dict(outcome.evidence),
    )
    what = f"'{outcome.name}' ran out of memory ({_evidence_text(outcome)}) on attempt {outcome.attempt}"
    if batch <= 1:
        return GateDecision(
            "stop_failed",
            f"{what}; batch_size {batch} cannot shrink (try use_gradient_checkpointing or more processes): stop, {keep}",
            numbers,
            keep_name,
        )
    if retries_used >= allowed:
        return GateDecision(
            "stop_failed",
            f"{what}; out-of-memory retries used up ({retries_used}/{allowed}): stop, {keep}",
            numbers,
            keep_name,
        )
    new_batch, new_accumulation = batch // 2, accumulation * 2
    old_effective, new_effective = batch * accumulation, new_batch * new_accumulation
    numbers.update(effective_batch_per_process=old_effective, new_effective_batch_per_process=new_effective)
    effect = (
        f"effective batch {old_effective} per process kept"
        if new_effective == old_effective
        else f"odd batch_size: effective batch per process changes {old_effective} -> {new_effective}"
    )
    return GateDecision(
        "retry",
        f"{what}: retry {retries_used + 1}/{allowed} with batch_size {batch} -> {new_batch}, "
        f"gradient_accumulation_steps {accumulation} -> {new_accumulation} ({effect})",
        numbers,
        keep_name,
        {"batch_size": new_batch, "gradient_accumulation_steps": new_accumulation},
    )
