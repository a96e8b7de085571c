"""Optimizer construction and optimizer state keyed by parameter *name*.

Keying by name (not by position in the parameter list) is what makes a resume state survive a
change in which parameters are trainable: a stage transition that carries optimizer moments
picks up exactly the parameters that stay trainable, and nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from theworld_core.model.components import parameters_by_component


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and norm scales (all 1-D tensors) are not decayed, by the usual convention."""
    return param.ndim < 2 or "norm" in name.lower()


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    component_learning_rates: Mapping[str, float] | None = None,
) -> tuple[torch.optim.AdamW, list[list[str]]]:
    """AdamW over trainable parameters only, one group per (component, decay or not).

    Returns the optimizer and, per group, the parameter names in order (what name-keyed state needs).
    Groups carry a `name` (e.g. `gemma_vision/decay`) used to label per-group learning rates.
    """
    component_learning_rates = component_learning_rates or {}
    groups, names = [], []
    for component, params in parameters_by_component(model).items():
        trainable = [(n, p) for n, p in params if p.requires_grad]
        for decayed in (True, False):
            chosen = [(n, p) for n, p in trainable if no_weight_decay(n, p) != decayed]
            if not chosen:
                continue
            groups.append({
                "params": [p for _, p in chosen],
                "lr": component_learning_rates.get(component, learning_rate),
                "weight_decay": weight_decay if decayed else 0.0,
                "name": f"{component}/{'decay' if decayed else 'no_decay'}",
            })
            names.append([n for n, _ in chosen])
    if not groups:
        raise ValueError("no trainable parameters: every component is frozen")
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay), names


def optimizer_state_by_name(optimizer: torch.optim.Optimizer, group_names: list[list[str]]) -> dict:
    """The optimizer's per-parameter state keyed by parameter name, plus group hyperparameters."""
    state = optimizer.state_dict()
    index_to_name = {}
    for group, names in zip(state["param_groups"], group_names):
        index_to_name.update(zip(group["params"], names))
    return {
        "state": {index_to_name[i]: s for i, s in state["state"].items()},
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
    }


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer,
    group_names: list[list[str]],
    saved: dict,
    restore_groups: bool = True,
) -> list[str]:
    """Load name-keyed state into `optimizer`; parameters without saved state start fresh.

    `restore_groups=False` keeps the current group hyperparameters (a stage transition keeps its
    own learning rates). Returns the names whose moments were restored.
    """
    current = optimizer.state_dict()
    name_to_index = {}
    for group, names in zip(current["param_groups"], group_names):
        name_to_index.update(zip(names, group["params"]))
    restored = [n for n in saved["state"] if n in name_to_index]
    current["state"] = {name_to_index[n]: saved["state"][n] for n in restored}
    if restore_groups:
        saved_groups = {g["name"]: g for g in saved["groups"]}
        for group in current["param_groups"]:
            if group["name"] in saved_groups:
                group.update({k: v for k, v in saved_groups[group["name"]].items() if k != "params"})
    optimizer.load_state_dict(current)
    return restored
