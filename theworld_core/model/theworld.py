"""TheWorld: Gemma 3 + the Cosmos VAE encoder, joined by a trainable world projector.

    image --Gemma processor--> SigLIP --mm projector--> image embeddings --+
    image --[-1,1], 1 frame--> VAE encoder --normalise--> pool --> project --+--> Gemma 3 LM --> text
    prompt / answer tokens ------------------------------------------------+

Components may sit in different dtypes (frozen ones bf16, trainable ones fp32: see precision.py),
so every hand-over between components casts to the receiving component's dtype. With labels, the
loss is computed at the answer positions only: their hidden states go through `lm_head`, never the
full (batch, sequence, vocabulary) logits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from theworld_core.config import ModelConfig
from theworld_core.model import base
from theworld_core.model.components import COMPONENTS, apply_freeze
from theworld_core.model.inputs import (
    END_OF_WORLD,
    START_OF_WORLD,
    WORLD_SOFT_TOKEN,
    WORLD_TOKENS,
    InputBuilder,
    WorldTokenIds,
    answer_positions,
)
from theworld_core.model.masks import gemma3_masks
from theworld_core.model.world import VaeEncoder, WorldProjector

LOSS_REDUCTIONS = ("mean", "sum")
# Answer rows sent through lm_head at once: bounds the fp32 logits of the loss to chunk x vocabulary
# (1024 x 262208 x 4 bytes = 1 GiB for Gemma 3). Longer answers are chunked and each chunk's logits
# recomputed in the backward pass instead of kept.
LOSS_CHUNK_ROWS = 1024


class TheWorld(nn.Module):
    def __init__(self, gemma: nn.Module, vae: VaeEncoder, config: ModelConfig, processor=None, base_commits=None):
        super().__init__()
        self.config = config
        self.gemma = gemma
        self.vae = vae
        self.processor = processor
        self.base_commits = base_commits or {}
        text_config = gemma.config.get_text_config()
        self.world = WorldProjector(
            z_dim=vae.z_dim,
            hidden_size=text_config.hidden_size,
            world_tokens=config.world_tokens,
            max_world_steps=config.max_world_steps,
            projector=config.world_projector,
        )
        self.token_ids = self._add_world_tokens() if processor is not None else None
        self.builder = (
            InputBuilder(
                processor,
                self.token_ids,
                config.world_tokens,
                config.world_image_size,
                config.enable_world,
                config.max_seq_length,
            )
            if processor is not None
            else None
        )
        self.loss_chunk_rows = LOSS_CHUNK_ROWS
        # Components whose weights differ from the pretrained base: what a stage output must hold.
        self.trained_components: set[str] = {"world_projector"}

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_base(cls, config: ModelConfig, dtype: torch.dtype | None = None) -> TheWorld:
        """Load the pretrained Gemma 3 and Cosmos VAE (encoder only) and add a fresh world branch.

        `dtype` None loads each base as its library does by default: Gemma in the dtype its config
        declares (bf16 for gemma-3-4b-it), the VAE in fp32 (diffusers upcasts); the world branch is fp32.
        Training puts the model into a precision policy afterwards (`model.precision.apply_precision`).
        """
        gemma, processor = base.load_gemma(config.model_name, config.model_revision, dtype=dtype)
        vae_full = base.load_vae(config.cosmos_model_name, config.cosmos_revision, dtype=dtype)
        vae = VaeEncoder.from_autoencoder(vae_full)
        commits = {"gemma": base.commit_hash(gemma.config), "cosmos": base.commit_hash(vae_full.config)}
        del vae_full  # the decoder and post_quant_conv go with it
        model = cls(gemma, vae, config, processor=processor, base_commits=commits)
        if dtype is not None:
            model.world.to(dtype)
        return model

    @classmethod
    def on_meta(cls, config: ModelConfig) -> TheWorld:
        """The architecture without weights (no memory, no download of weights): for planning."""
        from diffusers import AutoencoderKLWan
        from transformers import Gemma3ForConditionalGeneration

        gemma_config = base.load_gemma_config(config.model_name, config.model_revision)
        vae_config = base.load_vae_config(config.cosmos_model_name, config.cosmos_revision)
        with torch.device("meta"):
            gemma = Gemma3ForConditionalGeneration(gemma_config)
            vae = VaeEncoder.from_autoencoder(AutoencoderKLWan.from_config(vae_config))
            return cls(gemma, vae, config)

    def _add_world_tokens(self) -> WorldTokenIds:
        """Add the world markers to the tokenizer and grow (never shrink) the embedding table to fit."""
        tokenizer = self.processor.tokenizer
        missing = [t for t in WORLD_TOKENS if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        ids = WorldTokenIds(
            *(tokenizer.convert_tokens_to_ids(t) for t in (START_OF_WORLD, END_OF_WORLD, WORLD_SOFT_TOKEN))
        )
        self._check_special_token_ids()
        embeddings = self.gemma.get_input_embeddings()
        needed = max(ids.start, ids.end, ids.soft) + 1
        if needed > embeddings.num_embeddings:
            old = embeddings.num_embeddings
            self.gemma.resize_token_embeddings(needed, mean_resizing=False)
            with torch.no_grad():
                # Deterministic rows (the mean embedding), so the grown base is the same on every load.
                weight = self.gemma.get_input_embeddings().weight
                weight[old:] = weight[:old].mean(dim=0)
        with torch.no_grad():
            # Markers start where Gemma's image markers are, scaled as the text embedding layer scales.
            boi = self.gemma.get_input_embeddings()(
                torch.tensor([self.gemma.config.boi_token_index, self.gemma.config.eoi_token_index])
            )
            self.world.marker_embeddings.copy_(boi.to(self.world.marker_embeddings.dtype))
        return ids

    def _check_special_token_ids(self) -> None:
        tokenizer, cfg = self.processor.tokenizer, self.gemma.config
        expected = {
            "image_token_index": getattr(tokenizer, "image_token", None),
            "boi_token_index": getattr(tokenizer, "boi_token", None),
            "eoi_token_index": getattr(tokenizer, "eoi_token", None),
        }
        for key, token in expected.items():
            if token is None:
                continue
            token_id = tokenizer.convert_tokens_to_ids(token)
            if getattr(cfg, key) != token_id:
                raise base.BaseModelError(
                    f"model_name {self.config.model_name!r}: config.{key}={getattr(cfg, key)} but the tokenizer "
                    f"gives {token!r} the id {token_id}; the model config and tokenizer do not belong together"
                )

    # ---------------------------------------------------------------- freezing

    def set_trainable(self, components) -> tuple[str, ...]:
        """Make exactly these components trainable; they join the set a stage output saves."""
        trainable = apply_freeze(self, components)
        self.trained_components |= set(trainable)
        return trainable

    def _grad_if_trainable(self, module: nn.Module):
        # Frozen components ahead of every trainable one run without autograd: no activations kept.
        trainable = any(p.requires_grad for p in module.parameters())
        return contextlib.nullcontext() if trainable else torch.no_grad()

    # ---------------------------------------------------------------- forward

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """SigLIP + multi-modal projector: (B, mm_tokens_per_image, text hidden) image features.

        Runs without autograd when the vision component is frozen. The feature cache
        (`features.encoders.CachedEncoders`) calls this very method, so cached and fresh features agree.
        """
        vision = self.gemma.model.vision_tower
        with self._grad_if_trainable(vision):
            return self.gemma.model.get_image_features(pixel_values=pixel_values.to(_dtype_of(vision))).pooler_output

    def encode_world(self, world_pixel_values: torch.Tensor) -> torch.Tensor:
        """The Cosmos VAE encoder on one frame: normalised latents (B, z_dim, 1, S/8, S/8)."""
        with self._grad_if_trainable(self.vae):
            return self.vae(world_pixel_values.unsqueeze(2).to(_dtype_of(self.vae)))

    def embed_inputs(
        self, input_ids, pixel_values=None, world_pixel_values=None, *, image_features=None, world_latents=None
    ) -> torch.Tensor:
        """Token embeddings with image features and world embeddings written into their placeholders.

        `image_features` / `world_latents`: what `encode_images` / `encode_world` return, precomputed
        (the feature cache); each replaces the matching pixels. Placeholder counts are checked when the
        batch is built (`InputBuilder.collate`), not here: that check would read a value back from the
        device on every step.
        """
        embeds = self.gemma.get_input_embeddings()(input_ids)
        if image_features is None and pixel_values is not None:
            image_features = self.encode_images(pixel_values)
        if image_features is not None:
            embeds = _scatter(embeds, input_ids == self.gemma.config.image_token_index, image_features)
        if self.config.enable_world and world_latents is None and world_pixel_values is not None:
            world_latents = self.encode_world(world_pixel_values)
        if self.config.enable_world and world_latents is not None:
            world = self.world(world_latents)  # casts the latent to the projector's dtype
            embeds = _scatter(embeds, input_ids == self.token_ids.soft, world)
            markers = self.world.marker_embeddings.to(embeds.dtype)
            embeds = torch.where((input_ids == self.token_ids.start)[..., None], markers[0], embeds)
            embeds = torch.where((input_ids == self.token_ids.end)[..., None], markers[1], embeds)
        return embeds

    def forward(
        self,
        input_ids,
        attention_mask,
        token_type_ids,
        pixel_values=None,
        world_pixel_values=None,
        labels=None,
        loss_reduction: str = "mean",
        *,
        image_features=None,
        world_latents=None,
    ):
        """Returns `(logits, loss)`. `image_features` / `world_latents`: precomputed encoder outputs
        (the feature cache) in place of `pixel_values` / `world_pixel_values` (see `embed_inputs`).

        Without labels: the (B, T, V) logits and None. With labels: None and the cross entropy (fp32) of
        the answer tokens, their mean (`loss_reduction="mean"`) or their sum (`"sum"`; divide by
        `inputs.answer_token_count(labels)` summed over the micro-batches and ranks of an optimizer step
        to weight every answer token once). The full logits are never computed for the loss.
        """
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction={loss_reduction!r} is not allowed: use one of {list(LOSS_REDUCTIONS)}")
        embeds = self.embed_inputs(
            input_ids, pixel_values, world_pixel_values, image_features=image_features, world_latents=world_latents
        )
        # Prebuilt masks skip transformers' vmap construction (masks.py); None: the library builds them.
        masks = gemma3_masks(self.gemma.config.get_text_config(), embeds, attention_mask, token_type_ids)
        out = self.gemma.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask if masks is None else masks,
            token_type_ids=token_type_ids,
            use_cache=False,
        )
        if labels is None:
            return self._logits(out.last_hidden_state), None
        return None, self._answer_loss(out.last_hidden_state, labels, loss_reduction)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`lm_head`, then the final logit soft-capping where the text config sets one.

        Gemma 3 sets none; `Gemma3ForConditionalGeneration` would ignore one, `Gemma3ForCausalLM` applies it.
        """
        return self._softcap(self.gemma.lm_head(hidden))

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.gemma.config.get_text_config(), "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _answer_loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
        """Summed or mean fp32 cross entropy of the next token at the labelled positions only.

        Position t predicts token t+1, so the rows are the hidden states at t where labels[t+1] is set.
        """
        mask = answer_positions(labels)
        rows = hidden[:, :-1][mask]  # (N, H): gathered before lm_head
        targets = labels[:, 1:][mask]
        chunk_rows = self.loss_chunk_rows
        if rows.shape[0] <= chunk_rows:
            total = self._chunk_loss(rows, targets)
        else:
            from torch.utils.checkpoint import checkpoint

            total = sum(
                checkpoint(self._chunk_loss, r, t, use_reentrant=False)
                if torch.is_grad_enabled()
                else self._chunk_loss(r, t)
                for r, t in zip(rows.split(chunk_rows), targets.split(chunk_rows))
            )
        # Mean of no tokens is NaN, as F.cross_entropy(reduction="mean") gives.
        return total if reduction == "sum" else total / rows.shape[0]

    def _chunk_loss(self, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self._softcap(self.gemma.lm_head(rows).float())
        return F.cross_entropy(logits, targets, reduction="sum")

    @torch.no_grad()
    def generate(self, image: Image.Image, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy answer to `prompt` about `image` (sample generations: docs/stages.md#steps-and-evaluation)."""
        return self.generate_batch([image], [prompt], max_new_tokens=max_new_tokens)[0]

    @torch.no_grad()
    def generate_batch(self, images: list[Image.Image], prompts: list[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers to several (image, prompt) pairs at once, one string per pair.

        Prompts are left-padded to a common length with explicit position ids (each row counts its
        positions from its first real token, as it would alone) and every row stops at its own end
        of turn; the batch stops when all rows have. Runs in the model's dtypes on its device, under
        any autocast the caller opened (`PrecisionPolicy.autocast_context`).
        """
        if len(images) != len(prompts):
            raise ValueError(f"generate_batch: {len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        device = next(self.parameters()).device
        batch = self._left_padded([self.builder.encode(image, prompt) for image, prompt in zip(images, prompts)])
        batch = {k: v.to(device) for k, v in batch.items()}
        embeds = self.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["world_pixel_values"])
        tokenizer = self.processor.tokenizer
        # Gemma 3's generate() does not take inputs_embeds, so decode greedily with its KV cache.
        stop = torch.tensor(
            sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")}), device=device
        )
        never = torch.tensor([self.token_ids.start, self.token_ids.end, self.token_ids.soft], device=device)
        mask, token_types = batch["attention_mask"], batch["token_type_ids"]
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        rows = mask.shape[0]
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        generated = torch.zeros(rows, 0, dtype=torch.long, device=device)
        cache, step_embeds = None, embeds
        for _ in range(max_new_tokens):
            out = self.gemma.model(
                inputs_embeds=step_embeds,
                attention_mask=mask,
                token_type_ids=token_types,
                position_ids=positions,
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
            logits = self._logits(out.last_hidden_state[:, -1]).float()  # the last position only
            logits[:, never] = float("-inf")  # world markers are inputs only
            next_ids = logits.argmax(dim=-1)
            done |= torch.isin(next_ids, stop)
            if bool(done.all()):
                break
            # A finished row keeps decoding a pad (masked out of what it returns).
            next_ids = torch.where(done, torch.full_like(next_ids, tokenizer.pad_token_id), next_ids)
            generated = torch.cat([generated, torch.where(done, -1, next_ids)[:, None]], dim=1)
            step_embeds = self.gemma.get_input_embeddings()(next_ids[:, None])
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            token_types = torch.cat([token_types, token_types.new_zeros(rows, 1)], dim=1)
            positions = positions[:, -1:] + 1
        return [
            tokenizer.decode([t for t in row if t >= 0], skip_special_tokens=True).strip() for row in generated.tolist()
        ]

    def _left_padded(self, samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`InputBuilder.encode` outputs (no answer) as a left-padded batch: every row ends at the
        generation prompt, where the next token goes."""
        width = max(len(s["input_ids"]) for s in samples)
        pad = {"input_ids": self.processor.tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
        batch = {
            k: torch.stack([F.pad(s[k], (width - len(s[k]), 0), value=v) for s in samples]) for k, v in pad.items()
        }
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
        batch["world_pixel_values"] = torch.stack([s["world_pixel_values"] for s in samples])
        return batch

    # ---------------------------------------------------------------- identity and persistence

    def architecture_fingerprint(self) -> str:
        """Hash of every parameter's name and shape plus the world token ids: equal bases, equal hash."""
        shapes = [(name, list(p.shape)) for name, p in self.named_parameters()]
        ids = [self.token_ids.start, self.token_ids.end, self.token_ids.soft] if self.token_ids else None
        payload = json.dumps({"parameters": shapes, "world_token_ids": ids}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def save_pretrained(self, directory: str | Path, stage_config: dict | None = None) -> Path:
        """Write the stage output: weights of every component trained so far + a manifest."""
        from theworld_core.model.stage_output import save_stage_output

        return save_stage_output(self, Path(directory), stage_config=stage_config)

    @classmethod
    def from_pretrained(cls, source: str | Path, dtype: torch.dtype | None = None, **overrides) -> TheWorld:
        """Load a stage output from a folder, `runs:/...` or `models:/...`: bases rebuilt, trained weights applied.

        `overrides` replace model config keys (e.g. `model_name` pointing at a local copy of the base).
        """
        from theworld_core.model.stage_output import load_stage_output

        return load_stage_output(cls, source, dtype=dtype, overrides=overrides)


def _dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a component computes in: that of its (first) parameter."""
    return next(module.parameters()).dtype


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Write `values` (B, n, H) into the positions of `mask`, in order.

    The counts must agree; `InputBuilder.collate` checks them on the host when it builds the batch
    (a count check here would stall the device every step). A mismatch that slips through makes
    `masked_scatter` fail when there are fewer values than positions.
    """
    return embeds.masked_scatter(mask[..., None].expand_as(embeds), values.to(embeds.dtype))


__all__ = ["TheWorld", "COMPONENTS"]
