"""The train/eval split: a pure function of each sample's split group (its id or image path).

A sample is held out for evaluation when `split_score(group) < eval_fraction`. Because the score
depends on nothing but the group string, the split never overlaps, does not move when samples are
added, removed or reordered, and can be decided one sample at a time (streaming). Raising
`eval_fraction` only moves samples from train to eval, never the other way.
"""

from __future__ import annotations

import hashlib

SPLIT_VERSION = 1
"""Bump when the scoring changes: every split moves, so it is part of the fingerprint."""


def split_score(group: str) -> float:
    """Uniform position in [0, 1) derived from sha256 of the group string."""
    digest = hashlib.sha256(f"theworld-split-v{SPLIT_VERSION}\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_eval(score: float, eval_fraction: float) -> bool:
    """Whether a sample with this score belongs to the eval split (before the at-least-one rule)."""
    return score < eval_fraction
