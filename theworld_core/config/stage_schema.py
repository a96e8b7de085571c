"""The stage schema: what one stage of training is, as a stage JSON file writes it.

Stage JSON files (configs/seed/; docs/configuration.md#stage-json-files) are flat (model, data and
training keys side by side), so a stage config is the union of the groups below. Each group is
also usable alone: the model code takes a `ModelConfig`, the data code a `DataConfig`, and both
accept a full stage config because the fields are the same.

- `ModelConfig`, `DataConfig`, `TrainingConfig` (with `PlateauConfig`): the groups.
- `StageConfig`: their flat union plus `name`; cross-field checks live in `TrainingConfig`.
- `ARCHITECTURE_KEYS`, `RESUME_COMPATIBLE_KEYS`: key classifications, read from marks on the fields.
- `checkpoint_source_kind`: what a `resume_from_checkpoint` value points at.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from theworld_core.config.errors import StrictModel, cross_field_error, validate_config

DEFAULT_GEMMA = "google/gemma-3-4b-it"
DEFAULT_COSMOS = "nvidia/Cosmos-Predict2-2B-Video2World"
DEFAULT_MLFLOW_EXPERIMENT = "theworld-multistage"
"""MLflow experiment used when a config names none (`wandb_project` unset, no `mlflow.experiment`)."""

# Marks on fields (`json_schema_extra`), read back by `marked_keys`; they also show in the JSON schema.
_ARCHITECTURE = {"architecture": True}
_RESUME_COMPATIBLE = {"resume_compatible": True}


def marked_keys(model: type[BaseModel], mark: str) -> tuple[str, ...]:
    """The fields of `model` whose `json_schema_extra` sets `mark`, in field order."""
    return tuple(
        name
        for name, field in model.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get(mark) is True
    )


class ModelConfig(StrictModel):
    """What TheWorld is built from, and the shape of its world branch.

    Fields marked `architecture` decide the parameters' names and shapes (`ARCHITECTURE_KEYS`).
    """

    model_name: str = Field(DEFAULT_GEMMA, json_schema_extra=_ARCHITECTURE)
    """Gemma 3 checkpoint: a hub id or a local folder (e.g. the one `theworld tiny` prints)."""
    model_revision: str | None = Field(None, json_schema_extra=_ARCHITECTURE)
    """Hub revision (branch, tag or commit) of `model_name`; ignored for local folders."""
    cosmos_model_name: str = Field(DEFAULT_COSMOS, json_schema_extra=_ARCHITECTURE)
    """Cosmos checkpoint whose `vae` subfolder holds the Wan 2.1 VAE: a hub id or a local folder."""
    cosmos_revision: str | None = Field(None, json_schema_extra=_ARCHITECTURE)
    """Hub revision of `cosmos_model_name`."""
    num_world_steps: int = Field(0, ge=0)
    """Future world-model rollout steps fed to the model. Only 0 (the observed frame) is supported yet."""
    max_world_steps: int = Field(16, ge=0, json_schema_extra=_ARCHITECTURE)
    """Size of the temporal position embedding minus one (entry 0 is the observed frame)."""
    enable_world: bool = Field(True, json_schema_extra=_ARCHITECTURE)
    """False gives plain Gemma 3 behaviour (no world tokens); used for baselines and parity checks."""
    world_tokens: int = Field(64, ge=1, json_schema_extra=_ARCHITECTURE)
    """World tokens per image: the VAE latent is average-pooled to a sqrt(n) x sqrt(n) grid. Perfect square."""
    world_image_size: int = Field(256, ge=8)
    """Side in pixels of the image fed to the VAE encoder (a multiple of 8; the latent is size/8)."""
    world_projector: Literal["linear", "mlp"] = Field("linear", json_schema_extra=_ARCHITECTURE)
    """Latent (16 channels) -> text hidden size: one linear layer (default), or a 2-layer MLP."""
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
            raise ValueError(
                f"world_tokens={value} must be a perfect square (4, 16, 64, ...): the latent is pooled to a square grid"
            )
        return value

    @field_validator("world_image_size")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"world_image_size={value} must be a multiple of 8 (the VAE downsamples by 8)")
        return value


ARCHITECTURE_KEYS: tuple[str, ...] = marked_keys(ModelConfig, "architecture")
"""ModelConfig keys that decide the parameters' names and shapes: a stage output fits only a base
model with equal values (a warm start from the champion checks them)."""


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
    """Share of samples held out for evaluation, chosen by a hash of each sample's content (image bytes;
    synthetic: what is drawn; URL lists: the URL), so copies land on one side: stable and disjoint."""
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
# Training: every training key of the stage JSON files (configs/seed/), same names and meanings.
# ---------------------------------------------------------------------------------------------

Component = Literal["world_projector", "gemma_vision", "gemma_language", "cosmos_vae"]
"""The four trainable components (the model's component registry uses the same names)."""
COMPONENT_NAMES: tuple[str, ...] = ("world_projector", "gemma_vision", "gemma_language", "cosmos_vae")

FREEZE_FLAG_OF: dict[str, str] = {
    "gemma_vision": "freeze_gemma_vision",
    "gemma_language": "freeze_gemma_language",
    "cosmos_vae": "freeze_cosmos_vae",
}
"""Component -> the freeze flag that switches it (`world_projector` is always trained)."""

LrSchedulerName = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
]
"""Names `transformers.get_scheduler(name, optimizer, num_warmup_steps=, num_training_steps=)` accepts
with no further arguments. Its other names (`reduce_lr_on_plateau`, `greedy`: need the metric at each
step; `cosine_with_min_lr`, `cosine_warmup_with_min_lr`, `warmup_stable_decay`: need extra kwargs)
are refused rather than half-supported."""

_HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
STAGE_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
"""Stage (and profile) names: letters, digits, `_`, `-`, `.`; used in run and artifact names."""

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]

# The plateau keys' constraints, shared by `PlateauConfig`, the flat `plateau_*` stage keys and the
# pipeline's `plateau:` section.
PlateauMinImprovement = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
PlateauWindowSteps = Annotated[int, Field(ge=1)]
PlateauPatienceSteps = Annotated[int, Field(ge=1)]
PlateauMinSteps = Annotated[int, Field(ge=0)]

PLATEAU_MIN_STEPS_PROJECTION_ONLY = 10000
"""Default `min_steps` of a projection-only stage (docs/stages.md#plateau)."""
PLATEAU_MIN_STEPS_LATER_STAGES = 5000
"""Default `min_steps` of a stage that unfreezes a pretrained component (docs/stages.md#plateau)."""
PLATEAU_MIN_EVALUATIONS = 3  # evaluations a plateau rule needs: in its window / since the best (docs/stages.md#plateau)


class PlateauConfig(StrictModel):
    """The plateau rule (docs/stages.md#plateau).

    A stage has plateaued at its latest evaluation step `t` when `t >= min_steps` and either

    - **window rule**: the best validation loss improved by less than `min_improvement` (relative)
      over the last `window_steps` steps, i.e. `(best_before - best_recent) / |best_before| <
      min_improvement` where `best_before` is the lowest loss evaluated at a step `<= t -
      window_steps` and `best_recent` the lowest loss evaluated in `(t - window_steps, t]`; the
      window must be covered (an evaluation at or before `t - window_steps`) and hold 3 evaluations
      (`PLATEAU_MIN_EVALUATIONS`), else this rule does not fire; or
    - **patience rule**: no new best (strictly lower) loss for `patience_steps` steps and 3
      evaluations, i.e. `t - best_step >= patience_steps` with 3 evaluations after `best_step`.

    `theworld_core.training.plateau` implements it. The same four keys appear flat in a stage config
    as `plateau_min_improvement`, `plateau_window_steps`, `plateau_patience_steps` and
    `plateau_min_steps` (stage JSON files are flat); `TrainingConfig.plateau` gives this model.
    A pipeline file may use this model as a nested `plateau:` section.
    """

    model_config = ConfigDict(use_attribute_docstrings=True)

    min_improvement: PlateauMinImprovement = 0.01
    """Relative improvement of the best validation loss over the window below which the stage has
    plateaued (0.01 = 1%). An improvement of exactly this much counts as enough, so 0 switches the
    window rule off."""
    window_steps: PlateauWindowSteps = 5000
    """Length in optimizer steps of the window the improvement is measured over (>= 3 x eval_steps)."""
    patience_steps: PlateauPatienceSteps = 3000
    """Optimizer steps without a new best validation loss after which the stage has plateaued (>= 3 x eval_steps)."""
    min_steps: PlateauMinSteps = PLATEAU_MIN_STEPS_PROJECTION_ONLY
    """No plateau verdict before this optimizer step (docs/stages.md#plateau)."""


PLATEAU_DEFAULTS = PlateauConfig()
"""The plateau rule (docs/stages.md#plateau): the defaults of the flat `plateau_*` stage keys and
the pipeline's `plateau:` section (written once, in `PlateauConfig`)."""


@dataclass(frozen=True)
class MlflowNames:
    """Where a stage's metrics go: the MLflow experiment and run names."""

    experiment: str
    run_name: str | None


class TrainingConfig(StrictModel):
    """How a stage trains: the stage JSON files' training keys, plus what the pipeline adds (plateau,
    seed, per-component learning rates, optimizer carry-over).

    Keys starting with `_` (e.g. `"_comment"`) are dropped before validation. Fields marked
    `resume_compatible` may change between a crash and its resume (`RESUME_COMPATIBLE_KEYS`).
    """

    model_config = ConfigDict(hide_input_in_errors=True, use_attribute_docstrings=True)

    # --- freezing (three flags; docs/stages.md#components) -------------------------------
    freeze_gemma_vision: bool = True
    """Freeze Gemma's SigLIP vision tower and multi-modal projector (false from stage 2 on)."""
    freeze_gemma_language: bool = True
    """Freeze Gemma's language model, token embeddings and lm_head (false from stage 3 on)."""
    freeze_cosmos_vae: bool = True
    """Freeze the Cosmos (Wan 2.1) VAE encoder (false only in stage 4)."""

    # --- optimisation -------------------------------------------------------------------------
    learning_rate: PositiveFloat = 1e-4
    """Peak learning rate of AdamW (1e-4, 5e-5, 1e-5, 5e-6 in stages 1-4: docs/stages.md#the-four-stages)."""
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
    `linear` (decay to 0 at the last step), the Hugging Face Trainer's default."""
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    """AdamW decoupled weight decay."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """`adamw`: PyTorch AdamW with fp32 moments over fp32 master weights (fused kernels on CUDA).
    `adamw_8bit`: AdamW with 8-bit moments (torchao; CUDA only, the `gpu` extra), about a quarter of
    the optimizer memory (docs/stages.md#memory); refused before any work on a machine without it."""
    max_grad_norm: PositiveFloat = 1.0
    """Gradients are clipped to this global L2 norm before each optimizer step (0.5 in the
    divergence recipe, docs/stages.md#retries)."""
    divergence_grad_norm: PositiveFloat | None = 1000.0
    """A gradient norm (before clipping) above this ends the stage as diverged, as does a NaN/inf
    loss (docs/stages.md#gate). Null: only non-finite values count as divergence."""
    inject_fault: Literal["nan_loss", "oom"] | None = None
    """Rehearsal of the gate's failure paths: make this stage's loss NaN (`nan_loss`) or raise a
    CUDA out-of-memory error (`oom`) at optimizer step `inject_fault_step`. The gate's retry clears
    it, so the retried attempt runs clean. Leave null for real training."""
    inject_fault_step: int = Field(1, ge=1)
    """Optimizer step at which `inject_fault` fires."""

    # --- memory -----------------------------------------------------------------------------
    use_gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory (on from stage 3:
    docs/stages.md#the-four-stages)."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    """Autocast precision. `bf16` means bf16 where the device supports it and plain fp32 elsewhere
    (on CPU, or a GPU without bf16), so the stage JSON files run unchanged on a laptop; `fp16` needs
    a CUDA GPU; `no` is fp32 everywhere. `theworld_core.model.precision` applies it."""

    # --- data path ---------------------------------------------------------------------------
    num_workers: int | None = Field(None, ge=0)
    """DataLoader worker processes that decode and preprocess images beside the training loop
    (pinned memory and non-blocking copies on CUDA). Null: picked from the CPUs available per
    process; 0: everything in the training process."""
    feature_cache: Literal["auto", "off"] = Field("auto", json_schema_extra=_RESUME_COMPATIBLE)
    """Keep the outputs of frozen encoders (vision tower + projector, VAE encoder latent) on disk and
    reuse them across epochs, stages and runs (docs/stages.md#feature-cache); an encoder that trains
    is never served from it. `off`: every image is encoded at every step."""
    feature_cache_dir: str | None = Field(None, json_schema_extra=_RESUME_COMPATIBLE)
    """Feature cache folder (null: `feature_cache` under the project's state folder). Concurrent
    runs may share it."""
    feature_cache_max_gb: float = Field(50.0, gt=0, allow_inf_nan=False, json_schema_extra=_RESUME_COMPATIBLE)
    """Size cap of the feature cache in GB (10^9 bytes); the least recently used entries are evicted
    beyond it. About 1.34 MB per sample on Gemma 3 4B (bf16, world_image_size 256)."""

    # --- checkpoints --------------------------------------------------------------------------
    output_dir: str = Field("./checkpoints", json_schema_extra=_RESUME_COMPATIBLE)
    """Folder for this stage's resume states and stage output (one folder per stage)."""
    save_steps: int = Field(1000, ge=1, json_schema_extra=_RESUME_COMPATIBLE)
    """Write a resume state every this many optimizer steps."""
    save_total_limit: int | None = Field(5, ge=1, json_schema_extra=_RESUME_COMPATIBLE)
    """Keep only the newest this many resume states (null: keep all)."""
    resume_from_checkpoint: str | None = Field(None, json_schema_extra=_RESUME_COMPATIBLE)
    """What the stage starts from: a local folder (a stage output or a resume state), `runs:/<run
    id>/<artifact path>` (an MLflow run artifact), `models:/<name>/<version>` or
    `models:/<name>@<alias>` (the MLflow Model Registry), or a Hugging Face hub repo id `owner/name`
    (docs/checkpoints.md#where-a-stage-starts). A stage output starts the stage fresh (new
    optimizer, new warmup, step 0); a resume state of the same stage continues it. See
    `checkpoint_source_kind`."""
    carry_optimizer_state: bool = False
    """At a stage transition, carry the previous stage's AdamW moments for parameters that stay
    trainable (matched by parameter name); newly unfrozen parameters start with fresh moments. The
    step count and the scheduler are never carried."""

    # --- evaluation, plateau ------------------------------------------------------------------
    eval_steps: int = Field(1000, ge=1, json_schema_extra=_RESUME_COMPATIBLE)
    """Evaluate every this many optimizer steps (and at the end of the stage); 1000 as in stages.yaml:
    the plateau rule needs 3 evaluations per window and since the best (docs/stages.md#plateau)."""
    do_eval: bool = True
    """Run evaluation (the plateau rule and the gate need it)."""
    eval_max_samples: int | None = Field(None, ge=1)
    """Evaluate on at most this many samples of the eval split, the same ones each time (null: all)."""
    plateau_min_improvement: PlateauMinImprovement = PLATEAU_DEFAULTS.min_improvement
    """Plateau rule: relative improvement of the best validation loss over the window below which the
    stage has plateaued (0.01 = 1%). See `PlateauConfig`."""
    plateau_window_steps: PlateauWindowSteps = PLATEAU_DEFAULTS.window_steps
    """Plateau rule: window, in optimizer steps, the improvement is measured over."""
    plateau_patience_steps: PlateauPatienceSteps = PLATEAU_DEFAULTS.patience_steps
    """Plateau rule: optimizer steps without a new best validation loss that count as a plateau."""
    plateau_min_steps: PlateauMinSteps | None = None
    """Plateau rule: no plateau before this optimizer step. Null picks the value
    (docs/stages.md#plateau) from the freeze flags: 10000 for a projection-only stage (all three
    components frozen), else 5000."""

    # --- logging ------------------------------------------------------------------------------
    logging_steps: int = Field(100, ge=1, json_schema_extra=_RESUME_COMPATIBLE)
    """Log training metrics (loss, learning rate, gradient norm) every this many optimizer steps."""
    log_to_wandb: bool = Field(False, json_schema_extra=_RESUME_COMPATIBLE)
    """Accepted for the stage JSON files; Weights & Biases is not used: metrics always go to MLflow."""
    wandb_project: str | None = Field(None, json_schema_extra=_RESUME_COMPATIBLE)
    """Accepted for the stage JSON files: used as the MLflow experiment name."""
    wandb_run_name: str | None = Field(None, json_schema_extra=_RESUME_COMPATIBLE)
    """Accepted for the stage JSON files: used as the MLflow run name."""
    seed: int = 42
    """Seed of the training randomness (initialisation of new layers, shuffling, dropout)."""

    # --- distribution -------------------------------------------------------------------------
    num_processes: int = Field(1, ge=1, json_schema_extra=_RESUME_COMPATIBLE)
    """Data-parallel processes (one per GPU, or CPU processes with gloo) the stage is launched with."""
    distributed: Literal["ddp", "fsdp"] = Field("ddp", json_schema_extra=_RESUME_COMPATIBLE)
    """How those processes share the model. `ddp`: each holds all of it (stages 1-2). `fsdp`: weights,
    gradients and AdamW moments sharded (torch FSDP2, applied by the trainer; units hold fp32 trainable
    and bf16 frozen weights side by side; a frozen vision tower or VAE stays whole, training/sharding.py):
    stages 3-4 on 80 GB GPUs (docs/stages.md#memory). Saves the same files as `ddp` (either resumes the
    other's). Ignored in a single process."""

    # --- Hugging Face hub (optional; MLflow holds the artifacts in any case) -----------------
    push_to_hub: bool = Field(False, json_schema_extra=_RESUME_COMPATIBLE)
    """Also upload the stage output to the hub repo `hub_model_id` (token from the HF_TOKEN
    environment variable, never from a config file)."""
    hub_model_id: str | None = Field(None, json_schema_extra=_RESUME_COMPATIBLE)
    """Hub repo `owner/name` to push to; required when `push_to_hub` is true."""
    hub_strategy: Literal["every_save", "end"] = Field("every_save", json_schema_extra=_RESUME_COMPATIBLE)
    """When to push: at every resume-state save (`every_save`, as the stage JSON files set) or once at
    the end."""
    hub_private_repo: bool = Field(False, json_schema_extra=_RESUME_COMPATIBLE)
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
            raise cross_field_error(type(self).__name__, problems)
        return self

    def _cross_field_problems(self) -> list[tuple[str, Any, str]]:
        """Every check that involves more than one field, in one place: `(key, value, allowed)`."""
        problems: list[tuple[str, Any, str]] = []
        if self.push_to_hub and self.hub_model_id is None:
            problems.append(("hub_model_id", None, "required when push_to_hub is true: the hub repo as 'owner/name'"))
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            why = f"must not exceed max_steps ({self.max_steps}): the learning rate would never reach its peak"
            problems.append(("warmup_steps", self.warmup_steps, why))
        if self.distributed == "fsdp" and self.optimizer != "adamw":
            why = "must be adamw when distributed is fsdp (FSDP shards fp32 AdamW moments; 8-bit ones are not sharded)"
            problems.append(("optimizer", self.optimizer, why))
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
        """The three freeze flags by name, e.g. `{"freeze_gemma_vision": True, ...}` (the form
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

    def mlflow_names(self, *, default_run_name: str | None = None) -> MlflowNames:
        """The MLflow experiment and run names: `wandb_project` / `wandb_run_name` when given (the
        stage JSON files' keys), else `DEFAULT_MLFLOW_EXPERIMENT` / `default_run_name`."""
        return MlflowNames(
            experiment=self.wandb_project or DEFAULT_MLFLOW_EXPERIMENT, run_name=self.wandb_run_name or default_run_name
        )

    def wandb_notice(self, *, default_run_name: str | None = None) -> str | None:
        """One line to log once when the config uses the wandb keys (None when it does not)."""
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
      should still prefer a local folder of that exact relative name when one exists
    - anything else without a URI scheme (`/abs/path`, `./rel`, `checkpoints/stage1/checkpoint-1000`,
      `C:\\...`) -> `local`

    Other URI schemes (`s3://`, `https://`, ...) raise `ValueError`.
    """
    text = value.strip()
    if not text or text != value:
        raise ValueError("must be a non-empty path or URI without surrounding spaces")
    if text.startswith("runs:/"):
        run_id = text[len("runs:/") :].lstrip("/").partition("/")[0]
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
    """One stage as a stage JSON file writes it: model, data and training keys side by side.

    Views: `model_part()`, `data_part()` (the groups on their own), `freeze_flags`, `plateau`,
    `mlflow_names()`. Load a file with `load_stage_config`.
    """

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, use_attribute_docstrings=True)

    name: str | None = Field(None, json_schema_extra=_RESUME_COMPATIBLE)
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
        if value is not None and not STAGE_NAME_PATTERN.match(value):
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


RESUME_COMPATIBLE_KEYS: frozenset[str] = frozenset(marked_keys(StageConfig, "resume_compatible"))
"""Stage keys that may change between a crash and its resume without changing what is trained
(logging, saving, evaluation cadence, where outputs go, hub pushes, the stage name, the process
count); a change to any other key makes a resume state belong to another run."""
