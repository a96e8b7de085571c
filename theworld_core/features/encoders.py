"""TheWorld's frozen encoders behind the feature cache: what the trainer calls per batch.

Per stage: `CachedEncoders(model, cache, precision=..., autocast=...)` after the freeze flags are
applied. Only frozen encoders are cached (a trainable one changes every step).

In training the cache is read where the batch is built: `lookup()` gives the DataLoader workers a
`FeatureLookup`, which reads and checks each row's entries (checksum, namespace, image, shape and
dtype) before the row is preprocessed. A row whose entry is sound gets no pixels for that encoder
(the 896 px image processor or the VAE view does not run); a missing or damaged entry (dropped and
counted as before) leaves the row to be preprocessed right there, in the worker that holds the
image. `fill(batch)` then encodes only the rows that came with pixels, writes their entries in a
background thread (`flush()` waits for it), and returns the batch with `image_features`
(B, mm_tokens, hidden) and `world_latents` (B, z_dim, 1, S/8, S/8) in row order, for
`embed_inputs` to use as is. A batch of `InputBuilder.collate` plus `image_keys` (no worker lookup)
is filled from the cache here, synchronously.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from theworld_core.features.cache import FeatureCache, Namespace, make_namespace
from theworld_core.features.keys import encoder_fingerprint, vision_settings, world_settings
from theworld_core.model.components import parameters_by_component

log = logging.getLogger("theworld.feature_cache")

PIXELS = {"vision": "pixel_values", "vae_latent": "world_pixel_values"}
"""The batch key of each kind's preprocessed input."""
FEATURES = {"vision": "image_features", "vae_latent": "world_latents"}
"""The batch key of each kind's encoder output (what `TheWorld.embed_inputs` takes)."""
WRITE_QUEUE_BATCHES = 16  # batches of entries waiting to be written; more waits for the writer


def is_frozen(model: nn.Module, component: str) -> bool:
    """True when no parameter of `component` (registry name) trains."""
    return not any(param.requires_grad for _, param in parameters_by_component(model)[component])


class FeatureLookup:
    """What a DataLoader worker needs to read a batch's entries: a `FeatureCache.reader()`, the
    namespaces of the kinds this stage caches and the shape and dtype their encoders make. Plain
    data, so it pickles to workers started by spawn."""

    def __init__(self, reader: FeatureCache, namespaces: dict[str, Namespace], items: dict[str, tuple]):
        self.reader, self.namespaces, self.items = reader, namespaces, items

    def read(self, image_keys: Sequence[str]) -> dict[str, list[torch.Tensor | None]]:
        """Per kind, each row's cached tensor or None (missing, damaged, or not this encoder's)."""
        found = {}
        for kind, namespace in self.namespaces.items():
            shape, dtype = self.items[kind]
            found[kind] = [self.reader.get(namespace, key, shape=shape, dtype=dtype) for key in image_keys]
        return found


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
        self._writes: queue.Queue | None = None
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

    def _encoder(self, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.encode_vision if kind == "vision" else self.encode_world

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

    # ------------------------------------------------------------------ the workers' side

    def lookup(self) -> FeatureLookup | None:
        """What the DataLoader workers read entries with; None when this stage caches nothing.

        Call it once the model sits on its training device: one blank input through each cached
        encoder gives the dtype its outputs have there (entries of another dtype are not served).
        """
        if not self.kinds:
            return None
        device = next(self.model.parameters()).device
        probes = {
            "vision": torch.zeros(1, 3, *(2 * [self.model.gemma.config.vision_config.image_size])),
            "vae_latent": torch.zeros(1, 3, self.model.config.world_image_size, self.model.config.world_image_size),
        }
        items = {}
        for kind in self.kinds:
            made = self._encoder(kind)(probes[kind].to(device))
            if tuple(made.shape[1:]) != tuple(self.item_shapes[kind]):
                raise RuntimeError(f"{kind} encoder makes {tuple(made.shape[1:])}, expected {self.item_shapes[kind]}")
            items[kind] = (self.item_shapes[kind], made.dtype)
        return FeatureLookup(self.cache.reader(), {kind: self.namespaces[kind] for kind in self.kinds}, items)

    # ------------------------------------------------------------------ per batch

    def fill(self, batch: dict) -> dict:
        """The batch with cached kinds' pixels replaced by features; the lookup's keys removed."""
        batch = dict(batch)
        keys = batch.pop("image_keys", None)
        rows = batch.pop("feature_rows", None)
        cached = batch.pop("cached_features", None) or {}
        counts = batch.pop("feature_cache_counts", None)
        if counts is not None:
            self.cache.add_counts(counts)
        if rows is not None:  # looked up in the worker: hits came as features, misses as pixels
            for kind, hit_rows in rows.items():
                batch[FEATURES[kind]] = self._assemble(
                    kind, keys, hit_rows, cached.get(kind), batch.pop(PIXELS[kind], None)
                )
            return batch
        kinds = self.kinds
        if keys is None or not kinds:
            return batch
        if "vision" in kinds and batch.get("pixel_values") is not None:
            batch["image_features"] = self.vision_features(batch.pop("pixel_values"), keys)
        if "vae_latent" in kinds and batch.get("world_pixel_values") is not None:
            batch["world_latents"] = self.world_latents(batch.pop("world_pixel_values"), keys)
        return batch

    def _assemble(
        self, kind: str, keys: Sequence[str], hit_rows: list[int], hits: torch.Tensor | None, pixels
    ) -> torch.Tensor:
        """(B, ...) features in row order: the worker's hits, and the other rows encoded (and stored)."""
        hit_set = set(hit_rows)
        missing = [row for row in range(len(keys)) if row not in hit_set]
        if not missing:
            return hits
        encoded = self._encode_and_store(kind, pixels, [keys[row] for row in missing])
        if not hit_rows:
            return encoded
        if hits.dtype != encoded.dtype or hits.shape[1:] != encoded.shape[1:]:
            # The lookup serves only entries of the probed dtype and shape: this is a bug, not a bad folder.
            raise RuntimeError(f"cached {kind} rows are {hits.dtype} {tuple(hits.shape)}, encoded {encoded.dtype}")
        result = torch.empty((len(keys), *encoded.shape[1:]), dtype=encoded.dtype, device=encoded.device)
        result[hit_rows] = hits.to(encoded.device)
        result[missing] = encoded
        return result

    # ------------------------------------------------------------------ background writes

    def _encode_and_store(self, kind: str, pixels: torch.Tensor, keys: list[str]) -> torch.Tensor:
        """Encode the rows that missed and queue their entries; the step does not wait for the writes
        (hashing, the file) nor, on a GPU, for the copy to the host."""
        on_cuda = pixels.device.type == "cuda"
        if on_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        started = time.perf_counter()
        encoded = self._encoder(kind)(pixels)
        if not self.cache.enabled:
            return encoded
        if on_cuda:
            end.record()
            host = torch.empty(encoded.shape, dtype=encoded.dtype, pin_memory=True)
            host.copy_(encoded.detach(), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
            timing: Any = (start, end, copied)
        else:  # a copy: the entry must hold these values even if the step changed the tensor in place
            host, timing = encoded.detach().clone(), time.perf_counter() - started
        self._write_queue().put((self.namespaces[kind], keys, host, timing))
        return encoded

    def _write_queue(self) -> queue.Queue:
        if self._writes is None:
            self._writes = queue.Queue(maxsize=WRITE_QUEUE_BATCHES)
            threading.Thread(
                target=self._write_entries, args=(self._writes,), name="feature-cache-writer", daemon=True
            ).start()
        return self._writes

    def _write_entries(self, writes: queue.Queue) -> None:
        while True:
            namespace, keys, host, timing = writes.get()
            try:
                if isinstance(timing, tuple):  # CUDA events: the encoder's time, and the copy to `host` done
                    start, end, copied = timing
                    copied.synchronize()
                    timing = start.elapsed_time(end) / 1000
                self.cache.store(namespace, keys, host, timing)
            except Exception as error:  # never lose the thread silently: the cache goes off, training goes on
                self.cache.disable(f"writing entries failed: {type(error).__name__}: {error}")
            finally:
                writes.task_done()

    def flush(self) -> None:
        """Wait until every queued entry is written (epoch ends, the end of the stage)."""
        if self._writes is not None:
            self._writes.join()
