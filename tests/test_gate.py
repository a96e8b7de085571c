"""The gate: each branch with its numbers and champion, the retry recipes, and properties."""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from theworld_core.config import TrainingConfig
from theworld_core.training.gate import GateDecision, StageOutcome, best_stage, decide, degradation, metric_value

try:  # the real model, once it has landed in config.py
    from theworld_core.config import GateConfig
except ImportError:  # pragma: no cover - until then, a stand-in with the same attributes
    GateConfig = None

GATE_DEFAULTS = dict(
    metric="eval_loss",
    target=None,
    regression_tolerance=0.02,
    max_diverged_retries=1,
    max_oom_retries=2,
    diverged_lr_factor=0.1,
    diverged_max_grad_norm=0.5,
    diverged_warmup_steps=500,
)


def stand_in(**changes):
    """Same attributes as GateConfig, no validation (for values a real config would not hold)."""
    return types.SimpleNamespace(**{**GATE_DEFAULTS, **changes})


def gate(**changes):
    return GateConfig(**changes) if GateConfig is not None else stand_in(**changes)


def outcome(name="vision", eval_loss=1.0, **changes) -> StageOutcome:
    fields = dict(
        name=name,
        attempt=1,
        status="completed",
        eval_loss=eval_loss,
        task_accuracy=None,
        steps=1000,
        batch_size=4,
        gradient_accumulation_steps=4,
        learning_rate=5e-5,
        max_grad_norm=1.0,
        warmup_steps=100,
        max_steps=None,
    )
    return StageOutcome(**{**fields, **changes})


PROJECTION = outcome("projection", 1.141)


def run(o, earlier=(), g=None, *, retries_used=0, is_last_stage=False) -> GateDecision:
    d = decide(o, list(earlier), g or gate(), retries_used=retries_used, is_last_stage=is_last_stage)
    assert d.action in ("next", "stop_good_enough", "stop_regressed", "retry", "stop_failed")
    assert "\n" not in d.reason and d.reason
    json.dumps(d.to_dict())
    assert (d.retry_changes is not None) == (d.action == "retry")
    return d


def test_gate_config_defaults_match_the_brief():
    g = gate()
    for key, value in GATE_DEFAULTS.items():
        assert getattr(g, key) == value


def test_no_torch_mlflow_or_prefect_import():
    # other tests import torch into this process, so check the module's own source
    import theworld_core.training.gate as module

    source = open(module.__file__).read()
    for name in ("torch", "mlflow", "prefect"):
        assert f"import {name}" not in source and f"from {name}" not in source


# --- successful stages ----------------------------------------------------------------------------


def test_first_stage_goes_next_and_is_champion():
    d = run(outcome("projection", 1.141))
    assert (d.action, d.champion) == ("next", "projection")
    assert (
        d.reason == "eval_loss 1.141 of 'projection' (no earlier stage to compare): next stage, champion 'projection'"
    )
    assert d.numbers["best_earlier_stage"] is None and d.numbers["value"] == 1.141


def test_last_stage_says_pipeline_complete():
    d = run(outcome("language", 1.0), [PROJECTION], is_last_stage=True)
    assert (d.action, d.champion) == ("next", "language")
    assert d.reason.endswith(": last stage: pipeline complete, champion 'language'")


def test_improvement_takes_the_champion_title():
    d = run(outcome("vision", 1.0), [PROJECTION])
    assert (d.action, d.champion) == ("next", "vision")
    assert d.numbers["degradation"] == pytest.approx((1.0 - 1.141) / 1.141)
    assert d.reason == (
        "eval_loss 1 of 'vision' is 12.4% better than 1.141 of 'projection' (tolerance 2%): next stage, champion 'vision'"
    )


def test_within_tolerance_goes_next_but_keeps_the_champion():
    d = run(outcome("vision", 1.15), [PROJECTION])  # 0.79% worse
    assert (d.action, d.champion) == ("next", "projection")
    assert (
        "is 0.789% worse than 1.141 of 'projection' (tolerance 2%): next stage, keep champion 'projection'" in d.reason
    )


def test_tie_keeps_the_earlier_champion():
    d = run(outcome("vision", 1.141), [PROJECTION])
    assert (d.action, d.champion) == ("next", "projection")
    assert "is equal to 1.141 of 'projection'" in d.reason


def test_regression_stops_and_keeps_the_best_earlier_stage():
    d = run(outcome("vision", 1.234), [PROJECTION])
    assert (d.action, d.champion) == ("stop_regressed", "projection")
    assert d.reason == (
        "eval_loss 1.234 of 'vision' is 8.15% worse than 1.141 of 'projection' (tolerance 2%): stop, keep 'projection'"
    )
    assert d.numbers["best_earlier_stage"] == "projection"
    assert d.numbers["best_earlier_value"] == 1.141
    assert d.numbers["regression_tolerance"] == 0.02
    assert d.numbers["degradation"] == pytest.approx(0.093 / 1.141)


def test_regression_compares_with_the_best_not_the_last_earlier_stage():
    earlier = [outcome("projection", 1.0), outcome("vision", 1.015)]  # vision was within tolerance
    d = run(outcome("language", 1.03), earlier)
    assert (d.action, d.champion) == ("stop_regressed", "projection")
    assert "of 'language' is 3% worse than 1 of 'projection'" in d.reason


def test_regression_boundary_is_allowed():
    g = gate(regression_tolerance=0.25)
    assert run(outcome("vision", 5.0), [outcome("projection", 4.0)], g).action == "next"  # exactly 25%
    assert run(outcome("vision", 5.000001), [outcome("projection", 4.0)], g).action == "stop_regressed"


def test_zero_tolerance():
    g = gate(regression_tolerance=0.0)
    assert run(outcome("vision", 1.0), [outcome("projection", 1.0)], g).action == "next"
    assert run(outcome("vision", 1.0000001), [outcome("projection", 1.0)], g).action == "stop_regressed"


def test_best_earlier_of_zero():
    # eval_loss: nothing to be relative to, any worse value regresses; an equal one does not
    d = run(outcome("vision", 1e-9), [outcome("projection", 0.0)])
    assert (d.action, d.champion, d.numbers["degradation"]) == ("stop_regressed", "projection", math.inf)
    assert "inf% worse" in d.reason
    assert run(outcome("vision", 0.0), [outcome("projection", 0.0)]).action == "next"
    # task_accuracy: an earlier accuracy of 0 can only be matched or beaten
    g = gate(metric="task_accuracy")
    d = run(outcome("vision", None, task_accuracy=0.0), [outcome("projection", None, task_accuracy=0.0)], g)
    assert (d.action, d.champion) == ("next", "projection")
    d = run(outcome("vision", None, task_accuracy=0.1), [outcome("projection", None, task_accuracy=0.0)], g)
    assert (d.action, d.champion, d.numbers["degradation"]) == ("next", "vision", -math.inf)
    assert degradation(-1.0, 0.0, "eval_loss") == -math.inf


def test_target_met_stops_good_enough():
    d = run(outcome("vision", 0.9), [PROJECTION], gate(target=1.0))
    assert (d.action, d.champion) == ("stop_good_enough", "vision")
    assert d.reason == (
        "eval_loss 0.9 of 'vision' is 21.1% better than 1.141 of 'projection' (tolerance 2%); "
        "meets target <= 1: stop, deploy 'vision'"
    )
    assert d.numbers["target"] == 1.0 and d.numbers["target_met"] is True


def test_target_boundary_and_first_stage():
    d = run(outcome("projection", 1.0), [], gate(target=1.0))
    assert (d.action, d.champion) == ("stop_good_enough", "projection")
    assert (
        d.reason
        == "eval_loss 1 of 'projection' (no earlier stage to compare); meets target <= 1: stop, deploy 'projection'"
    )


def test_target_not_met_goes_next():
    d = run(outcome("vision", 1.1), [PROJECTION], gate(target=1.0), is_last_stage=True)
    assert (d.action, d.champion, d.numbers["target_met"]) == ("next", "vision", False)
    assert d.reason.endswith("; target <= 1 not met: last stage: pipeline complete, champion 'vision'")


def test_target_met_within_tolerance_keeps_the_strictly_better_champion():
    # Only possible when the earlier stage ran without this target; the champion stays the best.
    d = run(outcome("vision", 0.905), [outcome("projection", 0.9)], gate(target=1.0))
    assert (d.action, d.champion) == ("stop_good_enough", "projection")
    assert d.reason.endswith("meets target <= 1: stop, deploy 'projection'")


def test_regression_is_checked_before_the_target():
    d = run(outcome("vision", 0.8), [outcome("projection", 0.5)], gate(target=1.0))
    assert (d.action, d.champion) == ("stop_regressed", "projection")


def test_plateaued_counts_as_successful():
    d = run(outcome("vision", 1.0, status="plateaued", reason="plateau: no new best for 2000 steps"), [PROJECTION])
    assert (d.action, d.champion) == ("next", "vision")


# --- task_accuracy: higher is better -------------------------------------------------------------


ACC = gate(metric="task_accuracy", target=0.8)


def acc(name, value, eval_loss=2.0, **changes):
    return outcome(name, eval_loss, task_accuracy=value, **changes)


def test_accuracy_improvement_and_champion():
    d = run(acc("vision", 0.7), [acc("projection", 0.6)], ACC)
    assert (d.action, d.champion) == ("next", "vision")
    assert d.reason == (
        "task_accuracy 0.7 of 'vision' is 16.7% better than 0.6 of 'projection' (tolerance 2%); "
        "target >= 0.8 not met: next stage, champion 'vision'"
    )


def test_accuracy_regression_direction():
    d = run(acc("vision", 0.58), [acc("projection", 0.6)], ACC)  # 3.3% lower
    assert (d.action, d.champion) == ("stop_regressed", "projection")
    assert "task_accuracy 0.58 of 'vision' is 3.33% worse than 0.6 of 'projection'" in d.reason
    d = run(acc("vision", 0.595), [acc("projection", 0.6)], ACC)  # 0.8% lower: within tolerance
    assert (d.action, d.champion) == ("next", "projection")


def test_accuracy_target_direction():
    d = run(acc("vision", 0.8), [acc("projection", 0.6)], ACC)
    assert (d.action, d.champion) == ("stop_good_enough", "vision")
    assert "meets target >= 0.8" in d.reason


def test_accuracy_metric_ignores_eval_loss():
    # a lower eval loss does not matter when the gate judges accuracy
    d = run(acc("vision", 0.5, eval_loss=0.1), [acc("projection", 0.6, eval_loss=9.0)], ACC)
    assert (d.action, d.champion) == ("stop_regressed", "projection")


# --- no usable metric ----------------------------------------------------------------------------


@pytest.mark.parametrize("value, shown", [(math.nan, "nan"), (math.inf, "inf"), (None, "missing")])
def test_non_finite_or_missing_metric_stops_failed(value, shown):
    d = run(outcome("vision", value, steps=5000), [PROJECTION])
    assert (d.action, d.champion) == ("stop_failed", "projection")
    assert (
        d.reason
        == f"'vision' completed after 5000 steps but its eval_loss is {shown}: cannot judge it, stop, keep 'projection'"
    )
    assert run(outcome("projection", value)).champion is None


def test_missing_accuracy_stops_failed():
    d = run(acc("vision", None), [acc("projection", 0.6)], ACC)
    assert (d.action, d.champion) == ("stop_failed", "projection")
    assert "its task_accuracy is missing" in d.reason


def test_to_dict_is_json_safe_with_nan():
    d = run(outcome("vision", math.nan), [PROJECTION])
    assert d.to_dict()["numbers"]["value"] == "nan"
    assert json.loads(json.dumps(d.to_dict()))["champion"] == "projection"


# --- diverged ----------------------------------------------------------------------------------


DIVERGED = outcome(
    "vision",
    None,
    status="diverged",
    steps=120,
    learning_rate=5e-5,
    max_grad_norm=1.0,
    warmup_steps=100,
    reason="gradient norm 1.2e+04 at step 121 (limit 1000.0)",
    evidence={"step": 121, "grad_norm": 12000.0, "limit": 1000.0},
)


def test_diverged_retries_with_the_seed_recipe():
    d = run(DIVERGED, [PROJECTION])
    assert (d.action, d.champion) == ("retry", "projection")
    assert d.retry_changes == {"learning_rate": pytest.approx(5e-6), "max_grad_norm": 0.5, "warmup_steps": 500}
    assert d.reason == (
        "'vision' diverged (gradient norm 1.2e+04 at step 121 (limit 1000.0)) on attempt 1: retry 1/1 with "
        "learning_rate 5e-05 -> 5e-06, max_grad_norm 1 -> 0.5, warmup_steps 100 -> 500"
    )
    assert (d.numbers["retries_used"], d.numbers["retries_allowed"]) == (0, 1)
    assert d.numbers["evidence"]["grad_norm"] == 12000.0


def test_diverged_warmup_clamped_to_max_steps():
    d = run(dataclasses.replace(DIVERGED, max_steps=300))
    assert d.retry_changes["warmup_steps"] == 300
    assert d.reason.endswith("warmup_steps 100 -> 300 (warmup clamped to max_steps 300)")
    assert run(dataclasses.replace(DIVERGED, max_steps=500)).retry_changes["warmup_steps"] == 500
    assert run(dataclasses.replace(DIVERGED, max_steps=10_000)).retry_changes["warmup_steps"] == 500


def test_diverged_recipe_only_tightens():
    d = run(dataclasses.replace(DIVERGED, warmup_steps=1000, max_grad_norm=0.3))
    assert d.retry_changes["warmup_steps"] == 1000  # a longer warmup is not shortened
    assert d.retry_changes["max_grad_norm"] == 0.3  # tighter clipping is not loosened
    assert run(dataclasses.replace(DIVERGED, warmup_steps=1000, max_steps=800)).retry_changes["warmup_steps"] == 800


def test_diverged_scales_per_component_learning_rates():
    o = dataclasses.replace(DIVERGED, learning_rates={"world_projector": 1e-4, "gemma_vision": 1e-5})
    d = run(o)
    assert d.retry_changes["learning_rates"] == {
        "world_projector": pytest.approx(1e-5),
        "gemma_vision": pytest.approx(1e-6),
    }
    assert "learning_rates x0.1" in d.reason
    assert "learning_rates" not in run(DIVERGED).retry_changes


def test_diverged_recipe_follows_the_gate_config():
    g = gate(diverged_lr_factor=0.5, diverged_max_grad_norm=0.25, diverged_warmup_steps=200, max_diverged_retries=3)
    d = run(dataclasses.replace(DIVERGED, attempt=3, learning_rate=1e-4), g=g, retries_used=2)
    assert d.action == "retry"
    assert d.retry_changes == {"learning_rate": 5e-5, "max_grad_norm": 0.25, "warmup_steps": 200}
    assert "on attempt 3: retry 3/3" in d.reason


def test_diverged_retries_exhausted_stops_failed():
    d = run(dataclasses.replace(DIVERGED, attempt=2), [PROJECTION], retries_used=1)
    assert (d.action, d.champion, d.retry_changes) == ("stop_failed", "projection", None)
    assert d.reason == (
        "'vision' diverged (gradient norm 1.2e+04 at step 121 (limit 1000.0)) on attempt 2; "
        "diverged retries used up (1/1): stop, keep 'projection'"
    )
    d = run(dataclasses.replace(DIVERGED, name="projection"), [], gate(max_diverged_retries=0))
    assert (d.action, d.champion) == ("stop_failed", None)
    assert d.reason.endswith("diverged retries used up (0/0): stop, no champion")


def test_diverged_evidence_without_a_reason():
    o = dataclasses.replace(DIVERGED, reason="", evidence={"step": 7, "loss": math.nan})
    d = run(o, retries_used=1)
    assert d.reason.startswith("'vision' diverged (step=7, loss=nan) on attempt 1;")
    assert d.to_dict()["numbers"]["evidence"]["loss"] == "nan"
    assert "(no evidence given)" in run(dataclasses.replace(DIVERGED, reason="", evidence={})).reason


def test_multiline_trainer_reason_is_kept_on_one_line():
    d = run(dataclasses.replace(DIVERGED, reason="loss nan\nat step 3"))
    assert "(loss nan at step 3)" in d.reason


# --- out of memory -------------------------------------------------------------------------------


OOM = outcome(
    "language",
    None,
    status="oom",
    steps=0,
    batch_size=4,
    gradient_accumulation_steps=4,
    reason="out of memory at step 1 with batch_size 4",
    evidence={"step": 1, "batch_size": 4},
)


def test_oom_halves_the_batch_and_doubles_accumulation():
    d = run(OOM, [PROJECTION])
    assert (d.action, d.champion) == ("retry", "projection")
    assert d.retry_changes == {"batch_size": 2, "gradient_accumulation_steps": 8}
    assert d.reason == (
        "'language' ran out of memory (out of memory at step 1 with batch_size 4) on attempt 1: retry 1/2 with "
        "batch_size 4 -> 2, gradient_accumulation_steps 4 -> 8 (effective batch 16 per process kept)"
    )
    assert (d.numbers["effective_batch_per_process"], d.numbers["new_effective_batch_per_process"]) == (16, 16)


def test_oom_second_retry():
    d = run(dataclasses.replace(OOM, attempt=2, batch_size=2, gradient_accumulation_steps=8), retries_used=1)
    assert d.retry_changes == {"batch_size": 1, "gradient_accumulation_steps": 16}
    assert "retry 2/2" in d.reason


def test_oom_odd_batch_changes_the_effective_batch():
    d = run(dataclasses.replace(OOM, batch_size=3, gradient_accumulation_steps=4))
    assert d.retry_changes == {"batch_size": 1, "gradient_accumulation_steps": 8}
    assert d.reason.endswith("(odd batch_size: effective batch per process changes 12 -> 8)")


def test_oom_batch_of_one_cannot_shrink():
    d = run(dataclasses.replace(OOM, batch_size=1, gradient_accumulation_steps=16), [PROJECTION])
    assert (d.action, d.champion) == ("stop_failed", "projection")
    assert "batch_size 1 cannot shrink" in d.reason and d.reason.endswith("stop, keep 'projection'")


def test_oom_retries_exhausted():
    d = run(dataclasses.replace(OOM, attempt=3, batch_size=2), [PROJECTION], retries_used=2)
    assert (d.action, d.champion) == ("stop_failed", "projection")
    assert d.reason.endswith("; out-of-memory retries used up (2/2): stop, keep 'projection'")


def test_retry_kinds_are_independent():
    # retries_used counts this failure kind only; a diverged stage can still be retried after OOM retries
    assert run(DIVERGED, retries_used=0, g=gate(max_oom_retries=0)).action == "retry"
    assert run(OOM, retries_used=0, g=gate(max_diverged_retries=0)).action == "retry"


# --- helpers and input checks --------------------------------------------------------------------


def test_metric_value_and_best_stage():
    a, b, c = outcome("a", 2.0), outcome("b", 1.0), outcome("c", 1.0)
    assert metric_value(a, "eval_loss") == 2.0 and metric_value(a, "task_accuracy") is None
    assert best_stage([a, b, c], "eval_loss") is b  # tie: the first one
    assert best_stage([a, outcome("d", 0.1, status="diverged"), outcome("e", math.nan)], "eval_loss") is a
    assert best_stage([], "eval_loss") is None
    assert best_stage([acc("x", 0.3), acc("y", 0.5), acc("z", None)], "task_accuracy").name == "y"
    with pytest.raises(ValueError, match="metric 'bleu'"):
        metric_value(a, "bleu")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="status 'crashed'"):
        run(outcome(status="crashed"))
    with pytest.raises(ValueError, match="retries_used"):
        run(outcome(), retries_used=-1)
    with pytest.raises(ValueError, match="metric"):
        decide(outcome(), [], stand_in(metric="bleu"), retries_used=0, is_last_stage=False)


def test_earlier_failures_are_ignored():
    earlier = [outcome("projection", 0.5, status="diverged"), outcome("projection", math.nan)]
    d = run(outcome("vision", 1.0), earlier)
    assert (d.action, d.champion, d.numbers["best_earlier_stage"]) == ("next", "vision", None)


# --- properties ----------------------------------------------------------------------------------

losses = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False)
accuracies = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)
statuses = st.sampled_from(["completed", "plateaued", "diverged", "oom"])
tolerances = st.floats(min_value=0.0, max_value=0.5, allow_nan=False)


@st.composite
def stage_outcomes(draw, name=None, metric_values=losses, status=None):
    value = draw(st.one_of(metric_values, st.just(math.nan), st.none()) if status is None else metric_values)
    max_steps = draw(st.one_of(st.none(), st.integers(1, 20_000)))
    warmup = draw(st.integers(0, max_steps if max_steps else 2000))
    return outcome(
        name or draw(st.text("abcdefgh", min_size=1, max_size=6)),
        value,
        task_accuracy=draw(st.one_of(st.none(), accuracies)),
        status=status or draw(statuses),
        attempt=draw(st.integers(1, 4)),
        batch_size=draw(st.integers(1, 64)),
        gradient_accumulation_steps=draw(st.integers(1, 64)),
        learning_rate=draw(st.floats(1e-7, 1e-2)),
        max_grad_norm=draw(st.floats(0.01, 10.0)),
        warmup_steps=warmup,
        max_steps=max_steps,
        learning_rates=draw(
            st.one_of(
                st.none(),
                st.dictionaries(
                    st.sampled_from(["world_projector", "gemma_vision", "gemma_language", "cosmos_vae"]),
                    st.floats(1e-7, 1e-2),
                    min_size=1,
                ),
            )
        ),
    )


def scaled(o: StageOutcome, factor: float) -> StageOutcome:
    return dataclasses.replace(o, eval_loss=None if o.eval_loss is None else o.eval_loss * factor)


@settings(max_examples=300, deadline=None)
@given(
    o=stage_outcomes(name="this"),
    earlier=st.lists(stage_outcomes(), max_size=4),
    target=st.one_of(st.none(), losses),
    tol=tolerances,
    exponent=st.integers(-20, 20),
    retries_used=st.integers(0, 3),
    last=st.booleans(),
)
def test_invariant_to_scaling_losses_and_target(o, earlier, target, tol, exponent, retries_used, last):
    # Powers of two scale floats exactly, so nothing may change but the printed loss values.
    factor = 2.0**exponent
    g1, g2 = (
        gate(target=target, regression_tolerance=tol),
        gate(target=None if target is None else target * factor, regression_tolerance=tol),
    )
    a = run(o, earlier, g1, retries_used=retries_used, is_last_stage=last)
    b = run(scaled(o, factor), [scaled(e, factor) for e in earlier], g2, retries_used=retries_used, is_last_stage=last)
    assert (a.action, a.champion, a.retry_changes) == (b.action, b.champion, b.retry_changes)
    assert a.numbers.get("degradation") == b.numbers.get("degradation")


@settings(max_examples=300, deadline=None)
@given(
    o=stage_outcomes(name="this", metric_values=accuracies),
    earlier=st.lists(stage_outcomes(metric_values=accuracies), max_size=4),
    target=st.one_of(st.none(), accuracies),
    tol=tolerances,
)
def test_accuracy_is_the_mirror_of_loss(o, earlier, target, tol):
    # Judging accuracy a with target t is judging a "loss" of -a with target -t.
    def as_acc(x):
        return dataclasses.replace(x, task_accuracy=x.eval_loss, eval_loss=None)

    def negated(x):
        return dataclasses.replace(x, eval_loss=None if x.eval_loss is None else -x.eval_loss)

    a = run(
        as_acc(o), [as_acc(e) for e in earlier], gate(metric="task_accuracy", target=target, regression_tolerance=tol)
    )
    b = run(
        negated(o),
        [negated(e) for e in earlier],
        stand_in(target=None if target is None else -target, regression_tolerance=tol),
    )  # negative "losses"
    assert (a.action, a.champion) == (b.action, b.champion)


def simulate(stages, g):
    """Feed successful stages through the gate as the pipeline would; returns the decisions."""
    earlier, decisions = [], []
    for i, o in enumerate(stages):
        d = run(o, earlier, g, is_last_stage=i == len(stages) - 1)
        decisions.append(d)
        if d.action != "next":
            break
        earlier.append(o)
    return decisions


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(losses, min_size=1, max_size=6, unique=True),
    tol=tolerances,
    status=st.sampled_from(["completed", "plateaued"]),
)
def test_an_improving_sequence_never_regresses(values, tol, status):
    values = sorted(values, reverse=True)  # strictly decreasing losses
    stages = [outcome(f"s{i}", v, status=status) for i, v in enumerate(values)]
    decisions = simulate(stages, gate(regression_tolerance=tol))
    assert [d.action for d in decisions] == ["next"] * len(stages)
    assert [d.champion for d in decisions] == [s.name for s in stages]  # each improvement takes the title
    assert "last stage: pipeline complete" in decisions[-1].reason


@settings(max_examples=300, deadline=None)
@given(stages=st.lists(stage_outcomes(), min_size=1, max_size=6), target=st.one_of(st.none(), losses), tol=tolerances)
def test_champion_has_the_best_metric_among_the_stages_considered(stages, target, tol):
    stages = [dataclasses.replace(s, name=f"s{i}") for i, s in enumerate(stages)]
    earlier: list[StageOutcome] = []
    for i, o in enumerate(stages):
        d = run(o, earlier, gate(target=target, regression_tolerance=tol), is_last_stage=i == len(stages) - 1)
        considered = earlier + ([o] if d.action in ("next", "stop_good_enough") else [])
        usable = {
            s.name: s.eval_loss
            for s in considered
            if s.status in ("completed", "plateaued") and s.eval_loss is not None and math.isfinite(s.eval_loss)
        }
        if not usable:
            assert d.champion is None
        else:
            assert d.champion in usable and usable[d.champion] == min(usable.values())
        if d.action == "stop_regressed":
            assert d.champion != o.name
        if d.action != "next":
            break
        earlier.append(o)


@settings(max_examples=300, deadline=None)
@given(o=stage_outcomes(status="diverged"), retries_used=st.integers(0, 1))
def test_diverged_retry_changes_make_a_valid_config(o, retries_used):
    d = run(o, retries_used=retries_used)
    if retries_used >= 1:
        assert d.action == "stop_failed"
        return
    cfg = TrainingConfig(
        learning_rate=o.learning_rate,
        learning_rates=o.learning_rates,
        max_grad_norm=o.max_grad_norm,
        warmup_steps=o.warmup_steps,
        max_steps=o.max_steps,
        batch_size=o.batch_size,
        gradient_accumulation_steps=o.gradient_accumulation_steps,
    )
    new = cfg.with_changes(**d.retry_changes)
    assert new.learning_rate == pytest.approx(o.learning_rate / 10)
    assert new.max_grad_norm <= 0.5 and new.max_grad_norm <= o.max_grad_norm
    assert new.warmup_steps >= min(o.warmup_steps, 500) and (o.max_steps is None or new.warmup_steps <= o.max_steps)


@settings(max_examples=300, deadline=None)
@given(o=stage_outcomes(status="oom"), retries_used=st.integers(0, 3))
def test_oom_retry_changes_make_a_valid_config(o, retries_used):
    d = run(o, retries_used=retries_used)
    if o.batch_size == 1 or retries_used >= 2:
        assert d.action == "stop_failed"
        return
    assert d.action == "retry"
    cfg = TrainingConfig(batch_size=o.batch_size, gradient_accumulation_steps=o.gradient_accumulation_steps)
    new = cfg.with_changes(**d.retry_changes)
    assert new.batch_size * 2 in (o.batch_size, o.batch_size - 1)
    assert new.effective_batch_size <= cfg.effective_batch_size
    assert (new.effective_batch_size == cfg.effective_batch_size) == (o.batch_size % 2 == 0)
