"""`theworld plan`: trainable parameters and estimated GPU memory per stage, on the meta device.

No weights are read or allocated and no GPU is needed, so the real 4B architecture plans in seconds
from its config files alone.

Memory (`memory_gib`, GiB = 2^30 bytes, for ONE device) is an estimate of the peak a training step
allocates, at the stage's `batch_size`, `mixed_precision`, `optimizer`, `use_gradient_checkpointing`
and `num_processes`, under the precision policy (theworld_core/model/precision.py). Parameter counts
are exact; activations are an analytical model. Not counted: the CUDA context and libraries (about
0.5-1 GiB outside PyTorch's allocator), allocator fragmentation (reserved - allocated, typically
5-10 %), transient buffers inside one kernel (attention workspaces, the frozen encoders' forward
under no_grad, optimizer-step temporaries: fused AdamW has none worth counting, foreach AdamW and
torchao's 8-bit step dequantise one parameter group at a time). So compare `total` with what the
card leaves to PyTorch, not with its label (an "80 GB" H100 has 79.1 GiB; keep a few GiB spare).

- weights: trainable components fp32 (4 bytes), frozen ones in the compute dtype (2 bytes for
  bf16/fp16, 4 for `mixed_precision: no`). Tied lm_head counted once.
- gradients: 4 bytes per trainable parameter (fp32, kept across accumulation micro-steps); with
  `num_processes` > 1 DDP's gradient buckets add another 4 (`distributed: ddp`; for `fsdp` see
  `memory_gib_fsdp` below).
- optimizer: `adamw` two fp32 moments, 8 bytes per trainable parameter; `adamw_8bit` (torchao) two
  uint8 moments plus one fp32 scale per 256-value block, 2.03 bytes, for tensors of >= 4096
  elements divisible by 256; smaller tensors keep fp32 moments (8 bytes).
- activations: what autograd keeps for the backward pass, summed over these parts (the sum of the
  forward and backward peaks' parts: a slight over-estimate):
  - `language_model`: tokens = batch x sequence length (`sequence_length`: by default the typical
    length mm_tokens_per_image + world_tokens + 32 prompt + 32 answer + 16 template tokens = 400 for
    Gemma 3 4B, capped at max_seq_length; `--seq-len max` plans at max_seq_length, the padded worst
    case). Per decoder layer and token, with hidden h, MLP width i, query width q = heads x head_dim,
    key/value width kv, in bytes (counted with saved-tensor hooks on one real-width layer under
    bf16 autocast; split into the fp32 part + the 16-bit part, the latter doubles in fp32):
      trainable layer (fp32 residual stream):       (36h + 8q + 8kv) + (8i + 10h + 4q + 4kv)
      frozen layer, gradient flowing to its inputs: (18h + 4q + 4kv) + (6i + 4q + 4kv)
    (Gemma 3 4B: 236.5 KB and 132.1 KB). The language model always needs its graph: the world
    projector trains in every stage and its output enters at the input. With gradient checkpointing
    only each layer's input is kept (r x h per token, r = 4 bytes when the language model trains,
    else the compute dtype) plus one layer recomputed at a time. Plus 2 r h per token (the embedding
    output and the final norm).
  - `vision_tower`: only when it trains (frozen, it runs under no_grad). Tokens = batch x
    (image_size / patch_size)^2 (4096 at 896 px); per SigLIP layer and token 4i + 24h bytes
    (measured as above: 44.9 KB at h 1152, i 4304), 7h per token for embeddings and the final norm;
    checkpointing as for the language model (4h per layer and token kept).
  - `vae_encoder`: only when it trains: 12,000 bytes per input pixel of `world_image_size`^2
    (measured on the Wan 2.1 encoder under bf16 autocast, one frame); never checkpointed.
  - `loss`: the answer rows' logits, at most LOSS_CHUNK_ROWS (1024) rows at once: rows x vocabulary
    x (compute dtype + 4 + 4) bytes (lm_head output, its fp32 upcast, its gradient).
  - `weight_casts`: autocast keeps a 16-bit copy of every trainable fp32 weight matrix it casts
    for the whole forward pass (2 bytes per trainable parameter of >= 2 dimensions); 0 in fp32.
- total: the sum. `--gpu-memory GIB` marks each stage fits / does not fit by `total`.

`memory_gib_fsdp` (stages with `num_processes` > 1): weights, gradients and optimizer divided by the
process count (FSDP, training/sharding.py; a frozen vision tower or VAE stays whole), activations
unchanged. A stage with `distributed: fsdp` plans at that figure (`memory_gib` is it; `fits` uses
it); add one decoder layer's gathered weights (~0.3 GiB for Gemma 3 4B) for the unit in flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from theworld_core.config import ModelConfig
from theworld_core.model.components import (
    COMPONENTS,
    SEED_STAGES,
    parameter_report,
    parameters_by_component,
    trainable_components,
)

GIB = 2**30

# Submodules whose sizes are reported beside the components (they match the reference table).
SUBMODULES = {
    "vision_tower": "gemma.model.vision_tower",
    "multi_modal_projector": "gemma.model.multi_modal_projector",
    "language_model": "gemma.model.language_model",
    "token_embeddings": "gemma.model.language_model.embed_tokens",
    "vae_encoder": "vae.encoder",
    "vae_quant_conv": "vae.quant_conv",
    "world_projector": "world",
}

# The typical sequence: prompt and answer lengths (tokens) besides the image and world tokens, and the
# chat template's own tokens (<bos><start_of_turn>user\n, \n\n<boi> ... <eoi>\n\n, the two world markers,
# <end_of_turn>\n<start_of_turn>model\n, the answer's <end_of_turn>): the layout of bench_gpu_stages.py.
TYPICAL_PROMPT_TOKENS = 32
TYPICAL_ANSWER_TOKENS = 32
TEMPLATE_TOKENS = 16
LOSS_CHUNK_ROWS = 1024  # theworld_core.model.theworld.LOSS_CHUNK_ROWS (not imported: it pulls in the model)
VAE_BYTES_PER_PIXEL = 12_000
# torchao's AdamW8bit: block-wise quantised moments for tensors of >= 4096 elements divisible by 256.
ADAM8_BLOCK, ADAM8_MIN_NUMEL = 256, 4096


@dataclass(frozen=True)
class Recipe:
    """What of a stage decides its memory: the training keys of a StageConfig."""

    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    use_gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    mixed_precision: str = "bf16"
    num_processes: int = 1
    distributed: str = "ddp"

    @classmethod
    def of(cls, stage: Any) -> Recipe:
        return cls(**{k: getattr(stage, k) for k in cls.__dataclass_fields__ if hasattr(stage, k)})


# The guide's recipe (docs/stages.md#estimates), used with the four default stages when no stages.yaml is given.
SEED_RECIPES: dict[str, Recipe] = {
    "stage1_projection": Recipe(4, 4, False),
    "stage2_vision": Recipe(4, 4, False),
    "stage3_language": Recipe(2, 8, True),
    "stage4_full": Recipe(2, 8, True),
}


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class Architecture:
    """The shapes the memory model needs, read from the meta model."""

    text_layers: int
    hidden: int
    intermediate: int
    q_width: int
    kv_width: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    patches: int
    mm_tokens: int
    matrix_params: dict[str, int]  # per component: parameters in tensors of >= 2 dims (what autocast casts)
    adam8_params: dict[str, int]  # per component: parameters whose moments torchao quantises

    @classmethod
    def of(cls, model) -> Architecture:
        cfg = model.gemma.config
        text, vision = cfg.get_text_config(), cfg.vision_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        groups = parameters_by_component(model)
        return cls(
            text_layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            intermediate=text.intermediate_size,
            q_width=text.num_attention_heads * head_dim,
            kv_width=text.num_key_value_heads * head_dim,
            vocab=text.vocab_size,
            vision_layers=vision.num_hidden_layers,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            patches=(vision.image_size // vision.patch_size) ** 2,
            mm_tokens=cfg.mm_tokens_per_image,
            matrix_params={c: sum(p.numel() for _, p in ps if p.ndim >= 2) for c, ps in groups.items()},
            adam8_params={
                c: sum(p.numel() for _, p in ps if p.numel() >= ADAM8_MIN_NUMEL and p.numel() % ADAM8_BLOCK == 0)
                for c, ps in groups.items()
            },
        )

    def text_layer_bytes(self, trainable: bool, compute_bytes: int) -> float:
        """Bytes per token one decoder layer keeps for backward (see the module docstring)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        if trainable:
            fp32, half = 36 * h + 8 * q + 8 * kv, 8 * i + 10 * h + 4 * q + 4 * kv
        else:
            fp32, half = 18 * h + 4 * q + 4 * kv, 6 * i + 4 * q + 4 * kv
        return fp32 + half * compute_bytes / 2

    def vision_layer_bytes(self, compute_bytes: int) -> float:
        return 4 * self.vision_intermediate * compute_bytes / 2 + 24 * self.vision_hidden


def sequence_length(config: ModelConfig, mm_tokens: int, seq_len: int | str | None = None) -> tuple[int, str]:
    """(tokens, basis): `seq_len` as given, "max" for max_seq_length, None for the typical length."""
    if seq_len == "max":
        return config.max_seq_length, "max_seq_length"
    if seq_len is not None:
        return int(seq_len), "given"
    world = config.world_tokens if config.enable_world else 0
    template = TEMPLATE_TOKENS if config.enable_world else TEMPLATE_TOKENS - 2  # no world markers
    typical = mm_tokens + world + TYPICAL_PROMPT_TOKENS + TYPICAL_ANSWER_TOKENS + template
    return min(typical, config.max_seq_length), (
        f"typical: {mm_tokens} image + {world} world + {TYPICAL_PROMPT_TOKENS} prompt + {TYPICAL_ANSWER_TOKENS} answer "
        f"+ {template} template tokens"
    )


def stage_memory(
    arch: Architecture,
    totals: Mapping[str, int],
    trainable: Mapping[str, int],
    recipe: Recipe,
    config: ModelConfig,
    seq_len: int,
) -> dict[str, Any]:
    """Bytes of one device's training step for one stage, by part (see the module docstring)."""
    compute = 4 if recipe.mixed_precision == "no" else 2
    trains = {c: trainable[c] > 0 for c in COMPONENTS}
    n_train = sum(trainable.values())
    weights = sum(trainable[c] * 4 + (totals[c] - trainable[c]) * compute for c in COMPONENTS)
    gradients = n_train * 4 * (2 if recipe.num_processes > 1 else 1)
    if recipe.optimizer == "adamw_8bit":
        quantised = sum(arch.adam8_params[c] for c in COMPONENTS if trains[c])
        optimizer = quantised * 2 * (1 + 4 / ADAM8_BLOCK) + (n_train - quantised) * 8
    else:
        optimizer = n_train * 8
    batch, ckpt = recipe.batch_size, recipe.use_gradient_checkpointing
    parts: dict[str, float] = {}
    # Language model: always on the gradient path (the world projector feeds its input).
    lm_trains = trains["gemma_language"]
    resid = 4 if lm_trains else compute
    layer = arch.text_layer_bytes(lm_trains, compute)
    tokens = batch * seq_len
    kept = arch.text_layers * resid * arch.hidden + layer if ckpt else arch.text_layers * layer
    parts["language_model"] = tokens * (kept + 2 * resid * arch.hidden)
    parts["vision_tower"] = 0.0
    if trains["gemma_vision"]:
        v_tokens = batch * arch.patches
        v_layer = arch.vision_layer_bytes(compute)
        v_kept = arch.vision_layers * 4 * arch.vision_hidden + v_layer if ckpt else arch.vision_layers * v_layer
        parts["vision_tower"] = v_tokens * (v_kept + 7 * arch.vision_hidden)
    parts["vae_encoder"] = batch * config.world_image_size**2 * VAE_BYTES_PER_PIXEL if trains["cosmos_vae"] else 0.0
    rows = min(batch * (TYPICAL_ANSWER_TOKENS + 1), LOSS_CHUNK_ROWS)
    parts["loss"] = rows * arch.vocab * (compute + 8)
    parts["weight_casts"] = 0.0 if compute == 4 else 2 * sum(arch.matrix_params[c] for c in COMPONENTS if trains[c])
    activations = sum(parts.values())
    out = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations}
    out["total"] = sum(out.values())
    result: dict[str, Any] = {
        "memory_gib": {k: v / GIB for k, v in out.items()},
        "activations_gib": {k: v / GIB for k, v in parts.items()},
    }
    if recipe.num_processes > 1:
        n = recipe.num_processes
        whole = sum(totals[c] * compute for c in ("gemma_vision", "cosmos_vae") if not trains[c])
        sharded = {
            "weights": (weights - whole) / n + whole,
            "gradients": n_train * 4 / n,
            "optimizer": optimizer / n,
            "activations": activations,
        }
        sharded["total"] = sum(sharded.values())
        result["memory_gib_fsdp"] = {k: v / GIB for k, v in sharded.items()}
        if recipe.distributed == "fsdp":  # what runs
            result["memory_gib"] = result["memory_gib_fsdp"]
    return result


def how_line(recipe: Recipe, total_gib: float, other: Mapping[str, float]) -> str:
    """One line: the recipe behind a stage's memory figure, and what each memory switch is worth.

    `other`: the total (GiB) with `use_gradient_checkpointing` / `optimizer` switched the other way."""
    ckpt = recipe.use_gradient_checkpointing
    delta = other["checkpointing"] - total_gib
    said = [
        f"batch {recipe.batch_size} x accumulation {recipe.gradient_accumulation_steps}",
        f"gradient checkpointing {'on' if ckpt else 'off'} ({'off' if ckpt else 'on'}: {delta:+.1f} GiB)",
    ]
    delta = other["optimizer"] - total_gib
    if recipe.distributed == "fsdp" and recipe.num_processes > 1:  # adamw_8bit is refused there
        said.append("fp32 AdamW moments")
    elif recipe.optimizer == "adamw_8bit":
        said.append(f"8-bit AdamW moments (fp32 moments: {delta:+.1f} GiB)")
    else:
        said.append(f"fp32 AdamW moments (adamw_8bit: {delta:+.1f} GiB)")
    if recipe.mixed_precision != "no":
        said.append(f"frozen {recipe.mixed_precision}, trainable fp32")
    if recipe.num_processes > 1 and recipe.distributed == "fsdp":
        said.append(f"{recipe.num_processes} processes (FSDP: weights, gradients and moments sharded)")
    elif recipe.num_processes > 1:
        said.append(f"{recipe.num_processes} processes (DDP: whole model and gradient buckets on each device)")
    return ", ".join(said)


def plan(
    config: ModelConfig,
    stages: Mapping[str, Any] | None = None,
    *,
    seq_len: int | str | None = None,
    gpu_memory_gib: float | None = None,
    num_samples: int | None = None,
) -> dict[str, Any]:
    """Per stage: trainable parameters per component and the estimated memory of one device.

    `stages` maps a stage name to its freeze flags (a mapping; memory at the default `Recipe`) or to a
    StageConfig (memory at its own recipe); default: the four stages of docs/stages.md at the guide's
    recipe (`SEED_RECIPES`). `seq_len`: tokens per sample (None: typical; "max": max_seq_length).
    `gpu_memory_gib`: mark which stages fit. `num_samples`: size the feature cache for that many.
    """
    import torch
    from diffusers import AutoencoderKLWan

    from theworld_core.model.base import load_vae_config
    from theworld_core.model.theworld import TheWorld

    if stages is None:
        stages = {name: (SEED_STAGES[name], SEED_RECIPES[name]) for name in SEED_STAGES}
    model = TheWorld.on_meta(config)
    with torch.device("meta"):
        vae_whole = _count(
            AutoencoderKLWan.from_config(load_vae_config(config.cosmos_model_name, config.cosmos_revision))
        )
    totals = {c: n.total for c, n in parameter_report(model).items()}
    total = sum(totals.values())
    arch = Architecture.of(model)
    tokens, basis = sequence_length(config, arch.mm_tokens, seq_len)
    rows = []
    for name, spec in stages.items():
        if isinstance(spec, tuple):
            flags, recipe = spec
        elif isinstance(spec, Mapping):
            flags, recipe = spec, Recipe()
        else:  # a StageConfig
            flags, recipe = spec.freeze_flags, Recipe.of(spec)
        model.set_trainable(trainable_components(flags))
        trainable = {c: n.trainable for c, n in parameter_report(model).items()}
        count = sum(trainable.values())
        row = {
            "stage": name,
            "freeze_flags": dict(flags),
            "trainable_components": [c for c in COMPONENTS if trainable[c]],
            "trainable": trainable,
            "trainable_total": count,
            "trainable_share": count / total,
            "recipe": recipe.__dict__.copy(),
            **stage_memory(arch, totals, trainable, recipe, config, tokens),
        }
        switched = {
            "checkpointing": replace(recipe, use_gradient_checkpointing=not recipe.use_gradient_checkpointing),
            "optimizer": replace(recipe, optimizer="adamw" if recipe.optimizer == "adamw_8bit" else "adamw_8bit"),
        }
        other = {
            k: stage_memory(arch, totals, trainable, r, config, tokens)["memory_gib"]["total"]
            for k, r in switched.items()
        }
        row["how"] = how_line(recipe, row["memory_gib"]["total"], other)
        if gpu_memory_gib is not None:
            need = row["memory_gib"]["total"]
            row["fits"] = need <= gpu_memory_gib
            row["over_gib"] = max(0.0, need - gpu_memory_gib)
        rows.append(row)
    return {
        "gemma": config.model_name,
        "cosmos": config.cosmos_model_name,
        "components": totals,
        "total": total,
        "submodules": {key: _count(model.get_submodule(path)) for key, path in SUBMODULES.items()},
        "gemma_whole": _count(model.gemma),
        "vae_whole": vae_whole,
        "vae_decoder_not_loaded": vae_whole - totals["cosmos_vae"],
        "sequence_length": tokens,
        "sequence_basis": basis,
        "gpu_memory_gib": gpu_memory_gib,
        "feature_cache": feature_cache_size(config, num_samples, compute_bytes=2),
        "stages": rows,
    }


def feature_cache_size(config: ModelConfig, num_samples: int | None, compute_bytes: int = 2) -> dict[str, Any]:
    """Feature cache bytes per sample (theworld_core.features.keys.bytes_per_sample) and for `num_samples`."""
    from theworld_core.features.keys import bytes_per_sample

    per_sample = bytes_per_sample(config, dtype_bytes=compute_bytes)
    return {
        "bytes_per_sample": per_sample,
        "num_samples": num_samples,
        "total_bytes": None if num_samples is None else per_sample["total"] * num_samples,
    }


def stages_that_do_not_fit(result: Mapping[str, Any]) -> list[str]:
    """One line per stage over `gpu_memory_gib` (empty when every stage fits or none was asked)."""
    return [
        f"{row['stage']} needs {row['memory_gib']['total']:.1f} GiB: {row['over_gib']:.1f} GiB over "
        f"{result['gpu_memory_gib']:g} GiB"
        for row in result["stages"]
        if row.get("fits") is False
    ]


def format_plan(result: dict[str, Any]) -> str:
    """The plan as tables: trainable parameters per component, then memory per stage."""
    header = f"{'stage':<20}" + "".join(f"{c:>18}" for c in COMPONENTS) + f"{'trainable':>16}{'share':>10}"
    lines = [
        f"Gemma 3: {result['gemma']}",
        f"Cosmos:  {result['cosmos']} (VAE encoder only; decoder and post_quant_conv, {result['vae_decoder_not_loaded']:,} parameters, never loaded)",
        "",
        f"{'component size':<20}"
        + "".join(f"{result['components'][c]:>18,}" for c in COMPONENTS)
        + f"{result['total']:>16,}",
        header,
        "-" * len(header),
    ]
    for row in result["stages"]:
        lines.append(
            f"{row['stage']:<20}"
            + "".join(f"{row['trainable'][c]:>18,}" for c in COMPONENTS)
            + f"{row['trainable_total']:>16,}{row['trainable_share']:>10.4%}"
        )
    parts = ("weights", "gradients", "optimizer", "activations", "total")
    fits = result.get("gpu_memory_gib") is not None
    title = (
        f"Estimated memory of one device, GiB ({result['sequence_length']} tokens per sample, "
        f"{result['sequence_basis']}; not counted: CUDA context, fragmentation; docs/stages.md#memory)"
    )
    lines += ["", title]
    mem_header = (
        f"{'memory (GiB)':<20}"
        + "".join(f"{p:>13}" for p in parts)
        + (f"{'fits ' + format(result['gpu_memory_gib'], 'g'):>12}" if fits else "")
    )
    lines += [mem_header, "-" * len(mem_header)]
    for row in result["stages"]:
        m = row["memory_gib"]
        cell = "" if not fits else f"{'yes' if row['fits'] else 'NO +' + format(row['over_gib'], '.1f'):>12}"
        lines.append(f"{row['stage']:<20}" + "".join(f"{m[p]:>13.1f}" for p in parts) + cell)
    lines.append("")
    for row in result["stages"]:
        extra = ""
        if "memory_gib_fsdp" in row and row["recipe"].get("distributed") != "fsdp":
            extra = f"; with distributed: fsdp {row['memory_gib_fsdp']['total']:.1f} GiB per device"
        lines.append(f"how {row['stage']}: {row['how']}{extra}")
    cache = result["feature_cache"]
    per = cache["bytes_per_sample"]
    line = (
        f"feature cache: {per['total'] / 1e6:.2f} MB per sample (vision {per['vision'] / 1e6:.2f} MB, "
        f"vae_latent {per['vae_latent'] / 1e6:.3f} MB, bf16)"
    )
    if cache["num_samples"] is not None:
        line += f"; {cache['total_bytes'] / 1e9:.1f} GB for num_samples={cache['num_samples']:,}"
    else:
        line += "; num_samples not set (a streamed source: the cache grows to feature_cache_max_gb)"
    lines += ["", line]
    return "\n".join(lines)


__all__ = ["SEED_RECIPES", "Recipe", "format_plan", "plan", "stage_memory", "stages_that_do_not_fit"]
