"""Image-caption data: sources (synthetic, local files), fingerprints, the train/eval split.

Entry point: `prepare_data(DataConfig) -> PreparedData`. Every sample is a dict with `id` (str,
stable identity), `image` (PIL RGB after decoding), `prompt` (str) and `text` (str, the answer).
New kinds of source register in `sources.SOURCES`.
"""

from theworld_core.data.prepare import prepare_data
from theworld_core.data.sources import SOURCES, resolve_source
from theworld_core.data.split import split_score
from theworld_core.data.types import (
    DEFAULT_PROMPT,
    SAMPLE_COLUMNS,
    SAMPLE_FEATURES,
    DataStats,
    PreparedData,
    Source,
    SourceRecord,
    TooManyBadSamples,
)

__all__ = [
    "DEFAULT_PROMPT",
    "SAMPLE_COLUMNS",
    "SAMPLE_FEATURES",
    "SOURCES",
    "DataStats",
    "PreparedData",
    "Source",
    "SourceRecord",
    "TooManyBadSamples",
    "prepare_data",
    "resolve_source",
    "split_score",
]
