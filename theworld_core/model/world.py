"""The world branch: Cosmos VAE encoder -> normalised latent -> pooled grid -> projected world tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class VaeEncoder(nn.Module):
    """The encoder half of diffusers' `AutoencoderKLWan`, without the decoder.

    Keeps the original attribute names (`encoder`, `quant_conv`) so weights map one-to-one onto the
    hub checkpoint. Produces the posterior mean normalised with the VAE's `latents_mean` /
    `latents_std`, as the Cosmos pipeline feeds its transformer.
    """

    def __init__(self, encoder: nn.Module, quant_conv: nn.Module, latents_mean, latents_std, z_dim: int):
        super().__init__()
        self.encoder = encoder
        self.quant_conv = quant_conv
        self.z_dim = z_dim
        # Buffers, not parameters: they are constants of the checkpoint and never trained or saved.
        self.register_buffer("latents_mean", torch.tensor(latents_mean).view(1, z_dim, 1, 1, 1), persistent=False)
        self.register_buffer("latents_std", torch.tensor(latents_std).view(1, z_dim, 1, 1, 1), persistent=False)

    @classmethod
    def from_autoencoder(cls, vae: nn.Module) -> VaeEncoder:
        """Take the encoder out of a loaded `AutoencoderKLWan`; its decoder is left to be freed."""
        cfg = vae.config
        return cls(vae.encoder, vae.quant_conv, cfg.latents_mean, cfg.latents_std, cfg.z_dim)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """`video`: (B, 3, 1, H, W) in [-1, 1]. Returns the normalised latent (B, z_dim, 1, H/8, W/8).

        One frame fits in the causal encoder's first chunk, so no feature cache is needed (an empty
        cache and no cache give the same zero causal padding).
        """
        if video.shape[2] != 1:
            raise ValueError(f"the world branch encodes one observed frame; got {video.shape[2]} frames")
        moments = self.quant_conv(self.encoder(video))
        mean = moments[:, : self.z_dim]
        return (mean - self.latents_mean.to(mean.dtype)) / self.latents_std.to(mean.dtype)


class WorldProjector(nn.Module):
    """Maps the normalised VAE latent to world-token embeddings in the language model's space.

    Holds every parameter new to TheWorld: the projector, the temporal position embedding
    (`max_world_steps + 1` entries, entry 0 = the observed frame) and the input embeddings of the
    `<start_of_world>` / `<end_of_world>` markers, which are not pretrained and so always belong
    to the stage output whatever the language model's freeze flag.
    """

    def __init__(self, z_dim: int, hidden_size: int, world_tokens: int, max_world_steps: int, projector: str):
        super().__init__()
        self.grid = math.isqrt(world_tokens)
        if projector == "linear":
            self.projector = nn.Linear(z_dim, hidden_size)
        elif projector == "mlp":
            self.projector = nn.Sequential(
                nn.Linear(z_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
            )
        else:
            raise ValueError(f"world_projector={projector!r} is not allowed: use 'linear' or 'mlp'")
        self.temporal_embedding = nn.Embedding(max_world_steps + 1, hidden_size)
        self.marker_embeddings = nn.Parameter(torch.zeros(2, hidden_size))  # [start, end]

    def forward(self, latent: torch.Tensor, step: int = 0) -> torch.Tensor:
        """`latent`: (B, z_dim, 1, h, w) -> world embeddings (B, world_tokens, hidden)."""
        grid = F.adaptive_avg_pool2d(latent[:, :, 0], self.grid)  # (B, z, g, g)
        tokens = grid.flatten(2).transpose(1, 2)  # (B, g*g, z), row-major over the grid
        tokens = tokens.to(self.projector_dtype)
        return self.projector(tokens) + self.temporal_embedding.weight[step]

    @property
    def projector_dtype(self) -> torch.dtype:
        return self.temporal_embedding.weight.dtype
