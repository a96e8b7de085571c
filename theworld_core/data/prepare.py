"""`prepare_data`: a source becomes a fingerprint, a disjoint train/eval split and bad-sample counts.

Materialised (default): one pass hashes the content (fingerprint), a second writes every sample,
bad ones included, to a cached Arrow table keyed by that fingerprint; the splits are index views
on it. A rerun on unchanged data therefore only re-hashes the bytes, and the bad-sample counts
come back from the cache with the rows.

Streaming: one pass over the records hashes the content (and notes unreadable files), a second
writes only the eval samples to a cached table the same way; the train split is an
`IterableDataset` that reads, checks and counts its images while it is iterated. Images never
sit in memory in either mode: rows go to memory-mapped Arrow files; what stays in memory is a few
bytes per sample of bookkeeping (masks, split indices).

Split groups: a record grouped by content (local files, hub images) has its image read before its
side is known (`split_group`), so the eval pass of streaming reads every such image once more.

Length: with a `sequence_limit` (the model's `max_seq_length` in its own tokens) every record is
measured before its image is read; one that does not fit is a bad sample `too_long`, counted under
`max_bad_fraction` like a broken image, instead of failing the stage at the batch that holds it.

At-least-one eval sample: when no usable sample scores below `eval_fraction`, the usable
sample(s) with the lowest split score are held out instead (all samples of that split group).
That is the sample that would enter eval first if the fraction grew, so the rule is deterministic
and only matters for tiny datasets; once any sample scores below the fraction it is a no-op.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset

from theworld_core.config import DataConfig
from theworld_core.data.fingerprint import ContentHash, cache_key, data_fingerprint, image_digest, problem_marker
from theworld_core.data.reading import (
    Read,
    example_of,
    make_row,
    measured_records,
    needs_read_for_side,
    read_or_problem,
    sample_of,
    shard_records,
    split_group,
    with_reads,
)
from theworld_core.data.sources import data_source_for
from theworld_core.data.split import is_eval, split_score
from theworld_core.data.types import (
    DEFAULT_PROMPT,
    ROW_FEATURES,
    SAMPLE_COLUMNS,
    SAMPLE_FEATURES,
    DataStats,
    PreparedData,
    SampleProblem,
    SequenceLimit,
    Source,
    SourceRecord,
    TooManyBadSamples,
)

ROWS_VERSION = 1
"""Bump when the rows made from the same bytes change (normalisation, schema): invalidates caches."""
STREAM_CHECK_AFTER = 50
"""Streaming judges the bad share only after this many train samples (unless it is already certain)."""
FALLBACK_CANDIDATES = 16
"""Streaming keeps this many lowest-score groups as candidates for the at-least-one eval rule."""
EXAMPLE_COUNT = 5


def prepare_data(
    cfg: DataConfig,
    *,
    cache_dir: str | Path | None = None,
    default_prompt: str = DEFAULT_PROMPT,
    sequence_limit: SequenceLimit | None = None,
) -> PreparedData:
    """Open `cfg.dataset_name`, fingerprint it and split it into train and eval.

    `cache_dir`: where the materialised table goes (default: the `datasets` cache,
    `HF_DATASETS_CACHE`). `default_prompt`: prompt of samples whose source gives none.
    `sequence_limit`: the length the model takes (`model.inputs.ModelSequenceLimit.of(model_cfg)`);
    longer samples count as `too_long`, and its identity is part of the fingerprint. None: no check
    (a too-long sample then fails the batch that holds it).
    Raises `TooManyBadSamples` when the unusable share is above `cfg.max_bad_fraction` (streaming:
    when that is already certain at preparation, else during iteration) and `ValueError` for an
    unknown source or one without usable samples.
    """
    cfg = _as_data_config(cfg)
    source = data_source_for(cfg)
    if next(_limited(source, cfg), None) is None:  # cheap: only the first record is listed
        raise _no_usable_samples(source, 0)
    limit_identity = None
    if sequence_limit is not None:
        source = replace(source, records=partial(measured_records, source.records, sequence_limit, default_prompt))
        limit_identity = dict(sequence_limit.identity())
    if cfg.streaming:
        return _prepare_streaming(cfg, source, default_prompt, cache_dir, limit_identity)
    return _prepare_materialised(cfg, source, default_prompt, cache_dir, limit_identity)


def _as_data_config(cfg: Any) -> DataConfig:
    """Accept a full stage config too, keeping only its data fields (the generators carry the config
    along, and training fields have no business there)."""
    if type(cfg) is DataConfig:
        return cfg
    return DataConfig.model_validate(
        {name: getattr(cfg, name) for name in DataConfig.model_fields if hasattr(cfg, name)}
    )


# --- per-sample work shared by both modes -------------------------------------------------------


def _limited(source: Source, cfg: DataConfig) -> Iterator[SourceRecord]:
    """The records in source order, the first `num_samples` of them."""
    return islice(source.records(), cfg.num_samples)


def _check_bad_share(
    bad: int,
    seen: int,
    limit: float,
    reasons: dict[str, int],
    examples: list[tuple[str, str]],
    *,
    total: int,
    partial: bool = False,
) -> None:
    """Raise `TooManyBadSamples` when `bad / seen` is above `limit`, naming the numbers."""
    if seen == 0 or bad / seen <= limit:
        return
    counted = f"{bad} of {seen} samples{' read so far' if partial else ''}"
    where = f" (the source has {total} samples)" if partial else ""
    reason_text = ", ".join(f"{reason}={count}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]))
    example_text = "; ".join(f"{sample_id} ({why})" for sample_id, why in examples[:EXAMPLE_COUNT])
    raise TooManyBadSamples(
        f"{counted} ({bad / seen:.1%}) have an unusable image or record{where}, above "
        f"max_bad_fraction={limit} ({limit:.1%}). Reasons: {reason_text}. Examples: {example_text}",
        bad=bad,
        seen=seen,
        limit=limit,
        examples=tuple(examples[:EXAMPLE_COUNT]),
    )


def _no_usable_samples(source: Source, total: int) -> ValueError:
    if total == 0:
        return ValueError(f"{source.description} has no samples")
    return ValueError(f"{source.description}: none of its {total} samples is usable (all have bad images or records)")


def _hash_content(cfg: DataConfig, source: Source, default_prompt: str) -> str | None:
    """`ContentHash` of every record's bytes; None for sources fingerprinted by their parameters."""
    if source.static_fingerprint is not None:
        return None
    content = ContentHash()
    for record, read in with_reads(source, _limited(source, cfg), _bytes_are_hashed):
        _add_to_hash(content, record, default_prompt, read)
    return content.hexdigest()


def _fingerprint(
    cfg: DataConfig, source: Source, default_prompt: str, content: str | None, limit_identity: dict[str, Any] | None
) -> str:
    """The data fingerprint from the generator parameters or else the content hash."""
    part = dict(source.static_fingerprint) if source.static_fingerprint is not None else content or ""
    return data_fingerprint(cfg, source.kind, default_prompt, part, sequence_limit=limit_identity)


def _bytes_are_hashed(record: SourceRecord) -> bool:
    """Whether the fingerprint needs the record's image (not for records with a `content_key`)."""
    return record.content_key is None


def _add_to_hash(content: ContentHash, record: SourceRecord, default_prompt: str, read: Read) -> None:
    if record.content_key is not None:
        digest = f"key:{record.content_key}"
    elif isinstance(read, SampleProblem):
        digest = problem_marker(read.reason)
    else:
        assert read is not None, "records without a content_key are hashed by their bytes"
        digest = image_digest(read)
    content.add(record, record.prompt or default_prompt, digest)


# --- cached row tables (both modes) --------------------------------------------------------------


def _generate_rows(
    source: Source, cfg: DataConfig, default_prompt: str, only_eval: bool, expected_content: str | None
) -> Iterator[dict[str, Any]]:
    """Every record (or every eval-split record) as a row, bad ones included, so that the bad-sample
    counts are cached together with the data.

    `expected_content`: the content hash the cache key was made from; the rows are hashed again on
    the way and a mismatch (files edited meanwhile) fails the generation rather than caching new
    rows under the old key.
    """
    content = ContentHash()

    def maybe_eval(record: SourceRecord) -> bool:
        return needs_read_for_side(record) or is_eval(split_score(record.group), cfg.eval_fraction)

    for record, read in with_reads(source, _limited(source, cfg), maybe_eval if only_eval else None):
        if only_eval and (read is None or not is_eval(split_score(split_group(record, read)), cfg.eval_fraction)):
            continue
        if expected_content is not None:
            _add_to_hash(content, record, default_prompt, read)
        yield make_row(record, default_prompt, read)
    if expected_content is not None and content.hexdigest() != expected_content:
        raise RuntimeError(f"{source.description} changed while it was being prepared; run the preparation again")


def _row_table(
    source: Source,
    cfg: DataConfig,
    default_prompt: str,
    fingerprint: str,
    cache_dir: str | Path | None,
    *,
    only_eval: bool,
    expected_content: str | None = None,
) -> Dataset:
    """The rows as a memory-mapped Arrow table in the `datasets` cache, keyed by the fingerprint."""
    return Dataset.from_generator(
        _generate_rows,
        features=ROW_FEATURES,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        gen_kwargs={
            "source": source,
            "cfg": cfg,
            "default_prompt": default_prompt,
            "only_eval": only_eval,
            "expected_content": expected_content,
        },
        # Our own key instead of datasets hashing the generator: it covers the content (the
        # generator's hash would not notice edited files) and costs nothing.
        fingerprint=cache_key(fingerprint, ROWS_VERSION, "eval" if only_eval else "all"),
    )


@dataclass(frozen=True)
class _Bookkeeping:
    """The per-row facts of a row table, read from its Arrow columns (no image is decoded)."""

    good: np.ndarray
    scores: np.ndarray
    reasons: dict[str, int]
    examples: list[tuple[str, str]]

    @property
    def bad(self) -> int:
        return int((~self.good).sum())


def _bookkeeping(table: Dataset) -> _Bookkeeping:
    reason_column = table.data.column("bad_reason")
    good = pc.is_null(reason_column).to_numpy(zero_copy_only=False)
    reasons = {
        str(item["values"]): int(item["counts"]) for item in reason_column.drop_null().value_counts().to_pylist()
    }
    columns = table.select_columns(["id", "bad_reason", "bad_detail"])
    examples = [example_of(columns[int(index)]) for index in np.flatnonzero(~good)[:EXAMPLE_COUNT]]
    return _Bookkeeping(
        good=good, scores=table.data.column("split_score").to_numpy(), reasons=reasons, examples=examples
    )


def _samples(table: Dataset, mask: np.ndarray) -> Dataset:
    """The masked rows with only the sample columns: an index view, nothing copied."""
    return table.select_columns(list(SAMPLE_COLUMNS)).select(np.flatnonzero(mask))


# --- materialised -------------------------------------------------------------------------------


def _prepare_materialised(
    cfg: DataConfig,
    source: Source,
    default_prompt: str,
    cache_dir: str | Path | None,
    limit_identity: dict[str, Any] | None,
) -> PreparedData:
    content = _hash_content(cfg, source, default_prompt)
    fingerprint = _fingerprint(cfg, source, default_prompt, content, limit_identity)
    table = _row_table(source, cfg, default_prompt, fingerprint, cache_dir, only_eval=False, expected_content=content)
    books = _bookkeeping(table)
    total = len(table)
    _check_bad_share(books.bad, total, cfg.max_bad_fraction, books.reasons, books.examples, total=total)
    if not books.good.any():
        raise _no_usable_samples(source, total)

    eval_mask = _eval_mask(books.good, books.scores, cfg.eval_fraction)
    eval_split = _samples(table, eval_mask)
    train_split = _samples(table, books.good & ~eval_mask)
    stats = DataStats(
        total=total,
        train=len(train_split),
        eval=len(eval_split),
        bad=books.bad,
        bad_reasons=books.reasons,
        bad_examples=books.examples,
    )
    return PreparedData(
        train=train_split, eval=eval_split, fingerprint=fingerprint, stats=stats, source=source.description
    )


def _eval_mask(good: np.ndarray, scores: np.ndarray, eval_fraction: float) -> np.ndarray:
    """Usable samples scoring below the fraction; if none, the usable group with the lowest score."""
    mask = good & (scores < eval_fraction)
    if not mask.any() and good.any():
        mask = good & (scores == scores[good].min())
    return mask


# --- streaming ----------------------------------------------------------------------------------


class _StreamProgress:
    """Live counters shared by the prepared `DataStats` and every iteration of the train stream.

    Each iteration (epoch) counts for itself; the stats show the one that got furthest. Copies
    made inside `datasets` must keep updating the same stats, hence `__deepcopy__`. (A DataLoader
    worker process gets its own pickled copy: its counts stay in the worker.)
    """

    def __init__(self, stats: DataStats, eval_records: int, limit: float) -> None:
        self.stats = stats
        self.eval_records = eval_records
        self.eval_bad = Counter(stats.bad_reasons)
        self.eval_examples = list(stats.bad_examples)
        self.limit = limit
        self.best_seen = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> _StreamProgress:
        return self


class _StreamRun:
    """Counts of one pass over the train stream; fails it once the bad share is over the limit."""

    def __init__(self, progress: _StreamProgress, share: float = 1.0) -> None:
        self.progress = progress
        self.share = share  # this pass reads 1/count of the records (a shard): weigh eval's counts alike
        self.seen = 0
        self.good = 0
        self.bad: Counter[str] = Counter()
        self.examples: list[tuple[str, str]] = []

    def record(self, row: dict[str, Any]) -> None:
        self.seen += 1
        if row["bad_reason"] is None:
            self.good += 1
        else:
            self.bad[row["bad_reason"]] += 1
            if len(self.examples) < EXAMPLE_COUNT:
                self.examples.append(example_of(row))
        self._publish(final=False)
        bad = self.progress.eval_bad.total() * self.share + self.bad.total()
        certain = bad > self.progress.limit * self.progress.stats.total * self.share  # over the limit whatever follows
        if self.seen >= STREAM_CHECK_AFTER or certain:
            self._check()

    def finish(self) -> None:
        self._publish(final=True)
        self._check()

    def _check(self) -> None:
        progress = self.progress
        _check_bad_share(
            round(progress.eval_bad.total() * self.share) + self.bad.total(),
            round(progress.eval_records * self.share) + self.seen,
            progress.limit,
            dict(progress.eval_bad + self.bad),
            progress.eval_examples + self.examples,
            total=progress.stats.total,
            partial=True,
        )

    def _publish(self, final: bool) -> None:
        progress, stats = self.progress, self.progress.stats
        if self.seen < progress.best_seen:
            return
        progress.best_seen = self.seen
        stats.train = self.good
        stats.bad = progress.eval_bad.total() + self.bad.total()
        stats.bad_reasons = dict(progress.eval_bad + self.bad)
        stats.bad_examples = (progress.eval_examples + self.examples)[:EXAMPLE_COUNT]
        stats.complete = stats.complete or final


def _stream_train(
    source: Source,
    cfg: DataConfig,
    default_prompt: str,
    forced_score: float | None,
    progress: _StreamProgress,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[dict[str, Any]]:
    """The train samples in source order, images read and checked as they come.

    `shard` (index, count): only the records at positions index, index + count, ... (of the first
    `num_samples`) are measured and read, so `count` readers (DataLoader workers x processes) that
    take one index each read every record exactly once.
    """
    index, count = shard
    run = _StreamRun(progress, share=1.0 / count)

    def is_train(score: float) -> bool:
        return not (is_eval(score, cfg.eval_fraction) or score == forced_score)

    def maybe_train(record: SourceRecord) -> bool:
        return needs_read_for_side(record) or is_train(split_score(record.group))

    for record, read in with_reads(source, shard_records(source, cfg.num_samples, index, count), maybe_train):
        if read is None or not is_train(split_score(split_group(record, read))):
            continue
        row = make_row(record, default_prompt, read)
        run.record(row)
        if row["bad_reason"] is None:
            yield sample_of(row)
    run.finish()


@dataclass
class _StreamScan:
    """What the first pass over a streamed source learns without decoding any image."""

    total: int = 0
    eval_records: int = 0
    content: ContentHash = field(default_factory=ContentHash)
    train_unreadable: Counter[str] = field(default_factory=Counter)
    """Train records whose bytes could not be read: certainly bad (a lower bound)."""
    train_examples: list[tuple[str, str]] = field(default_factory=list)
    candidates: list[float] = field(default_factory=list)
    """Max-heap (negated) of the lowest split scores of readable train records."""

    def add_candidate(self, score: float) -> None:
        if -score in self.candidates:
            return
        if len(self.candidates) < FALLBACK_CANDIDATES:
            heapq.heappush(self.candidates, -score)
        elif score < -self.candidates[0]:
            heapq.heapreplace(self.candidates, -score)


def _scan_stream(cfg: DataConfig, source: Source, default_prompt: str) -> _StreamScan:
    """Count the records and hash their bytes (unless the source has a static fingerprint)."""
    hashing = source.static_fingerprint is None
    scan = _StreamScan()

    # Records with a content_key are not read here (URL lists: no download before training);
    # a record that is bad by itself still counts as certainly bad.
    def wanted(record: SourceRecord) -> bool:
        return (hashing and _bytes_are_hashed(record)) or needs_read_for_side(record)

    for record, read in with_reads(source, _limited(source, cfg), wanted):
        scan.total += 1
        if read is None and record.problem is not None:
            read = read_or_problem(record)
        score = split_score(split_group(record, read))
        if hashing:
            _add_to_hash(scan.content, record, default_prompt, read)
        if is_eval(score, cfg.eval_fraction):
            scan.eval_records += 1  # the eval table accounts for its bad ones
            continue
        if isinstance(read, SampleProblem):
            scan.train_unreadable[read.reason] += 1
            if len(scan.train_examples) < EXAMPLE_COUNT:
                scan.train_examples.append(
                    example_of({"id": record.id, "bad_reason": read.reason, "bad_detail": read.detail})
                )
        else:
            scan.add_candidate(score)
    return scan


def _hold_out_lowest(
    cfg: DataConfig, source: Source, default_prompt: str, candidates: list[float]
) -> tuple[float, list[dict[str, Any]]] | None:
    """The at-least-one rule for streaming: the lowest-score group with a usable sample, and its rows."""
    for score in sorted(-negated for negated in candidates):

        def maybe_this_group(record: SourceRecord, score: float = score) -> bool:
            return needs_read_for_side(record) or split_score(record.group) == score

        rows = [
            make_row(record, default_prompt, read)
            for record, read in with_reads(source, _limited(source, cfg), maybe_this_group)
            if read is not None and split_score(split_group(record, read)) == score
        ]
        if any(row["bad_reason"] is None for row in rows):
            return score, rows
    return None


def _prepare_streaming(
    cfg: DataConfig,
    source: Source,
    default_prompt: str,
    cache_dir: str | Path | None,
    limit_identity: dict[str, Any] | None,
) -> PreparedData:
    scan = _scan_stream(cfg, source, default_prompt)
    fingerprint = _fingerprint(cfg, source, default_prompt, scan.content.hexdigest(), limit_identity)
    table = (
        _row_table(source, cfg, default_prompt, fingerprint, cache_dir, only_eval=True)
        if scan.eval_records
        else Dataset.from_dict(
            {column: [] for column in ROW_FEATURES}, features=ROW_FEATURES
        )  # datasets refuses 0-row generators
    )
    books = _bookkeeping(table)
    eval_records, eval_reasons, eval_examples = len(table), Counter(books.reasons), list(books.examples)

    # Bad samples already known (every eval one, unreadable train files) are a lower bound:
    # fail now rather than mid-training when they alone exceed the limit.
    known_bad = eval_reasons + scan.train_unreadable
    if known_bad.total() > cfg.max_bad_fraction * scan.total:
        examples = eval_examples + scan.train_examples
        _check_bad_share(
            known_bad.total(), scan.total, cfg.max_bad_fraction, dict(known_bad), examples, total=scan.total
        )

    forced_score = None
    if books.good.any():
        eval_split = _samples(table, books.good)
    else:
        held_out = _hold_out_lowest(cfg, source, default_prompt, scan.candidates)
        if held_out is None:
            raise ValueError(
                f"{source.description}: no usable sample for the eval split among the {scan.total} samples "
                f"(every eval candidate has a bad image or record)"
            )
        forced_score, rows = held_out
        # Tiny by construction (one split group), so an in-memory table is fine here.
        eval_split = Dataset.from_list(
            [sample_of(row) for row in rows if row["bad_reason"] is None], features=SAMPLE_FEATURES
        )
        eval_records += len(rows)
        for row in rows:
            if row["bad_reason"] is not None:
                eval_reasons[row["bad_reason"]] += 1
                eval_examples.append(example_of(row))

    stats = DataStats(
        total=scan.total,
        train=0,
        eval=len(eval_split),
        bad=eval_reasons.total(),
        bad_reasons=dict(eval_reasons),
        bad_examples=eval_examples[:EXAMPLE_COUNT],
        complete=False,
    )
    progress = _StreamProgress(stats, eval_records, cfg.max_bad_fraction)
    stream_kwargs = {
        "source": source,
        "cfg": cfg,
        "default_prompt": default_prompt,
        "forced_score": forced_score,
        "progress": progress,
    }
    train = IterableDataset.from_generator(_stream_train, features=SAMPLE_FEATURES, gen_kwargs=stream_kwargs)
    return PreparedData(
        train=train,
        eval=eval_split,
        fingerprint=fingerprint,
        stats=stats,
        source=source.description,
        train_shard=partial(_train_shard, **stream_kwargs),
    )


def _train_shard(index: int, count: int, **stream_kwargs: Any) -> Iterator[dict[str, Any]]:
    """`PreparedData.train_shard`: the train samples of one shard, images decoded (PIL RGB)."""
    for sample in _stream_train(**stream_kwargs, shard=(index, count)):
        yield SAMPLE_FEATURES.decode_example(sample)
