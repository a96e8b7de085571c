"""Loading the pretrained bases: Gemma 3 (model, processor) and the Cosmos VAE, by hub id or folder.

A local folder (such as the one `theworld tiny` prints) and a hub id take exactly the same
`from_pretrained` path. `config_only` sources may also be a bare `config.json`, which is all
`theworld plan` needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# The Cosmos repos keep the VAE in this subfolder; only it is ever loaded, never the pipeline.
COSMOS_VAE_SUBFOLDER = "vae"


class BaseModelError(ValueError):
    """A base model path or id cannot be used; the message names the key, the value and why."""


def hf_token() -> str | None:
    """The Hugging Face token from the environment (HF_TOKEN or a file named by HF_TOKEN_PATH).

    It is passed straight to `from_pretrained` and never stored in configs, logs or artifacts.
    """
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    token_file = os.environ.get("HF_TOKEN_PATH")
    if token_file and Path(token_file).is_file():
        return Path(token_file).read_text().strip() or None
    return None


# Model names that mean the embedded tiny models (built offline once, see model/tiny.py).
TINY = "tiny"


def resolve_model_source(source: str, kind: str) -> str:
    """`tiny` -> the folder of the embedded tiny model of `kind` (gemma or cosmos); anything else as is."""
    if source != TINY:
        return source
    from theworld_core.model.tiny import ensure_tiny_models

    return str(getattr(ensure_tiny_models(), kind))


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists()


def _check_local(key: str, source: str) -> None:
    if _looks_local(source) and not Path(source).expanduser().exists():
        raise BaseModelError(f"{key}: {source!r} does not exist (expected a model folder, a config.json or a hub id)")


def _wrap_load_error(key: str, source: str, exc: Exception) -> BaseModelError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1: hub ids work only when already in the local cache)" if offline else ""
    return BaseModelError(f"{key}: cannot load {source!r}{hint}: {type(exc).__name__}: {exc}")


def load_gemma_config(source: str, revision: str | None = None):
    """Gemma 3 config from a hub id, a model folder or a bare config.json."""
    source = resolve_model_source(source, "gemma")
    from transformers import AutoConfig, Gemma3Config

    _check_local("model_name", source)
    path = Path(source).expanduser()
    try:
        if path.is_file():
            return Gemma3Config.from_dict(json.loads(path.read_text()))
        return AutoConfig.from_pretrained(source, revision=revision, token=hf_token())
    except Exception as exc:  # noqa: BLE001 - re-raised with the key and value named
        raise _wrap_load_error("model_name", source, exc) from exc


def load_vae_config(source: str, revision: str | None = None) -> dict[str, Any]:
    """Wan VAE config from a Cosmos hub id, a Cosmos folder (with `vae/`), a VAE folder or a config.json."""
    source = resolve_model_source(source, "cosmos")
    from diffusers import AutoencoderKLWan

    _check_local("cosmos_model_name", source)
    path = Path(source).expanduser()
    try:
        if path.is_file():
            return json.loads(path.read_text())
        if path.is_dir() and not (path / COSMOS_VAE_SUBFOLDER).is_dir():
            return AutoencoderKLWan.load_config(str(path))
        return AutoencoderKLWan.load_config(source, subfolder=COSMOS_VAE_SUBFOLDER, revision=revision, token=hf_token())
    except Exception as exc:  # noqa: BLE001
        raise _wrap_load_error("cosmos_model_name", source, exc) from exc


def load_gemma(source: str, revision: str | None = None, dtype=None):
    """Pretrained `Gemma3ForConditionalGeneration` and its `Gemma3Processor`."""
    source = resolve_model_source(source, "gemma")
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    _check_local("model_name", source)
    try:
        model = Gemma3ForConditionalGeneration.from_pretrained(source, revision=revision, token=hf_token(), dtype=dtype)
        processor = AutoProcessor.from_pretrained(source, revision=revision, token=hf_token())
    except Exception as exc:  # noqa: BLE001
        raise _wrap_load_error("model_name", source, exc) from exc
    return model, processor


def load_vae(source: str, revision: str | None = None, dtype=None):
    """Pretrained `AutoencoderKLWan` from the Cosmos repo's `vae` subfolder (or a bare VAE folder)."""
    source = resolve_model_source(source, "cosmos")
    from diffusers import AutoencoderKLWan

    _check_local("cosmos_model_name", source)
    path = Path(source).expanduser()
    subfolder = None if path.is_dir() and not (path / COSMOS_VAE_SUBFOLDER).is_dir() else COSMOS_VAE_SUBFOLDER
    try:
        return AutoencoderKLWan.from_pretrained(
            source, subfolder=subfolder, revision=revision, token=hf_token(), torch_dtype=dtype
        )
    except Exception as exc:  # noqa: BLE001
        raise _wrap_load_error("cosmos_model_name", source, exc) from exc


def commit_hash(config) -> str | None:
    """The hub commit a config was loaded from (None for local folders)."""
    return getattr(config, "_commit_hash", None)
