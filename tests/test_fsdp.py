"""Stages with `distributed: fsdp` (FSDP2, training/sharding.py) in 2 CPU processes over gloo.

- stage 3 (language + vision + projector unfrozen) sharded over 2 processes x batch B trains what
  1 process x batch 2B trains (the same logged losses and final weights, the tolerances of
  test_distributed.py), and its stage output and resume states are the unsharded files: full
  weights and full-shape AdamW moments, written once;
- a sharded stage resumes exactly: a copy of its checkpoint-10 in a new output folder continues to
  the final weights of the uninterrupted run;
- FSDP units hold fp32 trainable and bf16 frozen weights side by side (the precision policy with
  bf16 forced on the CPU): they shard, train a step, and gather to the full tensors in their dtypes;
- `accelerate launch` with configs/accelerate/fsdp.yaml shards the same way (the trainer takes the
  FSDP request over from accelerate, whose own FSDP does not run on CPUs).

Not checked here (no GPU): nccl, the memory per GPU, bf16 autocast on GPUs, the real model.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from launch_helpers import (
    ACCELERATE_CONFIGS,
    LOSS_RTOL,
    SETTINGS,
    STEPS,
    WEIGHT_ATOL,
    B,
    assert_two_ranks,
    launch,
    loss_history,
    stage_config,
    weights,
    write_config,
    write_equal_length_folder,
)

SHARDED = "FSDP2: "  # the trainer's log line when it shards


@pytest.fixture(autouse=True)
def local_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(tmp_path / "project"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


class FsdpRuns:
    """Stage 3 once in 1 process x 2B (here) and once sharded in 2 processes x B (the CLI)."""

    def __init__(self, tiny, data: Path, root: Path):
        self.tiny, self.data, self.root = tiny, data, root
        self.project = root / "project"
        self._one = self._two = None

    def config(self, output_dir: Path, **changes):
        return stage_config(self.tiny, SETTINGS["language"], output_dir, self.data, distributed="fsdp", **changes)

    def one(self):
        if self._one is None:
            from theworld_core.training.launch import train_stage

            cfg = self.config(self.root / "one", batch_size=2 * B)  # `fsdp` is ignored in one process
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("THEWORLD_PROJECT_DIR", str(self.project))
                result = train_stage(cfg)
            assert result.status == "completed", result.reason
            self._one = result.to_dict()
        return self._one

    def two(self):
        if self._two is None:
            # Its own feature cache: the frozen VAE runs on both ranks (misses), not only served from the cache.
            cfg = self.config(self.root / "two", feature_cache_dir=str(self.root / "cache-two"))
            run = launch(
                write_config(cfg, self.root / "two.json"),
                "--num-processes",
                "2",
                project=self.project,
                logs=self.root / "two",
            )
            assert run.returncode == 0, run.stderr[-4000:]
            self._two = (cfg, run)
        return self._two


@pytest.fixture(scope="module")
def fsdp_runs(tiny_paths, tmp_path_factory) -> FsdpRuns:
    data = write_equal_length_folder(tiny_paths, tmp_path_factory.mktemp("equal-length-shapes"))
    return FsdpRuns(tiny_paths, data, tmp_path_factory.mktemp("fsdp"))


def test_sharded_stage_3_trains_what_one_process_trains(fsdp_runs):
    one = fsdp_runs.one()
    cfg, run = fsdp_runs.two()
    assert_two_ranks(run)
    assert run.stderr.count(SHARDED) == 2, run.stderr[-3000:]  # each rank sharded its model
    two = run.result()
    assert two["status"] == "completed" and two["steps"] == one["steps"] == STEPS, two["reason"]
    assert two["trainable"]["gemma_language"] > 0 and two["trainable"]["gemma_vision"] > 0

    hist_one = loss_history(fsdp_runs.project, one["mlflow_run_id"])
    hist_two = loss_history(fsdp_runs.project, two["mlflow_run_id"])
    assert [s for s, _ in hist_one] == [s for s, _ in hist_two] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(hist_one, hist_two):
        assert math.isclose(a, b, rel_tol=LOSS_RTOL), f"step {step}: 1 process {a}, 2 sharded processes {b}"
    assert hist_two[-1][1] < hist_two[0][1] - 0.5, "the loss did not go down: nothing was trained"
    # Evaluation ran on the sharded model (every rank joins its gathers) and agrees.
    assert [s for s, _ in two["eval_history"]] == [10, 20]
    for (_, a), (_, b) in zip(one["eval_history"], two["eval_history"]):
        assert math.isclose(a, b, rel_tol=1e-4), (one["eval_history"], two["eval_history"])

    # The stage output holds the full weights (not one rank's shards), equal to the 1-process run's.
    final_one, final_two = weights(Path(one["stage_output"])), weights(Path(two["stage_output"]))
    assert final_one.keys() == final_two.keys() and final_one
    for name, tensor in final_one.items():
        assert final_two[name].shape == tensor.shape, name
    worst = max((float((final_one[n] - final_two[n]).abs().max()), n) for n in final_one)
    assert worst[0] <= WEIGHT_ATOL, f"final weights differ by {worst[0]:.3g} at {worst[1]}"
    mid = weights(Path(cfg.output_dir) / "checkpoint-10")
    moved = min(float((final_two[n] - mid[n]).abs().max()) for n in final_two if n.startswith("gemma.model.language"))
    assert moved > 0 and max(float((final_two[n] - mid[n]).abs().max()) for n in final_two) > 10 * WEIGHT_ATOL

    # The resume state's moments are full-shape, one entry per trainable parameter.
    moments = torch.load(Path(cfg.output_dir) / "checkpoint-20" / "optimizer.pt", weights_only=False)["state"]
    assert moments.keys() == final_two.keys()
    for name, state in moments.items():
        assert state["exp_avg"].shape == final_two[name].shape == state["exp_avg_sq"].shape, name


def test_sharded_stage_resumes_exactly(fsdp_runs, tmp_path):
    cfg, run = fsdp_runs.two()
    uninterrupted = run.result()
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(Path(cfg.output_dir) / "checkpoint-10", out / "checkpoint-10")
    resumed = launch(
        write_config(cfg.with_changes(output_dir=str(out)), tmp_path / "resumed.json"),
        "--num-processes",
        "2",
        project=fsdp_runs.project,
        logs=tmp_path / "resumed",
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert resumed.stderr.count(SHARDED) == 2
    result = resumed.result()
    assert result["started_from"].startswith("resumed"), result["started_from"]
    assert result["status"] == "completed" and result["steps"] == STEPS
    final_a, final_b = weights(Path(uninterrupted["stage_output"])), weights(out / "final")
    assert final_a.keys() == final_b.keys() and final_a
    for name in final_a:
        assert torch.allclose(final_a[name], final_b[name], rtol=0, atol=1e-6), name
    assert math.isclose(uninterrupted["eval_history"][-1][1], result["eval_history"][-1][1], abs_tol=1e-6)


def test_accelerate_fsdp_config_shards_on_cpu(fsdp_runs, tmp_path):
    """`--accelerate-config configs/accelerate/fsdp.yaml`: the ranks shard (the trainer takes the
    request over from accelerate) and take the same first steps as the torchrun route."""
    out = tmp_path / "accelerate"
    cfg = fsdp_runs.config(out, max_steps=3, save_steps=100, eval_steps=100).with_changes(distributed="ddp")
    run = launch(
        write_config(cfg, tmp_path / "accelerate.json"),
        "--num-processes",
        "2",
        "--accelerate-config",
        str(ACCELERATE_CONFIGS / "fsdp.yaml"),
        project=fsdp_runs.project,
        logs=tmp_path / "accelerate",
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert_two_ranks(run)
    assert run.stderr.count(SHARDED) == 2, run.stderr[-3000:]
    result = run.result()
    assert result["status"] == "completed" and result["steps"] == 3
    _, reference_run = fsdp_runs.two()
    reference = loss_history(fsdp_runs.project, reference_run.result()["mlflow_run_id"])[:2]
    mine = loss_history(fsdp_runs.project, result["mlflow_run_id"])[:2]
    for (step, a), (_, b) in zip(mine, reference):
        assert math.isclose(a, b, rel_tol=1e-6), f"step {step}: accelerate launch {a}, torchrun {b}"


MIXED_WORKER = """
import sys, numpy as np, torch, torch.distributed as dist
from PIL import Image
from theworld_core.config import ModelConfig
from theworld_core.model.components import SEED_STAGES, audit_step, gradient_presence, snapshot, trainable_components
from theworld_core.model.precision import apply_precision, check_precision, resolve_precision
from theworld_core.model.stage_output import stage_output_tensors
from theworld_core.model.theworld import TheWorld
from theworld_core.training.sharding import shard_model

dist.init_process_group("gloo")
rank0 = dist.get_rank() == 0
policy = resolve_precision("bf16", "cpu", bf16_supported=True)  # the GPU rule: frozen bf16, trainable fp32
for stage in ("stage1_projection", "stage3_language"):
    torch.manual_seed(0)
    model = TheWorld.from_base(ModelConfig(model_name=sys.argv[1], cosmos_model_name=sys.argv[2], world_tokens=4,
                                           world_image_size=32))
    trainable = model.set_trainable(trainable_components(SEED_STAGES[stage]))
    apply_precision(model, policy, trainable)
    check_precision(model, policy)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 40, 3), dtype=np.uint8)) for i in (0, 1)]
    rows = [model.builder.encode(im, "What is in this picture?", a) for im, a in zip(images, ("a red circle", "a cat"))]
    batch = model.builder.collate([rows[dist.get_rank()]])
    full_before = stage_output_tensors(model)
    shard_model(model, torch.device("cpu"))
    for name, param in model.named_parameters():  # a frozen VAE / vision tower stays whole
        whole = not param.requires_grad and name.startswith(("vae.", "gemma.model.vision_tower.", "gemma.model.multi_"))
        assert (type(param).__name__ == "DTensor") != whole, name
    check_precision(model, policy)  # sharding kept every dtype
    # The root unit mixes fp32 and bf16 in stage 1 (world projector + frozen embeddings).
    root = {p.dtype for n, p in model.named_parameters() if n.startswith(("world.", "gemma.model.language_model.embed"))}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = snapshot(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(**batch)
    loss.backward()
    had = gradient_presence(model)
    optimizer.step()
    audit_step(model, before, had, trainable)  # trainable parts changed, frozen ones did not
    after = stage_output_tensors(model, keep=rank0)
    if rank0:
        assert after.keys() == full_before.keys()
        for name, tensor in after.items():
            assert tensor.shape == full_before[name].shape and tensor.dtype == torch.float32, name
        print("OK", stage, sorted(str(d) for d in root))
dist.destroy_process_group()
"""


def test_units_hold_fp32_trainable_and_bf16_frozen_weights(tiny_paths, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "mixed.py"
    script.write_text(MIXED_WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(
        [*command, str(tiny_paths.gemma), str(tiny_paths.cosmos)], capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "OK stage1_projection ['torch.bfloat16', 'torch.float32']" in done.stdout, done.stdout
    assert "OK stage3_language ['torch.float32']" in done.stdout, done.stdout
