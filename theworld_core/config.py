"""Typed, validated configuration: the one place defaults live.

The seed's stage JSON files are flat (model, data and training keys side by side), so a stage
config is the union of the groups below. Each group is also usable alone: the model code takes a
`ModelConfig`, the data code a `DataConfig`, and both accept a full stage config because the
fields are the same.

- `ModelConfig`, `DataConfig`, `TrainingConfig` (with `PlateauConfig`): the groups.
- `StageConfig`: their flat union plus `name`; cross-field checks live in `TrainingConfig`.
- `load_stage_config(path)`: reads a seed stage file (JSON with `//` comments, `"_comment"` keys).
- `ConfigError`, `format_validation_error`, `validate_config`: one error format for every source,
  `<key path>: <value> is not allowed: <what is allowed>`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

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
    a local `.jsonl` / `.csv` file of image paths (or of URLs) and captions, a local `.parquet` URL
    list (`uid`, `url`, `text`), a hub dataset (`owner/name`, `hf:owner/name`) with an `image` or a
    `url` column, or `datacomp` (the hub URL list `mlfoundations/datacomp_1b`)."""
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
    dataset_split: str = "train"
    """Split of a hub dataset that is read (`load_dataset(..., split=)`); local sources ignore it."""
    fetch_timeout_s: float = Field(10.0, gt=0, allow_inf_nan=False)
    """URL lists: seconds each network operation (connect, each read) may take; a whole attempt
    (headers and body) gets three times as long."""
    fetch_retries: int = Field(2, ge=0, le=10)
    """URL lists: retries of a transient failure (timeout, connection error, truncated body, HTTP
    408/425/429/5xx); a 404 or a too-large image is not retried."""
    fetch_backoff_s: float = Field(0.5, ge=0, allow_inf_nan=False)
    """URL lists: wait before the first retry; doubles with each retry (plus up to this much jitter),
    at most 30 s."""
    fetch_max_bytes: int = Field(16 * 1024 * 1024, ge=1)
    """URL lists: larger images are skipped as `too_large` (a larger Content-Length is refused before
    the body is read)."""
    fetch_concurrency: int = Field(16, ge=1, le=256)
    """URL lists: images fetched at once, read ahead of the consumer in a bounded window."""
    image_cache_dir: str | None = None
    """URL lists: folder where fetched images are cached by sha256 of the URL, so a second epoch or a
    rerun does not fetch them again (null: `$XDG_CACHE_HOME/theworld/url-images`, else
    `~/.cache/theworld/url-images`)."""


# ---------------------------------------------------------------------------------------------
# Training: every training key of the seed's stage JSON files, same names and meanings.
# ---------------------------------------------------------------------------------------------

Component = Literal["world_projector", "gemma_vision", "gemma_language", "cosmos_vae"]
"""The four trainable components (the model's component registry uses the same names)."""
COMPONENT_NAMES: tuple[str, ...] = ("world_projector", "gemma_vision", "gemma_language", "cosmos_vae")

FREEZE_FLAG_OF: dict[str, str] = {
    "gemma_vision": "freeze_gemma_vision",
    "gemma_language": "freeze_gemma_language",
    "cosmos_vae": "freeze_cosmos_vae",
}
"""Component -> the seed's freeze flag that switches it (`world_projector` is always trained)."""

LrSchedulerName = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]
"""Names `transformers.get_scheduler(name, optimizer, num_warmup_steps=, num_training_steps=)` accepts
with no further arguments. Its other names (`reduce_lr_on_plateau`, `greedy`: need the metric at each
step; `cosine_with_min_lr`, `cosine_warmup_with_min_lr`, `warmup_stable_decay`: need extra kwargs)
are refused rather than half-supported."""

DEFAULT_MLFLOW_EXPERIMENT = "theworld-multistage"
"""MLflow experiment used when a config names none (`wandb_project` unset)."""

_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class PlateauConfig(StrictModel):
    """The plateau rule of the guide ("When to Move to Next Stage").

    A stage has plateaued at its latest evaluation step `t` when `t >= min_steps` and either

    - **window rule**: the best validation loss improved by less than `min_improvement` (relative)
      over the last `window_steps` steps, i.e. `(best_before - best_recent) / |best_before| <
      min_improvement` where `best_before` is the lowest loss evaluated at a step `<= t -
      window_steps` and `best_recent` the lowest loss evaluated in `(t - window_steps, t]`; the
      window must be covered (an evaluation at or before `t - window_steps` exists), else this rule
      does not fire; or
    - **patience rule**: no new best (strictly lower) loss for `patience_steps` steps, i.e.
      `t - best_step >= patience_steps`.

    `theworld_core.training.plateau` implements it. The same four keys appear flat in a stage config
    as `plateau_min_improvement`, `plateau_window_steps`, `plateau_patience_steps` and
    `plateau_min_steps` (the seed's JSON files are flat); `TrainingConfig.plateau` gives this model.
    A pipeline file may use this model as a nested `plateau:` section.
    """

    model_config = ConfigDict(use_attribute_docstrings=True)

    min_improvement: float = Field(0.01, ge=0, lt=1, allow_inf_nan=False)
    """Relative improvement of the best validation loss over the window below which the stage has
    plateaued (0.01 = the guide's 1%). An improvement of exactly this much counts as enough, so 0
    switches the window rule off."""
    window_steps: int = Field(5000, ge=1)
    """Length in optimizer steps of the window the improvement is measured over (the guide's 5K)."""
    patience_steps: int = Field(2000, ge=1)
    """Optimizer steps without a new best validation loss after which the stage has plateaued (2K)."""
    min_steps: int = Field(10000, ge=0)
    """No plateau verdict before this optimizer step (the guide: 10K for stage 1, 5K for the others)."""


PLATEAU_MIN_STEPS_PROJECTION_ONLY = 10000
"""The guide's minimum steps for stage 1 (projection only)."""
PLATEAU_MIN_STEPS_LATER_STAGES = 5000
"""The guide's minimum steps for the stages that unfreeze a pretrained component."""


@dataclass(frozen=True)
class MlflowNames:
    """Where a stage's metrics go: the MLflow experiment and run names."""

    experiment: str
    run_name: str | None


class TrainingConfig(StrictModel):
    """How a stage trains: the seed's training keys, plus what the pipeline adds (plateau, seed,
    per-component learning rates, optimizer carry-over).

    Keys starting with `_` (the seed's `"_comment"`) are dropped before validation.
    """

    model_config = ConfigDict(hide_input_in_errors=True, use_attribute_docstrings=True)

    # --- freezing (the seed's three flags) -------------------------------------------------
    freeze_gemma_vision: bool = True
    """Freeze Gemma's SigLIP vision tower and multi-modal projector (false from stage 2 on)."""
    freeze_gemma_language: bool = True
    """Freeze Gemma's language model, token embeddings and lm_head (false from stage 3 on)."""
    freeze_cosmos_vae: bool = True
    """Freeze the Cosmos (Wan 2.1) VAE encoder (false only in stage 4)."""

    # --- optimisation -------------------------------------------------------------------------
    learning_rate: PositiveFloat = 1e-4
    """Peak learning rate of AdamW (the guide: 1e-4, 5e-5, 1e-5, 5e-6 for stages 1-4)."""
    learning_rates: dict[Component, PositiveFloat] | None = None
    """Optional per-component peak learning rates, e.g. `{"world_projector": 1e-4, "gemma_vision":
    1e-5}`; a component without an entry uses `learning_rate`. Entries for frozen components are
    allowed (they apply once the component is unfrozen) and have no effect while it is frozen."""
    batch_size: int = Field(4, ge=1)
    """Samples per device per forward pass."""
    gradient_accumulation_steps: int = Field(4, ge=1)
    """Forward/backward passes per optimizer step; effective batch = batch_size x this x num_processes."""
    num_epochs: float = Field(1.0, gt=0, allow_inf_nan=False)
    """Passes over the training split; fractional values train that share of an epoch (0.5 = half)."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to train; when set it overrides `num_epochs` (null: derived from the epochs)."""
    warmup_steps: int = Field(100, ge=0)
    """Optimizer steps of linear learning-rate warmup from 0 to the peak (a fresh warmup each stage)."""
    lr_scheduler: LrSchedulerName = "linear"
    """Learning-rate schedule after warmup, by its `transformers.get_scheduler` name. The default is
    `linear` (decay to 0 at the last step), which is what the seed's `train_hf.py` got from the HF
    Trainer's default."""
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    """AdamW decoupled weight decay."""
    max_grad_norm: PositiveFloat = 1.0
    """Gradients are clipped to this global L2 norm before each optimizer step (0.5 in the guide's
    divergence recipe)."""
    divergence_grad_norm: PositiveFloat | None = 1000.0
    """A gradient norm (before clipping) above this ends the stage as diverged, as does a NaN/inf
    loss (the guide: "Gradients > 1000"). Null: only non-finite values count as divergence."""
    inject_fault: Literal["nan_loss", "oom"] | None = None
    """Rehearsal of the gate's failure paths: make this stage's loss NaN (`nan_loss`) or raise a
    CUDA out-of-memory error (`oom`) at optimizer step `inject_fault_step`. The gate's retry clears
    it, so the retried attempt runs clean. Leave null for real training."""
    inject_fault_step: int = Field(1, ge=1)
    """Optimizer step at which `inject_fault` fires."""

    # --- memory -----------------------------------------------------------------------------
    use_gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (the guide: on from stage 3)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    """Autocast precision. `bf16` means bf16 where the device supports it and plain fp32 elsewhere
    (on CPU, or a GPU without bf16), so the seed's configs run unchanged on a laptop; `fp16` needs a
    CUDA GPU; `no` is fp32 everywhere. See `effective_mixed_precision`."""

    # --- checkpoints --------------------------------------------------------------------------
    output_dir: str = "./checkpoints"
    """Folder for this stage's resume states and stage output (one folder per stage)."""
    save_steps: int = Field(1000, ge=1)
    """Write a resume state every this many optimizer steps."""
    save_total_limit: int | None = Field(5, ge=1)
    """Keep only the newest this many resume states (null: keep all)."""
    resume_from_checkpoint: str | None = None
    """What the stage starts from: a local folder (a stage output or a resume state), `runs:/<run
    id>/<artifact path>` (an MLflow run artifact), `models:/<name>/<version>` or
    `models:/<name>@<alias>` (the MLflow Model Registry), or a Hugging Face hub repo id `owner/name`
    (as in the seed). A stage output starts the stage fresh (new optimizer, new warmup, step 0); a
    resume state of the same stage continues it. See `checkpoint_source_kind`."""
    carry_optimizer_state: bool = False
    """At a stage transition, carry the previous stage's AdamW moments for parameters that stay
    trainable (matched by parameter name); newly unfrozen parameters start with fresh moments. The
    step count and the scheduler are never carried."""

    # --- evaluation, plateau ------------------------------------------------------------------
    eval_steps: int = Field(1000, ge=1)
    """Evaluate every this many optimizer steps (and at the end of the stage). The seed's files use
    5000; the default is 1000 so that the patience rule (2000 steps) sees more than one evaluation."""
    do_eval: bool = True
    """Run evaluation (the plateau rule and the gate need it)."""
    eval_max_samples: int | None = Field(None, ge=1)
    """Evaluate on at most this many samples of the eval split, the same ones each time (null: all)."""
    plateau_min_improvement: float = Field(0.01, ge=0, lt=1, allow_inf_nan=False)
    """Plateau rule: relative improvement of the best validation loss over the window below which the
    stage has plateaued (0.01 = 1%). See `PlateauConfig`."""
    plateau_window_steps: int = Field(5000, ge=1)
    """Plateau rule: window, in optimizer steps, the improvement is measured over."""
    plateau_patience_steps: int = Field(2000, ge=1)
    """Plateau rule: optimizer steps without a new best validation loss that count as a plateau."""
    plateau_min_steps: int | None = Field(None, ge=0)
    """Plateau rule: no plateau before this optimizer step. Null picks the guide's value from the
    freeze flags: 10000 for a projection-only stage (all three components frozen), else 5000."""

    # --- logging ------------------------------------------------------------------------------
    logging_steps: int = Field(100, ge=1)
    """Log training metrics (loss, learning rate, gradient norm) every this many optimizer steps."""
    log_to_wandb: bool = False
    """Accepted for the seed's files; Weights & Biases is not used: metrics always go to MLflow."""
    wandb_project: str | None = None
    """Accepted for the seed's files: used as the MLflow experiment name."""
    wandb_run_name: str | None = None
    """Accepted for the seed's files: used as the MLflow run name."""
    seed: int = 42
    """Seed of the training randomness (initialisation of new layers, shuffling, dropout)."""

    # --- distribution -------------------------------------------------------------------------
    num_processes: int = Field(1, ge=1)
    """Data-parallel processes (one per GPU, or CPU processes with gloo) the stage is launched with."""

    # --- Hugging Face hub (optional; MLflow holds the artifacts in any case) -----------------
    push_to_hub: bool = False
    """Also upload the stage output to the hub repo `hub_model_id` (token from the HF_TOKEN
    environment variable, never from a config file)."""
    hub_model_id: str | None = None
    """Hub repo `owner/name` to push to; required when `push_to_hub` is true."""
    hub_strategy: Literal["every_save", "end"] = "every_save"
    """When to push: at every resume-state save (`every_save`, the seed's choice) or once at the end."""
    hub_private_repo: bool = False
    """Create the hub repo as private."""

    @model_validator(mode="before")
    @classmethod
    def _drop_comment_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            return {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("_"))}
        return data

    @field_validator("resume_from_checkpoint")
    @classmethod
    def _checkpoint_form(cls, value: str | None) -> str | None:
        if value is not None:
            checkpoint_source_kind(value)  # raises ValueError with what is allowed
        return value

    @field_validator("hub_model_id")
    @classmethod
    def _hub_repo_form(cls, value: str | None) -> str | None:
        if value is not None and not _HUB_REPO_ID.match(value):
            raise ValueError("must be a hub repo id of the form 'owner/name'")
        return value

    @field_validator("output_dir")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty folder path")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> TrainingConfig:
        problems = self._cross_field_problems()
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    def _cross_field_problems(self) -> list[InitErrorDetails]:
        """Every check that involves more than one field, in one place."""
        problems: list[InitErrorDetails] = []

        def add(key: str, value: Any, allowed: str) -> None:
            problems.append(
                InitErrorDetails(
                    type=PydanticCustomError("cross_field", "{allowed}", {"allowed": allowed}), loc=(key,), input=value
                )
            )

        if self.push_to_hub and self.hub_model_id is None:
            add("hub_model_id", None, "required when push_to_hub is true: the hub repo as 'owner/name'")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            add(
                "warmup_steps",
                self.warmup_steps,
                f"must not exceed max_steps ({self.max_steps}): the learning rate would never reach its peak",
            )
        return problems

    # --- views ------------------------------------------------------------------------------------
    def with_changes(self, **changes: Any) -> Self:
        """A validated copy with `changes` applied together (e.g. the gate's retry recipe
        `learning_rate=lr / 10, max_grad_norm=0.5, warmup_steps=500`); raises `ConfigError`.

        Prefer it to assigning fields one by one: assignment validates each field, but when a
        cross-field check fails pydantic has already stored the value."""
        data = {**self.model_dump(exclude_unset=True), **changes}
        return validate_config(type(self), data, source=f"{type(self).__name__} changes")

    @property
    def freeze_flags(self) -> dict[str, bool]:
        """The seed's three freeze flags by name, e.g. `{"freeze_gemma_vision": True, ...}` (the form
        `theworld_core.model.components.trainable_components` takes)."""
        return {flag: getattr(self, flag) for flag in FREEZE_FLAG_OF.values()}

    @property
    def trainable_component_names(self) -> tuple[str, ...]:
        """Components this stage trains, in registry order (`world_projector` always)."""
        return tuple(c for c in COMPONENT_NAMES if c == "world_projector" or not getattr(self, FREEZE_FLAG_OF[c]))

    def learning_rate_for(self, component: str) -> float:
        """Peak learning rate of `component`: its `learning_rates` entry, else `learning_rate`."""
        if component not in COMPONENT_NAMES:
            raise KeyError(f"unknown component {component!r}; allowed: {list(COMPONENT_NAMES)}")
        return (self.learning_rates or {}).get(component, self.learning_rate)

    @property
    def component_learning_rates(self) -> dict[str, float]:
        """Peak learning rate of every component (frozen ones included; they are not optimised)."""
        return {c: self.learning_rate_for(c) for c in COMPONENT_NAMES}

    @property
    def effective_batch_size(self) -> int:
        """Samples per optimizer step over all processes."""
        return self.batch_size * self.gradient_accumulation_steps * self.num_processes

    @property
    def plateau(self) -> PlateauConfig:
        """The plateau rule of this stage, with `plateau_min_steps` resolved (see its docstring)."""
        min_steps = self.plateau_min_steps
        if min_steps is None:
            projection_only = all(self.freeze_flags.values())
            min_steps = PLATEAU_MIN_STEPS_PROJECTION_ONLY if projection_only else PLATEAU_MIN_STEPS_LATER_STAGES
        return PlateauConfig(
            min_improvement=self.plateau_min_improvement,
            window_steps=self.plateau_window_steps,
            patience_steps=self.plateau_patience_steps,
            min_steps=min_steps,
        )

    def effective_mixed_precision(self, *, device_type: str, bf16_supported: bool) -> Literal["no", "fp16", "bf16"]:
        """What `mixed_precision` means on a device: `bf16` falls back to `no` (fp32) where bf16 is not
        supported (CPU, older GPUs); `fp16` is only honoured on CUDA (fp32 elsewhere)."""
        if self.mixed_precision == "bf16":
            return "bf16" if bf16_supported and device_type != "cpu" else "no"
        if self.mixed_precision == "fp16":
            return "fp16" if device_type == "cuda" else "no"
        return "no"

    def mlflow_names(self, *, default_run_name: str | None = None) -> MlflowNames:
        """The MLflow experiment and run names: `wandb_project` / `wandb_run_name` when given (the
        seed's keys), else `DEFAULT_MLFLOW_EXPERIMENT` / `default_run_name`."""
        return MlflowNames(
            experiment=self.wandb_project or DEFAULT_MLFLOW_EXPERIMENT,
            run_name=self.wandb_run_name or default_run_name,
        )

    def wandb_notice(self, *, default_run_name: str | None = None) -> str | None:
        """One line to log once when the config uses the seed's wandb keys (None when it does not)."""
        # By value, not by "was the key written": the pipeline passes complete config dumps.
        used = [k for k in ("log_to_wandb", "wandb_project", "wandb_run_name") if getattr(self, k)]
        if not used:
            return None
        names = self.mlflow_names(default_run_name=default_run_name)
        run = f", run {names.run_name!r}" if names.run_name else ""
        return (
            f"config keys {', '.join(used)} are mapped to MLflow: metrics go to MLflow experiment "
            f"{names.experiment!r}{run}; Weights & Biases is not used (log_to_wandb has no effect)"
        )


def checkpoint_source_kind(value: str) -> Literal["mlflow_run", "mlflow_model", "local", "hub"]:
    """Classify a `resume_from_checkpoint` value, by form only (no file system or network access).

    - `runs:/<run id>/<artifact path>` -> `mlflow_run`
    - `models:/<name>/<version or stage>` or `models:/<name>@<alias>` -> `mlflow_model`
    - `owner/name` (exactly one slash, hub-legal characters, no leading `.`) -> `hub`; a loader
      should still prefer a local folder of that exact relative name when one exists, as the seed did
    - anything else without a URI scheme (`/abs/path`, `./rel`, `checkpoints/stage1/checkpoint-1000`,
      `C:\\...`) -> `local`

    Other URI schemes (`s3://`, `https://`, ...) raise `ValueError`.
    """
    text = value.strip()
    if not text or text != value:
        raise ValueError("must be a non-empty path or URI without surrounding spaces")
    if text.startswith("runs:/"):
        run_id, _, artifact = text[len("runs:/") :].lstrip("/").partition("/")
        if not run_id:
            raise ValueError("must be runs:/<run id>/<artifact path>")
        return "mlflow_run"
    if text.startswith("models:/"):
        rest = text[len("models:/") :].lstrip("/")
        if not rest or rest.startswith("@") or (("/" not in rest) and ("@" not in rest)):
            raise ValueError("must be models:/<name>/<version> or models:/<name>@<alias>")
        return "mlflow_model"
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) or text.startswith(("hf://", "mlflow-artifacts:")):
        raise ValueError(
            "must be a local folder, runs:/<run id>/<path>, models:/<name>/<version>, models:/<name>@<alias> "
            "or a hub repo id owner/name"
        )
    if _HUB_REPO_ID.match(text) and not text.startswith("."):
        return "hub"
    return "local"


class StageConfig(ModelConfig, DataConfig, TrainingConfig):
    """One stage as the seed's JSON files write it: model, data and training keys side by side.

    Views: `model_part()`, `data_part()` (the groups on their own), `freeze_flags`, `plateau`,
    `mlflow_names()`. Load a file with `load_stage_config`.
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, use_attribute_docstrings=True)

    name: str | None = None
    """Stage name (e.g. `stage2_vision`): letters, digits, `_`, `-`, `.`; used in run and artifact
    names. `load_stage_config` leaves it null; the pipeline sets it."""
    seed: int = 42
    """One seed for the whole stage: training randomness (new layer init, shuffling, dropout) and
    the `synthetic` data generator (`data_part().seed`). The flat files have a single `seed` key, so
    it cannot mean two things; keep it equal across the stages of a pipeline so that every stage
    sees the same synthetic samples and eval losses stay comparable."""

    @field_validator("name")
    @classmethod
    def _stage_name(cls, value: str | None) -> str | None:
        if value is not None and not _STAGE_NAME.match(value):
            raise ValueError("must start with a letter or digit and use only letters, digits, '_', '-' and '.'")
        return value

    def model_part(self) -> ModelConfig:
        """The model keys alone."""
        return ModelConfig(**{k: getattr(self, k) for k in ModelConfig.model_fields})

    def data_part(self) -> DataConfig:
        """The data keys alone (`seed` included: it seeds the synthetic generator too)."""
        return DataConfig(**{k: getattr(self, k) for k in DataConfig.model_fields})

    def training_part(self) -> TrainingConfig:
        """The training keys alone."""
        return TrainingConfig(**{k: getattr(self, k) for k in TrainingConfig.model_fields})

    def mlflow_names(self, *, default_run_name: str | None = None) -> MlflowNames:
        """As `TrainingConfig.mlflow_names`, with the stage name as the default run name."""
        return super().mlflow_names(default_run_name=default_run_name or self.name)

    def wandb_notice(self, *, default_run_name: str | None = None) -> str | None:
        return super().wandb_notice(default_run_name=default_run_name or self.name)


# ---------------------------------------------------------------------------------------------
# Errors: one formatter for every config source (stage JSON files now, stages.yaml later).
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config that cannot be used. `problems` holds one line per problem, each
    `<key path>: <value> is not allowed: <what is allowed>` (or `<key path>: unknown key; ...`);
    `source` is the file (or other origin); `line`/`column` are set for syntax errors."""

    def __init__(self, problems: list[str], source: str | None = None, *, line: int | None = None, column: int | None = None):
        self.problems = list(problems)
        self.source = source
        self.line = line
        self.column = column
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.source or "config"
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        if len(self.problems) == 1:
            return f"{where}: {self.problems[0]}"
        lines = [f"{where}: {len(self.problems)} problems:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


_SECRET_KEY = re.compile(r"(^|_)(token|api_key|apikey|secret|password|passwd)$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{8,})")

# Keys of the seed's `TrainingConfig` dataclass that this package deliberately does not have.
_RETIRED_SEED_KEYS: dict[str, str] = {
    "load_full_cosmos_pipeline": "only the Cosmos VAE encoder is ever loaded (AutoencoderKLWan, subfolder 'vae')",
    "log_to_tensorboard": "metrics are logged to MLflow",
    "save_safetensors": "checkpoints are always written as safetensors",
    "device": "the device is chosen at launch (CUDA when present, else CPU)",
}

# Common abbreviations; difflib alone does not find these.
_ALIASES: dict[str, str] = {
    "lr": "learning_rate",
    "epochs": "num_epochs",
    "num_train_epochs": "num_epochs",
    "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps",
    "per_device_train_batch_size": "batch_size",
    "warmup": "warmup_steps",
    "lr_scheduler_type": "lr_scheduler",
    "scheduler": "lr_scheduler",
    "gradient_checkpointing": "use_gradient_checkpointing",
    "fp16": "mixed_precision",
    "bf16": "mixed_precision",
    "resume_from": "resume_from_checkpoint",
    "max_train_steps": "max_steps",
}


def is_secret_key(key: str) -> bool:
    """Whether a config key names a credential (`hf_token`, `token`, `wandb_api_key`, ...)."""
    return bool(_SECRET_KEY.search(key))


def _secret_problem(path: str, key: str) -> str:
    env = "HF_TOKEN" if "token" in key.lower() and "mlflow" not in key.lower() else "the matching environment variable"
    return (
        f"{path}: secrets are not allowed in config files (configs are logged with the run); "
        f"remove it and set {env} in the environment instead"
    )


def _render_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    text = _SECRET_VALUE.sub("hf_***", text)
    return text if len(text) <= 80 else text[:77] + "..."


def _join_path(prefix: str, loc: tuple[Any, ...]) -> str:
    path = prefix.rstrip(".")
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path or "(top level)"


def _initials(name: str) -> str:
    return "".join(part[0] for part in name.split("_") if part)


def suggest_key(key: str, allowed: list[str] | tuple[str, ...]) -> str | None:
    """The allowed key a misspelt or abbreviated `key` most likely meant (None when nothing is close)."""
    allowed = list(allowed)
    low = key.lower()
    if _ALIASES.get(low) in allowed:
        return _ALIASES[low]
    close = difflib.get_close_matches(low, allowed, n=1, cutoff=0.6)
    if close:
        return close[0]
    by_initials = [a for a in allowed if len(low) >= 2 and _initials(a) == low]
    if len(by_initials) == 1:
        return by_initials[0]
    containing = [a for a in allowed if len(low) >= 4 and (low in a or a in low)]
    if len(containing) == 1:
        return containing[0]
    return None


def _field_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _field_model(arg)
        if found is not None:
            return found
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Field names of the (nested) model that holds the key at `loc` (None when unknown)."""
    current: type[BaseModel] | None = model
    for part in loc[:-1]:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        current = _field_model(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else None


def _quoted_choices(expected: str) -> list[str]:
    return re.findall(r"'([^']*)'", expected)


def _describe(error: dict[str, Any], loc: tuple[Any, ...], model: type[BaseModel] | None, path: str) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    key = loc[-1] if loc and isinstance(loc[-1], str) else None

    if kind == "extra_forbidden":
        if key is not None and is_secret_key(key):
            return _secret_problem(path, key)
        if key in _RETIRED_SEED_KEYS:
            return f"{path}: unknown key; the seed's {key!r} is not used here: {_RETIRED_SEED_KEYS[key]}"
        allowed = _allowed_keys(model, loc) if model is not None else None
        hint = suggest_key(key, allowed) if (key is not None and allowed) else None
        if hint:
            return f"{path}: unknown key; did you mean {hint!r}?"
        return f"{path}: unknown key (not a field of this config)"
    if kind == "missing":
        return f"{path}: required but missing"

    if kind == "literal_error":
        choices = _quoted_choices(ctx.get("expected", ""))
        allowed = "must be one of " + ", ".join(repr(c) for c in choices) if choices else f"must be {ctx.get('expected')}"
        if isinstance(value, str) and choices:
            hint = suggest_key(value, choices)
            if hint:
                allowed += f"; did you mean {hint!r}?"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        words = {
            "greater_than": ("greater than", "gt"),
            "greater_than_equal": ("greater than or equal to", "ge"),
            "less_than": ("less than", "lt"),
            "less_than_equal": ("less than or equal to", "le"),
        }[kind]
        bound = ctx.get(words[1])
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        allowed = f"must be {words[0]} {bound}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        allowed = "must be a whole number"
    elif kind in ("float_type", "float_parsing"):
        allowed = "must be a number"
    elif kind == "finite_number":
        allowed = "must be a finite number"
    elif kind in ("bool_type", "bool_parsing"):
        allowed = "must be true or false"
    elif kind == "string_type":
        allowed = "must be a string"
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        allowed = "must be a mapping of keys to values (a JSON object)"
    elif kind == "value_error":
        allowed = str(error["msg"]).removeprefix("Value error, ")
    elif kind == "cross_field":
        allowed = str(ctx.get("allowed", error["msg"]))
    else:
        allowed = str(error["msg"]).replace("Input should be", "must be")
    if key is not None and is_secret_key(key):
        value_text = "<hidden>"
    else:
        value_text = _render_value(value)
    return f"{path}: {value_text} is not allowed: {allowed}"


def format_validation_error(exc: ValidationError, source: str | None = None, prefix: str = "", model: type[BaseModel] | None = None) -> list[str]:
    """Turn a pydantic `ValidationError` into problem lines, one per error:
    `<key path>: <value> is not allowed: <what is allowed>`, or for unknown keys
    `<key path>: unknown key; did you mean '<field>'?`.

    `prefix` is prepended to every key path (e.g. `stages[2]` gives `stages[2].learning_rate`);
    `model` is the class that was validated (default: the one named by the error), used to suggest
    field names. Values of secret-looking keys are never shown. `source` is accepted so callers can
    pass the file name through; wrap the result as `ConfigError(problems, source)`.
    """
    del source  # the file name belongs to the ConfigError, not to each line
    if model is None:
        model = _MODELS_BY_NAME.get(exc.title)
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error.get("loc", ()))
        if loc and loc[-1] == "[key]":  # a wrong dict key (learning_rates.gemma_vison): the key is the value
            loc = loc[:-1]
        problems.append(_describe(error, loc, model, _join_path(prefix, loc)))
    return problems


_MODELS_BY_NAME: dict[str, type[BaseModel]] = {
    cls.__name__: cls for cls in (ModelConfig, DataConfig, TrainingConfig, PlateauConfig, StageConfig)
}
M = TypeVar("M", bound=BaseModel)


def validate_config(model: type[M], data: Any, source: str | None = None, prefix: str = "") -> M:
    """Validate `data` (a parsed mapping) as `model`, raising `ConfigError` listing every problem.

    Secret-looking keys are refused before validation, and keys starting with `_` are dropped, at
    every level of nesting. Reusable for any config source (`prefix` as in `format_validation_error`).
    Prefer it to calling `model_validate` on a parent model directly: a parent without
    `hide_input_in_errors=True` would print a secret's value in its raw `ValidationError`.
    """
    secrets: list[str] = []
    cleaned = _clean(data, prefix.rstrip("."), secrets)
    try:
        result = model.model_validate(cleaned)
    except ValidationError as exc:
        problems = format_validation_error(exc, source, prefix, model)
        raise ConfigError(secrets + problems, source) from None
    if secrets:
        raise ConfigError(secrets, source)
    return result


def _clean(data: Any, path: str, secrets: list[str]) -> Any:
    if isinstance(data, Mapping):
        out = {}
        for key, value in data.items():
            if isinstance(key, str) and key.startswith("_"):
                continue
            sub = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and is_secret_key(key):
                secrets.append(_secret_problem(sub, key))
                continue
            out[key] = _clean(value, sub, secrets)
        return out
    if isinstance(data, list):
        return [_clean(v, f"{path}[{i}]", secrets) for i, v in enumerate(data)]
    return data


# ---------------------------------------------------------------------------------------------
# JSON with comments (the seed's files), and the stage loader.
# ---------------------------------------------------------------------------------------------


def strip_json_comments(text: str) -> str:
    """Blank out `//` line comments, `/* */` block comments and trailing commas (before `}` or `]`)
    outside strings, keeping every other character in place so JSON error positions still point
    into the original text. `//` inside strings (`"https://..."`) is kept."""
    out = list(text)
    i, n = 0, len(text)
    in_string = False
    last_comma: int | None = None  # index of a comma with only blanks/comments after it so far
    while i < n:
        ch = text[i]
        if in_string:
            if ch == "\\":
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
            continue
        if ch == '"':
            in_string = True
            last_comma = None
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end == -1 else end
            for j in range(i, end):
                if out[j] != "\r":
                    out[j] = " "
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                line = text.count("\n", 0, i) + 1
                column = i - (text.rfind("\n", 0, i) + 1) + 1
                raise _CommentError(line, column)
            for j in range(i, end + 2):
                if out[j] not in "\r\n":
                    out[j] = " "
            i = end + 2
        elif ch == ",":
            last_comma = i
            i += 1
        elif ch in "}]":
            if last_comma is not None:
                out[last_comma] = " "
            last_comma = None
            i += 1
        elif ch in " \t\r\n":
            i += 1
        else:
            last_comma = None
            i += 1
    return "".join(out)


class _CommentError(Exception):
    def __init__(self, line: int, column: int):
        super().__init__("unterminated /* comment")
        self.line = line
        self.column = column


def parse_json_with_comments(text: str, source: str | None = None) -> Any:
    """Parse the seed's JSON dialect (JSON plus `//` and `/* */` comments and trailing commas).
    Duplicate keys and syntax errors raise `ConfigError` (syntax errors with line and column)."""
    try:
        cleaned = strip_json_comments(text)
    except _CommentError as exc:
        raise ConfigError([f"invalid JSON: {exc}"], source, line=exc.line, column=exc.column) from None
    duplicates: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in items:
            if key in seen and not key.startswith("_"):
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        data = json.loads(cleaned, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        line_text = text.splitlines()[exc.lineno - 1] if 0 < exc.lineno <= len(text.splitlines()) else ""
        detail = f"invalid JSON: {exc.msg}"
        if line_text.strip():
            detail += f" (line {exc.lineno}: {line_text.strip()[:100]!r})"
        raise ConfigError([detail], source, line=exc.lineno, column=exc.colno) from None
    if duplicates:
        raise ConfigError(
            [f"{key}: duplicate key: it appears more than once (JSON would silently keep the last)" for key in duplicates],
            source,
        )
    return data


def _read_config_file(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(source name, text) of a config file; an unreadable file is a `ConfigError` naming it."""
    source = os.fspath(path)
    try:
        return source, Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(["file not found"], source) from None
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror or exc}"], source) from None


def load_stage_config(path: str | os.PathLike[str]) -> StageConfig:
    """Read one stage file as the seed writes it (`//` comments, `"_comment"` keys) into a
    `StageConfig`. Every problem is reported at once in a `ConfigError` naming the file."""
    source, text = _read_config_file(path)
    try:
        blank = not strip_json_comments(text).strip()
    except _CommentError:
        blank = False  # parse_json_with_comments reports it with its position
    if blank:
        raise ConfigError(["the file is empty: a stage config is a JSON object ({} for all defaults)"], source)
    data = parse_json_with_comments(text, source)
    if not isinstance(data, dict):
        raise ConfigError(
            [f"(top level): {_render_value(data)} is not allowed: must be a JSON object of config keys"], source
        )
    return validate_config(StageConfig, data, source)


# =============================================================================================
# The pipeline file (`stages.yaml`): gate, schedule, MLflow names, profiles, and its loader.
# =============================================================================================
#
# A stage of the pipeline is built from layers, later ones winning:
#     model section + data section + defaults + plateau section (as the flat plateau_* keys)
#     + the stage's own keys (+ its name)
# and validated as one `StageConfig`. A profile is an overlay deep-merged onto the file before any
# of this. `load_pipeline_config` validates the base file and every profile, and reports every
# problem at once, each with the key path where the bad value was written.

import copy as _copy  # noqa: E402
from collections.abc import Callable  # noqa: E402
import hashlib as _hashlib  # noqa: E402
import zoneinfo as _zoneinfo  # noqa: E402

GateMetric = Literal["eval_loss", "task_accuracy"]
"""What the gate judges: `eval_loss` (lower is better) or `task_accuracy` (higher is better, in [0, 1])."""


def _cross_field_error(title: str, problems: list[tuple[str, Any, str]]) -> ValidationError:
    """A `ValidationError` of `cross_field` errors `(key, value, allowed)` that `format_validation_error` renders."""
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(type=PydanticCustomError("cross_field", "{allowed}", {"allowed": allowed}), loc=(key,), input=value)
            for key, value, allowed in problems
        ],
    )


class GateConfig(StrictModel):
    """What the gate after each stage decides on (the guide's "Evaluate: is performance good enough?").

    After a stage: diverged -> retry with the divergence recipe (up to `max_diverged_retries`);
    out of memory -> retry with half the batch and twice the accumulation (up to `max_oom_retries`);
    metric meets `target` -> stop and deploy this stage; metric worse than the best earlier stage by
    more than `regression_tolerance` -> stop and keep the best earlier stage; otherwise the next stage.
    `theworld_core.training.gate.decide` applies these rules.
    """

    model_config = ConfigDict(use_attribute_docstrings=True)

    metric: GateMetric = "eval_loss"
    """What "good enough" and "regression" are judged on: `eval_loss` (the held-out loss; lower is
    better) or `task_accuracy` (share of `eval_task_samples` held-out samples answered correctly;
    higher is better)."""
    target: float | None = Field(None, allow_inf_nan=False)
    """The stage is good enough, and the pipeline stops and deploys it, once the metric reaches this
    value (eval_loss <= target, or task_accuracy >= target; a task_accuracy target is in [0, 1]).
    Null: never stop early for quality; every stage runs unless one regresses or fails."""
    regression_tolerance: float = Field(0.02, ge=0, allow_inf_nan=False)
    """A stage whose metric is worse than the best earlier stage's by more than this share of it
    (0.02 = 2%) stops the pipeline, and the best earlier stage is kept (rollback)."""
    max_diverged_retries: int = Field(1, ge=0)
    """How often a stage that diverged (NaN/inf loss, or gradient norm above `divergence_grad_norm`)
    is retried with the divergence recipe before the pipeline stops as failed."""
    max_oom_retries: int = Field(2, ge=0)
    """How often a stage that ran out of memory is retried with half the batch size and twice the
    gradient accumulation (the same effective batch) before the pipeline stops as failed."""
    diverged_lr_factor: float = Field(0.1, gt=0, lt=1, allow_inf_nan=False)
    """Divergence recipe: the retry's learning rates are the failed attempt's times this (the guide: /10)."""
    diverged_max_grad_norm: PositiveFloat = 0.5
    """Divergence recipe: the retry clips gradients to at most this norm (the guide: 0.5)."""
    diverged_warmup_steps: int = Field(500, ge=0)
    """Divergence recipe: the retry warms up for at least this many steps (the guide: 500), capped
    at the stage's `max_steps`."""

    @model_validator(mode="after")
    def _target_range(self) -> GateConfig:
        if self.target is None:
            return self
        if self.metric == "task_accuracy" and not 0 <= self.target <= 1:
            raise _cross_field_error(
                type(self).__name__, [("target", self.target, "must be in [0, 1]: metric task_accuracy is a share of correct answers")]
            )
        if self.metric == "eval_loss" and self.target < 0:
            raise _cross_field_error(
                type(self).__name__,
                [("target", self.target, "must be greater than or equal to 0: metric eval_loss is a cross-entropy, never negative")],
            )
        return self


_CRON_NAMES = {
    "month": {m: i for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)},
    "day of week": {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
}
_CRON_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 7),
)


def cron_problem(expression: str) -> str | None:
    """Why `expression` is not a standard 5-field cron expression (None when it is one).

    Each field is `*`, a number, a range `a-b`, any of these with a step `/n`, or a comma list of
    them; months and weekdays may be written as names (`jan`, `mon`); weekday 0 and 7 are Sunday.
    """
    fields = expression.split()
    if len(fields) != 5:
        return (
            f"must be a cron expression of 5 fields (minute hour day-of-month month day-of-week), "
            f"e.g. '0 3 * * *' (03:00 daily); this has {len(fields)}"
        )
    for text, (label, low, high) in zip(fields, _CRON_FIELDS, strict=True):
        names = _CRON_NAMES.get(label, {})

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
                return (
                    f"{label} field {text!r}: {part!r} is not '*', a number, a range 'a-b' or a step '/n'"
                    + (" (names like 'mon' or 'jan' are allowed)" if names else "")
                )
            if not (low <= a <= high and low <= b <= high):
                return f"{label} field {text!r}: values must be in {low}-{high}"
            if a > b:
                return f"{label} field {text!r}: range {base!r} runs backwards"
    return None


class ScheduleConfig(StrictModel):
    """When the pipeline reruns on its own (the Prefect deployment's triggers)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    cron: str | None = None
    """Standard 5-field cron expression (minute hour day-of-month month day-of-week) of scheduled
    runs, e.g. `0 3 * * *` for 03:00 every day, in `timezone`. Null: no schedule (runs only on demand
    or on `new_data_event`)."""
    timezone: str = "UTC"
    """IANA time zone the cron expression is read in (e.g. `UTC`, `Europe/Berlin`)."""
    new_data_event: str = "theworld.data.updated"
    """Name of the Prefect event that triggers a rerun when new data lands (emit it after adding data)."""
    only_on_new_data: bool = True
    """A scheduled run whose data fingerprint equals the last completed run's completes at once with
    "no new data" instead of training again."""
    warm_start_from_champion: bool = False
    """Start a rerun's first stage from the registered champion's stage output instead of from the
    pretrained base."""

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            problem = cron_problem(value)
            if problem:
                raise ValueError(problem)
            value = " ".join(value.split())
        return value

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            _zoneinfo.ZoneInfo(value)
        except (ValueError, _zoneinfo.ZoneInfoNotFoundError):
            hint = suggest_key(value, sorted(_zoneinfo.available_timezones()))
            raise ValueError(
                "must be an IANA time zone name such as 'UTC' or 'Europe/Berlin'" + (f"; did you mean {hint!r}?" if hint else "")
            ) from None
        return value

    @field_validator("new_data_event")
    @classmethod
    def _event_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*", value):
            raise ValueError("must be a Prefect event name: letters, digits, '.', '_', '-', ':' (e.g. 'theworld.data.updated')")
        return value


_MLFLOW_ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")


class MlflowConfig(StrictModel):
    """Where the pipeline's runs and models go in MLflow (the tracking server comes from the
    `MLFLOW_TRACKING_URI` environment variable, never from this file)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    experiment: str = DEFAULT_MLFLOW_EXPERIMENT
    """MLflow experiment of the pipeline run (parent) and its stage runs (children, named after the stages)."""
    registered_model: str = "theworld"
    """Model Registry name the winning stage output is registered under."""
    champion_alias: str = "champion"
    """Registry alias moved to the newly registered version (load it as `models:/<registered_model>@<alias>`)."""
    log_system_metrics: bool = True
    """Also record CPU/GPU/memory usage in the stage runs (MLflow system metrics)."""

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty experiment name")
        return value

    @field_validator("registered_model")
    @classmethod
    def _registered_model(cls, value: str) -> str:
        if not value.strip() or "/" in value or ":" in value:
            raise ValueError("must be a non-empty model name without '/' or ':' (MLflow Model Registry rule)")
        return value

    @field_validator("champion_alias")
    @classmethod
    def _alias(cls, value: str) -> str:
        if not _MLFLOW_ALIAS.match(value) or value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
            raise ValueError(
                "must be an MLflow alias: letters, digits, '_' and '-', and neither 'latest' nor a version like 'v3'"
            )
        return value


class PipelinePlateauConfig(PlateauConfig):
    """The `plateau:` section of a pipeline file: `PlateauConfig`, with `min_steps` optional. Each
    key becomes the flat stage key `plateau_<key>` of every stage (a stage may override it)."""

    min_steps: int | None = Field(None, ge=0)
    """No plateau verdict before this optimizer step. Null: the guide's per-stage value, 10000 for a
    projection-only stage (all three components frozen) and 5000 for the others."""


class _PipelineSettings(StrictModel):
    """The pipeline-level scalar keys of a pipeline file."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    output_root: str = "./.theworld/stages"
    """Folder the stages' output folders go in (one folder per stage and attempt, made by the flow),
    relative to the working directory of the run."""
    eval_generations: int = Field(4, ge=0)
    """Sample generations (image + prompt -> answer) recorded per stage for a look by eye."""
    eval_task_samples: int = Field(64, ge=0)
    """Held-out samples the task metric (`task_accuracy`) is computed on, per stage."""

    @field_validator("output_root")
    @classmethod
    def _non_empty_root(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty folder path")
        return value


_SETTINGS_KEYS: tuple[str, ...] = tuple(_PipelineSettings.model_fields)
_SECTIONS: dict[str, type[StrictModel]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "plateau": PipelinePlateauConfig,
    "gate": GateConfig,
    "schedule": ScheduleConfig,
    "mlflow": MlflowConfig,
}
PIPELINE_KEYS: tuple[str, ...] = ("model", "data", "defaults", "stages", "plateau", "gate", "schedule", "mlflow", *_SETTINGS_KEYS, "profiles")
"""The top-level keys of a pipeline file."""
PROFILE_KEYS: tuple[str, ...] = tuple(k for k in PIPELINE_KEYS if k != "profiles")
"""The keys of a profile overlay (`stages` there maps a stage name to its overrides)."""

_PLATEAU_FLAT = {f"plateau_{k}": k for k in PlateauConfig.model_fields}
_WANDB_KEYS = ("log_to_wandb", "wandb_project", "wandb_run_name")
_TRAINING_KEYS: tuple[str, ...] = tuple(TrainingConfig.model_fields)


def _stage_key_problem(key: Any, value: Any, path: str, *, in_defaults: bool, first_stage: bool) -> str | None:
    """Why `key` may not appear in `defaults` (or in a stage entry); None when it may."""

    def refuse(reason: str) -> str:
        return f"{path}: {_render_value(value)} is not allowed: {reason}"

    if not isinstance(key, str):
        return f"{path}: unknown key (keys are names of config fields)"
    if key == "name":
        return refuse("stage names are given per stage, in the stages list") if in_defaults else None
    if key in _PLATEAU_FLAT:
        return refuse(f"set it in the plateau section as plateau.{_PLATEAU_FLAT[key]} (a stage may override it)") if in_defaults else None
    if key == "plateau":
        return refuse("a stage overrides the plateau rule with the flat keys " + ", ".join(_PLATEAU_FLAT))
    if key == "output_dir":
        return refuse("the pipeline sets it (a folder per stage under output_root); change output_root instead")
    if key in _WANDB_KEYS:
        return refuse("MLflow names come from the mlflow section (mlflow.experiment); stage runs are named after the stages")
    if key == "resume_from_checkpoint" and not first_stage:
        return refuse(
            "only the first stage may name a checkpoint to start from; every later stage starts from the "
            "previous stage's output, which the pipeline passes on"
        )
    if key == "seed" and not in_defaults:
        return refuse(
            "one seed for the whole pipeline: set it in defaults (it also seeds the synthetic data, so the "
            "stages' eval losses stay comparable)"
        )
    if key in ModelConfig.model_fields and key not in _TRAINING_KEYS:
        return refuse("a model key: set it in the model section (one model for all stages)")
    if key in DataConfig.model_fields and key not in _TRAINING_KEYS:
        return refuse("a data key: set it in the data section (one data set for all stages, so their eval losses compare)")
    if key in _TRAINING_KEYS:
        return None
    if is_secret_key(key):
        return _secret_problem(path, key)
    if key in _RETIRED_SEED_KEYS:
        return f"{path}: unknown key; the seed's {key!r} is not used here: {_RETIRED_SEED_KEYS[key]}"
    allowed = [k for k in _TRAINING_KEYS if k not in ("output_dir", *_WANDB_KEYS)]
    hint = suggest_key(key, allowed)
    return f"{path}: unknown key; did you mean {hint!r}?" if hint else f"{path}: unknown key (not a training config key)"


def _where_plain(loc: tuple[Any, ...]) -> str:
    return _join_path("", loc)


def _where_mapped(origins: dict[tuple[Any, ...], tuple[Any, ...]]) -> Callable[[tuple[Any, ...]], str]:
    """A key-path renderer that shows, for values a profile wrote, where the profile wrote them."""

    def where(loc: tuple[Any, ...]) -> str:
        for cut in range(len(loc), 0, -1):
            origin = origins.get(loc[:cut])
            if origin is not None:
                return _join_path("", origin + loc[cut:])
        return _join_path("", loc)

    return where


def _errors_of(exc: ValidationError) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    out = []
    for error in exc.errors(include_url=False):
        loc = tuple(error.get("loc", ()))
        if loc and loc[-1] == "[key]":
            loc = loc[:-1]
        out.append((loc, error))
    return out


def _validate_section(cls: type[M], raw: Any, at: tuple[Any, ...], where: Callable[[tuple[Any, ...]], str], problems: list[str]) -> M | None:
    """Validate one section, adding a problem line per error (paths rendered by `where`)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        problems.append(f"{where(at)}: {_render_value(raw)} is not allowed: must be a mapping of keys to values")
        return None
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        for loc, error in _errors_of(exc):
            home = _home_of(loc[0]) if error["type"] == "extra_forbidden" and len(loc) == 1 else None
            if home is not None and home != at:
                problems.append(f"{where(at + loc)}: unknown key here; {loc[0]!r} belongs in {home}")
            else:
                problems.append(_describe(error, loc, cls, where(at + loc)))
        return None


def _home_of(key: Any) -> str | None:
    """Where a key that is misplaced in a section belongs (None when it is nobody's key)."""
    if not isinstance(key, str):
        return None
    if key in ModelConfig.model_fields:
        return "the model section"
    if key in DataConfig.model_fields:
        return "the data section"
    if key in _PLATEAU_FLAT:
        return f"the plateau section (as {_PLATEAU_FLAT[key]})"
    if key in _TRAINING_KEYS:
        return "defaults or a stage"
    for section, cls in _SECTIONS.items():
        if key in cls.model_fields and section not in ("model", "data"):
            return f"the {section} section"
    if key in _SETTINGS_KEYS:
        return "the top level of the file"
    return None


def _stage_layers(
    model: Mapping[str, Any], data: Mapping[str, Any], defaults: Mapping[str, Any], plateau: Mapping[str, Any], stage: Mapping[str, Any], index: int
) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]]]:
    """The flat stage dict (later layers win, key by key) and, per key, the path it came from."""
    merged: dict[str, Any] = {}
    origin: dict[str, tuple[Any, ...]] = {}
    layers: list[tuple[Mapping[str, Any], Callable[[str], tuple[Any, ...]]]] = [
        (model, lambda k: ("model", k)),
        (data, lambda k: ("data", k)),
        (defaults, lambda k: ("defaults", k)),
        ({f"plateau_{k}": v for k, v in plateau.items()}, lambda k: ("plateau", k.removeprefix("plateau_"))),
        (stage, lambda k: ("stages", index, k)),
    ]
    for layer, path_of in layers:
        for key, value in layer.items():
            merged[key] = value
            origin[key] = path_of(key)
    return merged, origin


def _check_stages(
    model: Mapping[str, Any] | None,
    data: Mapping[str, Any] | None,
    defaults: Any,
    plateau: Mapping[str, Any] | None,
    stages: Any,
    where: Callable[[tuple[Any, ...]], str],
    problems: list[str],
    *,
    stages_given: bool = True,
) -> tuple[list[StageConfig], dict[str, Any], list[dict[str, Any]]]:
    """Check `defaults` and `stages` and resolve every stage. Sections that failed their own
    validation are passed as None and left out of the layering (their problems are already listed).
    Returns the resolved stages (only when all resolved) and the cleaned defaults and stage entries."""
    model, data, plateau = model or {}, data or {}, plateau or {}
    clean_defaults: dict[str, Any] = {}
    if defaults is None:
        defaults = {}
    if not isinstance(defaults, Mapping):
        problems.append(f"{where(('defaults',))}: {_render_value(defaults)} is not allowed: must be a mapping of training keys to values")
        defaults = {}
    for key, value in defaults.items():
        problem = _stage_key_problem(key, value, where(("defaults", key)), in_defaults=True, first_stage=False)
        if problem:
            problems.append(problem)
        else:
            clean_defaults[key] = value
    if "seed" in clean_defaults and "seed" in data and clean_defaults["seed"] != data["seed"]:
        problems.append(
            f"{where(('defaults', 'seed'))}: {_render_value(clean_defaults['seed'])} is not allowed: must equal "
            f"data.seed ({_render_value(data['seed'])}): a stage has one seed for training and the synthetic data"
        )

    if not stages_given:
        problems.append(f"{where(('stages',))}: required but missing: list the stages, each with a name and its training keys")
        return [], clean_defaults, []
    if not isinstance(stages, list):
        problems.append(f"{where(('stages',))}: {_render_value(stages)} is not allowed: must be a list of stages (mappings with a name)")
        return [], clean_defaults, []
    if not stages:
        problems.append(f"{where(('stages',))}: [] is not allowed: must list at least one stage")
        return [], clean_defaults, []

    resolved: list[StageConfig] = []
    clean_stages: list[dict[str, Any]] = []
    first_with_name: dict[str, int] = {}
    ok = True
    for index, entry in enumerate(stages):
        at = ("stages", index)
        if not isinstance(entry, Mapping):
            problems.append(f"{where(at)}: {_render_value(entry)} is not allowed: must be a mapping with a name and training keys")
            ok = False
            continue
        own: dict[str, Any] = {}
        for key, value in entry.items():
            problem = _stage_key_problem(key, value, where(at + (key,)), in_defaults=False, first_stage=index == 0)
            if problem:
                problems.append(problem)
                ok = False
            else:
                own[key] = value
        name = entry.get("name")
        if "name" not in entry:
            problems.append(f"{where(at + ('name',))}: required but missing: every stage needs a unique name")
            ok = False
        elif isinstance(name, str) and name in first_with_name:
            problems.append(
                f"{where(at + ('name',))}: {name!r} is not allowed: stage names must be unique; "
                f"stages[{first_with_name[name]}] is already named {name!r}"
            )
            ok = False
        elif isinstance(name, str):
            first_with_name[name] = index
        clean_stages.append(own)
        merged, origin = _stage_layers(model, data, clean_defaults, plateau, own, index)
        try:
            resolved.append(StageConfig.model_validate(merged))
        except ValidationError as exc:
            ok = False
            for loc, error in _errors_of(exc):
                key = loc[0] if loc else None
                source = origin.get(key, at + ((key,) if key is not None else ()))
                line = _describe(error, loc, StageConfig, where(source + loc[1:]))
                if error["type"] == "cross_field" and source[:2] != at:
                    line += f" (in stage {name!r})" if isinstance(name, str) else f" (in stages[{index}])"
                problems.append(line)
    return (resolved if ok else []), clean_defaults, clean_stages


class PipelineConfig(_PipelineSettings):
    """A validated pipeline file (`stages.yaml`): the shared model and data, the stages, the plateau
    rule, the gate, the schedule and the MLflow names. Load one with `load_pipeline_config`.

    `resolved_stages()` gives each stage as a `StageConfig` (its `output_dir` is left at the
    placeholder default; the flow sets a folder under `output_root`). `config_hash()` identifies the
    resolved content.
    """

    model_config = ConfigDict(use_attribute_docstrings=True, hide_input_in_errors=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    """The model every stage trains (ModelConfig keys). `tiny` as `model_name` / `cosmos_model_name`
    means the embedded tiny models; it is resolved when the model is loaded."""
    data: DataConfig = Field(default_factory=DataConfig)
    """The data every stage trains and evaluates on (DataConfig keys)."""
    defaults: dict[str, Any] = Field(default_factory=dict)
    """Training keys applied to every stage (a stage's own keys win)."""
    stages: list[dict[str, Any]]
    """The stages in order, each `{"name": ..., <training keys>}`."""
    plateau: PipelinePlateauConfig = Field(default_factory=PipelinePlateauConfig)
    """The plateau rule of every stage (a stage may override a key with the flat `plateau_<key>`)."""
    gate: GateConfig = Field(default_factory=GateConfig)
    """What the gate after each stage decides on."""
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    """When the pipeline reruns on its own."""
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    """MLflow experiment, registered model and champion alias."""
    profile: str | None = None
    """The profile applied when the file was loaded (null: none). Not part of `config_hash`."""
    source: str | None = None
    """The file this was loaded from. Not part of `config_hash`."""

    @model_validator(mode="after")
    def _stages_resolve(self) -> PipelineConfig:
        problems = self._problems(_where_plain)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _problems(self, where: Callable[[tuple[Any, ...]], str]) -> list[str]:
        problems: list[str] = []
        _check_stages(
            self.model.model_dump(exclude_unset=True),
            self.data.model_dump(exclude_unset=True),
            self.defaults,
            self.plateau.model_dump(exclude_unset=True),
            self.stages,
            where,
            problems,
        )
        if self.gate.metric == "task_accuracy" and self.eval_task_samples < 1:
            problems.append(
                f"{where(('eval_task_samples',))}: {self.eval_task_samples} is not allowed: must be at least 1 when "
                "gate.metric is task_accuracy (the metric is computed on these samples)"
            )
        return list(dict.fromkeys(problems))

    def resolved_stages(self) -> list[StageConfig]:
        """Each stage as a validated `StageConfig`: model + data + defaults + plateau + its own keys,
        with `name` set and `output_dir` left at its default."""
        problems: list[str] = []
        resolved, _, _ = _check_stages(
            self.model.model_dump(exclude_unset=True),
            self.data.model_dump(exclude_unset=True),
            self.defaults,
            self.plateau.model_dump(exclude_unset=True),
            self.stages,
            _where_plain,
            problems,
        )
        if problems:  # only reachable after in-place mutation of `defaults` / `stages`
            raise ConfigError(problems, self.source)
        return resolved

    def stage(self, name: str) -> StageConfig:
        """The resolved stage called `name` (KeyError naming the stages otherwise)."""
        for stage in self.resolved_stages():
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}; stages: {self.stage_names}")

    @property
    def stage_names(self) -> list[str]:
        """The stage names in order."""
        return [entry["name"] for entry in self.stages]

    def resolved_dict(self) -> dict[str, Any]:
        """The resolved content as JSON-ready data: every section with defaults filled in, and the
        resolved stages instead of `defaults` + stage entries (`profile` and `source` left out)."""
        return {
            "model": self.model.model_dump(mode="json"),
            "data": self.data.model_dump(mode="json"),
            "plateau": self.plateau.model_dump(mode="json"),
            "gate": self.gate.model_dump(mode="json"),
            "schedule": self.schedule.model_dump(mode="json"),
            "mlflow": self.mlflow.model_dump(mode="json"),
            **{key: getattr(self, key) for key in _SETTINGS_KEYS},
            "stages": [stage.model_dump(mode="json") for stage in self.resolved_stages()],
        }

    def config_hash(self) -> str:
        """sha256 (hex) of `resolved_dict()` as canonical JSON (sorted keys, no spaces): equal for
        configs that resolve to the same values however they were written."""
        text = json.dumps(self.resolved_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return _hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- YAML reading -----------------------------------------------------------------------------


def _yaml_loader_class() -> type:
    """A safe YAML loader with YAML 1.2 scalars: only true/false are booleans (`no` stays the string
    'no', as `mixed_precision: no` needs) and `1e-4` is a number (YAML 1.1 reads it as a string)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
                |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return Loader


_YAML_LOADER: type | None = None


def _duplicate_keys(node: Any) -> list[str]:
    """Keys written twice in one mapping (YAML loaders silently keep the last), with their paths."""
    import yaml

    problems: list[str] = []
    seen_nodes: set[int] = set()

    def walk(current: Any, loc: tuple[Any, ...]) -> None:
        if id(current) in seen_nodes:
            return
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, value_node in current.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    key = key_node.value
                    line = key_node.start_mark.line + 1
                    if key in lines:
                        problems.append(
                            f"{_join_path('', loc + (key,))}: duplicate key: written on lines {lines[key]} and {line} "
                            "(YAML would silently keep the last)"
                        )
                    else:
                        lines[key] = line
                    walk(value_node, loc + (key,))
                else:
                    walk(value_node, loc)
        elif isinstance(current, yaml.SequenceNode):
            for index, item in enumerate(current.value):
                walk(item, loc + (index,))

    walk(node, ())
    return problems


def parse_pipeline_yaml(text: str, source: str | None = None) -> Any:
    """Parse a pipeline file's YAML (YAML 1.2 booleans and floats, one document). Syntax errors raise
    `ConfigError` with line and column; duplicate keys raise `ConfigError` naming their paths."""
    import yaml

    global _YAML_LOADER
    if _YAML_LOADER is None:
        _YAML_LOADER = _yaml_loader_class()
    loader = _YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicates = _duplicate_keys(node)
        if duplicates:
            raise ConfigError(duplicates, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = exc.problem or exc.context or "syntax error"
        if exc.problem and exc.context:
            where = f", line {exc.context_mark.line + 1}" if exc.context_mark is not None else ""
            detail = f"{exc.problem} ({exc.context}{where})"
        raise ConfigError(
            [f"invalid YAML: {detail}"], source, line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], source) from None
    finally:
        loader.dispose()


# --- profiles -----------------------------------------------------------------------------------


def _deep_merge(
    base: Mapping[str, Any], overlay: Mapping[str, Any], at: tuple[Any, ...], origin: tuple[Any, ...], origins: dict[tuple[Any, ...], tuple[Any, ...]]
) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value, at + (key,), origin + (key,), origins)
        else:
            merged[key] = _copy.deepcopy(value)
            origins[at + (key,)] = origin + (key,)
    return merged


def _apply_profile(
    base: Mapping[str, Any], name: str, overlay: Mapping[str, Any], stage_index: Mapping[str, int]
) -> tuple[dict[str, Any], dict[tuple[Any, ...], tuple[Any, ...]]]:
    """The document with profile `name` deep-merged in, and where each overlaid value was written."""
    document = _copy.deepcopy(dict(base))
    origins: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for key, value in overlay.items():
        origin = ("profiles", name, key)
        if key == "stages":
            for stage_name, changes in (value or {}).items():
                index = stage_index[stage_name]
                document["stages"][index] = _deep_merge(document["stages"][index], changes or {}, ("stages", index), origin + (stage_name,), origins)
        elif isinstance(value, Mapping) and isinstance(document.get(key), Mapping):
            document[key] = _deep_merge(document[key], value, (key,), origin, origins)
        else:
            document[key] = _copy.deepcopy(value)
            origins[(key,)] = origin
    return document, origins


def _check_profiles(raw: Any, stage_index: Mapping[str, int] | None, problems: list[str]) -> dict[str, dict[str, Any]]:
    """The profile overlays by name, each with its structurally bad parts (unknown keys, unknown
    stages) listed in `problems` and left out, so the rest of it is still checked."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problems.append(f"profiles: {_render_value(raw)} is not allowed: must be a mapping of profile names to overlays")
        return {}
    good: dict[str, dict[str, Any]] = {}
    for name, overlay in raw.items():
        at = f"profiles.{name}"
        if not isinstance(name, str) or not _STAGE_NAME.match(name):
            problems.append(f"{at}: {_render_value(name)} is not allowed: a profile name uses only letters, digits, '_', '-' and '.'")
            continue
        if overlay is None:
            overlay = {}
        if not isinstance(overlay, Mapping):
            problems.append(f"{at}: {_render_value(overlay)} is not allowed: must be a mapping with the keys of the file ({', '.join(PROFILE_KEYS)})")
            continue
        kept: dict[str, Any] = {}
        for key, value in overlay.items():
            if key not in PROFILE_KEYS:
                hint = suggest_key(str(key), PROFILE_KEYS)
                problems.append(f"{at}.{key}: unknown key" + (f"; did you mean {hint!r}?" if hint else f" (a profile may set {', '.join(PROFILE_KEYS)})"))
            elif key != "stages":
                kept[key] = value
            elif value is None:
                continue
            elif not isinstance(value, Mapping):
                problems.append(f"{at}.stages: {_render_value(value)} is not allowed: must be a mapping of stage names to the keys to change")
            elif stage_index is not None:
                kept_stages: dict[str, Any] = {}
                for stage_name, changes in value.items():
                    where = f"{at}.stages.{stage_name}"
                    if stage_name not in stage_index:
                        hint = suggest_key(str(stage_name), list(stage_index))
                        known = ", ".join(repr(s) for s in stage_index)
                        problems.append(f"{where}: unknown stage" + (f"; did you mean {hint!r}?" if hint else f"; the stages are {known}"))
                    elif changes is not None and not isinstance(changes, Mapping):
                        problems.append(f"{where}: {_render_value(changes)} is not allowed: must be a mapping of keys to change")
                    elif isinstance(changes, Mapping) and "name" in changes and changes["name"] != stage_name:
                        problems.append(f"{where}.name: {_render_value(changes['name'])} is not allowed: a profile cannot rename a stage")
                    else:
                        kept_stages[stage_name] = changes or {}
                kept["stages"] = kept_stages
        good[name] = kept
    return good


def _build_pipeline(document: Mapping[str, Any], where: Callable[[tuple[Any, ...]], str]) -> tuple[PipelineConfig | None, list[str]]:
    """Validate a document (profiles already applied); the config, or None and the problems."""
    problems: list[str] = []
    parts: dict[str, Any] = {}
    for key, cls in _SECTIONS.items():
        parts[key] = _validate_section(cls, document.get(key), (key,), where, problems)
    settings = _validate_section(_PipelineSettings, {k: document[k] for k in _SETTINGS_KEYS if k in document}, (), where, problems)

    def layer(key: str) -> dict[str, Any] | None:
        # a section that failed its own checks is left out of the stages (its problems are listed)
        return parts[key].model_dump(exclude_unset=True) if parts[key] is not None else None

    _, defaults, stages = _check_stages(
        layer("model"), layer("data"), document.get("defaults"), layer("plateau"), document.get("stages"), where, problems,
        stages_given="stages" in document,
    )
    if settings is not None and parts["gate"] is not None and parts["gate"].metric == "task_accuracy" and settings.eval_task_samples < 1:
        problems.append(
            f"{where(('eval_task_samples',))}: {settings.eval_task_samples} is not allowed: must be at least 1 when "
            "gate.metric is task_accuracy (the metric is computed on these samples)"
        )
    problems = list(dict.fromkeys(problems))
    if problems or settings is None:
        return None, problems
    config = PipelineConfig(
        **{k: v for k, v in parts.items() if k in document},
        **settings.model_dump(exclude_unset=True),
        defaults=defaults,
        stages=stages,
    )
    return config, []


def load_pipeline_config(path: str | os.PathLike[str], profile: str | None = None) -> PipelineConfig:
    """Read a pipeline file (`stages.yaml`) and apply `profile` (one of its `profiles`).

    The base file and every profile in it are validated whichever profile is asked for, so a bad
    file is refused before anything runs; every problem is listed at once in one `ConfigError`
    naming the file, each as `<key path>: <value> is not allowed: <what is allowed>` (paths into a
    profile read `profiles.<name>.<...>`; a problem that only a profile brings out ends with
    `(with profile '<name>')`). Secrets are refused and their values never shown.
    """
    source, text = _read_config_file(path)
    raw = parse_pipeline_yaml(text, source)
    if raw is None:
        raise ConfigError(["the file is empty: a pipeline file is a YAML mapping with at least a stages list"], source)
    if not isinstance(raw, Mapping):
        raise ConfigError([f"(top level): {_render_value(raw)} is not allowed: must be a YAML mapping of the keys {', '.join(PIPELINE_KEYS)}"], source)

    problems: list[str] = []
    document = _clean(raw, "", problems)  # secrets refused (values never shown), `_` keys dropped
    for key in list(document):
        if key not in PIPELINE_KEYS:
            hint = suggest_key(str(key), PIPELINE_KEYS)
            problems.append(f"{key}: unknown key" + (f"; did you mean {hint!r}?" if hint else f" (the keys are {', '.join(PIPELINE_KEYS)})"))
            del document[key]

    base = {k: v for k, v in document.items() if k != "profiles"}
    stages = base.get("stages")
    stage_index: dict[str, int] | None = None
    if isinstance(stages, list) and all(isinstance(s, Mapping) and isinstance(s.get("name"), str) for s in stages):
        stage_index = {}
        for index, entry in enumerate(stages):
            stage_index.setdefault(entry["name"], index)
    overlays = _check_profiles(document.get("profiles"), stage_index, problems)

    config, base_problems = _build_pipeline(base, _where_plain)
    problems += base_problems
    configs: dict[str, PipelineConfig | None] = {}
    if stage_index is not None:
        known = set(base_problems)
        for name, overlay in overlays.items():
            merged, origins = _apply_profile(base, name, overlay, stage_index)
            configs[name], found = _build_pipeline(merged, _where_mapped(origins))
            problems += [p if p in known or p.startswith(f"profiles.{name}.") else f"{p} (with profile {name!r})" for p in found]

    if profile is not None and profile not in overlays:
        names = [str(n) for n in (document.get("profiles") or {})] if isinstance(document.get("profiles"), Mapping) else []
        if profile not in names:
            allowed = "must be one of " + ", ".join(repr(n) for n in names) if names else "the file defines no profiles"
            hint = suggest_key(profile, names) if names else None
            problems.append(f"profile: {profile!r} is not allowed: {allowed}" + (f"; did you mean {hint!r}?" if hint else ""))

    problems = list(dict.fromkeys(problems))
    if problems:
        raise ConfigError(problems, source)
    chosen = configs.get(profile) if profile is not None else config
    assert chosen is not None  # no problems: every config was built
    return chosen.model_copy(update={"profile": profile, "source": source})
