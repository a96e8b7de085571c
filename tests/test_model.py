"""TheWorld on the tiny offline Gemma 3 + Cosmos VAE: what a user checks before trusting a stage.

Parity with plain Gemma 3, labels token by token, the freeze audit for the four seed stages,
stage output save/load, the world markers, bad inputs, the VAE encoder against diffusers, and the
cached greedy decode.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file

from theworld_core.config import ModelConfig
from theworld_core.model.base import BaseModelError
from theworld_core.model.components import (
    SEED_STAGES,
    FreezeAuditError,
    audit_step,
    gradient_presence,
    snapshot,
    trainable_components,
)
from theworld_core.model.inputs import IGNORE_INDEX, InputBuilder, SequenceTooLongError, to_rgb
from theworld_core.model.stage_output import StageOutputError
from theworld_core.model.theworld import TheWorld

WORLD_TOKENS = 4
WORLD_IMAGE_SIZE = 32

# The components as DESIGN.md defines them, written out here independently of the registry.
PREFIXES = {
    "world_projector": ("world.",),
    "gemma_vision": ("gemma.model.vision_tower.", "gemma.model.multi_modal_projector."),
    "gemma_language": ("gemma.model.language_model.", "gemma.lm_head."),
    "cosmos_vae": ("vae.",),
}
EXPECTED_TRAINABLE = {
    "stage1_projection": {"world_projector"},
    "stage2_vision": {"world_projector", "gemma_vision"},
    "stage3_language": {"world_projector", "gemma_vision", "gemma_language"},
    "stage4_full": {"world_projector", "gemma_vision", "gemma_language", "cosmos_vae"},
}


UNUSED_FOR_ONE_FRAME = re.compile(r"^vae\.encoder\.down_blocks\.\d+\.time_conv\.")


def _component(name: str) -> str:
    owners = [c for c, prefixes in PREFIXES.items() if name.startswith(prefixes)]
    assert len(owners) == 1, f"{name} belongs to {owners}"
    return owners[0]


def _image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bases(tiny_paths, tmp_path_factory):
    """The tiny bases, with the tiny Gemma's multi-modal projector made non-zero.

    transformers initialises `mm_input_projection_weight` to zeros, so the stock tiny Gemma maps
    every image to zero features: the vision tower could neither influence the logits nor receive a
    gradient. A pretrained Gemma has a trained projector; this copy behaves like one.
    """
    from transformers import Gemma3ForConditionalGeneration

    folder = tmp_path_factory.mktemp("bases") / "gemma-3-tiny-live"
    shutil.copytree(tiny_paths.gemma, folder)
    gemma = Gemma3ForConditionalGeneration.from_pretrained(tiny_paths.gemma)
    torch.manual_seed(123)
    with torch.no_grad():
        gemma.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    gemma.save_pretrained(folder)
    return SimpleNamespace(gemma=folder, cosmos=tiny_paths.cosmos)


@pytest.fixture(scope="module")
def make(bases):
    """Build a fresh TheWorld on the tiny bases (seeded, so the world branch init is reproducible)."""

    def build(seed: int = 0, dtype: torch.dtype | None = None, **overrides) -> TheWorld:
        fields = dict(
            model_name=str(bases.gemma),
            cosmos_model_name=str(bases.cosmos),
            world_tokens=WORLD_TOKENS,
            world_image_size=WORLD_IMAGE_SIZE,
        )
        fields.update(overrides)
        torch.manual_seed(seed)
        # dtype None: the bases load as their checkpoints declare (Gemma bf16, as real users get it).
        return TheWorld.from_base(ModelConfig(**fields), dtype=dtype).eval()

    return build


@pytest.fixture(scope="module")
def model(make) -> TheWorld:
    """Read-only shared model with the world branch on (tests that train build their own)."""
    return make()


@pytest.fixture(scope="module")
def plain(bases):
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(bases.gemma).eval()


@pytest.fixture(scope="module")
def no_world(make) -> TheWorld:
    return make(enable_world=False)


def _batch(m: TheWorld, answers=("red circle", "a blue square at the top left")) -> dict[str, torch.Tensor]:
    samples = [m.builder.encode(_image(i), "What is in this picture?", a) for i, a in enumerate(answers)]
    return m.builder.collate(samples)


def _variant_gemma(tiny_paths, folder: Path, **text_changes) -> Path:
    """A copy of the tiny Gemma folder (same tokenizer and processor) with a re-sized language model."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    shutil.copytree(tiny_paths.gemma, folder)
    config = Gemma3Config.from_pretrained(tiny_paths.gemma)
    for key, value in text_changes.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(7)
    Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------ 1. parity


def test_parity_with_plain_gemma_when_world_disabled(no_world, plain) -> None:
    batch = _batch(no_world)
    # No world token anywhere: the plain model's vocabulary covers every id.
    assert int(batch["input_ids"].max()) < min(
        no_world.token_ids.start, no_world.token_ids.end, no_world.token_ids.soft
    )
    assert int((batch["input_ids"] == plain.config.image_token_index).sum()) == 2 * plain.config.mm_tokens_per_image
    with torch.no_grad():
        ours, _ = no_world(
            **{
                k: batch[k]
                for k in ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "world_pixel_values")
            }
        )
        reference = plain(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).logits
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # The comparison covers the vision path: same text, two images, different answer logits.
    same_text = no_world.builder.collate(
        [no_world.builder.encode(_image(i), "What is in this picture?") for i in (0, 1)]
    )
    two = _logits(no_world, same_text)
    assert torch.equal(same_text["input_ids"][0], same_text["input_ids"][1])
    assert (two[0, -1] - two[1, -1]).abs().amax() > 1e-3


def test_world_tokens_change_the_logits(model, no_world, plain) -> None:
    image, prompt = _image(3), "What is in this picture?"
    with_world = model.builder.collate([model.builder.encode(image, prompt)])
    without = no_world.builder.collate([no_world.builder.encode(image, prompt)])
    assert with_world["input_ids"].shape[1] == without["input_ids"].shape[1] + WORLD_TOKENS + 2
    ours, baseline = _logits(model, with_world), _logits(no_world, without)
    with torch.no_grad():
        # Plain Gemma on the very same ids (the world ids just read their unused embedding rows).
        reference = plain(
            **{k: with_world[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")}
        ).logits
    ours_other = _logits(model, dict(with_world, world_pixel_values=-with_world["world_pixel_values"]))
    start = int((with_world["input_ids"][0] == model.token_ids.start).nonzero())
    # Causal: everything before <start_of_world> is plain Gemma; everything after is not.
    torch.testing.assert_close(ours[:, :start], reference[:, :start], atol=1e-5, rtol=0)
    assert (ours[:, start:] - reference[:, start:]).abs().amax() > 1e-2
    # The answer would be predicted differently with world tokens than without them ...
    assert (ours[0, -1] - baseline[0, -1]).abs().max() > 1e-2
    # ... and depends on what the VAE sees: another world image, other logits after the world block.
    torch.testing.assert_close(ours_other[:, :start], ours[:, :start], atol=0, rtol=0)
    assert (ours_other[0, -1] - ours[0, -1]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------ 2. labels


def test_labels_token_by_token(model) -> None:
    tok = model.processor.tokenizer
    image, prompt, answer = _image(1), "What is in this picture?", "a red circle in the center"
    prompt_only = model.builder.encode(image, prompt)
    sample = model.builder.encode(image, prompt, answer)
    n = len(prompt_only["input_ids"])
    ids, labels = sample["input_ids"].tolist(), sample["labels"].tolist()
    assert ids[:n] == prompt_only["input_ids"].tolist()
    assert prompt_only["labels"].tolist() == [IGNORE_INDEX] * n

    tokens = tok.convert_ids_to_tokens(ids)
    # Every position before the answer, whatever it is, carries no label.
    for i in range(n):
        assert labels[i] == IGNORE_INDEX, f"position {i} ({tokens[i]!r}) is supervised but precedes the answer"
    # The prompt part holds bos, turn markers, image block, world block, the prompt, in this order.
    assert tokens[0] == "<bos>" and tokens[1] == "<start_of_turn>"
    assert tokens.count("<image_soft_token>") == model.gemma.config.mm_tokens_per_image
    assert tokens.count("<world_soft_token>") == WORLD_TOKENS
    order = [tokens.index(t) for t in ("<start_of_image>", "<end_of_image>", "<start_of_world>", "<end_of_world>")]
    assert order == sorted(order)
    assert tokens[order[2] + 1 : order[3]] == ["<world_soft_token>"] * WORLD_TOKENS
    assert tok.decode(ids[order[3] + 1 : n]).startswith(prompt)
    assert tok.decode(ids[:n]).endswith(prompt + "<end_of_turn>\n<start_of_turn>model\n")

    # Answer tokens and the closing <end_of_turn> are supervised with their own ids.
    expected_answer = tok(answer + "<end_of_turn>", add_special_tokens=False)["input_ids"]
    assert ids[n:] == expected_answer
    assert labels[n:] == expected_answer
    assert labels[-1] == tok.convert_tokens_to_ids("<end_of_turn>")
    assert tok.decode(ids[n:-1]) == answer
    assert sample["attention_mask"].tolist() == [1] * len(ids)
    assert sample["token_type_ids"].tolist() == [int(t == "<image_soft_token>") for t in tokens]


def test_padding_and_loss_over_answer_tokens_only(make) -> None:
    # fp32: padding invariance holds to 1e-5 only there (bf16 matmuls round differently per batch shape).
    model = make(dtype=torch.float32)
    tok = model.processor.tokenizer
    answers = ("red", "a blue square at the top left of the picture")
    samples = [model.builder.encode(_image(i), "Describe this image.", a) for i, a in enumerate(answers)]
    batch = model.builder.collate(samples)
    short = len(samples[0]["input_ids"])
    width = batch["input_ids"].shape[1]
    assert width == len(samples[1]["input_ids"]) > short
    # Padding of the short row: pad id, attention 0, label -100, not an image token.
    assert batch["input_ids"][0, short:].tolist() == [tok.pad_token_id] * (width - short)
    assert batch["attention_mask"][0, short:].tolist() == [0] * (width - short)
    assert batch["labels"][0, short:].tolist() == [IGNORE_INDEX] * (width - short)
    assert batch["token_type_ids"][0, short:].tolist() == [0] * (width - short)
    assert batch["attention_mask"][0, :short].tolist() == [1] * short
    assert torch.equal(batch["labels"][0, :short], samples[0]["labels"])

    logits, alone = _logits(model, batch), _logits(model, model.builder.collate(samples[:1]))
    with torch.no_grad():
        _, loss = model(**batch)
    # Right padding does not change the short sample's logits.
    torch.testing.assert_close(logits[0, :short], alone[0], atol=1e-5, rtol=0)

    # Hand-computed: mean cross entropy of each answer token (and <end_of_turn>) given its prefix.
    terms = []
    for b, answer in enumerate(answers):
        n_answer = len(tok(answer + "<end_of_turn>", add_special_tokens=False)["input_ids"])
        supervised = [t for t in range(width) if batch["labels"][b, t] != IGNORE_INDEX]
        assert len(supervised) == n_answer
        for t in supervised:
            terms.append(-torch.log_softmax(logits[b, t - 1].double(), dim=-1)[batch["input_ids"][b, t]])
    expected = torch.stack(terms).mean()
    assert loss is not None and abs(float(loss) - float(expected)) < 1e-5

    # Labels on the prompt would change the loss: the loss really is answer-only.
    leaked = batch["labels"].clone()
    leaked[batch["attention_mask"].bool()] = batch["input_ids"][batch["attention_mask"].bool()]
    with torch.no_grad():
        _, leaked_loss = model(**dict(batch, labels=leaked))
    assert abs(float(leaked_loss) - float(loss)) > 1e-3


def _full_logits_loss(m: TheWorld, batch, reduction: str) -> torch.Tensor:
    """The loss as computed before: cross entropy over the full (B, T, V) logits, ignoring unlabelled positions."""
    logits, _ = m(**{k: v for k, v in batch.items() if k != "labels"})
    assert logits.dim() == 3 and logits.shape[-1] == m.gemma.config.text_config.vocab_size
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )


def _loss_and_grads(m: TheWorld, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.fixture(scope="module")
def fp32_all_trainable(make) -> TheWorld:
    m = make(seed=21, dtype=torch.float32)
    m.set_trainable(trainable_components(SEED_STAGES["stage4_full"]))
    return m


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_answer_loss_equals_the_full_logits_loss(fp32_all_trainable, reduction, chunk_rows, monkeypatch) -> None:
    """Same value (1e-6) and same gradients as cross entropy over the full logits, chunked or not."""
    from theworld_core.model.inputs import answer_token_count

    m = fp32_all_trainable
    if chunk_rows is not None:
        monkeypatch.setattr(m, "loss_chunk_rows", chunk_rows)
    batch = _batch(m, answers=("red", "a blue square at the top left of the picture"))
    assert chunk_rows is None or answer_token_count(batch["labels"]) > 2 * chunk_rows  # really several chunks
    ours, ours_grads = _loss_and_grads(m, lambda: m(**batch, loss_reduction=reduction)[1])
    full, full_grads = _loss_and_grads(m, lambda: _full_logits_loss(m, batch, reduction))
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(full)) <= 1e-6 * max(1.0, abs(float(full)))
    assert set(ours_grads) == set(full_grads) and {_component(n) for n in ours_grads} == set(PREFIXES)
    for name, grad in ours_grads.items():
        # fp32 summation order differs (gathered rows, chunks): equal up to rounding noise.
        scale = float(full_grads[name].abs().max())
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-6 * max(scale, 1.0), msg=name)
    if reduction == "sum":  # the sum is the mean times the answer tokens the trainer divides by
        mean = m(**batch)[1]
        torch.testing.assert_close(ours, mean.detach() * answer_token_count(batch["labels"]), rtol=1e-6, atol=0)


def test_loss_never_materialises_the_full_logits(fp32_all_trainable) -> None:
    """lm_head sees the answer positions only: N_answer rows, not batch x sequence."""
    from theworld_core.model.inputs import answer_token_count

    m = fp32_all_trainable
    batch = _batch(m)
    n_answer = answer_token_count(batch["labels"])
    assert 0 < n_answer < batch["input_ids"].numel() // 4
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    hook = m.gemma.lm_head.register_forward_hook(
        lambda mod, args, out: seen.append((tuple(args[0].shape), tuple(out.shape)))
    )
    try:
        m.train()
        logits, loss = m(**batch)
        loss.backward()
        with torch.no_grad():
            _, eval_loss = m.eval()(**batch, loss_reduction="sum")
    finally:
        hook.remove()
        m.zero_grad(set_to_none=True)
        m.eval()
    vocab = m.gemma.config.text_config.vocab_size
    assert logits is None and torch.isfinite(loss) and torch.isfinite(eval_loss)
    hidden = m.gemma.config.text_config.hidden_size
    assert seen == [((n_answer, hidden), (n_answer, vocab))] * 2, seen


def test_final_logit_softcapping_is_respected(make) -> None:
    m = make(seed=22, dtype=torch.float32)
    batch = _batch(m)
    with torch.no_grad():
        plain_loss = m(**batch)[1]
        text_config = m.gemma.config.text_config
        text_config.final_logit_softcapping = 0.05  # small enough to squash every logit
        try:
            capped_loss = m(**batch)[1]
            capped_full = _full_logits_loss(m, batch, "mean")
            logits = _logits(m, batch)
        finally:
            text_config.final_logit_softcapping = None
    assert logits.abs().max() <= 0.05
    assert abs(float(capped_loss) - float(capped_full)) < 1e-6
    assert abs(float(capped_loss) - float(plain_loss)) > 1e-2


def test_bad_loss_reduction_names_the_value(model) -> None:
    with pytest.raises(ValueError, match=r"loss_reduction='none'.*mean.*sum"):
        model(**_batch(model), loss_reduction="none")


# ------------------------------------------------------------------------------------ 3. freeze audit


def _step(m: TheWorld, components, batch, hooks=None):
    """One AdamW step (lr 1e-2) on the trainable parameters; returns what the audit needs + raw copies."""
    m.set_trainable(components)
    m.train()
    if hooks and hooks.get("before_optimizer"):
        hooks["before_optimizer"](m)
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    sums = snapshot(m)
    before = {name: p.detach().clone() for name, p in m.named_parameters()}
    _, loss = m(**batch)
    loss.backward()
    if hooks and hooks.get("after_backward"):
        hooks["after_backward"](m)
    had = gradient_presence(m)
    grads = {name: (None if p.grad is None else p.grad.detach().clone()) for name, p in m.named_parameters()}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    m.eval()
    return sums, had, before, grads


@pytest.mark.parametrize("stage", list(SEED_STAGES))
def test_one_step_trains_exactly_the_stage_components(make, stage) -> None:
    m = make(seed=1)
    expected = EXPECTED_TRAINABLE[stage]
    components = trainable_components(SEED_STAGES[stage])
    assert set(components) == expected
    batch = _batch(m)
    sums, had, before, grads = _step(m, components, batch)

    # The project's audit agrees ...
    audit_step(m, sums, had, components)
    assert {c for c, present in had.items() if present} == expected

    # ... and so does a direct comparison of every parameter tensor.
    after = dict(m.named_parameters())
    seen = {c: 0 for c in PREFIXES}
    for name, old in before.items():
        component = _component(name)
        seen[component] += 1
        param, grad = after[name], grads[name]
        if component in expected:
            assert param.requires_grad, f"{name} ({component}) should be trainable in {stage}"
            if UNUSED_FOR_ONE_FRAME.search(name):
                # The VAE's temporal downsampling conv only sees frames after the first one.
                assert grad is None and torch.equal(param.detach(), old), name
                continue
            assert grad is not None and grad.abs().sum() > 0, f"{name} ({component}) got no gradient in {stage}"
            assert not torch.equal(param.detach(), old), f"{name} ({component}) did not change in {stage}"
        else:
            assert not param.requires_grad, f"{name} ({component}) should be frozen in {stage}"
            assert grad is None, f"{name} ({component}) is frozen but got a gradient in {stage}"
            assert torch.equal(param.detach(), old), f"{name} ({component}) is frozen but changed in {stage}"
    assert all(seen.values()), seen


def test_audit_names_a_frozen_component_that_trained(make) -> None:
    m = make(seed=2)
    stage1 = trainable_components(SEED_STAGES["stage1_projection"])

    def unfreeze_vision(model):  # a bug after set_trainable: the frozen vision tower requires grad again
        for name, p in model.named_parameters():
            if name.startswith(PREFIXES["gemma_vision"]):
                p.requires_grad_(True)

    sums, had, _, _ = _step(m, stage1, _batch(m), {"before_optimizer": unfreeze_vision})
    with pytest.raises(FreezeAuditError) as info:
        audit_step(m, sums, had, stage1)
    message = str(info.value)
    assert "gemma_vision" in message and "frozen" in message
    assert "world_projector" not in message and "gemma_language" not in message and "cosmos_vae" not in message


def test_audit_names_a_trainable_component_without_gradient(make) -> None:
    m = make(seed=3)
    stage2 = trainable_components(SEED_STAGES["stage2_vision"])

    def drop_vision_grads(model):  # e.g. a detach() in the wrong place: no gradient reaches the tower
        for name, p in model.named_parameters():
            if name.startswith(PREFIXES["gemma_vision"]) and p.grad is not None:
                p.grad.zero_()

    sums, had, _, _ = _step(m, stage2, _batch(m), {"after_backward": drop_vision_grads})
    assert had["gemma_vision"] is False and had["world_projector"] is True
    with pytest.raises(FreezeAuditError) as info:
        audit_step(m, sums, had, stage2)
    message = str(info.value)
    assert "gemma_vision" in message and "trainable" in message and "no gradient" in message
    assert "world_projector" not in message


@pytest.mark.parametrize("where", ["positive", "negative"])
def test_audit_notices_a_frozen_component_that_changed_without_gradient(make, where) -> None:
    """A frozen weight changed in place (no gradient involved) must fail the audit, whatever its sign."""
    m = make(seed=4)
    stage1 = trainable_components(SEED_STAGES["stage1_projection"])
    sums, had, _, _ = _step(m, stage1, _batch(m))
    audit_step(m, sums, had, stage1)  # a clean step passes
    weight = m.gemma.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        chosen = weight > 0 if where == "positive" else weight < 0
        weight[chosen] *= 1.5  # a real change of a frozen pretrained weight
    with pytest.raises(FreezeAuditError, match="gemma_vision"):
        audit_step(m, sums, had, stage1)


# ------------------------------------------------------------------------------------ 4. save / load


def _logits(m: TheWorld, batch) -> torch.Tensor:
    """The full (B, T, V) logits: a forward without labels (with labels the model returns only the loss)."""
    with torch.no_grad():
        logits, loss = m(**{k: v for k, v in batch.items() if k != "labels"})
    assert loss is None
    return logits


def test_stage2_save_load_round_trip(make, bases, tmp_path) -> None:
    m = make(seed=5)
    stage2 = trainable_components(SEED_STAGES["stage2_vision"])
    batch = _batch(m)
    sums, had, _, _ = _step(m, stage2, batch)
    audit_step(m, sums, had, stage2)
    out = m.save_pretrained(tmp_path / "stage2", stage_config={"name": "stage2_vision", **SEED_STAGES["stage2_vision"]})

    loaded = TheWorld.from_pretrained(out).eval()
    assert torch.equal(_logits(loaded, batch), _logits(m, batch))
    image = _image(11)
    text = m.generate(image, "Describe this image.", max_new_tokens=8)
    assert isinstance(text, str) and text
    assert loaded.generate(image, "Describe this image.", max_new_tokens=8) == text

    # Only what was trained is written: world branch + vision; no language model, no VAE tensors.
    tensors = load_file(str(out / "model.safetensors"))
    trained_names = {n for n, _ in m.named_parameters() if _component(n) in {"world_projector", "gemma_vision"}}
    assert set(tensors) == trained_names
    assert not [n for n in tensors if n.startswith(PREFIXES["gemma_language"] + PREFIXES["cosmos_vae"])]
    params = dict(m.named_parameters())
    for name, tensor in tensors.items():
        assert torch.equal(tensor, params[name].detach()), name
    # The next stage starts from the reloaded model: its own output must still hold the vision weights.
    assert loaded.trained_components == {"world_projector", "gemma_vision"}
    again = load_file(str(loaded.save_pretrained(tmp_path / "again") / "model.safetensors"))
    assert set(again) == trained_names and all(torch.equal(again[n], tensors[n]) for n in tensors)
    # The frozen parts of the reloaded model are the untouched pretrained base.
    base = make(seed=99)
    for name, p in loaded.named_parameters():
        if _component(name) in {"gemma_language", "cosmos_vae"}:
            assert torch.equal(p, dict(base.named_parameters())[name]), name

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["gemma"]["id"] == str(bases.gemma)
    assert manifest["base"]["cosmos"]["id"] == str(bases.cosmos)
    assert manifest["components"] == ["world_projector", "gemma_vision"]
    assert manifest["architecture_fingerprint"] == m.architecture_fingerprint() == loaded.architecture_fingerprint()
    assert manifest["model_config"] == m.config.model_dump()
    assert manifest["model_config"]["world_tokens"] == WORLD_TOKENS
    assert manifest["stage_config"]["name"] == "stage2_vision"
    assert set(manifest["parameters"]) == trained_names


def test_stage1_output_is_the_projector_and_a_small_manifest(make, tmp_path) -> None:
    m = make(seed=6)
    stage1 = trainable_components(SEED_STAGES["stage1_projection"])
    _step(m, stage1, _batch(m))
    out = m.save_pretrained(tmp_path / "stage1")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.safetensors"]
    world_bytes = sum(p.numel() * p.element_size() for p in m.world.parameters())
    weights = (out / "model.safetensors").stat().st_size
    assert set(load_file(str(out / "model.safetensors"))) == {f"world.{n}" for n, _ in m.world.named_parameters()}
    # safetensors = 8-byte length + JSON header + raw tensor bytes: the header is all that is added.
    assert world_bytes < weights <= world_bytes + 1024, (weights, world_bytes)
    assert (out / "manifest.json").stat().st_size < 16 * 1024
    whole_gemma = sum(p.numel() * p.element_size() for p in m.gemma.parameters())
    assert weights < whole_gemma / 10


def test_loading_onto_a_different_base_is_refused(make, bases, tiny_paths, tmp_path) -> None:
    m = make(seed=8)
    out = m.save_pretrained(tmp_path / "stage1")
    saved_fp = m.architecture_fingerprint()
    wider = _variant_gemma(tiny_paths, tmp_path / "gemma-3-tiny-wider", hidden_size=96)
    other = make(model_name=str(wider))
    assert other.architecture_fingerprint() != saved_fp

    with pytest.raises(StageOutputError) as info:
        TheWorld.from_pretrained(out, model_name=str(wider))
    message = str(info.value)
    assert str(bases.gemma) in message and str(wider) in message
    assert saved_fp[:12] in message and other.architecture_fingerprint()[:12] in message
    assert "world.projector.weight" in message  # says what does not fit

    # A world branch of another shape (MLP projector) does not take a linear projector's weights either.
    with pytest.raises(StageOutputError, match="world.projector"):
        TheWorld.from_pretrained(out, world_projector="mlp")


# ------------------------------------------------------------------------------------ 5. world markers


def test_world_markers_are_saved_from_stage1_and_reload(make, plain, tmp_path) -> None:
    m = make(seed=9)
    initial = m.world.marker_embeddings.detach().clone()
    stage1 = trainable_components(SEED_STAGES["stage1_projection"])
    _step(m, stage1, _batch(m))
    trained = m.world.marker_embeddings.detach().clone()
    assert not torch.equal(trained, initial), "the marker embeddings did not train in stage 1"
    out = m.save_pretrained(tmp_path / "stage1")

    tensors = load_file(str(out / "model.safetensors"))
    assert torch.equal(tensors["world.marker_embeddings"], trained)
    loaded = TheWorld.from_pretrained(out)
    assert torch.equal(loaded.world.marker_embeddings.detach(), trained)
    # The markers really are the embeddings fed at <start_of_world> / <end_of_world>.
    batch = _batch(loaded)
    with torch.no_grad():
        embeds = loaded.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["world_pixel_values"])
    ids = batch["input_ids"]
    # In the language model's dtype (bf16 as the base loads by default; the saved markers are fp32).
    assert embeds.dtype == loaded.gemma.get_input_embeddings().weight.dtype
    assert torch.equal(embeds[ids == loaded.token_ids.start], trained[0].to(embeds.dtype).expand(2, -1))
    assert torch.equal(embeds[ids == loaded.token_ids.end], trained[1].to(embeds.dtype).expand(2, -1))

    # Adding the three world tokens never shrinks Gemma's (padded) embedding table.
    before = plain.get_input_embeddings().num_embeddings
    assert loaded.gemma.get_input_embeddings().num_embeddings >= before
    assert loaded.gemma.get_input_embeddings().num_embeddings >= len(loaded.processor.tokenizer)
    assert torch.equal(loaded.gemma.get_input_embeddings().weight, plain.get_input_embeddings().weight)


def test_embedding_table_grows_when_the_tokenizer_fills_it(make, tiny_paths, tmp_path) -> None:
    from transformers import AutoTokenizer, Gemma3ForConditionalGeneration

    tokens = len(AutoTokenizer.from_pretrained(tiny_paths.gemma))
    exact = _variant_gemma(tiny_paths, tmp_path / "gemma-3-tiny-exact", vocab_size=tokens)
    base = Gemma3ForConditionalGeneration.from_pretrained(exact).eval()
    m = make(model_name=str(exact), enable_world=False)
    table = m.gemma.get_input_embeddings()
    assert table.num_embeddings == tokens + 3
    assert torch.equal(table.weight[:tokens], base.get_input_embeddings().weight)
    assert m.gemma.lm_head.weight.data_ptr() == table.weight.data_ptr()  # still tied
    batch = _batch(m)
    ours = _logits(m, batch)
    with torch.no_grad():
        reference = base(
            **{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask", "token_type_ids")}
        ).logits
    torch.testing.assert_close(ours[..., :tokens], reference, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ 6. bad input


def test_missing_model_path_names_the_key_and_path(tiny_paths, tmp_path) -> None:
    missing = tmp_path / "no-such-gemma"
    with pytest.raises(BaseModelError) as info:
        TheWorld.from_base(ModelConfig(model_name=str(missing), cosmos_model_name=str(tiny_paths.cosmos)))
    assert "model_name" in str(info.value) and str(missing) in str(info.value)
    missing_vae = tmp_path / "no-such-cosmos"
    with pytest.raises(BaseModelError) as info:
        TheWorld.from_base(ModelConfig(model_name=str(tiny_paths.gemma), cosmos_model_name=str(missing_vae)))
    assert "cosmos_model_name" in str(info.value) and str(missing_vae) in str(info.value)


def test_prompt_too_long_after_world_tokens(model) -> None:
    image, prompt = _image(0), "Describe this image in every detail you can see."
    fits = len(model.builder.encode(image, prompt)["input_ids"])
    # The same prompt fits without world tokens: the world block is what pushes it over.
    without_world = InputBuilder(model.processor, model.token_ids, WORLD_TOKENS, WORLD_IMAGE_SIZE, False, fits - 3)
    without_world.encode(image, prompt)
    tight = InputBuilder(model.processor, model.token_ids, WORLD_TOKENS, WORLD_IMAGE_SIZE, True, fits - 3)
    with pytest.raises(SequenceTooLongError) as info:
        tight.encode(image, prompt)
    message = str(info.value)
    assert "3 over" in message and f"max_seq_length={fits - 3}" in message and f"{fits} tokens" in message
    assert f"{WORLD_TOKENS} world tokens" in message
    with pytest.raises(SequenceTooLongError, match="5 over"):  # with the answer too
        answer_len = len(model.processor.tokenizer("red<end_of_turn>", add_special_tokens=False)["input_ids"])
        InputBuilder(
            model.processor, model.token_ids, WORLD_TOKENS, WORLD_IMAGE_SIZE, True, fits + answer_len - 5
        ).encode(image, prompt, "red")


def _i16() -> Image.Image:
    return Image.fromarray((np.arange(20 * 24).reshape(20, 24) * 131).astype(np.uint16))


def test_any_image_mode_and_odd_sizes_give_a_finite_loss(model) -> None:
    transparent = Image.new("RGBA", (24, 20), (0, 0, 0, 0))
    images = {
        "L": _image(1, mode="L"),
        "RGBA": _image(2, mode="RGBA"),
        "RGBA transparent": transparent,
        "P": _image(3, mode="P"),
        "I;16": _i16(),
        "LA": _image(4, mode="LA"),
        "CMYK": _image(5, mode="CMYK"),
        "1": _image(6, mode="1"),
        "7x300": _image(7, size=(7, 300)),
        "300x7": _image(8, size=(300, 7)),
        "1x1": _image(9, size=(1, 1)),
    }
    assert images["I;16"].mode == "I;16" and images["P"].mode == "P"
    for name, image in images.items():
        rgb = to_rgb(image)
        assert rgb.mode == "RGB" and rgb.size == image.size, name
    assert to_rgb(transparent).getextrema() == ((255, 255), (255, 255), (255, 255))  # onto white
    # 16-bit values scaled to 8 bits (65535 -> 255), not clipped to white as PIL's own convert does.
    assert to_rgb(images["I;16"]).getextrema()[0] == (0, round(int(np.asarray(images["I;16"]).max()) / 257))

    samples = [model.builder.encode(image, "What is in this picture?", "a shape") for image in images.values()]
    for name, sample in zip(images, samples):
        assert sample["pixel_values"].shape == samples[0]["pixel_values"].shape, name
        assert sample["world_pixel_values"].shape == (3, WORLD_IMAGE_SIZE, WORLD_IMAGE_SIZE), name
        assert sample["world_pixel_values"].min() >= -1 and sample["world_pixel_values"].max() <= 1, name
    for name, sample in zip(images, samples):
        with torch.no_grad():
            _, loss = model(**model.builder.collate([sample]))
        assert torch.isfinite(loss), f"{name}: loss {loss}"


def test_config_image_token_mismatch_names_the_key(tiny_paths, tmp_path) -> None:
    broken = tmp_path / "gemma-3-tiny-broken"
    shutil.copytree(tiny_paths.gemma, broken)
    config = json.loads((broken / "config.json").read_text())
    config["image_token_index"] = config["image_token_index"] + 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError) as info:
        TheWorld.from_base(
            ModelConfig(
                model_name=str(broken), cosmos_model_name=str(tiny_paths.cosmos), world_tokens=4, world_image_size=32
            )
        )
    message = str(info.value)
    assert "image_token_index" in message and str(broken) in message


def test_num_world_steps_other_than_zero_is_refused() -> None:
    with pytest.raises(ValidationError, match="not supported"):
        ModelConfig(num_world_steps=1)
    assert ModelConfig(num_world_steps=0).num_world_steps == 0


# ------------------------------------------------------------------------------------ 7. world branch


def test_vae_encoder_matches_diffusers_normalised_mean(model, tiny_paths) -> None:
    from diffusers import AutoencoderKLWan

    full = AutoencoderKLWan.from_pretrained(tiny_paths.cosmos, subfolder="vae").eval()
    assert not hasattr(model.vae, "decoder") and not [n for n, _ in model.named_parameters() if "decoder" in n]
    torch.manual_seed(0)
    video = torch.rand(2, 3, 1, WORLD_IMAGE_SIZE, WORLD_IMAGE_SIZE) * 2 - 1
    with torch.no_grad():
        ours = model.vae(video)
        mean = full.encode(video).latent_dist.mean
    shape = (1, full.config.z_dim, 1, 1, 1)
    expected = (mean - torch.tensor(full.config.latents_mean).view(shape)) / torch.tensor(full.config.latents_std).view(
        shape
    )
    assert ours.shape == (2, full.config.z_dim, 1, WORLD_IMAGE_SIZE // 8, WORLD_IMAGE_SIZE // 8)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, mean, atol=1e-3)  # the normalisation really is applied

    # The model feeds the VAE its own world view of the image: [-1, 1], 1 frame.
    sample = model.builder.encode(_image(4), "What?")
    wp = sample["world_pixel_values"]
    expected_pixels = (
        np.asarray(_image(4).resize((WORLD_IMAGE_SIZE,) * 2, Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1
    )
    torch.testing.assert_close(wp, torch.from_numpy(expected_pixels).permute(2, 0, 1))


@pytest.mark.parametrize(
    "stage, vae_graph", [("stage1_projection", False), ("stage3_language", False), ("stage4_full", True)]
)
def test_frozen_vae_builds_no_autograd_graph(make, stage, vae_graph) -> None:
    m = make(seed=10)
    m.set_trainable(trainable_components(SEED_STAGES[stage]))
    seen = {}
    hooks = [
        m.vae.register_forward_hook(lambda mod, args, out: seen.__setitem__("vae", out.requires_grad)),
        m.gemma.model.multi_modal_projector.register_forward_hook(
            lambda mod, args, out: seen.__setitem__("vision", out.requires_grad)
        ),
    ]
    try:
        _, loss = m(**_batch(m))
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["vae"] is vae_graph
    assert seen["vision"] is (stage != "stage1_projection")
    assert loss.requires_grad  # the world projector always trains


# ------------------------------------------------------------------------------------ 8. generate


def _greedy_uncached(m: TheWorld, image, prompt, steps: int) -> list[int]:
    tok = m.processor.tokenizer
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")}
    never = [m.token_ids.start, m.token_ids.end, m.token_ids.soft]
    batch = m.builder.collate([m.builder.encode(image, prompt)])
    ids, out = batch["input_ids"], []
    for _ in range(steps):
        with torch.no_grad():
            logits, _ = m(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                token_type_ids=(ids == m.gemma.config.image_token_index).long(),
                pixel_values=batch["pixel_values"],
                world_pixel_values=batch["world_pixel_values"],
            )
        last = logits[0, -1].clone()
        last[never] = float("-inf")
        next_id = int(last.argmax())
        if next_id in stop:
            break
        out.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return out


@pytest.mark.parametrize("world", [True, False])
def test_cached_generate_equals_uncached_greedy(model, no_world, world) -> None:
    m = model if world else no_world
    image, prompt, steps = _image(12), "What is in this picture?", 6
    expected = _greedy_uncached(m, image, prompt, steps)
    assert len(expected) >= 3, "pick a prompt whose greedy answer is long enough to compare"
    text = m.generate(image, prompt, max_new_tokens=steps)
    assert isinstance(text, str)
    assert text == m.processor.tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_generate_never_emits_world_tokens(model) -> None:
    """The world ids are inputs only: even when the head prefers them, greedy decoding skips them."""
    world_ids = [model.token_ids.start, model.token_ids.end, model.token_ids.soft]

    def prefer_world_ids(module, args, logits):
        logits = logits.clone()
        logits[..., world_ids] += 1e4
        return logits

    hook = model.gemma.lm_head.register_forward_hook(prefer_world_ids)
    try:
        expected = _greedy_uncached(model, _image(14), "Describe this image.", 5)
        text = model.generate(_image(14), "Describe this image.", max_new_tokens=5)
    finally:
        hook.remove()
    assert expected and not set(expected) & set(world_ids)
    assert text == model.processor.tokenizer.decode(expected, skip_special_tokens=True).strip()


def test_generate_without_world_equals_gemma_generate(no_world, plain) -> None:
    image, prompt, steps = _image(13), "Describe this image.", 6
    batch = no_world.builder.collate([no_world.builder.encode(image, prompt)])
    with torch.no_grad():
        out = plain.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            pixel_values=batch["pixel_values"],
            max_new_tokens=steps,
            do_sample=False,
            suppress_tokens=[no_world.token_ids.start, no_world.token_ids.end, no_world.token_ids.soft],
        )
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    assert len(new) >= 3
    expected = no_world.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert no_world.generate(image, prompt, max_new_tokens=steps) == expected


def test_stock_tiny_gemma_lets_the_image_reach_the_language_model(tiny_paths) -> None:
    """The embedded tiny Gemma must look at its image, as the real one does.

    transformers initialises `multi_modal_projector.mm_input_projection_weight` to zeros and the tiny
    build saves it as is, so every image becomes all-zero features: two different images give the
    same logits, and the vision tower gets no gradient in a stage-2 step on the tiny base.
    """
    from transformers import Gemma3ForConditionalGeneration

    stock = TheWorld.from_base(
        ModelConfig(
            model_name=str(tiny_paths.gemma),
            cosmos_model_name=str(tiny_paths.cosmos),
            enable_world=False,
            world_tokens=WORLD_TOKENS,
            world_image_size=WORLD_IMAGE_SIZE,
        )
    ).eval()
    gemma = Gemma3ForConditionalGeneration.from_pretrained(tiny_paths.gemma).eval()
    batch = stock.builder.collate([stock.builder.encode(_image(i), "What is in this picture?") for i in (0, 1)])
    with torch.no_grad():
        features = gemma.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    logits = _logits(stock, batch)
    assert features.abs().amax() > 0, "the tiny Gemma maps every image to all-zero features"
    assert (logits[0, -1] - logits[1, -1]).abs().amax() > 1e-4, "two different images give the same answer logits"
