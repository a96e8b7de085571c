"""Image-caption data: sources (synthetic, local files, hub datasets, URL lists), fingerprints,
the train/eval split, bad-sample counts.

Entry point: `prepare_data(DataConfig, sequence_limit=...) -> PreparedData`; `stats_as_metrics(prepared.stats)` gives
its counts as tracking metrics. Every sample is a dict with `id` (str, stable identity), `image`
(PIL RGB after decoding), `prompt` (str) and `text` (str, the answer).
New kinds of source register in `sources.SOURCES`.
"""

from theworld_core.data.fetch import FETCH_REASONS
from theworld_core.data.hub import HUB_ALIASES
from theworld_core.data.metrics import BAD_REASONS, stats_as_metrics
from theworld_core.data.prepare import prepare_data
from theworld_core.data.sources import SOURCES, data_source_for
from theworld_core.data.split import content_group, split_score
from theworld_core.data.types import (
    DEFAULT_PROMPT,
    SAMPLE_COLUMNS,
    SAMPLE_FEATURES,
    DataStats,
    PreparedData,
    SequenceLimit,
    Source,
    SourceRecord,
    TooManyBadSamples,
)

__all__ = [
    "BAD_REASONS",
    "DEFAULT_PROMPT",
    "FETCH_REASONS",
    "HUB_ALIASES",
    "SAMPLE_COLUMNS",
    "SAMPLE_FEATURES",
    "SOURCES",
    "DataStats",
    "PreparedData",
    "SequenceLimit",
    "Source",
    "SourceRecord",
    "TooManyBadSamples",
    "content_group",
    "prepare_data",
    "data_source_for",
    "split_score",
    "stats_as_metrics",
]
