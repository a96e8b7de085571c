"""Stage evaluation: held-out loss, a task metric and a few sample generations.

`evaluate_loss` is also what the trainer evaluates with during a stage.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from theworld_core.model.inputs import answer_positions
from theworld_core.model.precision import apply_precision
from theworld_core.records import eval_request

if TYPE_CHECKING:
    from theworld_core.config import StageConfig
    from theworld_core.model.precision import PrecisionPolicy
    from theworld_core.model.theworld import TheWorld

_WORD = re.compile(r"[a-z0-9]+")


@torch.no_grad()
def evaluate_loss(model: TheWorld, rows, batch_size: int, device, precision: PrecisionPolicy | None = None) -> float:
    """Mean answer-token loss of `model` over `rows` (dicts with image, prompt, text): the sum of every
    answer token's loss over the count of answer tokens, the estimator training optimises and logs.
    `precision`: its autocast runs around the forward passes (None: as the model is)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.long, device=device)
    autocast = precision.autocast_context if precision is not None else contextlib.nullcontext
    for batch_rows in _chunks(rows, batch_size):
        batch = model.builder.collate([model.builder.encode(r["image"], r["prompt"], r["text"]) for r in batch_rows])
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            _, loss_sum = model(**batch, loss_reduction="sum")
        total += loss_sum.double()
        tokens += answer_positions(batch["labels"]).sum()
    model.train(was_training)
    return float(total) / max(int(tokens), 1)  # one read-back for the whole evaluation


def _chunks(rows: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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


def evaluate_model(
    model,
    eval_rows,
    *,
    batch_size: int,
    loss_samples: int | None,
    task_samples: int,
    generations: int,
    max_new_tokens: int = 32,
    device="cpu",
    precision: PrecisionPolicy | None = None,
    loss: float | None = None,
) -> EvalReport:
    """Evaluate a loaded TheWorld (on `device`, in `precision`) on held-out rows (dicts with id, image,
    prompt, text); the task metric's answers are generated `batch_size` at a time. `loss`: the
    held-out loss when the caller already has it for these weights, rows and precision."""
    count = len(eval_rows)
    if loss is None:
        loss_rows = eval_rows.select(range(min(count, loss_samples))) if loss_samples else eval_rows
        loss = evaluate_loss(model, loss_rows, batch_size, device, precision=precision)
    autocast = precision.autocast_context if precision is not None else contextlib.nullcontext
    task_rows = eval_rows.select(range(min(count, task_samples)))
    scores, exact, samples = [], 0, []
    for rows in _chunks(task_rows, batch_size):
        with autocast():
            answers = model.generate_batch(
                [r["image"] for r in rows], [r["prompt"] for r in rows], max_new_tokens=max_new_tokens
            )
        for row, generated in zip(rows, answers):
            scores.append(word_f1(generated, row["text"]))
            exact += " ".join(_WORD.findall(generated.lower())) == " ".join(_WORD.findall(row["text"].lower()))
            if len(samples) < generations:
                samples.append(
                    {"id": row["id"], "prompt": row["prompt"], "reference": row["text"], "generated": generated}
                )
    n = max(len(scores), 1)
    return EvalReport(
        eval_loss=loss, task_accuracy=sum(scores) / n if scores else math.nan, exact_match=exact / n, samples=samples
    )


def post_stage_evaluation(
    model: TheWorld,
    eval_rows,
    cfg: StageConfig,
    precision: PrecisionPolicy,
    *,
    task_samples: int,
    generations: int,
    loss: float | None = None,
) -> dict:
    """The pipeline's evaluation of a finished stage: `evaluate_model` on the stage's held-out split with
    every component in the compute dtype (`apply_precision` with nothing trainable: how the stage
    output loads for inference), in eval mode. `model` is a stage output loaded for it, or the
    trainer's own model once its final weights are saved (the same weights: the trained components'
    are what the stage output holds). `loss`: `evaluate_model`'s. Returns the request, the report
    and its seconds, as plain values (`StageResult.evaluation`)."""
    started = time.perf_counter()
    apply_precision(model, precision, trainable=())
    model.eval()
    report = evaluate_model(
        model,
        eval_rows,
        batch_size=cfg.batch_size,
        loss_samples=cfg.eval_max_samples,
        task_samples=task_samples,
        generations=generations,
        device=next(model.parameters()).device,
        precision=precision,
        loss=loss,
    )
    return {
        "request": eval_request(task_samples, generations),
        "report": report.to_dict(),
        "seconds": time.perf_counter() - started,
    }


def reusable_loss(eval_history: list[list[float]], step: int, precision: PrecisionPolicy) -> float | None:
    """The training loop's held-out loss at `step` when it is the post-stage one: in fp32 the cast for
    inference changes nothing, so the same rows on the same weights give the same loss."""
    if precision.compute_dtype == torch.float32 and eval_history and eval_history[-1][0] == step:
        return eval_history[-1][1]
    return None
