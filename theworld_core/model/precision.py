"""The precision policy: which dtype every parameter of TheWorld lives in, and whether autocast runs.

One rule, applied after the trainable components are chosen:

- trainable components hold fp32 master weights, whatever dtype the checkpoint declares (Gemma 3
  declares bf16 and transformers 5 loads it so): AdamW stepping bf16 weights rounds most small
  updates away;
- frozen components sit in the compute dtype: bf16 (or fp16) where that mixed precision runs on the
  device, fp32 otherwise (a CPU, a GPU without bf16, `mixed_precision: no`);
- autocast runs in the compute dtype whenever that is not fp32, so the fp32 trainable weights meet
  the frozen ones in matmuls of the compute dtype; TheWorld casts at component boundaries, so its
  forward also runs with mixed dtypes and no autocast.

Buffers are left as loaded (Gemma's rotary frequencies are fp32 on purpose).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from theworld_core.model.components import COMPONENTS, component_of

MIXED_PRECISION_CHOICES = ("no", "bf16", "fp16")
MASTER_DTYPE = torch.float32


class PrecisionError(TypeError):
    """A parameter is not in the dtype the precision policy puts it in."""


@dataclass(frozen=True)
class PrecisionPolicy:
    """What `mixed_precision` means on one device."""

    mixed_precision: str
    """The setting asked for: no, bf16 or fp16."""
    effective: str
    """What runs on this device (no, bf16 or fp16): pass it to `Accelerator(mixed_precision=...)`."""
    device_type: str
    """cpu, cuda, ... (the `torch.device.type` the policy was resolved for)."""
    compute_dtype: torch.dtype
    """dtype of frozen parameters and of autocast."""
    autocast: bool
    """Whether the forward runs under `torch.autocast(device_type, compute_dtype)`."""
    master_dtype: torch.dtype = MASTER_DTYPE
    """dtype of trainable parameters (what the optimizer steps): always fp32."""

    def __post_init__(self) -> None:
        if self.mixed_precision not in MIXED_PRECISION_CHOICES or self.effective not in MIXED_PRECISION_CHOICES:
            raise ValueError(
                f"mixed_precision={self.mixed_precision!r} (effective {self.effective!r}) is not allowed: "
                f"use one of {list(MIXED_PRECISION_CHOICES)}"
            )
        if self.master_dtype != MASTER_DTYPE:
            raise ValueError(f"master_dtype={self.master_dtype} is not allowed: trainable weights are fp32")
        if self.autocast != (self.compute_dtype != torch.float32):
            raise ValueError(f"autocast={self.autocast} does not fit compute_dtype={self.compute_dtype}")

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """The autocast region for code that runs the model outside the trainer's Accelerator (eval, generate)."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute_dtype)

    def as_params(self) -> dict[str, str]:
        """The policy as flat string params for MLflow (`precision/...`)."""
        return {
            "precision/mixed_precision": self.mixed_precision,
            "precision/effective": self.effective,
            "precision/device_type": self.device_type,
            "precision/compute_dtype": _dtype_name(self.compute_dtype),
            "precision/master_dtype": _dtype_name(self.master_dtype),
            "precision/autocast": str(self.autocast).lower(),
        }


def resolve_precision(
    mixed_precision: str, device: torch.device | str, *, bf16_supported: bool | None = None
) -> PrecisionPolicy:
    """The policy for `mixed_precision` on `device`.

    `bf16` runs where bf16 is supported (default: a CUDA device that reports it; a CPU only if the
    caller passes `bf16_supported=True`) and falls back to fp32 elsewhere; `fp16` runs on CUDA only;
    `no` is fp32 everywhere.
    """
    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(
            f"mixed_precision={mixed_precision!r} is not allowed: use one of {list(MIXED_PRECISION_CHOICES)}"
        )
    device_type = torch.device(device).type
    if bf16_supported is None:
        bf16_supported = device_type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if mixed_precision == "bf16" and bf16_supported:
        effective, compute = "bf16", torch.bfloat16
    elif mixed_precision == "fp16" and device_type == "cuda":
        effective, compute = "fp16", torch.float16
    else:
        effective, compute = "no", torch.float32
    return PrecisionPolicy(
        mixed_precision=mixed_precision,
        effective=effective,
        device_type=device_type,
        compute_dtype=compute,
        autocast=compute != torch.float32,
    )


def apply_precision(model: nn.Module, policy: PrecisionPolicy, trainable: Iterable[str]) -> dict[str, str]:
    """Put `model` (a loaded TheWorld) into `policy`: `trainable` components fp32, the rest the compute dtype.

    Call it after `set_trainable(trainable)` and before building the optimizer (it replaces parameter
    data in place, so parameter objects and tied weights stay shared). Returns component -> dtype name.
    """
    wanted = set(trainable)
    unknown = wanted - set(COMPONENTS)
    if unknown:
        raise KeyError(f"unknown components {sorted(unknown)}; allowed: {list(COMPONENTS)}")
    dtypes = {c: policy.master_dtype if c in wanted else policy.compute_dtype for c in COMPONENTS}
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights come once
            target = dtypes[component_of(name)]
            if param.dtype != target:
                param.data = param.data.to(target)
                if param.grad is not None:
                    param.grad = None
    return {c: _dtype_name(d) for c, d in dtypes.items()}


def check_precision(model: nn.Module, policy: PrecisionPolicy) -> None:
    """Raise `PrecisionError` naming the parameters whose dtype breaks `policy`.

    Trainable means `requires_grad` (what the optimizer will step): those must be fp32; every frozen
    parameter must be in the compute dtype.
    """
    wrong = []
    for name, param in model.named_parameters():
        expected = policy.master_dtype if param.requires_grad else policy.compute_dtype
        if param.dtype != expected:
            role = "trainable" if param.requires_grad else "frozen"
            wrong.append(
                f"{name} ({component_of(name)}, {role}) is {_dtype_name(param.dtype)}, expected {_dtype_name(expected)}"
            )
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise PrecisionError(
            f"parameters break the precision policy (mixed_precision={policy.mixed_precision!r} on "
            f"{policy.device_type}: trainable {_dtype_name(policy.master_dtype)}, frozen "
            f"{_dtype_name(policy.compute_dtype)}): " + "; ".join(wrong[:5]) + more
        )


def dtypes_by_component(model: nn.Module) -> dict[str, list[str]]:
    """Component -> the sorted dtype names of its parameters (for reports and tests)."""
    found: dict[str, set[str]] = {c: set() for c in COMPONENTS}
    for name, param in model.named_parameters():
        found[component_of(name)].add(_dtype_name(param.dtype))
    return {c: sorted(names) for c, names in found.items()}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


__all__ = [
    "MIXED_PRECISION_CHOICES",
    "PrecisionError",
    "PrecisionPolicy",
    "apply_precision",
    "check_precision",
    "dtypes_by_component",
    "resolve_precision",
]
