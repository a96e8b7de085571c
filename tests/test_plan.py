"""`theworld plan`: the real 4B architecture planned on the meta device matches the reference counts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from theworld_core.config import ModelConfig

# In CI the repository is a fresh clone with `shared/` beside it (in a worktree: beside the worktrees).
_REPO = Path(__file__).resolve().parents[1]
SHARED = next(
    (p / "shared" for p in (_REPO.parent, _REPO.parent.parent) if (p / "shared" / "reference").is_dir()),
    _REPO.parent / "shared",
)
GEMMA_CONFIG = SHARED / "reference" / "gemma-3-4b-it.config.json"
COSMOS_CONFIG = SHARED / "reference" / "cosmos-predict2-vae.config.json"

# /work/shared/reference/README.md, measured with transformers 5.x / diffusers 0.42 on the meta device.
GEMMA_WHOLE = 4_300_079_472
VISION_TOWER = 416_866_032
MM_PROJECTOR = 2_950_272
LANGUAGE_MODEL = 3_880_263_168
TOKEN_EMBEDDINGS = 671_252_480
VAE_WHOLE = 126_892_531
VAE_ENCODER = 53_595_872
VAE_QUANT_CONV = 1_056
VAE_DECODER = 73_295_331

EXPECTED_TRAINABLE = {
    "stage1_projection": ["world_projector"],
    "stage2_vision": ["world_projector", "gemma_vision"],
    "stage3_language": ["world_projector", "gemma_vision", "gemma_language"],
    "stage4_full": ["world_projector", "gemma_vision", "gemma_language", "cosmos_vae"],
}


def _theworld() -> str:
    script = Path(sys.executable).parent / "theworld"
    found = str(script) if script.is_file() else shutil.which("theworld")
    assert found, "the `theworld` console script is not installed (pip install -e .)"
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([_theworld(), *args], check=False, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def real_plan() -> dict:
    if not (GEMMA_CONFIG.is_file() and COSMOS_CONFIG.is_file()):
        pytest.skip(
            f"reference configs not found under {SHARED / 'reference'} (shared/ must sit beside the repository)"
        )
    done = _run("plan", "--json", "--gemma", str(GEMMA_CONFIG), "--cosmos", str(COSMOS_CONFIG))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_reference_parameter_counts(real_plan) -> None:
    sub = real_plan["submodules"]
    assert real_plan["gemma_whole"] == GEMMA_WHOLE
    assert sub["vision_tower"] == VISION_TOWER
    assert sub["multi_modal_projector"] == MM_PROJECTOR
    assert sub["language_model"] == LANGUAGE_MODEL
    assert sub["token_embeddings"] == TOKEN_EMBEDDINGS
    assert real_plan["vae_whole"] == VAE_WHOLE
    assert sub["vae_encoder"] == VAE_ENCODER
    assert sub["vae_quant_conv"] == VAE_QUANT_CONV
    # What is never loaded: the decoder and post_quant_conv (16 -> 16 1x1x1 conv).
    assert real_plan["vae_decoder_not_loaded"] == VAE_DECODER + 16 * 16 + 16


def test_components_are_the_reference_submodules(real_plan) -> None:
    gemma = json.loads(GEMMA_CONFIG.read_text())
    vae = json.loads(COSMOS_CONFIG.read_text())
    hidden, z_dim = gemma["text_config"]["hidden_size"], vae["z_dim"]
    steps = ModelConfig().max_world_steps
    # Linear z_dim -> hidden, the temporal embedding (steps + 1 rows) and the two marker embeddings.
    world = (z_dim * hidden + hidden) + (steps + 1) * hidden + 2 * hidden
    components = real_plan["components"]
    assert components == {
        "world_projector": world,
        "gemma_vision": VISION_TOWER + MM_PROJECTOR,
        "gemma_language": LANGUAGE_MODEL,  # lm_head is tied to the token embeddings: counted once
        "cosmos_vae": VAE_ENCODER + VAE_QUANT_CONV,
    }
    assert real_plan["submodules"]["world_projector"] == world
    assert real_plan["total"] == GEMMA_WHOLE + VAE_ENCODER + VAE_QUANT_CONV + world


def test_stage_totals_are_consistent(real_plan) -> None:
    components, total = real_plan["components"], real_plan["total"]
    stages = real_plan["stages"]
    assert [row["stage"] for row in stages] == list(EXPECTED_TRAINABLE)
    previous = 0
    for row in stages:
        expected = EXPECTED_TRAINABLE[row["stage"]]
        assert row["trainable_components"] == expected
        for component, count in row["trainable"].items():
            assert count == (components[component] if component in expected else 0), (row["stage"], component)
        assert row["trainable_total"] == sum(components[c] for c in expected)
        assert row["trainable_share"] == pytest.approx(row["trainable_total"] / total, rel=1e-12)
        assert row["trainable_total"] > previous  # each stage unfreezes more
        previous = row["trainable_total"]
    by_name = {row["stage"]: row["trainable_total"] for row in stages}
    assert by_name["stage1_projection"] == components["world_projector"]
    assert by_name["stage2_vision"] == by_name["stage1_projection"] + VISION_TOWER + MM_PROJECTOR
    assert by_name["stage3_language"] == by_name["stage2_vision"] + LANGUAGE_MODEL
    assert by_name["stage4_full"] == by_name["stage3_language"] + VAE_ENCODER + VAE_QUANT_CONV == total
    assert stages[-1]["trainable_share"] == 1.0
    assert stages[0]["freeze_flags"] == {
        "freeze_gemma_vision": True,
        "freeze_gemma_language": True,
        "freeze_cosmos_vae": True,
    }
    assert stages[-1]["freeze_flags"] == {
        "freeze_gemma_vision": False,
        "freeze_gemma_language": False,
        "freeze_cosmos_vae": False,
    }


def test_plain_text_plan_on_the_tiny_models(tiny_paths) -> None:
    from theworld_core.model.plan import plan

    done = _run("plan", "--gemma", str(tiny_paths.gemma), "--cosmos", str(tiny_paths.cosmos))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    expected = plan(ModelConfig(model_name=str(tiny_paths.gemma), cosmos_model_name=str(tiny_paths.cosmos)))
    assert str(tiny_paths.gemma) in text and str(tiny_paths.cosmos) in text
    parameters_table = text.split("Estimated memory")[0]
    rows = {line.split()[0]: line.split()[1:] for line in parameters_table.splitlines() if line.startswith("stage")}
    for row in expected["stages"]:
        cells = rows[row["stage"]]
        # One column per component, then the stage's trainable total and share.
        assert cells[:4] == [f"{row['trainable'][c]:,}" for c in expected["components"]], row["stage"]
        assert cells[4] == f"{row['trainable_total']:,}"
    assert rows["stage4_full"][-1] == "100.0000%"
    assert f"{expected['total']:,}" in text


def test_missing_gemma_path_exits_2_with_one_line(tmp_path) -> None:
    missing = tmp_path / "no-such-gemma"
    done = _run("plan", "--gemma", str(missing))
    assert done.returncode == 2
    assert done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert "model_name" in lines[0] and str(missing) in lines[0]
    assert "Traceback" not in done.stderr


# --- memory -----------------------------------------------------------------------------------------

STAGES_YAML = Path(__file__).resolve().parents[1] / "stages.yaml"
GIB = 2**30


@pytest.fixture(scope="module")
def real_stages_plan() -> dict:
    if not (GEMMA_CONFIG.is_file() and COSMOS_CONFIG.is_file()):
        pytest.skip(f"reference configs not found under {SHARED / 'reference'}")
    done = _run(
        "plan",
        str(STAGES_YAML),
        "--json",
        "--gpu-memory",
        "80",
        "--gemma",
        str(GEMMA_CONFIG),
        "--cosmos",
        str(COSMOS_CONFIG),
    )
    assert done.returncode == 0, done.stderr  # 0: every stage fits
    return json.loads(done.stdout)


def test_stages_yaml_defaults_fit_one_80gb_gpu(real_stages_plan) -> None:
    stages = {row["stage"]: row for row in real_stages_plan["stages"]}
    assert list(stages) == ["projection", "vision", "language", "full"]
    for name, row in stages.items():
        memory = row["memory_gib"]
        assert set(memory) == {"weights", "gradients", "optimizer", "activations", "total"}
        assert memory["total"] == pytest.approx(sum(v for k, v in memory.items() if k != "total"))
        assert memory["total"] <= 80 and row["fits"] is True, (name, memory)
        # the effective batch of the guide: 16 samples per optimizer step
        recipe = row["recipe"]
        assert recipe["batch_size"] * recipe["gradient_accumulation_steps"] * recipe["num_processes"] == 16
        assert row["how"].startswith(f"batch {recipe['batch_size']} x accumulation")
    assert stages["projection"]["memory_gib"]["total"] <= 16
    assert stages["projection"]["recipe"]["batch_size"] == 4
    assert real_stages_plan["sequence_length"] == 400  # 256 image + 64 world + 32 prompt + 32 answer + 16 template


def test_memory_parts_follow_the_precision_policy(real_stages_plan) -> None:
    components = real_stages_plan["components"]
    for row in real_stages_plan["stages"]:
        trainable = row["trainable_total"]
        frozen = real_stages_plan["total"] - trainable
        memory, recipe = row["memory_gib"], row["recipe"]
        # trainable fp32 masters, frozen bf16; fp32 gradients of the trainable ones
        assert memory["weights"] * GIB == pytest.approx(trainable * 4 + frozen * 2)
        assert memory["gradients"] * GIB == pytest.approx(trainable * 4)
        if recipe["optimizer"] == "adamw":
            assert memory["optimizer"] * GIB == pytest.approx(trainable * 8)
        else:  # 8-bit moments: a little over 2 bytes per parameter (block scales, small tensors in fp32)
            assert 2.0 * trainable < memory["optimizer"] * GIB < 2.1 * trainable
    by_name = {row["stage"]: row for row in real_stages_plan["stages"]}
    # The frozen vision tower keeps no activations; trained (stage 2, no checkpointing) it dominates.
    assert by_name["projection"]["activations_gib"]["vision_tower"] == 0
    assert by_name["vision"]["activations_gib"]["vision_tower"] > by_name["vision"]["activations_gib"]["language_model"]
    assert (
        by_name["full"]["activations_gib"]["vae_encoder"] > 0 == by_name["language"]["activations_gib"]["vae_encoder"]
    )
    # autocast's bf16 copies of the trainable weights: 2 bytes per trainable matrix parameter
    casts = by_name["language"]["activations_gib"]["weight_casts"] * GIB
    assert 2 * 0.95 * (components["gemma_vision"] + components["gemma_language"]) < casts
    assert casts <= 2 * by_name["language"]["trainable_total"]


def test_stage_over_the_gpu_memory_is_named_and_exits_1(tiny_paths, tmp_path) -> None:
    done = _run(
        "plan",
        str(STAGES_YAML),
        "--profile",
        "tiny",
        "--gpu-memory",
        "0.001",
        "--gemma",
        str(tiny_paths.gemma),
        "--cosmos",
        str(tiny_paths.cosmos),
    )
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if "does not fit" in line]
    assert len(lines) == 4 and lines[0].startswith("theworld plan: does not fit: projection needs "), done.stderr
    assert "GiB over 0.001 GiB" in lines[0]
    assert "NO +" in done.stdout
    fits = _run(
        "plan",
        str(STAGES_YAML),
        "--profile",
        "tiny",
        "--gpu-memory",
        "80",
        "--json",
        "--gemma",
        str(tiny_paths.gemma),
        "--cosmos",
        str(tiny_paths.cosmos),
    )
    assert fits.returncode == 0 and all(row["fits"] for row in json.loads(fits.stdout)["stages"])
    bad = _run("plan", "--seq-len", "lots", "--gemma", str(tiny_paths.gemma), "--cosmos", str(tiny_paths.cosmos))
    assert bad.returncode == 2 and "--seq-len 'lots' is not allowed" in bad.stderr


def test_feature_cache_size_per_sample_and_for_num_samples(tiny_paths, tmp_path) -> None:
    from theworld_core.config import load_pipeline_config
    from theworld_core.features.keys import bytes_per_sample

    pipeline_file = tmp_path / "stages.yaml"
    pipeline_file.write_text(STAGES_YAML.read_text().replace("  num_samples: null ", "  num_samples: 1000 ", 1))
    done = _run(
        "plan",
        str(pipeline_file),
        "--profile",
        "tiny",
        "--json",
        "--gemma",
        str(tiny_paths.gemma),
        "--cosmos",
        str(tiny_paths.cosmos),
    )
    assert done.returncode == 0, done.stderr
    cache = json.loads(done.stdout)["feature_cache"]
    model = load_pipeline_config(pipeline_file, profile="tiny").model.model_copy(
        update={"model_name": str(tiny_paths.gemma), "cosmos_model_name": str(tiny_paths.cosmos)}
    )
    expected = bytes_per_sample(model, dtype_bytes=2)
    assert cache["bytes_per_sample"] == expected and cache["num_samples"] == 1000
    assert cache["total_bytes"] == 1000 * expected["total"]
    text = _run(
        "plan",
        str(pipeline_file),
        "--profile",
        "tiny",
        "--gemma",
        str(tiny_paths.gemma),
        "--cosmos",
        str(tiny_paths.cosmos),
    ).stdout
    assert f"feature cache: {expected['total'] / 1e6:.2f} MB per sample" in text
    assert "for num_samples=1,000" in text


def test_decoder_layer_activation_formula_matches_saved_tensors() -> None:
    """The per-layer bytes of the memory model against what autograd really keeps (one real-width
    Gemma 3 decoder, two layers, bf16 autocast on the CPU; parameters and autocast's weight copies excluded)."""
    if not GEMMA_CONFIG.is_file():
        pytest.skip(f"reference configs not found under {SHARED / 'reference'}")
    import torch
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextModel

    from theworld_core.model.plan import Architecture

    text = {k: v for k, v in json.loads(GEMMA_CONFIG.read_text())["text_config"].items() if k != "model_type"}
    layers, tokens = 2, 96
    config = Gemma3TextConfig(**{**text, "num_hidden_layers": layers, "vocab_size": 512})
    config._attn_implementation = "sdpa"
    arch = Architecture(
        text_layers=layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        q_width=config.num_attention_heads * config.head_dim,
        kv_width=config.num_key_value_heads * config.head_dim,
        vocab=512,
        vision_layers=0,
        vision_hidden=0,
        vision_intermediate=0,
        patches=0,
        mm_tokens=0,
        matrix_params={},
        adam8_params={},
    )
    for trainable in (True, False):
        torch.manual_seed(0)
        model = Gemma3TextModel(config).train()
        if not trainable:
            model.to(torch.bfloat16).requires_grad_(False)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        shapes = {tuple(p.shape) for p in model.parameters() if p.ndim == 2}
        seen: dict[int, int] = {}

        def keep(t, weights=weights, shapes=shapes, seen=seen):
            storage = t.untyped_storage()
            is_cast = (
                t.ndim == 2 and tokens not in t.shape and (tuple(t.shape) in shapes or tuple(t.shape[::-1]) in shapes)
            )
            if storage.data_ptr() not in weights and not is_cast:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        x = torch.randn(
            1, tokens, config.hidden_size, dtype=torch.float32 if trainable else torch.bfloat16, requires_grad=True
        )
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model(inputs_embeds=x, attention_mask=torch.ones(1, tokens, dtype=torch.long), use_cache=False)
        measured = sum(seen.values()) / layers / tokens
        resid = 4 if trainable else 2
        estimated = arch.text_layer_bytes(trainable, 2) + 2 * resid * config.hidden_size / layers
        assert measured == pytest.approx(estimated, rel=0.05), (trainable, measured, estimated)


def test_multi_gpu_profile_shards_stages_3_and_4_to_fit_80gb() -> None:
    """`--profile multi_gpu`: stages 3-4 (`distributed: fsdp`) plan at each GPU's share of the
    sharded weights, gradients and moments; stages 1-2 (DDP) at the whole model per GPU."""
    if not (GEMMA_CONFIG.is_file() and COSMOS_CONFIG.is_file()):
        pytest.skip(f"reference configs not found under {SHARED / 'reference'}")
    args = [str(STAGES_YAML), "--profile", "multi_gpu", "--json", "--gpu-memory", "80"]
    done = _run("plan", *args, "--gemma", str(GEMMA_CONFIG), "--cosmos", str(COSMOS_CONFIG))
    assert done.returncode == 0, done.stderr  # every stage fits
    stages = {row["stage"]: row for row in json.loads(done.stdout)["stages"]}
    for name in ("language", "full"):
        row = stages[name]
        assert row["recipe"]["distributed"] == "fsdp" and row["recipe"]["optimizer"] == "adamw", row["recipe"]
        assert row["memory_gib"] == row["memory_gib_fsdp"]
        trainable = row["trainable_total"]
        assert row["memory_gib"]["optimizer"] * GIB == pytest.approx(trainable * 8 / 8)  # fp32 moments / 8 GPUs
        assert row["memory_gib"]["total"] < 25 and row["fits"], row["memory_gib"]
        assert "FSDP" in row["how"]
    for name in ("projection", "vision"):
        assert stages[name]["recipe"]["distributed"] == "ddp"
        assert stages[name]["memory_gib"]["total"] > stages[name]["memory_gib_fsdp"]["total"]
