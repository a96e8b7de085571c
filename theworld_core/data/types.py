"""The shapes every part of the data package shares: records, sources, results, errors, schema."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from datasets import Dataset, Features, Image, IterableDataset, Value

DEFAULT_PROMPT = "Describe this image."
"""Prompt of samples whose source gives none."""

SAMPLE_COLUMNS = ("id", "image", "prompt", "text")
"""Columns of every prepared sample, in this order."""

SAMPLE_FEATURES = Features(
    {
        "id": Value("string"),
        # mode="RGB": whatever the stored bytes are, decoding hands out RGB (the rows are normalised
        # to RGB already; this is the safety net for anyone writing rows by another path).
        "image": Image(mode="RGB"),
        "prompt": Value("string"),
        "text": Value("string"),
    }
)

ROW_FEATURES = Features(
    {
        **SAMPLE_FEATURES,
        # Bad samples stay in the cached table (image null) so that the counts survive a cache hit.
        "bad_reason": Value("string"),
        "bad_detail": Value("string"),
        # Position of the sample's split group in [0, 1); eval iff below eval_fraction (see split.py).
        "split_score": Value("float64"),
    }
)
"""Internal schema of the materialised table: the sample columns plus bookkeeping."""


class SampleProblem(Exception):
    """Why one sample cannot be used; caught per sample and counted, never allowed to end a run."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TooManyBadSamples(ValueError):
    """The share of unusable samples is above `max_bad_fraction`.

    Constructible from the message alone so that it survives being re-raised across processes
    (DataLoader workers rebuild exceptions from their message).
    """

    def __init__(
        self,
        message: str,
        *,
        bad: int | None = None,
        seen: int | None = None,
        limit: float | None = None,
        examples: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message)
        self.bad = bad
        self.seen = seen
        self.limit = limit
        self.examples = examples


@dataclass(frozen=True)
class SourceRecord:
    """One sample as a source lists it, before its image is read.

    Cheap to produce: splitting and fingerprinting look at records, and only the samples that are
    needed get their image loaded.
    """

    id: str
    """Stable identity of the sample (a relative path, an `id` column, `synthetic-{seed}-{index}`)."""
    group: str
    """Split key: samples with the same group land on the same side (see split.py). With
    `group_by_content` only the fallback for a record whose image cannot be read."""
    text: str | None
    prompt: str | None
    """None: the default prompt."""
    load: Callable[[], bytes] | None
    """Returns the encoded image; raises OSError when it cannot be read."""
    problem: str | None = None
    """Set when the record itself is unusable (malformed row, no caption): the bad reason."""
    detail: str = ""
    content_key: str | None = None
    """When set (URL lists: the URL), the fingerprint hashes this instead of the image bytes, so
    fingerprinting needs no download and only the samples a pass uses get their image fetched."""
    group_by_content: bool = False
    """The split group is the sha256 of the image bytes (`split.content_group`): duplicates under
    other names or paths share a side. The image is read before the record's side is known."""
    where: str = ""
    """Where the record is written (`metadata.jsonl:12`, `owner/name:3`), for messages."""


class SequenceLimit(Protocol):
    """How long a sample may be for the model that trains on it (its `max_seq_length` in its own
    tokens). Given to `prepare_data`, every sample is measured at preparation and one that does not
    fit becomes a bad sample `too_long` instead of failing the stage at its first batch.

    Must be picklable (streaming ships it to DataLoader workers); the model package provides one
    (`theworld_core.model.inputs.ModelSequenceLimit`), so the data package stays model-free.
    """

    def problem(self, prompt: str, text: str) -> str | None:
        """None when (image, prompt, text) fits; else why not, with the numbers (the `too_long` detail)."""
        ...

    def identity(self) -> Mapping[str, Any]:
        """What decides which samples fit (tokenizer, limit, fixed tokens): part of the fingerprint."""
        ...


@dataclass(frozen=True)
class Source:
    """An opened data source: what it is and how to list its records.

    `records` must be picklable (module-level functions / partials): streaming datasets ship it to
    DataLoader workers.
    """

    kind: str
    """Short name used in fingerprints and messages: `synthetic`, `imagefolder`, `jsonl`, `csv`."""
    description: str
    records: Callable[[], Iterator[SourceRecord]]
    """A fresh iterator over all records in source order."""
    static_fingerprint: Mapping[str, Any] | None = None
    """When the content is a pure function of these parameters (a generator), the fingerprint
    hashes them instead of reading every image; None: hash the content."""
    read_concurrency: int = 1
    """How many `load` calls may run at once: above 1 (network sources), `prepare_data` reads ahead
    on a thread pool in a bounded window of `2 x read_concurrency` records, in source order."""
    read_timeout_s: float | None = None
    """Longest wait for one read-ahead `load` before its sample counts as `timeout` (a safety net
    over the loader's own deadlines, e.g. for a hanging DNS lookup); None: no limit."""


@dataclass
class DataStats:
    """Sample counts of a preparation. For streaming, `train` and part of `bad` grow while the
    train stream is read (the furthest iteration so far); `complete` says they are final."""

    total: int
    """Samples considered (after `num_samples`): train + eval + bad."""
    train: int
    eval: int
    bad: int
    bad_reasons: dict[str, int] = field(default_factory=dict)
    bad_examples: list[tuple[str, str]] = field(default_factory=list)
    """A few (id, reason) pairs of bad samples, for messages and tracking."""
    complete: bool = True

    @property
    def bad_fraction(self) -> float:
        seen = self.train + self.eval + self.bad
        return self.bad / seen if seen else 0.0


@dataclass(frozen=True)
class PreparedData:
    """What `prepare_data` hands to training: the two splits, their identity and their counts."""

    train: Dataset | IterableDataset
    eval: Dataset
    fingerprint: str
    """Hex sha256 of the data (see fingerprint.py); changes iff the prepared samples change."""
    stats: DataStats
    source: str
    """Human-readable description of where the samples came from."""
    train_shard: Callable[[int, int], Iterator[dict[str, Any]]] | None = None
    """Streaming only: `train_shard(index, count)` gives the train samples (images decoded) of the
    records at positions index, index + count, ...; `count` readers taking one index each read every
    record once (what `data.loading.ShardedStream` hands DataLoader workers and processes). Picklable."""
