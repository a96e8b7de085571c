"""The champion as an MLflow model: a pyfunc flavour over the stage output folder.

The registered version's source is the champion stage run's `stage_output` artifact folder. At
registration the MLflow model files (`MLmodel`, `python_env.yaml`, `requirements.txt`, the input
example) and a model card (`README.md`) are written beside the stage output's own files
(`manifest.json`, `model.safetensors`; no weights are copied), so one folder serves both loaders:

    TheWorld.from_pretrained("models:/theworld@champion")            # manifest.json + weights
    mlflow.pyfunc.load_model("models:/theworld@champion").predict(df) # MLmodel -> `_load_pyfunc` here

`predict` takes a DataFrame with the string columns `image` (a file path, or base64-encoded PNG /
JPEG bytes, optionally as a `data:image/...;base64,` URI) and `prompt`, and returns one answer per
row (greedy decoding, `max_new_tokens` from the params or the model config, default 32).

The base models (Gemma 3, Cosmos) are not in the folder: they load by the manifest's ids. On
another machine point them at local copies with `model_config`, e.g.
`mlflow.pyfunc.load_model(uri, model_config={"model_name": "/models/gemma-3-4b-it",
"cosmos_model_name": "/models/Cosmos-Predict2-2B-Video2World"})`; `device` ("cuda", "cpu"; default:
cuda when there is one) and `dtype` ("bfloat16", "float16", "float32") are read there too.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

PREDICT_DEFAULTS: dict[str, Any] = {"max_new_tokens": 32}
"""The model config saved in MLmodel (a `model_config` given to `load_model` overrides it)."""
LOAD_KEYS = ("device", "dtype", "max_new_tokens")
"""`model_config` keys that are not model config (ModelConfig) keys."""
DTYPES = ("bfloat16", "float16", "float32")
REQUIREMENTS = ("mlflow", "torch", "transformers", "diffusers", "accelerate", "safetensors", "pillow", "pandas")
"""Pinned at the versions of the registering process (the `theworld` package itself is not on PyPI:
install it from its repository)."""
INPUT_COLUMNS = ("image", "prompt")


# ============================================================================== writing


def write_model_files(folder: Path, card: str) -> Path:
    """Write the MLflow model files (pyfunc flavour, signature, input example, requirements) and the
    model card `README.md` into the new folder `folder`; they go beside a stage output's files."""
    import mlflow

    mlflow.pyfunc.save_model(
        path=str(folder),
        loader_module=__name__,
        signature=signature(),
        input_example=input_example(),
        pip_requirements=requirements(),
        model_config=dict(PREDICT_DEFAULTS),
    )
    (Path(folder) / "README.md").write_text(card, encoding="utf-8")
    return Path(folder)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "image"), ColSpec(DataType.string, "prompt")]),
        outputs=Schema([ColSpec(DataType.string, "answer")]),
        params=ParamSchema([ParamSpec("max_new_tokens", DataType.long, PREDICT_DEFAULTS["max_new_tokens"])]),
    )


def input_example():
    """One row: a 32x32 PNG (base64) and a question."""
    import pandas as pd
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return pd.DataFrame(
        {"image": [base64.b64encode(buffer.getvalue()).decode("ascii")], "prompt": ["What is in the image?"]}
    )


def requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def version_description(info: dict[str, Any], registered_model: str, alias: str) -> str:
    """The registered version's description: stage, metrics, data fingerprint, config hash."""
    uri = f"models:/{registered_model}@{alias}"
    return (
        f"Champion stage **{info.get('stage', '?')}** (attempt {info.get('attempt', 1)}) of pipeline run "
        f"{info.get('pipeline_run_name') or '?'} (`{info.get('pipeline_run_id') or '?'}`): "
        f"eval_loss {_fmt(info.get('eval_loss'))}, task_accuracy {_fmt(info.get('task_accuracy'))}, "
        f"{info.get('steps', '?')} steps.\n\n"
        f"- data fingerprint: `{info.get('data_fingerprint') or '?'}`\n"
        f"- config hash: `{info.get('config_hash') or '?'}`\n"
        f"- code version: `{info.get('code_version') or '?'}`\n\n"
        f'Load: `mlflow.pyfunc.load_model("{uri}").predict(df)` (columns `image`, `prompt`) '
        f'or `TheWorld.from_pretrained("{uri}")`; README.md in the version\'s files is the model card.'
    )


def model_card(manifest: dict[str, Any], info: dict[str, Any], registered_model: str, alias: str) -> str:
    """README.md of the registered stage output: what it is, how it was made, how to load it."""
    base = manifest.get("base") or {}
    gemma, cosmos = base.get("gemma") or {}, base.get("cosmos") or {}
    uri = f"models:/{registered_model}@{alias}"

    def base_line(label: str, entry: dict) -> str:
        return (
            f"| {label} | `{entry.get('id')}` | {entry.get('revision') or '-'} | "
            f"{(entry.get('commit') or '-')[:12]} |\n"
        )

    return (
        f"# TheWorld: {registered_model} ({info.get('stage', 'stage output')})\n\n"
        "Gemma 3 (vision-language) with the Cosmos (Wan 2.1) VAE encoder as a world branch, joined by a "
        "trainable world projector. This folder is a TheWorld stage output (`manifest.json`, "
        "`model.safetensors`: the weights of the components trained so far) and an MLflow pyfunc model "
        "(`MLmodel`).\n\n"
        "## How it was made\n\n"
        "| | |\n|---|---|\n"
        f"| stage | {info.get('stage', '-')} (attempt {info.get('attempt', 1)}) |\n"
        f"| components trained | {', '.join(manifest.get('components') or []) or '-'} |\n"
        f"| eval loss | {_fmt(info.get('eval_loss'))} |\n"
        f"| task accuracy | {_fmt(info.get('task_accuracy'))} |\n"
        f"| steps | {info.get('steps', '-')} |\n"
        f"| data fingerprint | `{info.get('data_fingerprint') or '-'}` |\n"
        f"| config hash | `{info.get('config_hash') or '-'}` |\n"
        f"| code version | `{info.get('code_version') or '-'}` |\n"
        f"| pipeline run | {info.get('pipeline_run_name') or '-'} (`{info.get('pipeline_run_id') or '-'}`) |\n"
        f"| stage run | `{info.get('run_id') or '-'}` |\n\n"
        "## Base models (not in this folder: loaded by id)\n\n"
        "| | id | revision | commit |\n|---|---|---|---|\n"
        + base_line("Gemma 3", gemma)
        + base_line("Cosmos", cosmos)
        + "\n## Use\n\n"
        "```python\nimport mlflow, pandas as pd\n"
        f'model = mlflow.pyfunc.load_model("{uri}")\n'
        'answers = model.predict(pd.DataFrame({"image": ["photo.jpg"], "prompt": ["What is in the image?"]}))\n'
        "```\n\n"
        "`image`: a file path, or base64-encoded PNG/JPEG bytes; `prompt`: the question. One answer string per "
        'row; `params={"max_new_tokens": 64}` decodes longer answers. As a TheWorld model:\n\n'
        "```python\nfrom theworld_core.model.theworld import TheWorld\n"
        f'model = TheWorld.from_pretrained("{uri}")\n```\n\n'
        "Both need the `theworld` package installed (from its repository). On a machine with local copies of "
        "the base models, point at them:\n\n"
        "```python\nmlflow.pyfunc.load_model(\n"
        f'    "{uri}",\n'
        '    model_config={"model_name": "/models/gemma-3-4b-it", "cosmos_model_name": "/models/cosmos",\n'
        '                  "device": "cuda", "dtype": "bfloat16"})\n'
        f'TheWorld.from_pretrained("{uri}", model_name="/models/gemma-3-4b-it", cosmos_model_name="/models/cosmos")\n'
        "```\n"
    )


# ============================================================================== loading


class TheWorldPredictor:
    """What `mlflow.pyfunc.load_model` hands back (wrapped): answers per (image, prompt) row."""

    def __init__(self, model, max_new_tokens: int):
        self.model = model
        self.max_new_tokens = max_new_tokens

    def predict(self, model_input, params: dict[str, Any] | None = None) -> list[str]:
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(
                f"predict input lacks column(s) {missing}: expected columns {list(INPUT_COLUMNS)} "
                f"(image: a file path or base64 PNG/JPEG; prompt: the question), got {list(frame.columns)}"
            )
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        return [
            self.model.generate(decode_image(image, row), str(prompt), max_new_tokens=max_new_tokens)
            for row, (image, prompt) in enumerate(zip(frame["image"], frame["prompt"]))
        ]


def decode_image(value: Any, row: int = 0):
    """A PIL RGB image from a file path, base64 PNG/JPEG text (or a `data:` URI) or raw bytes."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    else:
        text = str(value).strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        path = Path(text).expanduser() if len(text) < 4096 else None
        if path is not None and path.is_file():
            with Image.open(path) as image:
                return image.convert("RGB")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                f"predict row {row}: image {text[:60]!r} is neither an existing file nor base64 PNG/JPEG bytes"
            ) from None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"predict row {row}: image is not a readable PNG/JPEG ({len(data)} bytes: {exc})") from None


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> TheWorldPredictor:
    """MLflow's entry point (the pyfunc flavour's `loader_module`): `path` is the model folder."""
    import torch

    from theworld_core.config import ModelConfig
    from theworld_core.model.theworld import TheWorld

    settings = {**PREDICT_DEFAULTS, **(model_config or {})}
    unknown = sorted(k for k in settings if k not in LOAD_KEYS and k not in ModelConfig.model_fields)
    if unknown:
        raise ValueError(
            f"model_config key(s) {unknown} unknown: allowed are {list(LOAD_KEYS)} and the model config "
            f"keys {sorted(ModelConfig.model_fields)}"
        )
    dtype_name = settings.get("dtype")
    if dtype_name is not None and dtype_name not in DTYPES:
        raise ValueError(f"model_config dtype {dtype_name!r} is not one of {list(DTYPES)}")
    overrides = {k: v for k, v in settings.items() if k not in LOAD_KEYS}
    model = TheWorld.from_pretrained(path, dtype=getattr(torch, dtype_name) if dtype_name else None, **overrides)
    device = settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    return TheWorldPredictor(model, int(settings["max_new_tokens"]))


def model_files_folder() -> tempfile.TemporaryDirectory:
    """A temporary parent folder for `write_model_files` (it wants a path that does not exist)."""
    return tempfile.TemporaryDirectory(prefix="theworld-pyfunc-")
