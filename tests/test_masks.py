"""Our Gemma 3 attention masks (theworld_core/model/masks.py) against transformers' own."""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from theworld_core.config import ModelConfig
from theworld_core.model import theworld as theworld_module
from theworld_core.model.masks import gemma3_masks
from theworld_core.model.theworld import TheWorld
from theworld_core.model.tiny import TEXT_CONFIG

IMPLEMENTATIONS = ("sdpa", "eager")


def _config(implementation: str, sliding_window: int) -> Gemma3TextConfig:
    config = Gemma3TextConfig(**{**TEXT_CONFIG, "sliding_window": sliding_window})
    config._attn_implementation = implementation
    return config


def _rows(*rows: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention_mask, token_type_ids) from one string per sample: `_` padding, `t` text, `i` image."""
    mask = torch.tensor([[c != "_" for c in row] for row in rows], dtype=torch.long)
    types = torch.tensor([[c == "i" for c in row] for row in rows], dtype=torch.long)
    return mask, types


def _library(config, embeds, mask, types) -> dict[str, torch.Tensor]:
    blocks = get_block_sequence_ids_for_mask(types, device=embeds.device)
    return create_masks_for_vision_model(config, embeds, mask, None, None, block_sequence_ids=blocks)


def _assert_same(config, mask, types, dtype=torch.float32) -> None:
    embeds = torch.zeros(*types.shape, 8, dtype=dtype)
    ours = gemma3_masks(config, embeds, mask, types)
    theirs = _library(config, embeds, mask, types)
    assert ours is not None
    assert ours.keys() == theirs.keys()
    for kind in theirs:
        assert ours[kind].dtype == theirs[kind].dtype, kind
        assert torch.equal(ours[kind], theirs[kind]), kind


CASES = {
    "right padding": ("ttiiiitttt", "ttiiiitt__", "tttt______"),
    "left padding": ("__ttiiiitt", "ttiiiitttt", "______tttt"),
    "several images per sample": ("tiiittiiitiit", "iiitttiitiiit"),
    "samples without images": ("tttttttt", "tttttt__"),
    "with and without an image": ("ttiiiitt", "tttttt__"),
    "image longer than the window, sequence past it": ("ttiiiiiiitttttttiiiittt", "tttiiiiiiiiitttttt_____"),
    "mixed lengths": ("ttiitt____", "ttttiiiitt", "tiit______", "___tiittii"),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_masks_equal_the_library_masks(implementation, case) -> None:
    mask, types = _rows(*CASES[case])
    for window in (3, 5, 64):  # shorter and longer than the sequences
        _assert_same(_config(implementation, window), mask, types)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_masks_equal_the_library_masks_on_random_batches(implementation) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch, length = torch.randint(1, 5, (2,), generator=generator).tolist()
        length = 1 + 4 * length
        mask = (torch.rand(batch, length, generator=generator) > 0.2).long()
        types = (torch.rand(batch, length, generator=generator) > 0.6).long()
        window = int(torch.randint(1, length + 3, (1,), generator=generator))
        _assert_same(_config(implementation, window), mask, types)


def test_eager_masks_use_the_embedding_dtype_and_no_padding_mask_is_all_attended() -> None:
    mask, types = _rows("ttiiitt", "iitttii")
    _assert_same(_config("eager", 3), mask, types, dtype=torch.bfloat16)
    _assert_same(_config("sdpa", 3), None, types)
    _assert_same(_config("eager", 3), None, types, dtype=torch.bfloat16)


def test_cases_the_library_must_build_are_left_to_it() -> None:
    mask, types = _rows("ttiitt")
    embeds = torch.zeros(1, 6, 8)
    assert gemma3_masks(_config("flex_attention", 3), embeds, mask, types) is None
    assert gemma3_masks(_config("sdpa", 3), embeds, mask, None) is None  # no token types: no image blocks
    assert gemma3_masks(_config("sdpa", 3), embeds, mask[:, :4], types) is None  # mask of another length
    no_window = _config("sdpa", 3)
    no_window.sliding_window = None
    assert gemma3_masks(no_window, embeds, mask, types) is None
    not_causal = _config("sdpa", 3)
    not_causal.is_causal = False
    assert gemma3_masks(not_causal, embeds, mask, types) is None


# ------------------------------------------------------------------------------------ TheWorld forward


@pytest.fixture(scope="module")
def world_model(tiny_paths) -> TheWorld:
    """fp32 TheWorld on the tiny bases, every parameter trainable; the multi-modal projector made
    non-zero (transformers initialises it to zeros) so images reach the language model."""
    torch.manual_seed(0)
    config = ModelConfig(
        model_name=str(tiny_paths.gemma), cosmos_model_name=str(tiny_paths.cosmos), world_tokens=4, world_image_size=32
    )
    model = TheWorld.from_base(config, dtype=torch.float32).eval()
    with torch.no_grad():
        model.gemma.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    model.requires_grad_(True)
    return model


def _world_batch(model: TheWorld) -> dict[str, torch.Tensor]:
    from PIL import Image

    answers = ("red", "a blue square at the top left of a plain background", "a green triangle")
    samples = [
        model.builder.encode(Image.new("RGB", (40, 30), (60 * i, 90, 200 - 50 * i)), "What is this?", answer)
        for i, answer in enumerate(answers)
    ]
    return model.builder.collate(samples)  # right-padded, rows of different lengths


def _loss_and_grads(model: TheWorld, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    _, loss = model(**batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_world_forward_same_loss_and_gradients_as_with_the_library_masks(
    world_model, implementation, monkeypatch
) -> None:
    text_config = world_model.gemma.config.get_text_config()
    monkeypatch.setattr(text_config, "sliding_window", 8)  # shorter than the sequences: the window matters
    monkeypatch.setattr(text_config, "_attn_implementation", implementation)
    batch = _world_batch(world_model)
    assert batch["input_ids"].shape[1] > 8 and (batch["token_type_ids"] == 1).any()
    assert not bool(batch["attention_mask"].all())  # some padding
    built = []
    monkeypatch.setattr(theworld_module, "gemma3_masks", lambda *a: built.append(1) or gemma3_masks(*a))
    ours = _loss_and_grads(world_model, batch)
    assert built  # our masks were used
    monkeypatch.setattr(theworld_module, "gemma3_masks", lambda *a: None)  # the library builds them
    theirs = _loss_and_grads(world_model, batch)
    assert torch.equal(ours[0], theirs[0]) and torch.isfinite(ours[0])
    assert ours[1].keys() == theirs[1].keys() and len(ours[1]) > 0
    for name, grad in theirs[1].items():
        torch.testing.assert_close(ours[1][name], grad, rtol=0, atol=1e-6, msg=name)


def test_world_logits_with_left_padding_same_as_with_the_library_masks(world_model, monkeypatch) -> None:
    from PIL import Image

    samples = [
        world_model.builder.encode(Image.new("RGB", (32, 32), c), p)
        for c, p in (("red", "Hi?"), ("blue", "What is in this picture, in detail?"))
    ]
    batch = world_model._left_padded(samples)
    with torch.no_grad():
        ours, _ = world_model(**batch)
        monkeypatch.setattr(theworld_module, "gemma3_masks", lambda *a: None)
        theirs, _ = world_model(**batch)
    real = batch["attention_mask"].bool()  # fully masked padding rows are undefined (NaN) on both paths
    assert torch.equal(ours[real], theirs[real])
