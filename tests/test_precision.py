"""The precision policy on the tiny bf16 checkpoints: fp32 master weights for what trains, the compute
dtype for what is frozen, forward and backward with mixed dtypes, and why fp32 masters matter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from theworld_core.config import ModelConfig
from theworld_core.model.components import (
    COMPONENTS,
    SEED_STAGES,
    audit_step,
    gradient_presence,
    snapshot,
    trainable_components,
)
from theworld_core.model.precision import (
    PrecisionError,
    PrecisionPolicy,
    apply_precision,
    check_precision,
    dtypes_by_component,
    resolve_precision,
)
from theworld_core.model.stage_output import apply_stage_output, read_manifest
from theworld_core.model.theworld import TheWorld

BF16_ON_CPU = resolve_precision("bf16", "cpu", bf16_supported=True)  # the GPU rule, testable on a CPU


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (30, 40, 3), dtype=np.uint8))


def _config(tiny_paths) -> ModelConfig:
    return ModelConfig(
        model_name=str(tiny_paths.gemma), cosmos_model_name=str(tiny_paths.cosmos), world_tokens=4, world_image_size=32
    )


def _batch(m: TheWorld) -> dict[str, torch.Tensor]:
    answers = ("a red circle", "a blue square at the top left")
    return m.builder.collate(
        [m.builder.encode(_image(i), "What is in this picture?", a) for i, a in enumerate(answers)]
    )


@pytest.fixture
def base(tiny_paths) -> TheWorld:
    """TheWorld loaded as a user loads it: no dtype passed, so each base takes its checkpoint's default."""
    torch.manual_seed(0)
    return TheWorld.from_base(_config(tiny_paths))


# ------------------------------------------------------------------------------------ the checkpoint


def test_tiny_checkpoints_are_bf16_like_the_real_ones(tiny_paths) -> None:
    from diffusers import AutoencoderKLWan
    from transformers import Gemma3ForConditionalGeneration

    config = json.loads((tiny_paths.gemma / "config.json").read_text())
    assert config["dtype"] == "bfloat16"  # transformers 5's spelling of gemma-3-4b-it's `torch_dtype: bfloat16`
    weights = [
        tiny_paths.gemma / "model.safetensors",
        tiny_paths.cosmos / "vae" / "diffusion_pytorch_model.safetensors",
    ]
    for path in weights:
        with safe_open(str(path), "pt") as f:
            stored = {f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        assert stored == {"BF16"}, (path, stored)
    # What the libraries then load by default: transformers follows the declared dtype, diffusers upcasts.
    gemma = Gemma3ForConditionalGeneration.from_pretrained(tiny_paths.gemma)
    assert {p.dtype for p in gemma.parameters()} == {torch.bfloat16}
    vae = AutoencoderKLWan.from_pretrained(tiny_paths.cosmos, subfolder="vae")
    assert {p.dtype for p in vae.parameters()} == {torch.float32}


def test_from_base_loads_the_declared_dtypes(base) -> None:
    assert dtypes_by_component(base) == {
        "world_projector": ["float32"],  # new weights, created in torch's default dtype
        "gemma_vision": ["bfloat16"],
        "gemma_language": ["bfloat16"],
        "cosmos_vae": ["float32"],
    }


# ------------------------------------------------------------------------------------ resolving the policy


@pytest.mark.parametrize(
    ("asked", "device", "bf16_supported", "effective", "compute"),
    [
        ("bf16", "cuda", True, "bf16", torch.bfloat16),
        ("bf16", "cuda", False, "no", torch.float32),
        ("bf16", "cpu", None, "no", torch.float32),  # a plain CPU: fp32, no autocast
        ("bf16", "cpu", True, "bf16", torch.bfloat16),
        ("fp16", "cuda", True, "fp16", torch.float16),
        ("fp16", "cpu", True, "no", torch.float32),
        ("no", "cuda", True, "no", torch.float32),
    ],
)
def test_resolve_precision(asked, device, bf16_supported, effective, compute) -> None:
    policy = resolve_precision(asked, device, bf16_supported=bf16_supported)
    assert (policy.effective, policy.compute_dtype, policy.master_dtype) == (effective, compute, torch.float32)
    assert policy.autocast is (compute != torch.float32)
    assert policy.device_type == device
    params = policy.as_params()
    assert params == {
        "precision/mixed_precision": asked,
        "precision/effective": effective,
        "precision/device_type": device,
        "precision/compute_dtype": str(compute).removeprefix("torch."),
        "precision/master_dtype": "float32",
        "precision/autocast": str(compute != torch.float32).lower(),
    }
    assert all(isinstance(v, str) for v in params.values())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match=r"mixed_precision='bf32'.*'no', 'bf16', 'fp16'"):
        resolve_precision("bf32", "cpu")
    with pytest.raises(ValueError, match="master_dtype"):
        PrecisionPolicy("bf16", "bf16", "cpu", torch.bfloat16, autocast=True, master_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="autocast"):
        PrecisionPolicy("bf16", "bf16", "cpu", torch.bfloat16, autocast=False)


# ------------------------------------------------------------------------------------ applying it


@pytest.mark.parametrize("stage", list(SEED_STAGES))
def test_each_stage_trains_fp32_masters_next_to_bf16_frozen_parts(base, stage) -> None:
    m = base
    trainable = m.set_trainable(trainable_components(SEED_STAGES[stage]))
    assert apply_precision(m, BF16_ON_CPU, trainable) == {
        c: "float32" if c in trainable else "bfloat16" for c in COMPONENTS
    }
    check_precision(m, BF16_ON_CPU)
    for name, param in m.named_parameters():  # the same, checked directly
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    # Tied weights stay tied through the cast.
    assert m.gemma.lm_head.weight is m.gemma.get_input_embeddings().weight

    batch = _batch(m)
    m.train()
    losses = {}
    for autocast in (True, False):  # the trainer autocasts; eval/generate code may not
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, loss = m(**batch)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), (autocast, loss)
        losses[autocast] = float(loss.detach())
        m.zero_grad(set_to_none=True)
    assert abs(losses[True] - losses[False]) < 0.05 * losses[False]

    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    before = snapshot(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = m(**batch)
    loss.backward()
    had = gradient_presence(m)
    for name, param in m.named_parameters():
        assert param.grad is None or param.grad.dtype == param.dtype, name  # fp32 gradients for fp32 masters
    optimizer.step()
    audit_step(m, before, had, trainable)  # trainable components changed, frozen ones did not
    check_precision(m, BF16_ON_CPU)  # and every dtype is still where the policy put it
    m.eval()
    assert isinstance(m.generate(_image(5), "Describe this image.", max_new_tokens=3), str)


def test_on_a_plain_cpu_everything_is_fp32(base) -> None:
    policy = resolve_precision("bf16", "cpu", bf16_supported=False)
    trainable = base.set_trainable(trainable_components(SEED_STAGES["stage2_vision"]))
    apply_precision(base, policy, trainable)
    check_precision(base, policy)
    assert {dtype for names in dtypes_by_component(base).values() for dtype in names} == {"float32"}
    _, loss = base(**_batch(base))
    assert torch.isfinite(loss)


def test_check_names_the_parameter_in_the_wrong_dtype(base) -> None:
    trainable = base.set_trainable(trainable_components(SEED_STAGES["stage2_vision"]))
    apply_precision(base, BF16_ON_CPU, trainable)
    master = base.world.projector.weight
    master.data = master.data.to(torch.bfloat16)  # a bf16 weight the optimizer would step
    with pytest.raises(
        PrecisionError, match=r"world\.projector\.weight \(world_projector, trainable\) is bfloat16, expected float32"
    ):
        check_precision(base, BF16_ON_CPU)
    master.data = master.data.float()
    frozen = base.vae.quant_conv.weight
    frozen.data = frozen.data.float()
    with pytest.raises(
        PrecisionError, match=r"vae\.quant_conv\.weight \(cosmos_vae, frozen\) is float32, expected bfloat16"
    ):
        check_precision(base, BF16_ON_CPU)
    with pytest.raises(KeyError, match="gemma_text"):
        apply_precision(base, BF16_ON_CPU, ["gemma_text"])


def test_stage_output_keeps_fp32_masters_when_precision_comes_first(base, tiny_paths, tmp_path) -> None:
    """A transition or resume: the saved fp32 weights survive only if the model is put into the policy
    before the stage output is applied (copying into a bf16 parameter rounds them)."""
    stage2 = base.set_trainable(trainable_components(SEED_STAGES["stage2_vision"]))
    apply_precision(base, BF16_ON_CPU, stage2)
    with torch.no_grad():
        for _, param in base.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 1e-4)  # a small update bf16 cannot hold
    out = base.save_pretrained(tmp_path / "stage2")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118 - trainable: fp32
    saved = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    manifest = read_manifest(out)

    stage3 = trainable_components(SEED_STAGES["stage3_language"])
    right = TheWorld.from_base(_config(tiny_paths))
    apply_precision(right, BF16_ON_CPU, stage3)
    apply_stage_output(right, out, manifest)
    right.set_trainable(stage3)
    check_precision(right, BF16_ON_CPU)
    params = dict(right.named_parameters())
    assert all(torch.equal(params[n], saved[n]) for n in saved)

    wrong = TheWorld.from_base(_config(tiny_paths))
    apply_stage_output(wrong, out, manifest)  # into the bf16 vision tower: rounded
    apply_precision(wrong, BF16_ON_CPU, stage3)
    params = dict(wrong.named_parameters())
    assert not all(torch.equal(params[n], saved[n]) for n in saved if n.startswith("gemma."))


# ------------------------------------------------------------------------------------ why fp32 masters


def test_fp32_master_weights_keep_the_updates_bf16_weights_lose() -> None:
    """AdamW at lr 5e-6 on N(0, 0.02) weights: each step moves a weight by about lr, far below half a
    bf16 spacing at that magnitude (~6e-5), so bf16 weights mostly stay put; fp32 masters all move."""
    generator = torch.Generator().manual_seed(0)
    start = (torch.randn(200_000, generator=generator) * 0.02).to(torch.bfloat16)  # as the checkpoint holds it
    grads = [torch.randn(start.shape, generator=generator) for _ in range(10)]

    def fraction_changed(dtype: torch.dtype) -> float:
        weight = torch.nn.Parameter(start.to(dtype))
        optimizer = torch.optim.AdamW([weight], lr=5e-6, weight_decay=0.0)
        for grad in grads:
            weight.grad = grad.to(dtype)
            optimizer.step()
        return float((weight.detach().float() != start.float()).float().mean())

    fp32, bf16 = fraction_changed(torch.float32), fraction_changed(torch.bfloat16)
    assert fp32 > 0.99, fp32
    assert bf16 < 0.05, bf16  # measured: 0.0 (fp32 masters: 0.99995)
