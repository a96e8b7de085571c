"""`theworld plan`: trainable parameters per component and stage, computed on the meta device.

No weights are read or allocated and no GPU is needed, so the real 4B architecture plans in seconds
from its config files alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from theworld_core.config import ModelConfig
from theworld_core.model.components import COMPONENTS, SEED_STAGES, parameter_report, trainable_components

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


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def plan(config: ModelConfig, stages: Mapping[str, Mapping[str, bool]] | None = None) -> dict[str, Any]:
    """Per stage (name -> freeze flags; the four of docs/stages.md by default): trainable parameters per component."""
    from diffusers import AutoencoderKLWan
    import torch

    from theworld_core.model.base import load_vae_config
    from theworld_core.model.theworld import TheWorld

    stages = stages or SEED_STAGES
    model = TheWorld.on_meta(config)
    with torch.device("meta"):
        vae_whole = _count(AutoencoderKLWan.from_config(load_vae_config(config.cosmos_model_name, config.cosmos_revision)))
    totals = {c: n.total for c, n in parameter_report(model).items()}
    total = sum(totals.values())
    rows = []
    for name, flags in stages.items():
        model.set_trainable(trainable_components(flags))
        trainable = {c: n.trainable for c, n in parameter_report(model).items()}
        count = sum(trainable.values())
        rows.append({
            "stage": name,
            "freeze_flags": dict(flags),
            "trainable_components": [c for c in COMPONENTS if trainable[c]],
            "trainable": trainable,
            "trainable_total": count,
            "trainable_share": count / total,
        })
    return {
        "gemma": config.model_name,
        "cosmos": config.cosmos_model_name,
        "components": totals,
        "total": total,
        "submodules": {key: _count(model.get_submodule(path)) for key, path in SUBMODULES.items()},
        "gemma_whole": _count(model.gemma),
        "vae_whole": vae_whole,
        "vae_decoder_not_loaded": vae_whole - totals["cosmos_vae"],
        "stages": rows,
    }


def format_plan(result: dict[str, Any]) -> str:
    """The plan as a table: one row per stage, trainable parameters per component."""
    header = f"{'stage':<20}" + "".join(f"{c:>18}" for c in COMPONENTS) + f"{'trainable':>16}{'share':>10}"
    lines = [
        f"Gemma 3: {result['gemma']}",
        f"Cosmos:  {result['cosmos']} (VAE encoder only; decoder and post_quant_conv, {result['vae_decoder_not_loaded']:,} parameters, never loaded)",
        "",
        f"{'component size':<20}" + "".join(f"{result['components'][c]:>18,}" for c in COMPONENTS) + f"{result['total']:>16,}",
        header,
        "-" * len(header),
    ]
    for row in result["stages"]:
        lines.append(
            f"{row['stage']:<20}"
            + "".join(f"{row['trainable'][c]:>18,}" for c in COMPONENTS)
            + f"{row['trainable_total']:>16,}{row['trainable_share']:>10.4%}"
        )
    return "\n".join(lines)
