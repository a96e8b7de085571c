"""The stage output: what the next stage and users load.

Contents of a stage output folder (nanoGPT-style explicit, nothing else):

    model.safetensors   every parameter of the components trained so far (never frozen pretrained weights)
    manifest.json       format + version, components included, parameter names and shapes, the base
                        models (ids, revisions, commits), the architecture fingerprint, the model
                        config and the stage config that produced it

Loading rebuilds the bases from their ids, refuses a base whose architecture fingerprint differs,
and applies the saved tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from theworld_core.config import ModelConfig
from theworld_core.model.components import COMPONENTS, component_of

FORMAT = "theworld-stage-output"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


class StageOutputError(ValueError):
    """A stage output cannot be read or does not fit the base it is loaded onto."""


def atomic_directory(target: Path):
    """A context manager yielding a temporary sibling folder that replaces `target` on success."""
    return _AtomicDirectory(target)


class _AtomicDirectory:
    def __init__(self, target: Path):
        self.target = target
        self.tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for child in self.tmp.iterdir():  # data reaches the disk before the rename makes it visible
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def stage_output_tensors(model) -> dict[str, torch.Tensor]:
    """The parameters a stage output holds: those of `model.trained_components`."""
    return {
        name: param.detach().contiguous().cpu()
        for name, param in model.named_parameters()
        if component_of(name) in model.trained_components
    }


def build_manifest(model, tensors: dict[str, torch.Tensor], stage_config: dict | None) -> dict[str, Any]:
    import diffusers
    import transformers

    cfg: ModelConfig = model.config
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "components": [c for c in COMPONENTS if c in model.trained_components],
        "parameters": {name: list(t.shape) for name, t in tensors.items()},
        "base": {
            "gemma": {"id": cfg.model_name, "revision": cfg.model_revision, "commit": model.base_commits.get("gemma")},
            "cosmos": {"id": cfg.cosmos_model_name, "revision": cfg.cosmos_revision, "commit": model.base_commits.get("cosmos")},
        },
        "architecture_fingerprint": model.architecture_fingerprint(),
        "model_config": cfg.model_dump(),
        "stage_config": stage_config,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__},
    }


def save_stage_output(model, directory: Path, stage_config: dict | None = None) -> Path:
    """Atomically write the stage output of `model` to `directory` (replacing an older one)."""
    tensors = stage_output_tensors(model)
    manifest = build_manifest(model, tensors, stage_config)
    with atomic_directory(Path(directory)) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Path(directory)


def resolve_source(source: str | Path) -> Path:
    """A local folder for a stage output given as a folder, an MLflow URI or a hub repo id."""
    text = str(source)
    if text.startswith(("runs:/", "models:/", "mlflow-artifacts:")):
        import mlflow

        from theworld_core.tracking.mlflow_runs import configure_tracking

        configure_tracking()  # MLFLOW_TRACKING_URI wins over a store set earlier in this process
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=text))
    path = Path(text).expanduser()
    if path.exists():
        return path
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        from huggingface_hub import constants, snapshot_download

        from theworld_core.model.base import hf_token

        try:
            return Path(snapshot_download(repo_id=text, token=hf_token()))
        except Exception as exc:  # noqa: BLE001 - re-raised with the value named
            hint = " (HF_HUB_OFFLINE=1: only repos already in the HF cache)" if constants.is_offline_mode() else ""
            raise StageOutputError(f"stage output {text!r}: cannot get the hub repo{hint}: {type(exc).__name__}: {exc}") from exc
    raise StageOutputError(f"stage output {text!r} not found: expected a folder, runs:/..., models:/... or a hub repo id")


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise StageOutputError(f"{directory} is not a stage output: {MANIFEST_FILE} is missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise StageOutputError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')} is not "
            f"{FORMAT!r} v{FORMAT_VERSION}"
        )
    return manifest


def apply_stage_output(model, directory: Path, manifest: dict[str, Any]) -> None:
    """Copy the saved tensors into `model` after checking it is the architecture they were trained on."""
    fingerprint = model.architecture_fingerprint()
    if fingerprint != manifest["architecture_fingerprint"]:
        own = {name: list(p.shape) for name, p in model.named_parameters()}
        diffs = [
            f"{name}: saved {shape}, base has {own.get(name, 'nothing')}"
            for name, shape in manifest["parameters"].items()
            if own.get(name) != shape
        ][:3]
        base = manifest["base"]["gemma"]["id"], manifest["base"]["cosmos"]["id"]
        raise StageOutputError(
            f"{directory} was trained on a different base architecture (saved on {base[0]} + {base[1]}, "
            f"fingerprint {manifest['architecture_fingerprint'][:12]}; this base {model.config.model_name} + "
            f"{model.config.cosmos_model_name} has {fingerprint[:12]})"
            + (": " + "; ".join(diffs) if diffs else "")
        )
    tensors = load_file(str(Path(directory) / WEIGHTS_FILE))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    model.trained_components = set(manifest["components"])


def load_stage_output(cls, source, dtype=None, overrides: dict | None = None):
    directory = resolve_source(source)
    manifest = read_manifest(directory)
    config = ModelConfig(**{**manifest["model_config"], **(overrides or {})})
    model = cls.from_base(config, dtype=dtype)
    apply_stage_output(model, directory, manifest)
    return model
