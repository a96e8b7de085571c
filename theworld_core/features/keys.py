"""What a feature-cache entry is keyed by, and how much room entries take.

- The image: sha256 of its decoded 8-bit RGB pixels and size (`image_key`). Pixels, not file bytes:
  the collator sees PIL images (file bytes are gone by then), and equal pixels give equal features
  whether they came as JPEG, PNG or a re-encoded copy. The RGB conversion is the one `InputBuilder`
  applies (`to_rgb`), so the key covers exactly what the encoders see.
- The preprocessing: the image processor's settings (size, mean/std, rescale, resample, pan-and-scan)
  for `vision`; world_image_size and the resize for `vae_latent`; and the autocast precision.
- The encoder: `encoder_fingerprint`, a sha256 over every parameter's and buffer's name, dtype, shape
  and bytes. Computed once per stage (after stage outputs are applied): a trained VAE (stage 4) or
  another base has another fingerprint and never hits old entries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from torch import nn

from theworld_core.data.images import to_rgb

FINGERPRINT_VERSION = 1
_CHUNK_ELEMENTS = 1 << 24  # hash big tensors in slices: no second full copy on the host


def image_key(image: Image.Image) -> str:
    """sha256 of the image as the encoders see it: 8-bit RGB pixels plus width and height."""
    rgb = to_rgb(image)
    digest = hashlib.sha256(f"rgb8 {rgb.width}x{rgb.height}\n".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _named_tensors(module: nn.Module | Mapping[str, nn.Module]) -> Iterable[tuple[str, torch.Tensor]]:
    modules = module.items() if isinstance(module, Mapping) else [("", module)]
    for prefix, part in modules:
        for name, tensor in part.named_parameters(prefix=prefix, remove_duplicate=True):
            yield name, tensor
        for name, tensor in part.named_buffers(prefix=prefix, remove_duplicate=True):
            yield name, tensor


def encoder_fingerprint(module: nn.Module | Mapping[str, nn.Module]) -> str:
    """sha256 over the name, dtype, shape and bytes of every parameter and buffer of `module`.

    A mapping (`{"vision_tower": m1, "multi_modal_projector": m2}`) hashes several modules as one
    encoder. Deterministic across processes and machines for equal weights; any changed bit, dtype
    or shape changes it. Tensors are hashed in parallel threads (hashlib releases the GIL), each
    copied to the host on its own, so the cost is about (weight bytes / cores) at sha256 speed.
    """
    tensors = sorted(_named_tensors(module), key=lambda item: item[0])
    for name, tensor in tensors:
        if tensor.is_meta:
            raise ValueError(f"cannot fingerprint {name!r}: it has no weights (meta device)")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(_tensor_digest, [tensor for _, tensor in tensors]))
    digest = hashlib.sha256(f"theworld-encoder-fingerprint v{FINGERPRINT_VERSION}\n".encode())
    for (name, tensor), tensor_digest in zip(tensors, digests):
        digest.update(f"{name} {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}\n".encode())
        digest.update(tensor_digest)
    return digest.hexdigest()


def _tensor_digest(tensor: torch.Tensor) -> bytes:
    digest = hashlib.sha256()
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
        chunk = flat[start : start + _CHUNK_ELEMENTS].to("cpu").contiguous()
        digest.update(chunk.view(torch.uint8).numpy().data)
    return digest.digest()


def vision_settings(processor, precision: str) -> dict[str, Any]:
    """Everything besides the weights that shapes a `vision` entry: the image processor's settings."""
    settings = json.loads(json.dumps(processor.image_processor.to_dict(), sort_keys=True, default=str))
    return {"image_processor": settings, "color": "to_rgb", "precision": precision}


def world_settings(world_image_size: int, precision: str) -> dict[str, Any]:
    """Everything besides the weights that shapes a `vae_latent` entry (InputBuilder.world_pixels)."""
    return {
        "world_image_size": world_image_size,
        "resample": "PIL bicubic",
        "range": "[-1, 1]",
        "frames": 1,
        "color": "to_rgb",
        "precision": precision,
    }


def entry_payload_bytes(
    *, mm_tokens_per_image: int, hidden_size: int, z_dim: int, world_image_size: int, dtype_bytes: int
) -> dict[str, int]:
    """Tensor bytes of one sample's entries: vision (tokens x hidden) and vae_latent (z x (S/8)^2)."""
    side = world_image_size // 8
    return {"vision": mm_tokens_per_image * hidden_size * dtype_bytes, "vae_latent": z_dim * side * side * dtype_bytes}


def bytes_per_sample(config, dtype_bytes: int = 2) -> dict[str, int]:
    """Cache bytes per sample for `config` (a ModelConfig; reads config files only, no weights).

    Each kind includes the entry overhead (`ENTRY_OVERHEAD_BYTES`, an upper bound); `dtype_bytes` is
    2 for bf16/fp16 autocast (GPU runs), 4 for fp32. Filesystems round files up to their block size.
    """
    from theworld_core.features.cache import ENTRY_OVERHEAD_BYTES
    from theworld_core.model.base import load_gemma_config, load_vae_config

    gemma = load_gemma_config(config.model_name, config.model_revision)
    vae = load_vae_config(config.cosmos_model_name, config.cosmos_revision)
    payload = entry_payload_bytes(
        mm_tokens_per_image=gemma.mm_tokens_per_image,
        hidden_size=gemma.get_text_config().hidden_size,
        z_dim=vae["z_dim"],
        world_image_size=config.world_image_size,
        dtype_bytes=dtype_bytes,
    )
    sizes = {kind: size + ENTRY_OVERHEAD_BYTES for kind, size in payload.items()}
    if not config.enable_world:
        sizes["vae_latent"] = 0
    sizes["total"] = sum(sizes.values())
    return sizes
