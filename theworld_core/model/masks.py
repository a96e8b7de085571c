"""Gemma 3's attention masks for a forward pass without a KV cache, built with plain index ops.

transformers builds them in `create_masks_for_vision_model`: the sliding-window mask combines the
causal mask with the image blocks through `or_mask_function` / `and_mask_function`, which makes
`create_causal_mask` expand it with four nested `torch.vmap`s. On the tiny models that took about a
quarter of a training step (bench/RESULTS.md, issue 10). The same masks are a few broadcast
comparisons; `Gemma3Model.forward` takes them prebuilt as a `{layer type: mask}` mapping.

`gemma3_masks` returns None wherever it cannot be sure its masks are the library's (another
attention implementation or a re-registered mask function, a non-causal config, no token types or
no sliding window, a padding mask that is not (batch, sequence)): the caller then passes the 2D
padding mask and transformers builds the masks itself. tests/test_masks.py checks equality.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

# The implementations whose mask format is reproduced here: sdpa takes booleans (True = attend),
# eager the same as 0 / dtype minimum added to the scores.
_LIBRARY_MASK_FUNCTIONS = {"sdpa": sdpa_mask, "eager": eager_mask}


def gemma3_masks(
    text_config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None, token_type_ids: torch.Tensor | None
) -> dict[str, torch.Tensor] | None:
    """`{"full_attention": mask, "sliding_attention": mask}` as `create_masks_for_vision_model` gives
    them with no cache and no position ids, each (B, 1, T, T); or None where that is not certain.

    Query q may see key k when k is not padding and either k <= q (causal) or both are tokens of
    the same image (`token_type_ids == 1`, bidirectional within the image); the sliding layers
    also need k > q - sliding_window. The library never skips these masks (its image overlay
    turns off sdpa's `is_causal` shortcut), so neither does this.
    """
    implementation = getattr(text_config, "_attn_implementation", None)
    batch, length = inputs_embeds.shape[:2]
    if (
        _LIBRARY_MASK_FUNCTIONS.get(implementation) is None
        or ALL_MASK_ATTENTION_FUNCTIONS[implementation] is not _LIBRARY_MASK_FUNCTIONS[implementation]
        or not getattr(text_config, "is_causal", True)
        or not isinstance(getattr(text_config, "sliding_window", None), int)
        or token_type_ids is None
        or (attention_mask is not None and tuple(attention_mask.shape) != (batch, length))
    ):
        return None
    device = inputs_embeds.device
    blocks = get_block_sequence_ids_for_mask(token_type_ids, device=device)  # (B, T): image index or -1
    position = torch.arange(length, device=device)
    query, key = position[:, None], position[None, :]
    same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
    full = (key <= query) | same_image  # (B, T, T)
    if attention_mask is not None:
        full = full & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]
    sliding = full & (key > query - text_config.sliding_window)
    masks = {"full_attention": full[:, None], "sliding_attention": sliding[:, None]}
    if implementation == "eager":
        # As eager_mask converts sdpa's booleans: 0 where attended, the dtype's minimum elsewhere.
        dtype = inputs_embeds.dtype
        zero = torch.zeros((), device=device, dtype=dtype)
        masks = {kind: torch.where(mask, zero, torch.finfo(dtype).min) for kind, mask in masks.items()}
    return masks
