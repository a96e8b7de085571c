"""Stage configs for tests that train on the tiny models (the same swap and short schedule as
tests/test_trainer.py), shared so a test file need not import another test module."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from theworld_core.config import StageConfig, load_stage_config

SEED = Path(__file__).resolve().parents[1] / "configs" / "seed"


def tiny_swap(tiny, output_dir) -> dict:
    """The keys a test changes in a seed file: tiny bases, small world branch, synthetic data, its
    own output folder, no hub push."""
    return {
        "model_name": str(tiny.gemma),
        "cosmos_model_name": str(tiny.cosmos),
        "world_tokens": 4,
        "world_image_size": 32,
        "dataset_name": "synthetic",
        "synthetic_samples": 100,
        "synthetic_image_size": 32,
        "output_dir": str(output_dir),
        "push_to_hub": False,
    }


def small_cfg(tiny, output_dir, seed_file: str = "stage1_projection.json", **changes) -> StageConfig:
    """A seed stage file with the tiny swap and a short schedule (materialised data, batch 4, no
    accumulation, 20 steps, evaluate/save every 10); `changes` override any of it."""
    schedule = {
        "streaming": False,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 20,
        "warmup_steps": 2,
        "eval_steps": 10,
        "save_steps": 10,
        "logging_steps": 5,
    }
    return load_stage_config(SEED / seed_file).with_changes(**{**tiny_swap(tiny, output_dir), **schedule, **changes})


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


VARIED_CAPTION_TAIL = " It sits on a plain background, seen from the front."


def write_varied_length_folder(folder: Path, count: int = 64) -> Path:
    """An image folder (metadata.jsonl) of synthetic shapes whose captions run from about 10 to about
    40 answer tokens on the tiny tokenizer: averaging the loss per micro-batch or per rank would
    weight them very differently from averaging it per answer token."""
    import json

    from theworld_core.data.synthetic import render_png, shape_spec

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        spec = shape_spec(0, i)
        (folder / f"{i:04d}.png").write_bytes(render_png(spec, 32))
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "text": spec.caption + VARIED_CAPTION_TAIL * (i % 4)}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


class Calls:
    """Counts the image processor's and the VAE view's runs (what a cache hit saves)."""

    def __init__(self, monkeypatch):
        from transformers.image_processing_utils import BaseImageProcessor

        from theworld_core.model.inputs import InputBuilder

        self.vision = self.world = 0
        for owner, name, counter in (
            (BaseImageProcessor, "__call__", "vision"),
            (InputBuilder, "world_pixels", "world"),
        ):
            original = getattr(owner, name)

            def counted(*args, _original=original, _counter=counter, **kwargs):
                setattr(self, _counter, getattr(self, _counter) + 1)
                return _original(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)

    def take(self) -> tuple[int, int]:
        taken = (self.vision, self.world)
        self.vision = self.world = 0
        return taken


def tiny_model_section() -> dict:
    """The `model` section of a test pipeline document: the tiny bases, a small world branch."""
    return {
        "model_name": "tiny",
        "cosmos_model_name": "tiny",
        "world_tokens": 4,
        "world_image_size": 32,
        "max_seq_length": 128,
    }
