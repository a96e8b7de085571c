"""The component registry: the one place that says which parameter belongs to what.

Freezing, the parameter report, the freeze audit, per-component learning rates and the stage
output all read this registry, so what is trained and what is saved can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from theworld_core.config import COMPONENT_NAMES, FREEZE_FLAG_OF

# Parameter-name prefixes of each component inside `TheWorld` (its attributes are `world`,
# `gemma` and `vae`). Order matters only for display.
COMPONENT_PREFIXES: dict[str, tuple[str, ...]] = {
    # Projector, temporal embedding and the <start_of_world>/<end_of_world> embeddings: always trained.
    "world_projector": ("world.",),
    # SigLIP vision tower + Gemma's multi-modal projector.
    "gemma_vision": ("gemma.model.vision_tower.", "gemma.model.multi_modal_projector."),
    # Decoder layers, token embeddings and the (tied) lm_head.
    "gemma_language": ("gemma.model.language_model.", "gemma.lm_head."),
    # Wan 2.1 VAE encoder + quant_conv; the decoder is never loaded.
    "cosmos_vae": ("vae.",),
}
COMPONENTS: tuple[str, ...] = COMPONENT_NAMES
assert tuple(COMPONENT_PREFIXES) == COMPONENTS, "the registry and config.COMPONENT_NAMES must list the same components"

# The three freeze flags, each switching one component (flag -> component); see docs/stages.md#components.
FREEZE_FLAGS: dict[str, str] = {flag: component for component, flag in FREEZE_FLAG_OF.items()}

# The four stages (docs/stages.md#the-four-stages), used by `theworld plan` when no stages.yaml is given.
SEED_STAGES: dict[str, dict[str, bool]] = {
    "stage1_projection": {"freeze_gemma_vision": True, "freeze_gemma_language": True, "freeze_cosmos_vae": True},
    "stage2_vision": {"freeze_gemma_vision": False, "freeze_gemma_language": True, "freeze_cosmos_vae": True},
    "stage3_language": {"freeze_gemma_vision": False, "freeze_gemma_language": False, "freeze_cosmos_vae": True},
    "stage4_full": {"freeze_gemma_vision": False, "freeze_gemma_language": False, "freeze_cosmos_vae": False},
}


class FreezeAuditError(RuntimeError):
    """A component was trained although frozen, or was not trained although trainable."""


def component_of(param_name: str) -> str:
    """The component a parameter (or buffer) name of `TheWorld` belongs to."""
    for component, prefixes in COMPONENT_PREFIXES.items():
        if param_name.startswith(prefixes):
            return component
    raise KeyError(f"parameter {param_name!r} belongs to no component; known prefixes: {COMPONENT_PREFIXES}")


def trainable_components(freeze_flags: Mapping[str, bool]) -> tuple[str, ...]:
    """Components a stage trains, from its freeze flags (missing flags mean frozen)."""
    unknown = set(freeze_flags) - set(FREEZE_FLAGS)
    if unknown:
        raise KeyError(f"unknown freeze flags {sorted(unknown)}; allowed: {sorted(FREEZE_FLAGS)}")
    unfrozen = {FREEZE_FLAGS[flag] for flag, frozen in freeze_flags.items() if not frozen}
    return tuple(c for c in COMPONENTS if c == "world_projector" or c in unfrozen)


def parameters_by_component(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Named parameters grouped by component (tied weights counted once, as `named_parameters` does)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {c: [] for c in COMPONENTS}
    for name, param in model.named_parameters():
        groups[component_of(name)].append((name, param))
    return groups


def apply_freeze(model: nn.Module, components: Iterable[str]) -> tuple[str, ...]:
    """Make exactly `components` trainable and everything else frozen; returns them in registry order."""
    wanted = set(components)
    unknown = wanted - set(COMPONENTS)
    if unknown:
        raise KeyError(f"unknown components {sorted(unknown)}; allowed: {list(COMPONENTS)}")
    for component, params in parameters_by_component(model).items():
        for _, param in params:
            param.requires_grad_(component in wanted)
    return tuple(c for c in COMPONENTS if c in wanted)


@dataclass(frozen=True)
class ComponentCount:
    total: int
    trainable: int


def parameter_report(model: nn.Module) -> dict[str, ComponentCount]:
    """Per component: total and trainable parameter counts (works on the meta device too)."""
    report = {}
    for component, params in parameters_by_component(model).items():
        total = sum(p.numel() for _, p in params)
        trainable = sum(p.numel() for _, p in params if p.requires_grad)
        report[component] = ComponentCount(total, trainable)
    return report


def _checksum(params: list[tuple[str, nn.Parameter]]) -> tuple[float, float]:
    # float64 sums of w and of w^2 over the component: any real update changes them, and they cost
    # one pass over the weights instead of a copy (a copy of stage 4 would double memory).
    with torch.no_grad():
        total = math.fsum(float(p.detach().double().sum()) for _, p in params)
        squares = math.fsum(float(p.detach().double().square().sum()) for _, p in params)
    return total, squares


def snapshot(model: nn.Module) -> dict[str, tuple[float, float]]:
    """Per-component weight checksums, taken before the first optimizer step of a stage."""
    return {c: _checksum(params) for c, params in parameters_by_component(model).items() if params}


def gradient_presence(model: nn.Module) -> dict[str, bool]:
    """Per component: whether any parameter holds a non-zero gradient (call after backward)."""
    present = {}
    for component, params in parameters_by_component(model).items():
        present[component] = any(p.grad is not None and bool(p.grad.detach().abs().sum() > 0) for _, p in params)
    return present


def audit_step(
    model: nn.Module,
    before: Mapping[str, tuple[float, float]],
    had_gradient: Mapping[str, bool],
    expected_trainable: Iterable[str],
) -> None:
    """Check one optimizer step: trainable components got gradients and changed, frozen ones did neither.

    Raises `FreezeAuditError` naming every component that disagrees.
    """
    expected = set(expected_trainable)
    after = snapshot(model)
    problems = []
    for component in before:
        changed = after[component] != before[component]
        got_grad = had_gradient.get(component, False)
        if component in expected and not (changed and got_grad):
            problems.append(
                f"{component} should be trainable but "
                + ("received no gradient" if not got_grad else "did not change after the optimizer step")
            )
        if component not in expected and (changed or got_grad):
            problems.append(f"{component} should be frozen but " + ("received a gradient" if got_grad else "changed"))
    if problems:
        raise FreezeAuditError("freeze audit failed after the first optimizer step: " + "; ".join(problems))
