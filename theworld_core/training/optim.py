"""Optimizer construction, the learning-rate schedule, and optimizer state keyed by parameter *name*.

Keying by name (not by position in the parameter list) is what makes a resume state survive a
change in which parameters are trainable: a stage transition that carries optimizer moments
picks up exactly the parameters that stay trainable, and nothing else.

Two optimizers (the stage key `optimizer`):
- `adamw`: `torch.optim.AdamW`, fused kernels on CUDA, the multi-tensor (foreach) path elsewhere;
- `adamw_8bit`: torchao's `AdamW8bit` (8-bit block-quantised moments, the `gpu` extra), CUDA only.
  Its moments are torchao tensor subclasses (`OptimState8bit`); they go through `torch.save` /
  `torch.load` and `Optimizer.load_state_dict` as they are, so name-keyed state works unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from theworld_core.config import StageConfig
from theworld_core.config.errors import ConfigError
from theworld_core.model.components import parameters_by_component

OPTIMIZERS = ("adamw", "adamw_8bit")
# nn.Parameters that are embeddings without being an nn.Embedding's weight.
EMBEDDING_PARAMETERS = ("world.marker_embeddings",)


def check_optimizer_available(name: str, *, cuda: bool, source: str = "stage config") -> None:
    """Raise `ConfigError` naming the key `optimizer` when `name` cannot run here (before any work)."""
    if name not in OPTIMIZERS:
        raise ConfigError([f"optimizer: {name!r} is not allowed: use one of {list(OPTIMIZERS)}"], source)
    if name != "adamw_8bit":
        return
    if not cuda:
        problem = (
            f"optimizer: {name!r} is not allowed on a machine without a CUDA GPU: torchao's 8-bit AdamW "
            "is a GPU optimizer; use 'adamw' here"
        )
        raise ConfigError([problem], source)
    try:
        import torchao.optim  # noqa: F401
    except ImportError as error:
        problem = (
            f"optimizer: {name!r} is not allowed without torchao ({error}): install the `gpu` extra "
            "(pip install 'theworld-multistage[gpu]') or use 'adamw'"
        )
        raise ConfigError([problem], source) from None


def no_weight_decay_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters AdamW must not decay: biases and norm scales (1-D, or named `norm`) and
    every embedding (token, position and temporal embeddings, the world marker embeddings): decay
    pulls rarely seen rows towards zero between their updates."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    exempt = set()
    for name, param in model.named_parameters():
        if param.ndim < 2 or "norm" in name.lower() or id(param) in embeddings or name in EMBEDDING_PARAMETERS:
            exempt.add(id(param))
    return exempt


def build_optimizer(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    component_learning_rates: Mapping[str, float] | None = None,
    *,
    optimizer: str = "adamw",
    device_type: str = "cpu",
) -> tuple[torch.optim.Optimizer, list[list[str]]]:
    """The stage's optimizer over trainable parameters only, one group per (component, decay or not).

    Returns the optimizer and, per group, the parameter names in order (what name-keyed state needs).
    Groups carry a `name` (e.g. `gemma_vision/decay`) used to label per-group learning rates.
    `device_type`: where the parameters will be stepped (`fused` AdamW on `cuda`).
    """
    component_learning_rates = component_learning_rates or {}
    exempt = no_weight_decay_parameters(model)
    groups, names = [], []
    for component, params in parameters_by_component(model).items():
        trainable = [(n, p) for n, p in params if p.requires_grad]
        for decayed in (True, False):
            chosen = [(n, p) for n, p in trainable if (id(p) not in exempt) == decayed]
            if not chosen:
                continue
            groups.append(
                {
                    "params": [p for _, p in chosen],
                    "lr": component_learning_rates.get(component, learning_rate),
                    "weight_decay": weight_decay if decayed else 0.0,
                    "name": f"{component}/{'decay' if decayed else 'no_decay'}",
                }
            )
            names.append([n for n, _ in chosen])
    if not groups:
        raise ValueError("no trainable parameters: every component is frozen")
    if optimizer == "adamw":
        fast = {"fused": True} if device_type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay, **fast), names
    if optimizer == "adamw_8bit":
        from torchao.optim import AdamW8bit

        # Its learning rates are 0-d tensors (no recompile per value); the scheduler fills them in place.
        return AdamW8bit(groups, lr=learning_rate, weight_decay=weight_decay), names
    raise ValueError(f"optimizer={optimizer!r} is not allowed: use one of {list(OPTIMIZERS)}")


def build_schedule(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """`transformers.get_scheduler(name)` shifted by one step, so optimizer step k (1-based) uses the
    schedule's value at k: the first step of a stage trains at `lr / warmup_steps` instead of 0, and
    the schedule is one step longer so the last step is not at 0 either (linear, cosine)."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    base = get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps + 1)
    # Closures, not objects: LambdaLR leaves plain functions out of its state_dict (nothing to pickle).
    shifted = [(lambda step, f=f: f(step + 1)) for f in base.lr_lambdas]
    return LambdaLR(optimizer, shifted)


def group_learning_rate(group: Mapping) -> float:
    """A param group's current learning rate as a float (torchao keeps it as a 0-d tensor)."""
    return float(group["lr"])


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
    optimizer: torch.optim.Optimizer, group_names: list[list[str]], saved: dict, restore_groups: bool = True
) -> list[str]:
    """Load name-keyed state into `optimizer`; parameters without saved state start fresh.

    `restore_groups=False` keeps the current group hyperparameters (a stage transition keeps its
    own learning rates). Moments saved by `adamw_8bit` are dequantised when loaded into `adamw`
    (a transition that changes the optimizer); `adamw_8bit` steps fp32 moments as they are.
    Returns the names whose moments were restored.
    """
    current = optimizer.state_dict()
    name_to_index = {}
    for group, names in zip(current["param_groups"], group_names):
        name_to_index.update(zip(names, group["params"]))
    restored = [n for n in saved["state"] if n in name_to_index]
    plain = isinstance(optimizer, torch.optim.AdamW)
    current["state"] = {
        name_to_index[n]: _plain_state(saved["state"][n]) if plain else saved["state"][n] for n in restored
    }
    if restore_groups:
        saved_groups = {g["name"]: g for g in saved["groups"]}
        for group in current["param_groups"]:
            if group["name"] in saved_groups:
                group.update(
                    {k: _like(group.get(k), v) for k, v in saved_groups[group["name"]].items() if k != "params"}
                )
    optimizer.load_state_dict(current)
    return restored


def _plain_state(state: Mapping) -> dict:
    """Per-parameter state with quantised moments (torchao subclasses) turned into fp32 tensors."""
    return {k: v.dequantize() if _quantised(v) else v for k, v in state.items()}


def _quantised(value) -> bool:
    # A DTensor (FSDP's shard of an fp32 moment) also has `dequantize`, and is not quantised.
    return hasattr(value, "dequantize") and type(value) is not torch.Tensor and not hasattr(value, "full_tensor")


def _like(current, saved):
    """A saved group value in the form the optimizer keeps it (torchao: 0-d tensor learning rates)."""
    if isinstance(current, torch.Tensor) and not isinstance(saved, torch.Tensor):
        return torch.tensor(saved, dtype=current.dtype)
    if isinstance(saved, torch.Tensor) and not isinstance(current, torch.Tensor) and saved.ndim == 0:
        return float(saved)
    return saved


def refuse_unavailable_options(cfg: StageConfig, *, cuda: bool) -> None:
    """Raise `ConfigError` for a stage option this machine cannot run, before any work.

    `optimizer: adamw_8bit` needs CUDA and torchao; `mixed_precision: fp16` needs CUDA (fp16 without
    a GradScaler on a GPU is not a setting to fall back from silently). `bf16` without bf16 support
    runs in fp32 by design (docs/stages.md#precision-and-optimizer), so stage files run on a laptop.
    """
    source = f"stage {cfg.name or cfg.output_dir}"
    check_optimizer_available(cfg.optimizer, cuda=cuda, source=source)
    if cfg.mixed_precision == "fp16" and not cuda:
        problem = (
            "mixed_precision: 'fp16' is not allowed on a machine without a CUDA GPU: use 'bf16' (fp32 "
            "where bf16 is not supported) or 'no'"
        )
        raise ConfigError([problem], source)
