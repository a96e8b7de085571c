"""Stage evaluation: held-out loss, a task metric and a few sample generations.

`evaluate_loss` is also what the trainer evaluates with during a stage.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from theworld_core.model.theworld import TheWorld

_WORD = re.compile(r"[a-z0-9]+")


@torch.no_grad()
def evaluate_loss(model: TheWorld, rows, batch_size: int, device) -> float:
    """Token-weighted mean answer loss of `model` over `rows` (dicts with image, prompt, text)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    batch_rows: list[dict] = []

    def flush():
        nonlocal total, tokens
        batch = model.builder.collate([model.builder.encode(r["image"], r["prompt"], r["text"]) for r in batch_rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        _, loss = model(**batch)
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(loss) * n
        tokens += n

    for row in rows:
        batch_rows.append(row)
        if len(batch_rows) == batch_size:
            flush()
            batch_rows = []
    if batch_rows:
        flush()
    model.train(was_training)
    return total / max(tokens, 1)


def word_f1(generated: str, reference: str) -> float:
    """Bag-of-words F1 of a generated caption against the reference (1.0 = same words)."""
    got, want = Counter(_WORD.findall(generated.lower())), Counter(_WORD.findall(reference.lower()))
    overlap = sum((got & want).values())
    if not got or not want or not overlap:
        return float(not got and not want)
    precision, recall = overlap / sum(got.values()), overlap / sum(want.values())
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class EvalReport:
    eval_loss: float
    """Token-weighted mean answer loss on the held-out split (the first `loss_samples` of it)."""
    task_accuracy: float
    """Mean word-level F1 of greedy answers against the references on `task_samples` held-out samples."""
    exact_match: float
    """Share of those answers equal to the reference (case and spacing ignored)."""
    samples: list[dict[str, str]] = field(default_factory=list)
    """A few generations: id, prompt, reference, generated."""

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_model(model, eval_rows, *, batch_size: int, loss_samples: int | None, task_samples: int,
                   generations: int, max_new_tokens: int = 32, device="cpu") -> EvalReport:
    """Evaluate a loaded TheWorld on held-out rows (dicts with id, image, prompt, text)."""
    count = len(eval_rows)
    loss_rows = eval_rows.select(range(min(count, loss_samples))) if loss_samples else eval_rows
    loss = evaluate_loss(model, loss_rows, batch_size, device)
    scores, exact, samples = [], 0, []
    for index in range(min(count, task_samples)):
        row = eval_rows[index]
        generated = model.generate(row["image"], row["prompt"], max_new_tokens=max_new_tokens)
        scores.append(word_f1(generated, row["text"]))
        exact += " ".join(_WORD.findall(generated.lower())) == " ".join(_WORD.findall(row["text"].lower()))
        if len(samples) < generations:
            samples.append({"id": row["id"], "prompt": row["prompt"], "reference": row["text"], "generated": generated})
    n = max(len(scores), 1)
    return EvalReport(
        eval_loss=loss,
        task_accuracy=sum(scores) / n if scores else math.nan,
        exact_match=exact / n,
        samples=samples,
    )
