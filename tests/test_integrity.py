"""Integrity of stage outputs and resume states, on the tiny models and real files.

- a stage output (folder or MLflow artifact) with flipped bytes, a removed tensor or an edited
  manifest field is refused by `from_pretrained` / `apply_stage_output`, naming the file and what
  differs; a model of another world branch is refused too; a format-1 manifest is refused;
- a rerun after the newest resume state was damaged (flipped bytes in model.safetensors, a
  truncated optimizer.pt or trainer_state.json) moves that state aside, resumes from the one before,
  and ends with the weights of the uninterrupted run; `save_total_limit` leaves the moved-aside
  folder alone and keeps the valid states.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from stage_helpers import small_cfg, weights

from theworld_core.config import ModelConfig
from theworld_core.model.stage_output import StageOutputError, apply_stage_output, is_intact_stage_output, read_manifest
from theworld_core.model.theworld import TheWorld
from theworld_core.training import checkpoint as ckpt
from theworld_core.training.launch import train_stage

WEIGHTS, MANIFEST = "model.safetensors", "manifest.json"


@pytest.fixture(autouse=True)
def local_mlflow(tmp_path, monkeypatch):
    """Each test tracks into its own project folder (SQLite under it), never a shared server."""
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(tmp_path / "project"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "project"


def flip_bytes(path: Path, offset_from_end: int = 16, count: int = 4) -> None:
    """Invert `count` bytes near the end of the file (tensor data, not the header)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - offset_from_end, len(data) - offset_from_end + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


# ============================================================================== stage outputs


@pytest.fixture(scope="module")
def tiny_config(tiny_paths) -> ModelConfig:
    return ModelConfig(
        model_name=str(tiny_paths.gemma), cosmos_model_name=str(tiny_paths.cosmos), world_tokens=4, world_image_size=32
    )


@pytest.fixture(scope="module")
def saved(tiny_config, tmp_path_factory) -> tuple[TheWorld, Path]:
    """A stage-1 output whose world branch differs from a fresh initialisation."""
    torch.manual_seed(7)
    model = TheWorld.from_base(tiny_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("world."):
                p.add_(0.5)
    return model, model.save_pretrained(tmp_path_factory.mktemp("saved") / "stage1", stage_config={"name": "stage1"})


@pytest.fixture
def copy(saved, tmp_path) -> Path:
    """A private copy of the saved stage output, to damage."""
    return Path(shutil.copytree(saved[1], tmp_path / "stage1"))


def test_manifest_records_every_file_and_an_intact_output_loads(saved, copy):
    model, _ = saved
    manifest = read_manifest(copy)
    data = (copy / WEIGHTS).read_bytes()
    assert manifest["format_version"] == 2
    assert manifest["files"] == {WEIGHTS: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}}
    assert is_intact_stage_output(copy)
    loaded = TheWorld.from_pretrained(copy)
    own = dict(model.named_parameters())
    assert all(torch.equal(p, own[n]) for n, p in loaded.named_parameters())


def test_flipped_bytes_in_a_stage_output_are_refused_naming_the_file(saved, copy, tiny_config):
    flip_bytes(copy / WEIGHTS)
    assert not is_intact_stage_output(copy)
    with pytest.raises(StageOutputError, match="sha256") as info:
        TheWorld.from_pretrained(copy)
    assert str(copy / WEIGHTS) in str(info.value)
    # The trainer's path (apply onto a built model) refuses too, and leaves the model untouched.
    fresh = TheWorld.from_base(tiny_config)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    with pytest.raises(StageOutputError, match=f"{WEIGHTS}.*sha256"):
        apply_stage_output(fresh, copy, read_manifest(copy))
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())


def test_flipped_bytes_in_the_mlflow_artifact_are_refused(saved):
    import mlflow

    from theworld_core.tracking.mlflow_runs import configure_tracking, ensure_experiment

    configure_tracking()
    with mlflow.start_run(experiment_id=ensure_experiment("integrity")) as run:
        mlflow.log_artifacts(str(saved[1]), artifact_path="stage_output")
        stored = Path(mlflow.get_artifact_uri("stage_output").removeprefix("file://")) / WEIGHTS
    assert stored.is_file(), stored
    uri = f"runs:/{run.info.run_id}/stage_output"
    TheWorld.from_pretrained(uri)  # intact: loads
    flip_bytes(stored)
    with pytest.raises(StageOutputError, match=f"{WEIGHTS}: sha256 [0-9a-f]{{64}}, expected"):
        TheWorld.from_pretrained(uri)


def test_a_removed_tensor_is_refused_naming_the_tensor(copy):
    path = copy / WEIGHTS
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    del tensors["world.projector.bias"]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(StageOutputError, match=r"lacks tensor\(s\) world\.projector\.bias") as info:
        TheWorld.from_pretrained(copy)
    assert str(path) in str(info.value)


def test_a_tensor_removed_with_its_manifest_entries_is_refused_against_the_model(copy):
    """Even with 'parameters', 'files' and 'fields_sha256' rewritten to match, the model's own
    parameter list still names the missing tensor (it would silently keep its initial value)."""
    from theworld_core.model import stage_output

    path = copy / WEIGHTS
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    del tensors["world.projector.bias"]
    save_file(tensors, str(path), metadata=metadata)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["parameters"]["world.projector.bias"]
    for key in ("files", "fields_sha256"):
        manifest.pop(key)
    stage_output.write_manifest(copy, manifest)
    with pytest.raises(StageOutputError, match=r"lacks tensor\(s\) world\.projector\.bias that the model"):
        TheWorld.from_pretrained(copy)


@pytest.mark.parametrize(
    ("field", "change", "says"),
    [
        (
            "components",
            lambda m: m.update(components=["world_projector", "gemma_vision"]),
            r"field components is \['world_projector', 'gemma_vision'\] but .* was written with \['world_projector'\]",
        ),
        (
            "world_tokens",
            lambda m: m["model_config"].update(world_tokens=16),
            r"field model_config\.world_tokens is 16 but .* was written with 4",
        ),
        (
            "parameters",
            lambda m: m["parameters"].update({"world.projector.bias": [65]}),
            r"shapes differ from .*'parameters': world\.projector\.bias: expected \[65\], found \[64\]",
        ),
        (
            "parameters",
            lambda m: m["parameters"].pop("world.projector.bias"),
            r"holds tensor\(s\) world\.projector\.bias that .*'parameters' does not list",
        ),
        (
            "architecture_fingerprint",
            lambda m: m.update(architecture_fingerprint="0" * 64),
            r"field architecture_fingerprint is '0{64}' but .* was written with '[0-9a-f]{64}'",
        ),
        (
            "stage_config",
            lambda m: m["stage_config"].update(name="stage9"),
            r"field\(s\) changed after the manifest was written .*stage_config = \{\"name\":\"stage9\"\}",
        ),
        ("base", lambda m: m["base"]["gemma"].update(id="google/gemma-3-4b-it"), r"field\(s\) changed .*base = "),
    ],
)
def test_an_edited_manifest_field_is_refused_naming_it(copy, field, change, says):
    edit_manifest(copy, change)
    with pytest.raises(StageOutputError, match=says) as info:
        TheWorld.from_pretrained(copy)
    assert str(copy / MANIFEST) in str(info.value)


def test_a_model_with_another_world_branch_is_refused(copy, tiny_paths):
    other = TheWorld.from_base(
        ModelConfig(
            model_name=str(tiny_paths.gemma),
            cosmos_model_name=str(tiny_paths.cosmos),
            world_tokens=16,
            world_image_size=32,
        )
    )
    with pytest.raises(StageOutputError, match=r"trained with model_config\.world_tokens = 4; .* has 16"):
        apply_stage_output(other, copy, read_manifest(copy))


def test_a_format_1_stage_output_is_refused_naming_the_missing_field(copy):
    edit_manifest(copy, lambda m: [m.pop("files"), m.pop("fields_sha256"), m.update(format_version=1)])
    with pytest.raises(StageOutputError, match=r"v1 has no 'files' field"):
        TheWorld.from_pretrained(copy)


# ============================================================================== resume states


@pytest.fixture(scope="module")
def trained(tiny_paths, tmp_path_factory):
    """An uninterrupted 30-step run, resume states every 10 steps, the newest 2 kept."""
    root = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THEWORLD_PROJECT_DIR", str(root / "project"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = small_cfg(tiny_paths, root / "out", max_steps=30, save_total_limit=2)
        result = train_stage(cfg)
    assert result.status == "completed" and result.steps == 30
    assert sorted(p.name for p in (root / "out").iterdir()) == ["checkpoint-20", "checkpoint-30", "final"]
    return cfg, root / "out"


def damaged_copy(trained, tmp_path: Path, damage) -> tuple[Path, Path]:
    """A copy of the uninterrupted run's output without its final/, newest state damaged."""
    _, out = trained
    copy = Path(shutil.copytree(out, tmp_path / "out", ignore=shutil.ignore_patterns("final")))
    damage(copy / "checkpoint-30")
    return copy, copy / "checkpoint-30"


DAMAGES = {
    "flipped-model": (lambda d: flip_bytes(d / WEIGHTS), "sha256-model.safetensors"),
    "truncated-optimizer": (lambda d: truncate(d / "optimizer.pt"), "size-optimizer.pt"),
    "truncated-trainer-state": (lambda d: truncate(d / "trainer_state.json"), "size-trainer_state.json"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_state_is_moved_aside_and_the_rerun_matches(trained, tiny_paths, tmp_path, caplog, damage):
    cfg, out = trained
    damage_fn, reason = DAMAGES[damage]
    copy, newest = damaged_copy(trained, tmp_path, damage_fn)
    caplog.set_level(logging.WARNING, logger="theworld.checkpoint")

    result = train_stage(cfg.with_changes(output_dir=str(copy)))

    assert result.status == "completed" and result.steps == 30
    assert result.started_from == f"resumed {copy / 'checkpoint-20'}"
    moved = copy / f"checkpoint-30.corrupt-{reason}"
    assert moved.is_dir() and (moved / "optimizer.pt").is_file(), sorted(p.name for p in copy.iterdir())
    warning = [r.getMessage() for r in caplog.records if "moved aside" in r.getMessage()]
    assert len(warning) == 1 and str(newest) in warning[0] and moved.name in warning[0], warning
    # save_total_limit=2: the valid 20 and the new 30 stay; the moved-aside folder is neither counted nor deleted.
    assert sorted(p.name for p in copy.iterdir()) == ["checkpoint-20", "checkpoint-30", moved.name, "final"]
    ckpt.verify_resume_state(copy / "checkpoint-30")
    expected, found = weights(out / "final"), weights(copy / "final")
    assert expected.keys() == found.keys() and expected
    for name in expected:
        assert torch.allclose(expected[name], found[name], rtol=0, atol=1e-6), name


def test_no_valid_state_left_means_none_and_both_moved_aside(trained, tmp_path):
    copy, _ = damaged_copy(trained, tmp_path, lambda d: truncate(d / WEIGHTS))
    (copy / "checkpoint-20" / "rng.pt").unlink()
    assert ckpt.latest_resume_state(copy) is None
    assert sorted(p.name for p in copy.iterdir()) == [
        "checkpoint-20.corrupt-missing-rng.pt",
        "checkpoint-30.corrupt-header-model.safetensors",
    ]


def test_another_rank_skips_a_damaged_state_without_moving_it(trained, tmp_path, monkeypatch):
    copy, newest = damaged_copy(trained, tmp_path, lambda d: flip_bytes(d / "scheduler.pt", offset_from_end=40))
    monkeypatch.setenv("RANK", "1")
    assert ckpt.latest_resume_state(copy) == copy / "checkpoint-20"
    assert newest.is_dir()
    monkeypatch.setenv("RANK", "0")
    assert ckpt.latest_resume_state(copy) == copy / "checkpoint-20"
    assert not newest.exists() and (copy / "checkpoint-30.corrupt-sha256-scheduler.pt").is_dir()


def test_loading_a_damaged_file_names_it(trained, tmp_path):
    """The explicit readers (`resume_from_checkpoint` at another folder's state) name the file too."""
    copy, newest = damaged_copy(trained, tmp_path, lambda d: truncate(d / "trainer_state.json"))
    with pytest.raises(ckpt.ResumeStateError, match=r"trainer_state\.json: \d+ bytes, expected \d+"):
        ckpt.load_trainer_state(newest)
    truncate(newest / "optimizer.pt")
    with pytest.raises(ckpt.ResumeStateError, match=r"optimizer\.pt: \d+ bytes, expected \d+"):
        ckpt.load_torch(newest, "optimizer.pt")
    assert ckpt.load_torch(copy / "checkpoint-20", "scheduler.pt")["last_epoch"] == 20
