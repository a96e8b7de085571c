"""Data fingerprints: how the pipeline notices that new data arrived.

The fingerprint is a sha256 over
- a header: fingerprint version, source kind, `num_samples`, `eval_fraction`, split version, the
  default prompt and the length check when there is one (everything besides the content that
  changes which samples train or eval sees);
- the content: either the generator parameters (synthetic) or, for files, an order-independent
  hash of every sample's (id, text, prompt, sha256 of the image bytes).

Paths, modification times and file order are deliberately absent: a copied or touched dataset
keeps its fingerprint; an added, removed or edited sample (caption or pixels) changes it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from theworld_core.config import DataConfig
from theworld_core.data.split import SPLIT_VERSION
from theworld_core.data.types import SourceRecord

FINGERPRINT_VERSION = 1
_MODULUS = 2**256


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class ContentHash:
    """Order-independent hash of a multiset of samples, in constant memory.

    Each sample's digest is added modulo 2**256: the result does not depend on the order (like
    hashing the sorted list of digests) but needs no list, and unlike XOR a duplicated sample
    still changes it.
    """

    def __init__(self) -> None:
        self._sum = 0
        self.count = 0

    def add(self, record: SourceRecord, prompt: str, image_digest: str) -> None:
        """Fold in one sample; `image_digest` is the bytes' sha256 or a `<reason>` marker."""
        item = [record.id, record.text or "", prompt, image_digest]
        digest = hashlib.sha256(json.dumps(item, ensure_ascii=False).encode()).digest()
        self._sum = (self._sum + int.from_bytes(digest, "big")) % _MODULUS
        self.count += 1

    def hexdigest(self) -> str:
        return f"{self.count}:{self._sum:064x}"


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def problem_marker(reason: str) -> str:
    """Stands in for the image digest of a sample whose image could not be read."""
    return f"<{reason}>"


def data_fingerprint(
    cfg: DataConfig,
    kind: str,
    default_prompt: str,
    content: Mapping[str, Any] | str,
    *,
    sequence_limit: Mapping[str, Any] | None = None,
) -> str:
    """Combine the header with the content part (generator parameters or `ContentHash.hexdigest()`).

    `sequence_limit`: the identity of the length check (`SequenceLimit.identity()`), since it
    decides which samples are usable; None when preparation checks no length."""
    header = {
        "version": FINGERPRINT_VERSION,
        "source": kind,
        "num_samples": cfg.num_samples,
        "eval_fraction": cfg.eval_fraction,
        "split_version": SPLIT_VERSION,
        "default_prompt": default_prompt,
    }
    if sequence_limit is not None:  # absent rather than null: fingerprints without a check stay as they were
        header["sequence_limit"] = dict(sequence_limit)
    return _sha256_json({"header": header, "content": content})


def cache_key(fingerprint: str, rows_version: int, part: str) -> str:
    """Key of a cached row table: the data fingerprint, the version of the row-making code and
    which rows it holds (`all`, `eval`)."""
    return _sha256_json({"fingerprint": fingerprint, "rows_version": rows_version, "part": part})[:32]
