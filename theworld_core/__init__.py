"""TheWorld: Gemma 3 + the Cosmos VAE encoder, joined by a trainable world projector, trained stage by stage.

The public API, imported on first use so that `import theworld_core.config` (or any light module)
does not load torch:

    from theworld_core import TheWorld, load_pipeline_config
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "TheWorld": "theworld_core.model.theworld",
    "StageConfig": "theworld_core.config",
    "PipelineConfig": "theworld_core.config",
    "ConfigError": "theworld_core.config",
    "load_stage_config": "theworld_core.config",
    "load_pipeline_config": "theworld_core.config",
}
"""Public name -> the module that defines it."""

__all__ = ["ConfigError", "PipelineConfig", "StageConfig", "TheWorld", "load_pipeline_config", "load_stage_config"]

if TYPE_CHECKING:
    from theworld_core.config import ConfigError, PipelineConfig, StageConfig, load_pipeline_config, load_stage_config
    from theworld_core.model.theworld import TheWorld


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'theworld_core' has no attribute {name!r} (public names: {', '.join(__all__)})")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
