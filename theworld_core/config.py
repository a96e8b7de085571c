"""Typed, validated configuration: the one place defaults live.

The seed's stage JSON files are flat (model, data and training keys side by side), so a stage
config is the union of the groups below. Each group is also usable alone: the model code takes a
`ModelConfig`, the data code a `DataConfig`, and both accept a full stage config because the
fields are the same.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_GEMMA = "google/gemma-3-4b-it"
DEFAULT_COSMOS = "nvidia/Cosmos-Predict2-2B-Video2World"


class StrictModel(BaseModel):
    """Unknown keys are errors, never silently ignored (the reference implementation's mistake)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(StrictModel):
    """What TheWorld is built from, and the shape of its world branch."""

    model_name: str = DEFAULT_GEMMA
    """Gemma 3 checkpoint: a hub id or a local folder (e.g. the one `theworld tiny` prints)."""
    model_revision: str | None = None
    """Hub revision (branch, tag or commit) of `model_name`; ignored for local folders."""
    cosmos_model_name: str = DEFAULT_COSMOS
    """Cosmos checkpoint whose `vae` subfolder holds the Wan 2.1 VAE: a hub id or a local folder."""
    cosmos_revision: str | None = None
    """Hub revision of `cosmos_model_name`."""
    num_world_steps: int = Field(0, ge=0)
    """Future world-model rollout steps fed to the model. Only 0 (the observed frame) is supported yet."""
    max_world_steps: int = Field(16, ge=0)
    """Size of the temporal position embedding minus one (entry 0 is the observed frame)."""
    enable_world: bool = True
    """False gives plain Gemma 3 behaviour (no world tokens); used for baselines and parity checks."""
    world_tokens: int = Field(64, ge=1)
    """World tokens per image: the VAE latent is average-pooled to a sqrt(n) x sqrt(n) grid. Perfect square."""
    world_image_size: int = Field(256, ge=8)
    """Side in pixels of the image fed to the VAE encoder (a multiple of 8; the latent is size/8)."""
    world_projector: Literal["linear", "mlp"] = "linear"
    """Latent (16 channels) -> text hidden size: one linear layer as in the seed, or a 2-layer MLP."""
    max_seq_length: int = Field(2048, ge=8)
    """Longest token sequence after world tokens are inserted; longer inputs are refused, not cut."""

    @field_validator("num_world_steps")
    @classmethod
    def _only_observed_frame(cls, value: int) -> int:
        if value != 0:
            raise ValueError(
                f"num_world_steps={value} is not supported yet: only 0 (world tokens from the observed frame) "
                "is implemented; multi-step rollouts come in a later release"
            )
        return value

    @field_validator("world_tokens")
    @classmethod
    def _perfect_square(cls, value: int) -> int:
        side = math.isqrt(value)
        if side * side != value:
            raise ValueError(f"world_tokens={value} must be a perfect square (4, 16, 64, ...): the latent is pooled to a square grid")
        return value

    @field_validator("world_image_size")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"world_image_size={value} must be a multiple of 8 (the VAE downsamples by 8)")
        return value


class DataConfig(StrictModel):
    """Where samples come from and how they are split."""

    dataset_name: str = "synthetic"
    """`synthetic` (generated shapes; the embedded default), a local folder with `metadata.jsonl`,
    or a local `.jsonl` / `.csv` file of image paths and captions."""
    num_samples: int | None = Field(None, ge=1)
    """Use at most this many samples of the source (null: all of it)."""
    streaming: bool = False
    """Read the source lazily (constant memory) instead of materialising it."""
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    """Share of samples held out for evaluation, chosen by a hash of the sample id (stable, disjoint)."""
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    """A stage fails when more than this share of samples has a missing or corrupt image."""
    synthetic_samples: int = Field(2000, ge=10)
    """How many samples the `synthetic` source generates."""
    synthetic_image_size: int = Field(64, ge=16)
    """Side in pixels of generated synthetic images."""
    seed: int = 0
    """Seed of the synthetic generator (the split itself depends only on sample ids)."""
