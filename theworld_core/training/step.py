"""One optimizer step of a stage, as the trainer takes it and bench/bench_gpu_stages.py times it.

Each micro-batch backpropagates its *summed* answer-token loss (`micro_batch`); at the step the
gradients become those of the mean over every answer token of the whole step, all micro-batches
and all ranks, so every token weighs the same however the step is split; then a NaN/inf loss on
any rank, or a gradient norm over the limit, stops the stage on every rank before the update
(`gradients_ready`), and the optimizer and schedule step (`apply`). Nothing is read back to the
host per micro-batch: token counts and the non-finite check stay on the device until the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from theworld_core.model.inputs import answer_positions
from theworld_core.model.stage_output import full_tensor
from theworld_core.training.sharding import local

if TYPE_CHECKING:
    from accelerate import Accelerator

LossHook = Callable[[int, torch.Tensor], torch.Tensor]
"""(optimizer step about to be taken, loss) -> the loss to backpropagate (fault rehearsals, tests)."""


def injected_fault(fault: str | None, at_step: int | None) -> LossHook | None:
    """The loss hook behind the stage keys `inject_fault` / `inject_fault_step` (fault rehearsals): a
    NaN loss (`nan_loss`) or an out-of-memory error (`oom`) at that optimizer step; None without a fault."""
    if not fault:
        return None

    def hook(step: int, loss: torch.Tensor) -> torch.Tensor:
        if step != at_step:
            return loss
        if fault == "oom":
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by inject_fault at step {step})")
        return loss * float("nan")

    return hook


class StopStage(Exception):
    """Ends a stage's loop early with a status (diverged, oom, plateaued) and its evidence."""

    def __init__(self, status: str, reason: str, evidence: dict[str, Any] | None = None):
        super().__init__(reason)
        self.status, self.reason, self.evidence = status, reason, evidence or {}


class OptimizerStep:
    """The step's mechanics over a model and optimizer already passed through `accelerator.prepare`
    (or sharded); `step` numbers are the optimizer step about to be taken (1-based)."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        *,
        max_grad_norm: float,
        divergence_grad_norm: float | None = None,
        loss_hook: LossHook | None = None,
        batch_size: int | None = None,
    ):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.max_grad_norm, self.divergence_grad_norm = max_grad_norm, divergence_grad_norm
        self.loss_hook = loss_hook
        self.batch_size = batch_size  # named in an out-of-memory stop
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.last_train_loss: float | None = None  # named in a divergence stop (the caller keeps it current)
        self._tokens: torch.Tensor | None = None  # answer tokens of this rank's micro-batches since the last step
        self._nonfinite: torch.Tensor | None = None  # count of non-finite micro-batch losses this step
        self._bad_loss: torch.Tensor | None = None  # the first of them

    def micro_batch(self, batch: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch (inside `accelerator.accumulate`); returns (its
        summed answer-token loss, its answer tokens), both detached on the device."""
        acc = self.accelerator
        try:
            with acc.accumulate(self.model):
                tokens = answer_positions(batch["labels"]).sum()
                self._tokens = tokens if self._tokens is None else self._tokens + tokens
                _, loss = self.model(**batch, loss_reduction="sum")
                if self.loss_hook is not None:
                    loss = self.loss_hook(step, loss)
                self._note_nonfinite(loss.detach() / tokens.clamp(min=1))
                # Backward even on a bad loss: every rank must join the gradient all-reduce; the stage
                # stops at the optimizer step, on every rank at once.
                acc.backward(loss)
        except torch.OutOfMemoryError as exc:
            raise StopStage(
                "oom",
                f"out of memory at step {step} with batch_size {self.batch_size}",
                {"step": step, "batch_size": self.batch_size, "error": str(exc)[:300]},
            ) from None
        return loss.detach(), tokens

    @property
    def sync_gradients(self) -> bool:
        """True after the last micro-batch of an optimizer step."""
        return self.accelerator.sync_gradients

    def gradients_ready(self, step: int) -> float:
        """At the step's end: stop on a non-finite loss (any rank), scale the gradients to the token
        mean, clip them; returns the gradient norm before clipping (stops when it is not finite or
        over `divergence_grad_norm`)."""
        self._stop_if_any_rank_diverged(step)
        self._scale_gradients_to_token_mean()
        grad_norm = float(full_tensor(self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)))
        limit = self.divergence_grad_norm
        if not math.isfinite(grad_norm) or (limit is not None and grad_norm > limit):
            raise StopStage(
                "diverged",
                f"gradient norm {grad_norm:.4g} at step {step} (limit {limit})",
                {"step": step, "grad_norm": grad_norm, "limit": limit},
            )
        return grad_norm

    def apply(self) -> None:
        """The optimizer and schedule step; gradients released."""
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _scale_gradients_to_token_mean(self) -> None:
        """Turn the accumulated gradients into those of (sum of answer-token losses) / (answer tokens
        of the whole step). Each micro-batch backpropagated its summed loss, which `accelerator.backward`
        divided by the accumulation steps, and DDP averaged the ranks' gradients (FSDP too): the
        gradients hold sum / (accumulation x ranks). One all-reduce of a token count per step."""
        acc = self.accelerator
        tokens = acc.reduce(self._tokens, reduction="sum") if acc.num_processes > 1 else self._tokens
        self._tokens = None
        factor = (acc.gradient_accumulation_steps * acc.num_processes) / tokens.clamp(min=1).to(torch.float32)
        grads = [local(p.grad) for p in self.params if p.grad is not None]  # a sharded gradient: its shard
        if grads:
            torch._foreach_mul_(grads, factor.to(grads[0].device))

    def _note_nonfinite(self, loss_per_token: torch.Tensor) -> None:
        """Count a non-finite micro-batch loss on the device (no host read-back per micro-step)."""
        bad = (~torch.isfinite(loss_per_token)).to(torch.float32)
        if self._nonfinite is None:
            self._nonfinite, self._bad_loss = bad, loss_per_token
        else:  # keep the first non-finite value of the step
            self._bad_loss = torch.where(self._nonfinite > 0, self._bad_loss, loss_per_token)
            self._nonfinite = self._nonfinite + bad

    def _stop_if_any_rank_diverged(self, step: int) -> None:
        """A NaN/inf loss on any rank ends the stage on all ranks (before the optimizer step)."""
        mine = self._nonfinite
        if mine is None:
            mine = torch.zeros((), device=self.accelerator.device)
        self._nonfinite = None
        if float(self.accelerator.reduce(mine.reshape(1), reduction="sum")) == 0:
            return
        if float(mine) > 0:
            evidence = {"step": step, "loss": float(self._bad_loss), "last_train_loss": self.last_train_loss}
        else:
            evidence = {"step": step, "loss": "non-finite on another rank"}
        raise StopStage("diverged", f"loss {evidence['loss']} at step {evidence['step']}", evidence)
