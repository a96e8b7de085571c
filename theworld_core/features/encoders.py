"""TheWorld's frozen encoders behind the feature cache: what the trainer calls per batch.

Per stage: `CachedEncoders(model, cache, precision=..., autocast=...)` after the freeze flags are
applied. Only frozen encoders are cached (a trainable one changes every step). Per batch:
`fill(batch)` takes the batch of `InputBuilder.collate` plus `image_keys` (one `image_key` per row)
and returns it with `pixel_values` replaced by `image_features` (B, mm_tokens, hidden) and
`world_pixel_values` by `world_latents` (B, z_dim, 1, S/8, S/8), for `embed_inputs` to use as is.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from theworld_core.features.cache import FeatureCache, Namespace, make_namespace
from theworld_core.features.keys import encoder_fingerprint, vision_settings, world_settings
from theworld_core.model.components import parameters_by_component


def is_frozen(model: nn.Module, component: str) -> bool:
    """True when no parameter of `component` (registry name) trains."""
    return not any(param.requires_grad for _, param in parameters_by_component(model)[component])


class CachedEncoders:
    """The frozen encoders of one TheWorld for one stage, reading and filling a `FeatureCache`.

    `precision`: the autocast setting the features are made under (`no`, `bf16`, `fp16`): part of
    the key. `autocast`: a context factory applying it (e.g. `accelerator.autocast`), since the
    encoders run here, outside the model's wrapped forward.
    """

    def __init__(
        self,
        model: nn.Module,
        cache: FeatureCache,
        *,
        precision: str = "no",
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        self.model, self.cache = model, cache
        self.autocast = autocast or contextlib.nullcontext
        self.namespaces: dict[str, Namespace] = {}
        self.fingerprint_seconds = 0.0
        gemma = model.gemma
        side = model.config.world_image_size // 8
        self.item_shapes = {
            "vision": (gemma.config.mm_tokens_per_image, gemma.config.get_text_config().hidden_size),
            "vae_latent": (model.vae.z_dim, 1, side, side),
        }
        if not cache.enabled:
            return
        started = time.perf_counter()
        if is_frozen(model, "gemma_vision"):
            fingerprint = encoder_fingerprint(
                {"vision_tower": gemma.model.vision_tower, "multi_modal_projector": gemma.model.multi_modal_projector}
            )
            self.namespaces["vision"] = make_namespace(
                "vision", fingerprint, vision_settings(model.processor, precision)
            )
        if model.config.enable_world and is_frozen(model, "cosmos_vae"):
            self.namespaces["vae_latent"] = make_namespace(
                "vae_latent", encoder_fingerprint(model.vae), world_settings(model.config.world_image_size, precision)
            )
        self.fingerprint_seconds = time.perf_counter() - started

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds this stage caches (none when the cache is off or both encoders train)."""
        return tuple(self.namespaces) if self.cache.enabled else ()

    # The model's own encoder methods, the ones its forward runs on pixels: cached = fresh features.
    def encode_vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.model.encode_images(pixel_values)

    def encode_world(self, world_pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            return self.model.encode_world(world_pixel_values)

    def vision_features(self, pixel_values: torch.Tensor, image_keys) -> torch.Tensor:
        return self.cache.get_or_encode(
            self.namespaces["vision"],
            image_keys,
            pixel_values,
            self.encode_vision,
            item_shape=self.item_shapes["vision"],
        )

    def world_latents(self, world_pixel_values: torch.Tensor, image_keys) -> torch.Tensor:
        return self.cache.get_or_encode(
            self.namespaces["vae_latent"],
            image_keys,
            world_pixel_values,
            self.encode_world,
            item_shape=self.item_shapes["vae_latent"],
        )

    def fill(self, batch: dict) -> dict:
        """The batch with cached kinds' pixels replaced by features; `image_keys` removed."""
        batch = dict(batch)
        keys = batch.pop("image_keys", None)
        kinds = self.kinds
        if keys is None or not kinds:
            return batch
        if "vision" in kinds and batch.get("pixel_values") is not None:
            batch["image_features"] = self.vision_features(batch.pop("pixel_values"), keys)
        if "vae_latent" in kinds and batch.get("world_pixel_values") is not None:
            batch["world_latents"] = self.world_latents(batch.pop("world_pixel_values"), keys)
        return batch
