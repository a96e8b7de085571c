"""bench/bench_gpu_stages.py: the GPU stage benchmark's code path, kept alive on the CPU with the tiny models."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from theworld_core.model.components import SEED_STAGES

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "bench_gpu_stages.py"
REFERENCE = next(
    (p / "shared" / "reference" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared" / "reference").is_dir()),
    ROOT.parent / "shared" / "reference",
)

EXPECTED_TRAINABLE = {
    "stage1_projection": ["world_projector"],
    "stage2_vision": ["world_projector", "gemma_vision"],
    "stage3_language": ["world_projector", "gemma_vision", "gemma_language"],
    "stage4_full": ["world_projector", "gemma_vision", "gemma_language", "cosmos_vae"],
}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_stages", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, tiny_paths, *args: str) -> tuple[dict, str]:
    out = tmp_path / "tmp.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--tiny-dir", str(tiny_paths.gemma.parent), "--out", str(out), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text()), done.stdout


def test_tiny_run_reports_four_stages(tmp_path, tiny_paths) -> None:
    result, stdout = _run(tmp_path, tiny_paths, "--steps", "2", "--peak-tflops", "1")
    stages = result["stages"]
    assert [s["stage"] for s in stages] == list(SEED_STAGES)
    for row in stages:
        assert row["status"] == "ok", row
        for key in ("s_per_step", "tokens_per_s", "samples_per_s", "mfu", "achieved_tflops"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["stage"], key, row[key])
        assert len(row["step_times"]) == 2
        assert row["trainable_components"] == EXPECTED_TRAINABLE[row["stage"]]
        assert row["loss_finite"] and row["gradients_match_trainable"] is True, row
        assert row["tokens_per_step"] == row["batch_size"] * row["accum"] * result["settings"]["layout"]["seq_len"]
        assert row["samples_per_s"] == pytest.approx(row["batch_size"] * row["accum"] / row["s_per_step"])
        # the trainer's precision policy on a CPU: bf16 asked, fp32 effective
        assert row["precision"]["precision/effective"] == "no" and row["optimizer"] == "adamw"
        estimate = row["plan_memory_gib"]
        assert estimate["total"] == pytest.approx(sum(v for k, v in estimate.items() if k != "total"))
    counts = [s["trainable_params"] for s in stages]
    assert all(a < b for a, b in itertools.pairwise(counts)), counts
    flops = [s["train_flops_per_step"] / (s["batch_size"] * s["accum"]) for s in stages]
    assert all(a < b for a, b in itertools.pairwise(flops)), flops
    # stages.yaml's recipe: gradient checkpointing in stages 3 and 4 only.
    assert [s["gradient_checkpointing"] for s in stages] == [False, False, True, True]
    assert result["device"] == "cpu" and result["mode"] == "tiny"
    assert "| stage | trainable |" in stdout and "| stage4_full |" in stdout


def test_oom_is_reported_and_the_next_stage_runs(tmp_path, tiny_paths) -> None:
    result, stdout = _run(
        tmp_path,
        tiny_paths,
        "--steps",
        "1",
        "--stages",
        "stage2_vision,stage3_language",
        "--inject-oom",
        "stage2_vision",
    )
    first, second = result["stages"]
    assert first["status"] == "oom" and first["oom_phase"] == "timed" and first["s_per_step"] is None
    assert "out-of-memory" in first["error"]
    assert second["status"] == "ok" and math.isfinite(second["s_per_step"])
    assert "| stage2_vision |" in stdout and "OOM" in stdout


def test_training_flops_rule() -> None:
    bench = _bench()
    fwd = {"gemma_language": 100, "gemma_vision": 10, "cosmos_vae": 1, "world_projector": 0}
    assert bench.training_flops_per_sample(fwd, ["world_projector"]) == 200 + 10 + 1
    assert bench.training_flops_per_sample(fwd, EXPECTED_TRAINABLE["stage2_vision"]) == 200 + 30 + 1
    assert bench.training_flops_per_sample(fwd, EXPECTED_TRAINABLE["stage4_full"]) == 3 * 111  # 6N: fwd + 2x bwd


def test_real_architecture_on_meta(tmp_path) -> None:
    if not (REFERENCE / "gemma-3-4b-it.config.json").is_file():
        pytest.skip(f"reference configs not found under {REFERENCE}")
    bench = _bench()
    out = tmp_path / "meta.json"
    assert bench.main(["--meta", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["world_token_ids"] == [262145, 262146, 262147]
    assert result["settings"]["layout"]["seq_len"] == 400 and result["settings"]["layout"]["image_size"] == 896
    stages = {s["stage"]: s for s in result["stages"]}
    # /work/shared/reference/README.md: Gemma 4,300,079,472 + VAE encoder 53,595,872 + quant_conv 1,056.
    assert stages["stage4_full"]["trainable_params"] == stages["stage4_full"]["total_params"]
    assert stages["stage4_full"]["total_params"] == 4_300_079_472 + 53_595_872 + 1_056 + 92_160
    assert stages["stage1_projection"]["trainable_params"] == 92_160  # linear 16->2560, 17 steps, 2 markers
    # the plan's estimate at stages.yaml's recipes: every stage within one 80 GB GPU, stage 1 within 16 GiB
    assert all(s["plan_memory_gib"]["total"] <= 80 for s in stages.values())
    assert stages["stage1_projection"]["plan_memory_gib"]["total"] <= 16
    assert (
        stages["stage3_language"]["optimizer"] == "adamw_8bit" and stages["stage3_language"]["gradient_checkpointing"]
    )
    fwd = result["forward_flops_per_sample"]
    # SigLIP over 4096 patches outweighs the language model over 400 tokens.
    assert fwd["gemma_vision"] > fwd["gemma_language"] > fwd["cosmos_vae"] > fwd["world_projector"] > 0
