"""Fully sharded data parallel for a stage with `distributed: fsdp` (torch FSDP2, `fully_shard`).

The trainer shards the model itself instead of handing it to accelerate's FSDP plugin: the same
code then runs on GPUs (nccl) and on CPUs (gloo, where accelerate silently falls back to DDP), so
the CPU tests exercise what the GPUs run. FSDP2 keeps each parameter's dtype (no flat buffer), so
a unit may hold fp32 trainable and bf16 frozen weights side by side: the precision policy
(model/precision.py) is unchanged, and autocast still runs the matmuls in the compute dtype.

Units: each Gemma decoder layer and SigLIP encoder layer, the vision tower, the multi-modal
projector and the VAE when they train, then the root (embeddings, lm_head, world projector). A
frozen vision tower or VAE stays whole on every rank: the feature cache runs it outside the root's
forward, where FSDP2 cannot gather a unit.

Saving is collective: every rank all-gathers each sharded tensor (`stage_output.full_tensor`),
rank 0 keeps and writes it, so stage outputs and resume states are the files an unsharded run
writes. Loading reads the full tensors on every rank and keeps the local shard.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from theworld_core.model.stage_output import full_tensor

log = logging.getLogger("theworld.sharding")

UNIT_CLASSES = ("Gemma3DecoderLayer", "SiglipEncoderLayer")
"""Module classes that each become one FSDP unit (the transformer layers)."""
ENCODERS = ("gemma.model.vision_tower", "gemma.model.multi_modal_projector", "vae")
"""Submodules of TheWorld that a frozen-encoder feature cache runs on their own, outside the root's
forward: a trainable one is a unit of its own, a frozen one stays whole on every rank (FSDP2 only
gathers a unit inside the root's forward, and the frozen encoders are small next to the rest)."""


def take_over_fsdp(distributed: str) -> str:
    """The stage's `distributed`, "fsdp" also when `accelerate launch` was given an FSDP config
    (configs/accelerate/fsdp.yaml); call it before the Accelerator is built: accelerate's own FSDP
    plugin stays off (it would wrap the model a second time), this module shards instead."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return distributed
    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ValueError(
            f"the accelerate config sets fsdp_version: {version}; TheWorld shards with FSDP2 only (FSDP1 refuses "
            "units that mix fp32 trainable and bf16 frozen weights): set fsdp_version: 2 (configs/accelerate/fsdp.yaml)"
        )
    os.environ.pop("ACCELERATE_USE_FSDP")
    return "fsdp"


def fsdp_units(model: nn.Module) -> tuple[list[nn.Module], set[nn.Parameter]]:
    """(the modules that become FSDP units, innermost first; the parameters kept whole). The root
    becomes a unit too, separately."""
    units, whole = [], []
    for path in ENCODERS:
        try:
            module = model.get_submodule(path)
        except AttributeError:  # a model without that part
            continue
        params = list(module.parameters())
        if params and any(p.requires_grad for p in params):
            units.append(module)
        elif params:
            whole.append(module)
    inside_whole = {id(m) for w in whole for m in w.modules()}
    layers = [m for m in model.modules() if type(m).__name__ in UNIT_CLASSES and id(m) not in inside_whole]
    return layers + units, {p for w in whole for p in w.parameters()}


def shard_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard `model` in place over every process (call after freezing and the precision policy, and
    before building the optimizer: sharding replaces the parameters)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units, whole = fsdp_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=whole)
    model.to(device)  # the whole encoders and buffers outside any unit; sharded parameters are there already
    log.info("FSDP2: %d units over %d processes, %d frozen parameters whole", len(units) + 1, mesh.size(), len(whole))
    return model


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a sharded tensor (in-place ops on it change the shard), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def gathered_state(obj: Any, keep: bool) -> Any:
    """`obj` (nested dicts/lists of tensors) with every sharded tensor all-gathered, on CPU.

    Collective: call it on every rank, in the same order. `keep=False` (ranks that do not write)
    drops each gathered tensor at once, so only rank 0 holds a full copy."""
    if isinstance(obj, torch.Tensor):
        full = full_tensor(obj)
        return full.detach().cpu() if keep else None
    if isinstance(obj, dict):
        return {k: gathered_state(v, keep) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gathered_state(v, keep) for v in obj)
    return obj


def shard_optimizer_state(saved: dict, model: nn.Module) -> dict:
    """Name-keyed optimizer state (`optim.optimizer_state_by_name`) with each full moment replaced by
    this rank's shard, laid out as its parameter (no communication: every rank read the file)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    state = {}
    for name, entry in saved["state"].items():
        param = params.get(name)
        if not isinstance(param, DTensor):
            state[name] = entry
            continue
        state[name] = {
            k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
            if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(param.shape)
            else v
            for k, v in entry.items()
        }
    return {**saved, "state": state}
