"""The four training stages on the real architectures with random weights, through the trainer's step:
s/optimizer step, samples/s, tokens/s, peak memory beside the plan's estimate, MFU.

    # on a GPU (H100 / H200), the real Gemma 3 4B + Wan 2.1 VAE encoder from ../shared/reference/:
    .venv/bin/python bench/bench_gpu_stages.py --out bench/gpu_stages.json
    # the same script, tiny models on the CPU (what tests/test_bench_gpu_stages.py runs):
    .venv/bin/python bench/bench_gpu_stages.py --tiny --steps 2 --out tmp.json
    # the real hidden sizes / vocabulary with 2 text and 2 vision layers, one step on the CPU:
    .venv/bin/python bench/bench_gpu_stages.py --device cpu --layers 2 --batch 1 --accum 1 --warmup 1 --steps 1
    # no training: per-stage parameter and FLOP counts of the real architecture (meta device, seconds)
    .venv/bin/python bench/bench_gpu_stages.py --meta

What runs, per stage (the four stages' freeze flags, `SEED_STAGES`; the recipe of the matching stage
of `--stages-yaml`, default the repository's stages.yaml, `--profile` applied: batch size,
accumulation, gradient checkpointing, optimizer, mixed precision; `--batch`, `--accum`,
`--checkpointing`, `--optimizer` override):

- The model: `TheWorld.on_meta(ModelConfig)` from the config files (`--gemma`, `--cosmos`; default
  `shared/reference/*.config.json` beside the repository), world token ids set by hand (the three
  ids after Gemma's image token, 262145-262147 for the real vocabulary), the stage's freeze applied
  with `set_trainable`, then the trainer's precision policy: `resolve_precision` as StageTrainer
  resolves it and `apply_precision` (trainable fp32, frozen in the compute dtype), on meta; then
  `to_empty(device)`, initialised on the device (Gemma's HF `init_weights()`, the zero-initialised
  multi-modal projector and the world branch N(0, 0.02), the VAE encoder N(0, 1/fan_in), zero biases,
  unit RMS-norm gammas, the latent mean/std from the config) and checked: finite, non-zero weights
  per component, `check_precision`. No download; each stage is built afresh.
- The data: the model's own `InputBuilder` (`encode` + `collate`, as the trainer's loader) over
  random 64 x 64 images, a prompt and an answer of `--prompt-tokens` / `--answer-tokens` tokens
  (400 tokens in all on the real architecture, the plan's typical sequence). The processor is
  `--processor` or the tiny model's: in front of the real architecture its image processor is set to
  896 px and 256 tokens per image and its special ids are translated to the real ones after
  collation (`BenchInputs`). `accum` different batches per optimizer step, made before timing.
- The step: the trainer's. An Accelerator built as `StageTrainer.setup` builds it (the policy's
  mixed precision, the stage's accumulation), model and optimizer through `accelerator.prepare`,
  `build_optimizer` (its groups and AdamW; `adamw_8bit` once it takes an `optimizer` argument),
  `activation_checkpointing_enable(use_reentrant=False)` as the trainer calls it; then the
  trainer's `OptimizerStep` (theworld_core/training/step.py), the very code StageTrainer steps
  with: per micro-batch `TheWorld.forward(**batch, loss_reduction="sum")` and `accelerator.backward`
  inside `accelerator.accumulate(model)`; at the step the token-mean scaling, the non-finite check,
  `accelerator.clip_grad_norm_` at 1.0, `optimizer.step()`, `zero_grad(set_to_none=True)`. Not
  timed: the trainer's logging, evaluation and saving.
- Timing: `--warmup` optimizer steps (untimed; the first also records which components received
  gradients), then `--steps` timed optimizer steps, synchronised; s/optimizer step is their mean.
- Memory (CUDA): `torch.cuda.reset_peak_memory_stats` after the warmup steps, then
  `max_memory_allocated` / `max_memory_reserved` over the timed steps (weights, gradients and
  optimizer state are resident by then), in GiB (2^30 bytes), beside `theworld plan`'s estimate for
  the same recipe and sequence (`plan_memory_gib`). An out-of-memory error in a stage (CUDA OOM or
  a failed CPU allocation) gives an `OOM` row with the peak at the failure, and the next stage runs.

Throughput and MFU:

- tokens/s = the attention-mask tokens of an optimizer step's batches (every language-model
  position: text, image, world tokens) / s per optimizer step; samples/s = batch x accum / s.
- FLOPs: the forward FLOPs of one sample are counted per component with `torch.utils.flop_counter`
  on the meta device (exact matmul/conv/attention FLOPs for these shapes, no weights needed):
  F_vision (SigLIP on the 4096 patches + multi-modal projector), F_vae (VAE encoder + quant_conv),
  F_world (projector), F_lm (Gemma 3 text model + lm_head over the sequence). Training FLOPs per
  sample ("6N" adjusted for what is trainable), backward = activation gradients (~1x forward) where a
  gradient must flow through the component + weight gradients (~1x forward) where it is trainable:

      F_train = F_lm * (2 + [language trainable])          # the world projector feeds the LM: its
                                                           # input gradients are always needed
              + F_vision * (3 if vision trainable else 1)  # frozen: forward only, under no_grad
              + F_vae * (3 if VAE trainable else 1)
              + F_world * (2 + [VAE trainable])

  so a fully trainable model gets 3 x forward = 6 N tokens. Gradient-checkpointing recompute is not
  counted (model FLOPs, not hardware FLOPs). MFU = F_train x batch x accum / s_per_step /
  (`--peak-tflops` x 1e12); the default peak is the card's dense bf16 figure (H100 SXM 989, H200
  989, H100 PCIe 756, H100 NVL 835, A100 312 TFLOP/s), none on the CPU (MFU not reported unless
  `--peak-tflops` is given).

Prints a Markdown table beside the guide's estimates and writes everything to `--out` (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Offline and quiet, before transformers / diffusers are imported (only config files are read).
for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from theworld_core.config import ModelConfig  # noqa: E402
from theworld_core.model.components import (  # noqa: E402
    COMPONENTS,
    SEED_STAGES,
    gradient_presence,
    parameter_report,
    parameters_by_component,
    trainable_components,
)
from theworld_core.model.inputs import IGNORE_INDEX, WorldTokenIds  # noqa: E402
from theworld_core.training.step import OptimizerStep, StopStage  # noqa: E402

# shared/ sits beside the repository (in a git worktree: beside the worktrees).
REFERENCE = next(
    (p / "shared" / "reference" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared" / "reference").is_dir()),
    ROOT.parent / "shared" / "reference",
)
STAGES_YAML = ROOT / "stages.yaml"
DEFAULT_GEMMA = REFERENCE / "gemma-3-4b-it.config.json"
DEFAULT_COSMOS = REFERENCE / "cosmos-predict2-vae.config.json"

# The seed guide's stage table (estimated there, not measured).
SEED: dict[str, dict] = {
    "stage1_projection": {"memory_gb": (20, 24), "s_per_step": (1, 2)},
    "stage2_vision": {"memory_gb": (35, 40), "s_per_step": (3, 4)},
    "stage3_language": {"memory_gb": (56, 60), "s_per_step": (8, 10)},
    "stage4_full": {"memory_gb": (80, 84), "s_per_step": (15, 20)},
}
assert tuple(SEED) == tuple(SEED_STAGES)
RECIPE_KEYS = (
    "batch_size",
    "gradient_accumulation_steps",
    "use_gradient_checkpointing",
    "optimizer",
    "mixed_precision",
)


def stages_yaml_recipes(path: Path, profile: str | None = None) -> dict[str, dict]:
    """The memory recipe of each stage of a pipeline file, by position onto SEED_STAGES' names."""
    from theworld_core.config import load_pipeline_config

    stages = load_pipeline_config(path, profile=profile).resolved_stages()
    if len(stages) != len(SEED_STAGES) or [s.freeze_flags for s in stages] != list(SEED_STAGES.values()):
        raise ValueError(f"{path}: its stages do not unfreeze as the four stages of docs/stages.md")
    return {name: {k: getattr(s, k) for k in RECIPE_KEYS} for name, s in zip(SEED_STAGES, stages)}


# Dense bf16 peak TFLOP/s by device name (first match wins; more specific names first).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("A100", 312.0),
)

# Tiny mode: the embedded tiny models at a size that runs in seconds on a CPU.
TINY_DEFAULTS = {
    "batch": 2,
    "accum": 2,
    "world_tokens": 4,
    "world_image_size": 32,
    "prompt_tokens": 8,
    "answer_tokens": 8,
    "warmup": 1,
    "threads": 1,
}
REAL_DEFAULTS = {"world_tokens": 64, "world_image_size": 256, "prompt_tokens": 32, "answer_tokens": 32, "warmup": 2}

GIB = 2**30


# ------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Sources:
    gemma: str
    cosmos: str
    model_config: ModelConfig


def _override_layers(gemma_source: str, layers: int, workdir: Path) -> str:
    """A copy of the Gemma config with `layers` text and vision layers (at least one global attention layer)."""
    from theworld_core.model.base import load_gemma_config

    config = load_gemma_config(gemma_source)
    text, vision = config.text_config, config.vision_config
    kinds = list(getattr(text, "layer_types", None) or [])[:layers]
    if len(kinds) < layers:
        kinds += ["sliding_attention"] * (layers - len(kinds))
    if "full_attention" not in kinds:
        kinds[-1] = "full_attention"  # keep both of Gemma 3's attention kinds in the measured model
    text.num_hidden_layers = layers
    text.layer_types = kinds
    vision.num_hidden_layers = layers
    path = workdir / "gemma-layers.config.json"
    path.write_text(json.dumps(config.to_dict(), indent=1, default=str))
    return str(path)


def resolve_sources(args, workdir: Path) -> Sources:
    if args.tiny:
        from theworld_core.model.tiny import ensure_tiny_models

        tiny = ensure_tiny_models(Path(args.tiny_dir) if args.tiny_dir else None)
        gemma, cosmos = str(tiny.gemma), str(tiny.cosmos)
    else:
        gemma, cosmos = str(args.gemma), str(args.cosmos)
    if args.layers:
        gemma = _override_layers(gemma, args.layers, workdir)
    model_config = ModelConfig(
        model_name=gemma,
        cosmos_model_name=cosmos,
        world_tokens=args.world_tokens,
        world_image_size=args.world_image_size,
        max_seq_length=max(2048, 4 * args.world_tokens + 2048),
    )
    return Sources(gemma, cosmos, model_config)


def tiny_processor_dir(args) -> Path:
    from theworld_core.model.tiny import ensure_tiny_models

    return ensure_tiny_models(Path(args.tiny_dir) if args.tiny_dir else None).gemma


def world_token_ids(gemma_config) -> WorldTokenIds:
    """The three ids after Gemma's highest special (image) token; inside the padded embedding table."""
    first = max(gemma_config.image_token_index, gemma_config.boi_token_index, gemma_config.eoi_token_index) + 1
    ids = WorldTokenIds(first, first + 1, first + 2)
    vocab = gemma_config.get_text_config().vocab_size
    if ids.soft >= vocab:
        raise ValueError(f"world token ids {ids} do not fit the embedding table of {vocab} rows")
    return ids


# ------------------------------------------------------------------------------------ building


def build_meta(sources: Sources):
    from theworld_core.model.theworld import TheWorld

    model = TheWorld.on_meta(sources.model_config)
    model.token_ids = world_token_ids(model.gemma.config)
    return model


@torch.no_grad()
def initialise(model, vae_config: dict, seed: int) -> None:
    """Random, finite, non-zero weights in place (after `to_empty`)."""
    torch.manual_seed(seed)
    gemma = model.gemma
    # HF init: normal(initializer_range) weights, Gemma's (1 + w) RMS norms at 0, rotary inv_freq,
    # embed_scale and SigLIP position ids recomputed, lm_head tied to the embeddings again.
    gemma.init_weights()
    # HF initialises the multi-modal projection to zeros (the checkpoint overwrites it); left so,
    # images would vanish and the vision tower get no gradient.
    gemma.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    for module in model.vae.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                param.zero_()
            elif name == "gamma":  # Wan's RMS norm scale
                param.fill_(1.0)
            else:
                param.normal_(0.0, param[0].numel() ** -0.5)
    z = model.vae.z_dim
    model.vae.latents_mean.copy_(torch.tensor(vae_config["latents_mean"], dtype=torch.float32).view(1, z, 1, 1, 1))
    model.vae.latents_std.copy_(torch.tensor(vae_config["latents_std"], dtype=torch.float32).view(1, z, 1, 1, 1))
    for name, param in model.world.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02)


@torch.no_grad()
def check_weights(model) -> None:
    embed = model.gemma.get_input_embeddings().weight
    if model.gemma.config.get_text_config().tie_word_embeddings and model.gemma.lm_head.weight is not embed:
        raise RuntimeError("lm_head is not tied to the token embeddings after initialisation")
    for component, params in parameters_by_component(model).items():
        finite = all(bool(torch.isfinite(p).all()) for _, p in params)
        nonzero = any(bool(p.count_nonzero() > 0) for _, p in params)
        if not (finite and nonzero):
            raise RuntimeError(
                f"{component}: weights after initialisation are {'not finite' if not finite else 'all zero'}"
            )
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and not bool(torch.isfinite(buffer).all()):
            raise RuntimeError(f"buffer {name} is not finite after initialisation")


def build_stage_model(sources: Sources, stage: str, device: torch.device, policy, seed: int):
    """Meta build -> freeze -> the trainer's precision policy (`apply_precision`, on meta) ->
    `to_empty(device)` -> init on the device."""
    from theworld_core.model.base import load_vae_config
    from theworld_core.model.precision import apply_precision, check_precision

    model = build_meta(sources)
    trainable = model.set_trainable(trainable_components(SEED_STAGES[stage]))
    apply_precision(model, policy, trainable)
    model.to_empty(device=device)  # requires_grad survives; ties are restored by init_weights()
    initialise(model, load_vae_config(sources.cosmos), seed)
    check_weights(model)
    check_precision(model, policy)
    return model, trainable


# ------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class Layout:
    seq_len: int
    labelled: int
    image_tokens: int
    image_size: int
    world_tokens: int
    world_image_size: int


class BenchInputs:
    """Batches made by the model's own `InputBuilder` (encode + collate), as the trainer's loader makes them.

    The processor is `--processor` (a Gemma 3 processor folder) or the tiny model's. When its token
    ids are not the measured model's (the tiny processor in front of the real architecture), the image
    processor is set to the model's image size and tokens per image, and the special ids (image,
    boi, eoi, world markers) are translated to the model's after collation; ordinary ids are kept
    (random weights: which words they are does not matter).
    """

    def __init__(self, processor_source: str, gemma_config, model_ids: WorldTokenIds, args, max_seq_length: int):
        from transformers import AutoProcessor

        from theworld_core.model.inputs import WORLD_TOKENS, InputBuilder

        processor = AutoProcessor.from_pretrained(processor_source)
        tokenizer = processor.tokenizer
        tokenizer.add_tokens([t for t in WORLD_TOKENS if t not in tokenizer.get_vocab()], special_tokens=True)
        ids = WorldTokenIds(*(tokenizer.convert_tokens_to_ids(t) for t in WORLD_TOKENS))
        mm, side = gemma_config.mm_tokens_per_image, gemma_config.vision_config.image_size
        if processor.image_seq_length != mm or processor.image_processor.size.get("height") != side:
            processor.image_processor.size = {"height": side, "width": side}
            processor = type(processor)(
                image_processor=processor.image_processor,
                tokenizer=tokenizer,
                chat_template=processor.chat_template,
                image_seq_length=mm,
            )
        own = {
            tokenizer.convert_tokens_to_ids(tokenizer.image_token): gemma_config.image_token_index,
            tokenizer.convert_tokens_to_ids(tokenizer.boi_token): gemma_config.boi_token_index,
            tokenizer.convert_tokens_to_ids(tokenizer.eoi_token): gemma_config.eoi_token_index,
            ids.start: model_ids.start,
            ids.end: model_ids.end,
            ids.soft: model_ids.soft,
        }
        self.translate = {a: b for a, b in own.items() if a != b}
        self.builder = InputBuilder(processor, ids, args.world_tokens, args.world_image_size, True, max_seq_length)
        self.prompt = self._text(args.prompt_tokens)
        self.answer = self._text(args.answer_tokens - 1)  # + <end_of_turn>
        self.image_size = side
        # Gemma's tokenizer gives the template 16 tokens (the plan's typical sequence); another tokenizer
        # may give more or fewer: the prompt absorbs the difference, so the sequence is the plan's.
        target = mm + args.world_tokens + args.prompt_tokens + args.answer_tokens + 16
        extra = self.batch(1, "cpu", 0)["input_ids"].shape[1] - target
        if extra and args.prompt_tokens - extra > 0:
            self.prompt = self._text(args.prompt_tokens - extra)

    def _text(self, tokens: int) -> str:
        """Words that the tokenizer makes `tokens` tokens of (close to it when no single-token word repeats)."""
        tokenizer = self.builder.tokenizer
        for word in ("the", "a", "world", "image", "x"):
            text = " ".join([word] * tokens)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens:
                return text
        return " ".join(["the"] * tokens)

    def batch(self, size: int, device, seed: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        g = torch.Generator().manual_seed(seed)
        rows = []
        for _ in range(size):
            pixels = torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
            rows.append(self.builder.encode(Image.fromarray(pixels, "RGB"), self.prompt, self.answer))
        batch = self.builder.collate(rows)
        for key in ("input_ids", "labels"):
            original = batch[key].clone()  # masks from the original ids: no chained replacements
            for old, new in self.translate.items():
                batch[key][original == old] = new
        return {k: v.to(device) for k, v in batch.items()}

    def layout(self, args) -> Layout:
        sample = self.batch(1, "cpu", 0)
        labelled = int((sample["labels"] != IGNORE_INDEX).sum())
        return Layout(
            sample["input_ids"].shape[1],
            labelled,
            int((sample["token_type_ids"] == 1).sum()),
            self.image_size,
            args.world_tokens,
            args.world_image_size,
        )


# ------------------------------------------------------------------------------------ FLOPs


def forward_flops(sources: Sources, layout: Layout) -> dict[str, int]:
    """Forward FLOPs of one sample per component, counted on the meta device (shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_meta(sources)
    text_cfg = model.gemma.config.get_text_config()
    counts = {}

    def count(key, fn):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            fn()
        counts[key] = int(counter.get_total_flops())

    with torch.device("meta"):
        side, ws = layout.image_size, layout.world_image_size
        count("gemma_vision", lambda: model.gemma.model.get_image_features(pixel_values=torch.randn(1, 3, side, side)))
        latent = torch.randn(1, model.vae.z_dim, 1, ws // 8, ws // 8)
        count("cosmos_vae", lambda: model.vae(torch.randn(1, 3, 1, ws, ws)))
        count("world_projector", lambda: model.world(latent))
        n = layout.seq_len
        token_types = torch.zeros(1, n, dtype=torch.long)
        count(
            "gemma_language",
            lambda: model.gemma(
                inputs_embeds=torch.randn(1, n, text_cfg.hidden_size),
                attention_mask=torch.ones(1, n, dtype=torch.long),
                token_type_ids=token_types,
                use_cache=False,
            ),
        )
    return counts


def training_flops_per_sample(fwd: dict[str, int], trainable) -> int:
    """Forward + backward FLOPs of one sample for a stage (see the module docstring for the rule)."""
    t = set(trainable)
    return int(
        fwd["gemma_language"] * (2 + ("gemma_language" in t))
        + fwd["gemma_vision"] * (3 if "gemma_vision" in t else 1)
        + fwd["cosmos_vae"] * (3 if "cosmos_vae" in t else 1)
        + fwd["world_projector"] * (2 + ("cosmos_vae" in t))
    )


# ------------------------------------------------------------------------------------ running


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError) or (isinstance(exc, StopStage) and exc.status == "oom"):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory(device: torch.device) -> dict:
    import resource

    # Process-wide high-water mark of resident memory (Linux: KiB); never goes down, so on the CPU it
    # bounds the stages run so far, not this stage alone.
    rss = {"process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None, **rss}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        **rss,
    }


def _optimizer(model, recipe: dict, args):
    """The trainer's optimizer: `build_optimizer` (its groups, its AdamW, and its 8-bit option once it has one)."""
    import inspect

    from theworld_core.training.optim import build_optimizer

    kwargs = {}
    if "optimizer" in inspect.signature(build_optimizer).parameters:
        kwargs["optimizer"] = recipe["optimizer"]
    elif recipe["optimizer"] != "adamw":
        raise ValueError(f"optimizer {recipe['optimizer']!r}: training/optim.build_optimizer has no such option here")
    optimizer, _ = build_optimizer(model, args.lr, args.weight_decay, **kwargs)
    return optimizer


def _recipe(stage: str, args) -> dict:
    base = {**args.recipes[stage]}
    for key, value in (("batch_size", args.batch), ("gradient_accumulation_steps", args.accum)):
        if value is not None:
            base[key] = value
    if args.checkpointing != "recipe":
        base["use_gradient_checkpointing"] = args.checkpointing == "on"
    if args.optimizer:
        base["optimizer"] = args.optimizer
    return base


def plan_estimate(sources: Sources, stage: str, recipe: dict, seq_len: int) -> dict[str, float]:
    """`theworld plan`'s memory estimate (GiB) of this stage at this recipe and sequence length."""
    from theworld_core.model.plan import Architecture, Recipe, stage_memory

    model = build_meta(sources)
    totals = {c: r.total for c, r in parameter_report(model).items()}
    model.set_trainable(trainable_components(SEED_STAGES[stage]))
    trainable = {c: r.trainable for c, r in parameter_report(model).items()}
    fields = {k: v for k, v in recipe.items() if k in Recipe.__dataclass_fields__}
    return stage_memory(Architecture.of(model), totals, trainable, Recipe(**fields), sources.model_config, seq_len)[
        "memory_gib"
    ]


def run_stage(
    stage: str,
    sources: Sources,
    inputs: BenchInputs,
    layout: Layout,
    fwd: dict[str, int],
    args,
    device: torch.device,
    progress: dict,
) -> dict:
    """Build, warm up and time one stage with the trainer's step; raises on OOM (the caller reports it).

    The step is StageTrainer's: an Accelerator set up as `StageTrainer.setup` sets it up (the
    precision policy's mixed precision, the stage's accumulation), the model and optimizer through
    `accelerator.prepare`, then the trainer's own `OptimizerStep` (training/step.py): per micro-batch
    the summed answer-token loss and its backward, at the step the token-mean scaling, the
    non-finite check, `clip_grad_norm_`, `optimizer.step()`, `zero_grad(set_to_none=True)`.
    """
    from accelerate import Accelerator

    from theworld_core.model.precision import resolve_precision

    recipe = _recipe(stage, args)
    batch, accum, checkpointing = (
        recipe["batch_size"],
        recipe["gradient_accumulation_steps"],
        recipe["use_gradient_checkpointing"],
    )
    progress.update(
        phase="build",
        batch_size=batch,
        accum=accum,
        gradient_checkpointing=checkpointing,
        optimizer=recipe["optimizer"],
    )
    on_gpu = device.type == "cuda"
    policy = resolve_precision(
        recipe["mixed_precision"], device, bf16_supported=on_gpu and torch.cuda.is_bf16_supported()
    )
    started = time.perf_counter()
    model, trainable = build_stage_model(sources, stage, device, policy, args.seed)
    _sync(device)
    build_s = time.perf_counter() - started
    report = parameter_report(model)
    progress["trainable_params"] = sum(r.trainable for r in report.values())
    weights_gib = torch.cuda.memory_allocated(device) / GIB if on_gpu else None
    model.train()
    if checkpointing:
        with warnings.catch_warnings():  # transformers 5 renames it; the call is the trainer's
            warnings.simplefilter("ignore", FutureWarning)
            model.gemma.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    progress["phase"] = "optimizer"
    optimizer = _optimizer(model, recipe, args)
    acc = Accelerator(mixed_precision=policy.effective, gradient_accumulation_steps=accum, cpu=not on_gpu)
    acc.gradient_accumulation_steps = accum  # the state is shared by every Accelerator of the process
    model, optimizer = acc.prepare(model, optimizer)
    stepper = OptimizerStep(acc, model, optimizer, None, max_grad_norm=args.max_grad_norm)  # the trainer's step
    batches = [inputs.batch(batch, device, args.seed + 1 + i) for i in range(accum)]
    gradients: dict[str, bool] | None = None
    losses: list[float] = []

    def optimizer_step(first: bool) -> None:
        nonlocal gradients
        sums = [stepper.micro_batch(micro, step=len(losses) + 1) for micro in batches]
        stepper.gradients_ready(step=len(losses) + 1)
        if first:
            gradients = gradient_presence(acc.unwrap_model(model))
        stepper.apply()
        loss_sum, tokens = (sum(values) for values in zip(*sums))
        losses.append(float(loss_sum / tokens.clamp(min=1)))  # the step's token-mean loss

    progress["phase"] = "warmup"
    for i in range(args.warmup):
        optimizer_step(first=i == 0)
    _sync(device)
    if on_gpu:  # after warmup: the timed steps' peak (weights, gradients and moments are resident by now)
        torch.cuda.reset_peak_memory_stats(device)
    progress["phase"] = "timed"
    times = []
    for i in range(args.steps):
        if stage in args.inject_oom:
            raise torch.OutOfMemoryError(f"injected out-of-memory in {stage} (--inject-oom)")
        _sync(device)
        t0 = time.perf_counter()
        optimizer_step(first=args.warmup == 0 and i == 0)
        _sync(device)
        times.append(time.perf_counter() - t0)
    memory = _memory(device)
    acc.free_memory()
    s_per_step = sum(times) / len(times)
    tokens_per_step = sum(int(b["attention_mask"].sum()) for b in batches)
    samples_per_step = batch * accum
    flops_per_step = training_flops_per_sample(fwd, trainable) * samples_per_step
    expected = set(trainable)
    gradients_ok = None if gradients is None else all(gradients[c] == (c in expected) for c in COMPONENTS)
    if gradients_ok is False:
        print(
            f"# WARNING {stage}: gradients {gradients} do not match the trainable components {sorted(expected)}",
            file=sys.stderr,
        )
    return {
        "status": "ok",
        "trainable_components": list(trainable),
        "trainable_params": sum(r.trainable for r in report.values()),
        "total_params": sum(r.total for r in report.values()),
        "trainable_by_component": {c: r.trainable for c, r in report.items()},
        "batch_size": batch,
        "accum": accum,
        "gradient_checkpointing": checkpointing,
        "optimizer": recipe["optimizer"],
        "precision": policy.as_params(),
        "build_s": build_s,
        "s_per_step": s_per_step,
        "s_per_step_min": min(times),
        "step_times": times,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / s_per_step,
        "samples_per_s": samples_per_step / s_per_step,
        "train_flops_per_step": flops_per_step,
        "achieved_tflops": flops_per_step / s_per_step / 1e12,
        "mfu": flops_per_step / s_per_step / (args.peak_tflops * 1e12) if args.peak_tflops else None,
        "weights_gib": weights_gib,
        **memory,
        "plan_memory_gib": plan_estimate(
            sources, stage, {**recipe, "mixed_precision": policy.effective}, layout.seq_len
        ),
        "loss_last": losses[-1] if losses else None,
        "loss_finite": all(math.isfinite(x) for x in losses),
        "gradients": gradients,
        "gradients_match_trainable": gradients_ok,
    }


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def meta_report(sources: Sources, layout: Layout, fwd: dict[str, int], args) -> list[dict]:
    """No training: per-stage parameter and FLOP counts and the plan's memory estimate, on the meta device."""
    model = build_meta(sources)
    rows = []
    for stage, flags in SEED_STAGES.items():
        trainable = model.set_trainable(trainable_components(flags))
        report = parameter_report(model)
        recipe = _recipe(stage, args)
        rows.append(
            {
                "stage": stage,
                "status": "meta",
                "trainable_components": list(trainable),
                "trainable_params": sum(r.trainable for r in report.values()),
                "total_params": sum(r.total for r in report.values()),
                "train_flops_per_sample": training_flops_per_sample(fwd, trainable),
                "batch_size": recipe["batch_size"],
                "accum": recipe["gradient_accumulation_steps"],
                "gradient_checkpointing": recipe["use_gradient_checkpointing"],
                "optimizer": recipe["optimizer"],
                "plan_memory_gib": plan_estimate(sources, stage, recipe, layout.seq_len),
            }
        )
    return rows


# ------------------------------------------------------------------------------------ reporting


def machine() -> dict:
    info = {
        "cpu": platform.processor() or None,
        "cores": os.cpu_count(),
        "ram_gib": None,
        "gpu": None,
        "gpu_memory_gib": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except (OSError, subprocess.SubprocessError):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    try:
        import diffusers
        import transformers

        info["transformers"], info["diffusers"] = transformers.__version__, diffusers.__version__
    except ImportError:
        pass
    return info


def default_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def _range(pair) -> str:
    return f"{pair[0]}-{pair[1]}"


def format_table(result: dict) -> str:
    lines = [
        (
            "| stage | trainable | batch x accum | seed memory (GB) | plan estimate (GiB) | measured peak alloc / "
            "reserved (GiB) | seed s/step | measured s/optimizer step | samples/s | tokens/s | MFU |"
        ),
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["stages"]:
        seed = SEED[row["stage"]]
        recipe = (
            f"{row.get('batch_size', '?')} x {row.get('accum', '?')}"
            + (" + GC" if row.get("gradient_checkpointing") else "")
            + (" + 8-bit AdamW" if row.get("optimizer") == "adamw_8bit" else "")
        )
        trainable = f"{row['trainable_params']:,}" if row.get("trainable_params") is not None else "?"
        if row["status"] in ("oom", "error"):
            peak = row.get("peak_allocated_gib")
            what = row["status"].upper()
            memory = f"{what} in {row['oom_phase']}" + (
                f" (peak {peak:.1f} / {row['peak_reserved_gib']:.1f})" if peak else ""
            )
            cells = [memory, what if what == "OOM" else row["error"][:80], "-", "-", "-"]
        elif row["status"] == "meta":
            cells = ["not run", "not run", "-", "-", f"{row['train_flops_per_sample'] / 1e12:.2f} TFLOP/sample"]
        else:
            memory = (
                "n/a (CPU)"
                if row["peak_allocated_gib"] is None
                else f"{row['peak_allocated_gib']:.1f} / {row['peak_reserved_gib']:.1f}"
            )
            mfu = f"{100 * row['mfu']:.1f} %" if row["mfu"] is not None else "n/a"
            cells = [
                memory,
                f"{row['s_per_step']:.3f}",
                f"{row['samples_per_s']:.2f}",
                f"{row['tokens_per_s']:,.0f}",
                mfu,
            ]
        estimate = row.get("plan_memory_gib", {}).get("total")
        lines.append(
            f"| {row['stage']} | {trainable} | {recipe} | {_range(seed['memory_gb'])} | "
            f"{'-' if estimate is None else format(estimate, '.1f')} | {cells[0]} "
            f"| {_range(seed['s_per_step'])} | {' | '.join(cells[1:])} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ driver


def _write(out: str | None, result: dict) -> None:
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gemma",
        default=str(DEFAULT_GEMMA),
        help="Gemma 3 config.json, model folder or hub id "
        "(default: ../shared/reference/gemma-3-4b-it.config.json beside the repository)",
    )
    parser.add_argument(
        "--cosmos", default=str(DEFAULT_COSMOS), help="Wan VAE config.json, Cosmos/VAE folder or hub id"
    )
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny models, small batch, on the CPU")
    parser.add_argument("--tiny-dir", help="tiny model folder (default: $THEWORLD_HOME/tiny)")
    parser.add_argument(
        "--processor",
        help="Gemma 3 processor folder or hub id that makes the batches (default: the "
        "tiny model's, its special token ids translated to the real ones)",
    )
    parser.add_argument("--meta", action="store_true", help="no training: parameter and FLOP counts on the meta device")
    parser.add_argument("--layers", type=int, help="override the text and vision layer counts (CPU validation)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda if available; cpu with --tiny)")
    parser.add_argument("--stages", default=",".join(SEED_STAGES), help="comma-separated (default: all four)")
    parser.add_argument("--warmup", type=int, help="untimed optimizer steps (default 2; 1 with --tiny)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (default %(default)s)")
    parser.add_argument(
        "--stages-yaml",
        default=str(STAGES_YAML),
        help="pipeline file whose stages give the recipes (default: the repository's stages.yaml)",
    )
    parser.add_argument("--profile", help="profile of --stages-yaml to apply (e.g. multi_gpu)")
    parser.add_argument("--batch", type=int, help="micro-batch size for every stage (default: the recipe's)")
    parser.add_argument("--accum", type=int, help="gradient accumulation for every stage (default: the recipe's)")
    parser.add_argument(
        "--checkpointing",
        choices=("recipe", "on", "off"),
        default="recipe",
        help="gradient checkpointing: the recipe's, on or off for all",
    )
    parser.add_argument(
        "--optimizer",
        choices=("adamw", "adamw_8bit"),
        help="optimizer for every stage (default: the recipe's; --tiny: adamw)",
    )
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--world-tokens", type=int)
    parser.add_argument("--world-image-size", type=int)
    parser.add_argument("--prompt-tokens", type=int)
    parser.add_argument("--answer-tokens", type=int)
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the card's dense bf16 peak (default by device name: "
        + ", ".join(f"{k} {v:g}" for k, v in PEAK_TFLOPS)
        + "; none on the CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads (default: torch's; 1 with --tiny, where more threads only add overhead)",
    )
    parser.add_argument("--inject-oom", default="", help=argparse.SUPPRESS)  # comma-separated stages (tests)
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)
    defaults = {**REAL_DEFAULTS, **(TINY_DEFAULTS if args.tiny else {})}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    try:
        args.recipes = stages_yaml_recipes(Path(args.stages_yaml), args.profile)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    if args.tiny and args.optimizer is None:
        args.optimizer = "adamw"  # 8-bit moments need CUDA
    args.inject_oom = {s.strip() for s in args.inject_oom.split(",") if s.strip()}
    unknown = [s for s in args.stages if s not in SEED_STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; allowed: {list(SEED_STAGES)}")
    if args.warmup < 0 or args.steps < 1:
        parser.error("--warmup must be >= 0 and --steps >= 1")
    if args.layers is not None and args.layers < 1:
        parser.error("--layers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging

    logging.getLogger("theworld").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    if args.peak_tflops is None:
        args.peak_tflops = default_peak_tflops(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-stages-") as tmp:
        sources = resolve_sources(args, Path(tmp))
        meta = build_meta(sources)
        gemma_config = meta.gemma.config
        processor = args.processor or str(tiny_processor_dir(args))
        inputs = BenchInputs(processor, gemma_config, meta.token_ids, args, sources.model_config.max_seq_length)
        layout = inputs.layout(args)
        parameters = {c: r.total for c, r in parameter_report(meta).items()}
        token_ids = meta.token_ids
        del meta
        fwd = forward_flops(sources, layout)
        result = {
            "bench": "gpu_stages",
            "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": machine(),
            "device": str(device),
            "mode": "meta" if args.meta else ("tiny" if args.tiny else "real"),
            "gemma": str(args.gemma) if not args.tiny else "tiny",
            "cosmos": str(args.cosmos) if not args.tiny else "tiny",
            "layers_override": args.layers,
            "settings": {
                "recipes": {s: _recipe(s, args) for s in SEED_STAGES},
                "stages_yaml": args.stages_yaml,
                "profile": args.profile,
                "processor": processor,
                "lr": args.lr,
                "max_grad_norm": args.max_grad_norm,
                "warmup": args.warmup,
                "steps": args.steps,
                "checkpointing": args.checkpointing,
                "peak_tflops": args.peak_tflops,
                "world_token_ids": [token_ids.start, token_ids.end, token_ids.soft],
                "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                "layout": layout.__dict__,
                "attn_implementation": getattr(gemma_config.get_text_config(), "_attn_implementation", None),
            },
            "parameters": parameters,
            "forward_flops_per_sample": fwd,
            "stages": [],
        }
        if args.meta:
            result["stages"] = meta_report(sources, layout, fwd, args)
        else:
            for stage in args.stages:
                progress: dict = {"phase": "start"}
                print(f"# {stage} ...", file=sys.stderr, flush=True)
                try:
                    row = {"stage": stage, **run_stage(stage, sources, inputs, layout, fwd, args, device, progress)}
                except Exception as exc:
                    # ValueError: a recipe this code cannot run; StopStage: a non-finite loss or gradient norm
                    if not (is_oom(exc) or isinstance(exc, (ValueError, StopStage))):
                        raise
                    row = {
                        "stage": stage,
                        "status": "oom" if is_oom(exc) else "error",
                        "oom_phase": progress.get("phase"),
                        "error": str(exc).strip().splitlines()[0][:400] if str(exc).strip() else type(exc).__name__,
                        **{k: v for k, v in progress.items() if k != "phase"},
                        **_memory(device),
                        "s_per_step": None,
                        "tokens_per_s": None,
                        "mfu": None,
                    }
                _release(device)
                result["stages"].append(row)
                _write(args.out, result)  # after every stage: a later crash or time limit keeps these
                shown = (
                    f"{row['s_per_step']:.4f} s/step, {row['tokens_per_s']:,.0f} tokens/s"
                    if row["status"] == "ok"
                    else f"{row['status'].upper()} in {row['oom_phase']}: {row['error']}"
                )
                print(f"# {stage}: {shown}", file=sys.stderr, flush=True)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(
        f"\n{result['mode']} on {device} ({result['machine']['gpu'] or result['machine']['cpu']}), "
        f"{args.warmup} warmup + {args.steps} timed optimizer steps (the trainer's step, recipes of "
        f"{args.stages_yaml}{' --profile ' + args.profile if args.profile else ''}), sequence {layout.seq_len} tokens, "
        f"image {layout.image_size} px, "
        f"world {layout.world_tokens} tokens from {layout.world_image_size} px\n"
    )
    print(format_table(result))
    print("\nFLOPs per sample (forward, counted on meta): " + ", ".join(f"{k} {v / 1e9:.4g} G" for k, v in fwd.items()))
    if args.out:
        _write(args.out, result)
        print(f"JSON written to {args.out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
