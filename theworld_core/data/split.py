"""The train/eval split: a pure function of each sample's split group.

The group is the sample's content wherever the source can say it cheaply, so that a duplicate can
never land on the other side:
- local files and hub images: the sha256 of the image bytes (`content_group`), so byte-identical
  copies under other names, one file reached by two paths (`sub/../a.png`, `a.png`) and the several
  captions of one image all share a side; a file that cannot be read falls back to its normalised path;
- synthetic shapes: what is drawn (shape, colour, background, cell), which fixes pixels and caption;
- URL lists: the URL (the bytes are unknown before the download, and the split must not need it).

A sample is held out for evaluation when `split_score(group) < eval_fraction`. Because the score
depends on nothing but the group string, the split never overlaps, does not move when samples are
added, removed or reordered, and can be decided one sample at a time (streaming). Raising
`eval_fraction` only moves samples from train to eval, never the other way.
"""

from __future__ import annotations

import hashlib

SPLIT_VERSION = 2
"""Bump when the scoring or the groups change: every split moves, so it is part of the fingerprint.
2: groups by content (image bytes / what is drawn) instead of by id or path as written."""


def split_score(group: str) -> float:
    """Uniform position in [0, 1) derived from sha256 of the group string."""
    digest = hashlib.sha256(f"theworld-split-v{SPLIT_VERSION}\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def content_group(image: bytes) -> str:
    """The split group of a sample grouped by content: the sha256 of its image bytes."""
    return f"sha256:{hashlib.sha256(image).hexdigest()}"


def is_eval(score: float, eval_fraction: float) -> bool:
    """Whether a sample with this score belongs to the eval split (before the at-least-one rule)."""
    return score < eval_fraction
