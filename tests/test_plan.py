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

# In CI the repository is a fresh clone with `shared/` beside it.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
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
    return subprocess.run([_theworld(), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def real_plan() -> dict:
    if not (GEMMA_CONFIG.is_file() and COSMOS_CONFIG.is_file()):
        pytest.skip(f"reference configs not found under {SHARED / 'reference'} (shared/ must sit beside the repository)")
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
    assert stages[0]["freeze_flags"] == {"freeze_gemma_vision": True, "freeze_gemma_language": True, "freeze_cosmos_vae": True}
    assert stages[-1]["freeze_flags"] == {"freeze_gemma_vision": False, "freeze_gemma_language": False, "freeze_cosmos_vae": False}


def test_plain_text_plan_on_the_tiny_models(tiny_paths) -> None:
    from theworld_core.model.plan import plan

    done = _run("plan", "--gemma", str(tiny_paths.gemma), "--cosmos", str(tiny_paths.cosmos))
    assert done.returncode == 0, done.stderr
    text = done.stdout
    expected = plan(ModelConfig(model_name=str(tiny_paths.gemma), cosmos_model_name=str(tiny_paths.cosmos)))
    assert str(tiny_paths.gemma) in text and str(tiny_paths.cosmos) in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("stage")}
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
