"""Data counts as tracking metrics: `stats_as_metrics(prepared.stats)` for `mlflow.log_metrics`.

Every known bad-sample reason is always present (0 when it did not occur), so runs and stages
compare column by column in the MLflow UI; a reason outside `BAD_REASONS` is logged as well.
"""

from __future__ import annotations

from theworld_core.data.fetch import FETCH_REASONS
from theworld_core.data.types import DataStats

BAD_REASONS: dict[str, str] = {
    "bad_record": "the row cannot be parsed (invalid JSON or UTF-8; named <file>:<line>) or names no image / URL",
    "missing_text": "the row has no caption (text / caption)",
    "too_long": "prompt and caption (with the image and world tokens) do not fit the model's max_seq_length",
    "missing_file": "a local image file does not exist",
    "unreadable_file": "a local image file cannot be read",
    "empty_file": "the image file or fetched body is empty",
    **FETCH_REASONS,
    "not_an_image": "the bytes are no image format PIL knows (an HTML error page, ...)",
    "corrupt_image": "the image does not decode completely (cut or damaged)",
    "unsupported_mode": "a pixel mode that cannot be converted to RGB",
}
"""Every reason a sample is skipped and counted for, with what it means."""

METRIC_PREFIX = "data/"


def stats_as_metrics(stats: DataStats) -> dict[str, float]:
    """`data/total`, `data/train`, `data/eval`, `data/bad`, `data/bad_fraction`, `data/complete`
    (1 when the counts are final; a stream's grow while it is read) and `data/bad/<reason>` for
    every reason in `BAD_REASONS` plus any other that occurred."""
    metrics = {
        f"{METRIC_PREFIX}total": float(stats.total),
        f"{METRIC_PREFIX}train": float(stats.train),
        f"{METRIC_PREFIX}eval": float(stats.eval),
        f"{METRIC_PREFIX}bad": float(stats.bad),
        f"{METRIC_PREFIX}bad_fraction": float(stats.bad_fraction),
        f"{METRIC_PREFIX}complete": 1.0 if stats.complete else 0.0,
    }
    for reason in (*BAD_REASONS, *sorted(set(stats.bad_reasons) - set(BAD_REASONS))):
        metrics[f"{METRIC_PREFIX}bad/{reason}"] = float(stats.bad_reasons.get(reason, 0))
    return metrics
