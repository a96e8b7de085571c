"""Stage trainer vs a bare PyTorch loop on the tiny models: s/step, ratio, and the trainer's overhead.

    .venv/bin/python bench/bench_trainer.py      # stage 1 and stage 3, 300 timed steps, 3 repeats

What is compared, per stage (`--stages`, default stage 1 and stage 3 of the seed's freeze flags):

- trainer: `StageTrainer(cfg).run()`, unchanged (a subclass only adds timestamps), with the seed's
  cadence scaled to 300 steps: logging every 10 steps (to MLflow), eval every 100, a resume state
  every 100. With `--lean`, also a trainer run with `do_eval=False` and `save_steps` past the end.
- bare: a plain PyTorch loop doing the same training: the same model (`TheWorld.from_base(
  cfg.model_part())` after the same seed, same freeze via `set_trainable`), the same batches (same
  split, same per-epoch seeded order, same collate through `model.builder`), the same AdamW
  (`build_optimizer`: same parameter groups), LR schedule and gradient clipping, the same number of
  steps; no accelerate, logging, progress bar, eval, checkpoints or MLflow. Both arms train
  identically: the final losses printed must be equal.

Two ways to run the arms (`--mode`):

- `paired` (default): one process runs the trainer and, after each of its steps, one step of the
  bare loop (on its own model copy): the arms alternate step by step, so load from other processes
  (this box is shared) hits both alike, and step i of both arms sees the same batch.
- `sequential`: separate runs, bare then trainer (then lean) in each repeat.

Timing: `--warmup` steps first (the trainer's freeze audit, first allocations), then a window of
`--steps` steps. Setup (model load, data preparation, MLflow run start) and the end of the stage
(final eval, stage output) are outside the window. Eval, save and log calls are timed one by one.
Reported, per stage (median over `--repeats`):

- s/step of each arm (window mean) and the ratio trainer / bare;
- the trainer's overhead excluding the eval itself, as a share of the bare step, three ways:
  `mean` ((trainer window - eval time) / steps over the bare mean), `robust` (10-90 % trimmed mean of
  the step-by-step differences, timed saves and log calls added back) and `CPU` (the same on CPU
  time: main thread per step, plus the trainer's background threads, e.g. MLflow's async logger);
  target < 5 % (robust and CPU);
- saves, logging and eval as shares of the bare step, and each one's cost per call.

Diagnostics: `--ablate` (the lean trainer with the progress bar, then MLflow logging switched off)
and `--breakdown` (the trainer's per-step calls timed one by one against the bare loop's, and the
CPU cost of one MLflow log call) say where the overhead goes.

Threads: `torch.set_num_threads(--threads)` for both arms (default 1; on a 2-core box shared with
other jobs, 2 intra-op threads make steps several times slower and erratic).

Prints a Markdown table and one JSON line (prefixed `JSON `).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import bench_env  # noqa: F401  (first: transformers, datasets and MLflow read its environment at import)
# isort: on

import torch  # noqa: E402

from theworld_core.config import StageConfig  # noqa: E402
from theworld_core.model.components import SEED_STAGES, trainable_components  # noqa: E402
from theworld_core.training.trainer import StageTrainer  # noqa: E402

DEFAULT_STAGES = ("stage1_projection", "stage3_language")
CALL_KINDS = ("eval", "save", "log")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _now() -> tuple[float, float, float]:
    """(wall, process CPU of all threads, CPU of this thread)."""
    _sync()
    return time.perf_counter(), time.process_time(), time.thread_time()


# ------------------------------------------------------------------------------------ bare loop


class BareLoop:
    """The same training as the trainer's, as a plain PyTorch loop, one `step()` at a time."""

    def __init__(self, cfg: StageConfig):
        from accelerate.utils import set_seed

        from theworld_core.data import prepare_data
        from theworld_core.model.theworld import TheWorld
        from theworld_core.training.optim import build_optimizer, build_schedule

        self.cfg = cfg
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        set_seed(cfg.seed)  # as StageTrainer.setup: same seed before data and model, same world-branch init
        self.data = prepare_data(cfg.data_part())
        self.model = TheWorld.from_base(cfg.model_part())
        self.model.set_trainable(trainable_components(cfg.freeze_flags))
        self.model.to(self.device).train()
        self.optimizer, _ = build_optimizer(
            self.model, cfg.learning_rate, cfg.weight_decay, cfg.component_learning_rates
        )
        self.scheduler = build_schedule(cfg.lr_scheduler, self.optimizer, cfg.warmup_steps, cfg.max_steps)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.epoch = 0
        self.batches = self._epoch_batches()
        self.losses: list[float] = []

    def _collate(self, rows):
        builder = self.model.builder
        return builder.collate([builder.encode(r["image"], r["prompt"], r["text"]) for r in rows])

    def _epoch_batches(self):
        from torch.utils.data import DataLoader

        generator = torch.Generator().manual_seed(self.cfg.seed + self.epoch)
        order = torch.randperm(len(self.data.train), generator=generator).tolist()
        return iter(
            DataLoader(self.data.train, batch_size=self.cfg.batch_size, sampler=order, collate_fn=self._collate)
        )

    def step(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.batches = self._epoch_batches()
            batch = next(self.batches)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        _, loss = self.model(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))

    def final_loss(self) -> float:
        """Mean loss of the last complete logging window: what the trainer reports as its train loss."""
        every = self.cfg.logging_steps
        end = len(self.losses) // every * every
        tail = self.losses[end - every : end] or self.losses[-every:]
        return sum(tail) / len(tail)


# ------------------------------------------------------------------------------------ trainer


class TimedTrainer(StageTrainer):
    """The stage trainer, unchanged, plus timestamps; with `paired`, one bare step after each of its steps."""

    def __init__(self, cfg: StageConfig, paired: BareLoop | None = None, progress_bar: bool = True):
        super().__init__(cfg, fresh=True)
        self.paired = paired
        self.progress_bar = progress_bar
        self.end: dict[int, tuple[float, float, float]] = {}  # end of the trainer's step i
        self.resume: dict[int, tuple[float, float, float]] = {}  # trainer takes over again after step i
        self.bare_wall: dict[int, float] = {}
        self.bare_cpu: dict[int, float] = {}
        self.calls: list[tuple[str, float, float, float]] = []  # (kind, start, wall, main-thread CPU)

    def _timed(self, kind: str, fn, *args):
        start = _now()
        try:
            return fn(*args)
        finally:
            stop = _now()
            self.calls.append((kind, start[0], stop[0] - start[0], stop[2] - start[2]))

    def _after_step(self, window, grad_norm: float) -> None:
        super()._after_step(window, grad_norm)
        step = self.state.step
        self.end[step] = _now()
        if self.paired is not None:
            self.paired.step()
            self.resume[step] = _now()
            self.bare_wall[step] = self.resume[step][0] - self.end[step][0]
            self.bare_cpu[step] = self.resume[step][2] - self.end[step][2]
        else:
            self.resume[step] = self.end[step]

    def _train(self):
        if self.progress_bar:
            return super()._train()
        import tqdm.auto  # the trainer imports tqdm from here when its loop starts

        original = tqdm.auto.tqdm
        tqdm.auto.tqdm = lambda *args, **kwargs: original(*args, **{**kwargs, "disable": True})
        try:
            return super()._train()
        finally:
            tqdm.auto.tqdm = original

    def evaluate(self) -> float:
        return self._timed("eval", super().evaluate)

    def _save_resume_state(self) -> None:
        return self._timed("save", super()._save_resume_state)

    def setup(self) -> None:
        super().setup()
        log_metrics = self.logger.log_metrics  # every metrics call of the stage goes through it
        self.logger.log_metrics = lambda metrics, stage_step: self._timed("log", log_metrics, metrics, stage_step)

    def timing(self, warmup: int, steps: int) -> dict:
        """The trainer's figures over steps warmup+1 .. warmup+steps (intervals exclude the bare steps)."""
        lo, hi = warmup, warmup + steps
        wall, cpu = [], []
        totals = {f"{k}_{m}": 0.0 for k in CALL_KINDS for m in ("s", "cpu_s", "calls")}
        for step in range(lo + 1, hi + 1):
            begin, end = self.resume[step - 1], self.end[step]
            inside = [c for c in self.calls if begin[0] < c[1] < end[0]]
            for kind, _, w, c in inside:
                totals[f"{kind}_s"] += w
                totals[f"{kind}_cpu_s"] += c
                totals[f"{kind}_calls"] += 1
            wall.append(end[0] - begin[0] - sum(c[2] for c in inside))
            cpu.append(end[2] - begin[2] - sum(c[3] for c in inside))
        main_total = self.end[hi][2] - self.end[lo][2] - sum(self.bare_cpu.get(s, 0.0) for s in range(lo, hi))
        # CPU of the other threads (MLflow's async logger, tqdm's monitor) over the window.
        background = (self.end[hi][1] - self.end[lo][1]) - (self.end[hi][2] - self.end[lo][2])
        return {
            "s_per_step": (sum(wall) + sum(totals[f"{k}_s"] for k in CALL_KINDS)) / steps,
            "cpu_s_per_step": (main_total + background) / steps,
            "background_cpu_s_per_step": background / steps,
            "wall_steps": wall,
            "cpu_steps": cpu,
            **totals,
        }

    def paired_timing(self, warmup: int, steps: int) -> dict:
        steps_range = range(warmup + 1, warmup + steps + 1)
        wall = [self.bare_wall[s] for s in steps_range]
        cpu = [self.bare_cpu[s] for s in steps_range]
        return {
            "s_per_step": sum(wall) / steps,
            "cpu_s_per_step": sum(cpu) / steps,
            "background_cpu_s_per_step": 0.0,
            "wall_steps": wall,
            "cpu_steps": cpu,
            **{f"{k}_{m}": 0.0 for k in CALL_KINDS for m in ("s", "cpu_s", "calls")},
        }


def run_trainer(cfg: StageConfig, warmup: int, steps: int, paired: bool, progress_bar: bool = True) -> dict[str, dict]:
    """One trainer run; with `paired`, also the bare loop's figures from the steps interleaved with it."""
    bare = BareLoop(cfg) if paired else None
    trainer = TimedTrainer(cfg, paired=bare, progress_bar=progress_bar)
    result = trainer.run()
    if result.status != "completed":
        raise RuntimeError(f"trainer stopped early: {result.status}: {result.reason}")
    out = {"trainer": {**trainer.timing(warmup, steps), "final_loss": result.train_loss}}
    if bare is not None:
        out["bare"] = {**trainer.paired_timing(warmup, steps), "final_loss": bare.final_loss()}
    return out


def run_bare(cfg: StageConfig, warmup: int, steps: int) -> dict:
    """The bare loop alone, for `--mode sequential`."""
    loop = BareLoop(cfg)
    stamps = {0: _now()}
    for step in range(1, cfg.max_steps + 1):
        loop.step()
        stamps[step] = _now()
    lo, hi = warmup, warmup + steps
    wall = [stamps[s][0] - stamps[s - 1][0] for s in range(lo + 1, hi + 1)]
    cpu = [stamps[s][2] - stamps[s - 1][2] for s in range(lo + 1, hi + 1)]
    background = (stamps[hi][1] - stamps[lo][1]) - (stamps[hi][2] - stamps[lo][2])
    return {
        "s_per_step": sum(wall) / steps,
        "cpu_s_per_step": (sum(cpu) + background) / steps,
        "background_cpu_s_per_step": background / steps,
        "wall_steps": wall,
        "cpu_steps": cpu,
        **{f"{k}_{m}": 0.0 for k in CALL_KINDS for m in ("s", "cpu_s", "calls")},
        "final_loss": loop.final_loss(),
    }


# ------------------------------------------------------------------------------------ statistics


def trimmed_mean(values, cut: float = 0.1) -> float:
    """Mean of the values between the `cut` and `1 - cut` quantiles (drops bursts of outside load)."""
    ordered = sorted(values)
    k = int(len(ordered) * cut)
    kept = ordered[k : len(ordered) - k] or ordered
    return sum(kept) / len(kept)


def trimmed_ci95(values, cut: float = 0.1) -> float:
    """Half-width of a 95 % interval for the trimmed mean (winsorised variance, Tukey-McLaughlin)."""
    ordered = sorted(values)
    n, k = len(ordered), int(len(ordered) * cut)
    if n - 2 * k < 2:
        return float("nan")
    winsorised = [min(max(v, ordered[k]), ordered[n - k - 1]) for v in ordered]
    return 1.96 * statistics.stdev(winsorised) / ((1 - 2 * cut) * math.sqrt(n))


def overhead(arm: dict, bare: dict, key: str, extra_s: float) -> tuple[float, float]:
    """(share of the bare step that `arm` adds, its 95 % half-width): trimmed mean of the step-by-step
    differences, plus `extra_s` per step (the timed calls kept out of the intervals)."""
    diffs = [a - b for a, b in zip(arm[key], bare[key])]
    base = trimmed_mean(bare[key])
    return (trimmed_mean(diffs) + extra_s) / base, trimmed_ci95(diffs) / base


def summarise(stage: str, runs: list[dict[str, dict]], steps: int) -> dict:
    """Medians over repeats of per-repeat values (a repeat's arms ran together or back to back)."""
    med = statistics.median
    full = [(r["trainer"], r["bare"]) for r in runs]

    def cpu_extra(t: dict, b: dict, kinds=("save", "log")) -> float:
        return (
            sum(t[f"{k}_cpu_s"] for k in kinds)
            + steps * (t["background_cpu_s_per_step"] - b["background_cpu_s_per_step"])
        ) / steps

    robust = [overhead(t, b, "wall_steps", (t["save_s"] + t["log_s"]) / steps) for t, b in full]
    cpu = [overhead(t, b, "cpu_steps", cpu_extra(t, b)) for t, b in full]
    row = {
        "stage": stage,
        "trains": list(trainable_components(SEED_STAGES[stage])),
        "bare_s_per_step": med(b["s_per_step"] for _, b in full),
        "trainer_s_per_step": med(t["s_per_step"] for t, _ in full),
        "ratio_trainer_vs_bare": med(t["s_per_step"] / b["s_per_step"] for t, b in full),
        "overhead_excl_eval_mean": med((t["s_per_step"] - t["eval_s"] / steps) / b["s_per_step"] - 1 for t, b in full),
        "overhead_excl_eval_robust": med(x for x, _ in robust),
        "overhead_excl_eval_robust_ci95": med(ci for _, ci in robust),
        "overhead_excl_eval_cpu": med(x for x, _ in cpu),
        "overhead_excl_eval_cpu_ci95": med(ci for _, ci in cpu),
        "per_step_loop_robust": med(overhead(t, b, "wall_steps", 0.0)[0] for t, b in full),
        "per_step_loop_cpu": med(overhead(t, b, "cpu_steps", 0.0)[0] for t, b in full),
        "background_cpu_share": med(t["background_cpu_s_per_step"] / trimmed_mean(b["cpu_steps"]) for t, b in full),
        "cpu_s_per_step": {
            "bare": med(b["cpu_s_per_step"] for _, b in full),
            "trainer": med(t["cpu_s_per_step"] for t, _ in full),
        },
        "final_loss": {"bare": med(b["final_loss"] for _, b in full), "trainer": med(t["final_loss"] for t, _ in full)},
        "runs_s_per_step": {
            "bare": [round(b["s_per_step"], 6) for _, b in full],
            "trainer": [round(t["s_per_step"], 6) for t, _ in full],
        },
    }
    for kind in CALL_KINDS:
        row[f"{kind}_share"] = med(t[f"{kind}_s"] / steps / trimmed_mean(b["wall_steps"]) for t, b in full)
        row[f"{kind}_call_s"] = med(t[f"{kind}_s"] / max(1, t[f"{kind}_calls"]) for t, _ in full)
        row[f"{kind}_calls_in_window"] = int(full[0][0][f"{kind}_calls"])
    if all("lean" in r for r in runs):
        lean = [(r["lean"], r["lean_bare"]) for r in runs]
        row["lean_s_per_step"] = med(t["s_per_step"] for t, _ in lean)
        row["lean_overhead_mean"] = med(t["s_per_step"] / b["s_per_step"] - 1 for t, b in lean)
        row["lean_overhead_robust"] = med(overhead(t, b, "wall_steps", t["log_s"] / steps)[0] for t, b in lean)
        row["lean_overhead_cpu"] = med(overhead(t, b, "cpu_steps", cpu_extra(t, b, ("log",)))[0] for t, b in lean)
    row["meets_target"] = max(row["overhead_excl_eval_robust"], row["overhead_excl_eval_cpu"]) < 0.05
    return row


# ------------------------------------------------------------------------------------ per-call breakdown


class _CallClock:
    """Thread-CPU time per step of named calls, in one arm."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}
        self.current: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.thread_time() - start)

        return timed

    def end_step(self, total: float) -> None:
        self.current["other loop bookkeeping"] = total - sum(self.current.values())
        self.current["step total"] = total
        for name, value in self.current.items():
            self.times.setdefault(name, []).append(value)
        self.current = {}


class _BreakdownBare(BareLoop):
    def __init__(self, cfg: StageConfig):
        super().__init__(cfg)
        self.clock = _CallClock()
        self.optimizer.step = self.clock.wrap(self.optimizer.step, "optimizer.step")
        self.optimizer.zero_grad = self.clock.wrap(self.optimizer.zero_grad, "optimizer.zero_grad")
        self.scheduler_step = self.clock.wrap(self.scheduler.step, "scheduler.step")

    def step(self) -> None:
        clock, t = self.clock, time.thread_time
        begin = t()
        try:
            batch = next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.batches = self._epoch_batches()
            batch = next(self.batches)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        clock.add("batch from the loader", t() - begin)
        start = t()
        _, loss = self.model(**batch)
        clock.add("forward", t() - start)
        start = t()
        loss.backward()
        clock.add("backward", t() - start)
        start = t()
        torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        clock.add("clip_grad_norm_", t() - start)
        self.optimizer.step()
        self.scheduler_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))
        clock.end_step(t() - begin)


class _BreakdownTrainer(TimedTrainer):
    """The trainer with accelerate's per-step calls timed (instance attributes; nothing that is saved)."""

    def setup(self) -> None:
        super().setup()
        clock = self.clock = _CallClock()
        acc, opt = self.accelerator, self.optimizer
        acc.backward = clock.wrap(acc.backward, "backward")
        acc.clip_grad_norm_ = clock.wrap(acc.clip_grad_norm_, "clip_grad_norm_")
        opt.step = clock.wrap(opt.step, "optimizer.step")
        opt.zero_grad = clock.wrap(opt.zero_grad, "optimizer.zero_grad")
        # The step object calls the scheduler: a timed stand-in there, the real one stays the trainer's (saved).
        self.step.scheduler = _SchedulerProxy(self.scheduler, clock.wrap(self.scheduler.step, "scheduler.step"))
        micro_batch = self.step.micro_batch
        self.step.micro_batch = lambda batch, step: self._timed_micro_batch(micro_batch, batch, step)
        enter = acc.accumulate

        import contextlib

        @contextlib.contextmanager
        def accumulate(*models):
            start = time.thread_time()
            with enter(*models):
                clock.add("accumulate() context", time.thread_time() - start)
                yield
                start = time.thread_time()
            clock.add("accumulate() context", time.thread_time() - start)

        acc.accumulate = accumulate
        self._step_begin = None

    def _timed_micro_batch(self, micro_batch, batch, step):
        now = time.thread_time()
        if self._step_begin is not None:
            # From the end of the previous step (after the paired bare step) to here: the loader's next batch.
            self.clock.add("batch from the loader", now - self._step_begin)
        inside = ("backward", "accumulate() context")  # timed on their own within the micro-batch
        before = sum(self.clock.current.get(name, 0.0) for name in inside)
        result = micro_batch(batch, step)
        after = sum(self.clock.current.get(name, 0.0) for name in inside)
        self.clock.add("forward", time.thread_time() - now - (after - before))
        return result

    def _after_step(self, window, grad_norm: float) -> None:
        StageTrainer._after_step(self, window, grad_norm)
        end = time.thread_time()
        if self._step_begin is not None:
            self.clock.end_step(end - self._step_begin)
        else:
            self.clock.current = {}
        self.paired.step()
        self._step_begin = time.thread_time()


class _SchedulerProxy:
    def __init__(self, inner, step):
        self.inner, self.step = inner, step

    def __getattr__(self, name):
        return getattr(self.inner, name)


def breakdown(args, tiny, stage: str, workdir: Path) -> dict:
    """Where the trainer's per-step CPU goes, call by call, against the bare loop (paired, in one
    process), for a trainer without eval, saves, logging or progress bar; plus the CPU cost of one
    MLflow `log_metrics` call with the trainer's metric set (calling thread and MLflow's threads)."""
    import warnings

    # The timing wrappers replace optimizer.step after the scheduler was built; torch warns about that.
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    cfg = stage_config(args, tiny, stage, "lean-nolog", workdir, 200)
    bare = _BreakdownBare(cfg)
    trainer = _BreakdownTrainer(cfg, paired=bare, progress_bar=False)
    result = trainer.run()
    if result.status != "completed":
        raise RuntimeError(f"trainer stopped early: {result.status}: {result.reason}")
    skip = args.warmup
    rows = []
    for name in (
        "batch from the loader",
        "accumulate() context",
        "forward",
        "backward",
        "clip_grad_norm_",
        "optimizer.step",
        "scheduler.step",
        "optimizer.zero_grad",
        "other loop bookkeeping",
        "step total",
    ):
        t_vals = trainer.clock.times.get(name, [])[skip:]
        b_vals = bare.clock.times.get(name, [])[skip:]
        n = min(len(t_vals), len(b_vals)) or max(len(t_vals), len(b_vals))
        trainer_s = trimmed_mean(t_vals[:n]) if t_vals else 0.0
        bare_s = trimmed_mean(b_vals[:n]) if b_vals else 0.0
        extra = (
            trimmed_mean([a - b for a, b in zip(t_vals[:n], b_vals[:n])]) if t_vals and b_vals else trainer_s - bare_s
        )
        rows.append({"call": name, "trainer_s": trainer_s, "bare_s": bare_s, "extra_s": extra})

    import mlflow

    from theworld_core.tracking.mlflow_runs import stage_run

    groups = len(trainer.optimizer.param_groups)
    metrics = {
        "train/loss": 1.0,
        "train/grad_norm": 1.0,
        "train/samples_per_s": 1.0,
        "train/tokens_per_s": 1.0,
        **{f"lr/group{i}": 1e-4 for i in range(groups)},
        "stage_step": 0,
    }
    with stage_run(None, "theworld-bench-breakdown", "log-cost"):
        calls = 30
        process, thread = time.process_time(), time.thread_time()
        for i in range(calls):
            mlflow.log_metrics(metrics, step=i, synchronous=False)
            time.sleep(0.02)  # room for MLflow's threads, as between two logging steps
        mlflow.flush_async_logging()
        time.sleep(0.2)
        own = (time.thread_time() - thread) / calls
        others = ((time.process_time() - process) - (time.thread_time() - thread)) / calls
    return {
        "stage": stage,
        "steps": len(trainer.clock.times.get("step total", [])) - skip,
        "calls": rows,
        "mlflow_metrics": len(metrics),
        "mlflow_log_caller_s": own,
        "mlflow_log_threads_s": others,
    }


# ------------------------------------------------------------------------------------ driver


def stage_config(args, tiny, stage: str, arm: str, workdir: Path, repeat: int) -> StageConfig:
    total = args.warmup + args.steps
    fields = dict(
        name=f"bench_{stage}_{arm}",
        model_name=str(tiny.gemma),
        cosmos_model_name=str(tiny.cosmos),
        world_tokens=args.world_tokens,
        world_image_size=args.world_image_size,
        synthetic_samples=args.samples,
        batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=total,
        warmup_steps=min(10, total),
        mixed_precision="no",  # the bare loop runs fp32 too, on any device
        divergence_grad_norm=None,  # random tiny bases give first-step norms > 1000 once the LM trains
        logging_steps=10,
        eval_steps=100,
        save_steps=100,
        save_total_limit=2,
        output_dir=str(workdir / f"{stage}-{arm}-{repeat}"),
        wandb_project="theworld-bench",
        **SEED_STAGES[stage],
    )
    if arm.startswith("lean"):
        fields.update(do_eval=False, save_steps=10 * total)
    if arm == "lean-nolog":
        fields.update(logging_steps=10 * total)
    return StageConfig(**fields)


ABLATIONS = (
    # (name, config arm, progress bar)
    ("trainer without eval and saves (logging every 10 steps, progress bar)", "lean", True),
    ("... and without the progress bar", "lean", False),
    ("... and without MLflow logging (accelerate loop only)", "lean-nolog", False),
)


def run_ablation(args, tiny, stage: str, workdir: Path) -> list[dict]:
    """Where the trainer's per-step overhead goes: the lean trainer with parts switched off, paired."""
    results: dict[str, list[dict]] = {name: [] for name, _, _ in ABLATIONS}
    for repeat in range(args.repeats):
        for name, arm, progress in ABLATIONS:
            cfg = stage_config(args, tiny, stage, arm, workdir, 100 + repeat)
            results[name].append(run_trainer(cfg, args.warmup, args.steps, True, progress_bar=progress))
    rows = []
    steps = args.steps
    for name, runs in results.items():
        pairs = [(r["trainer"], r["bare"]) for r in runs]
        rows.append(
            {
                "variant": name,
                "overhead_robust": statistics.median(
                    overhead(t, b, "wall_steps", t["log_s"] / steps)[0] for t, b in pairs
                ),
                "overhead_cpu": statistics.median(
                    overhead(t, b, "cpu_steps", (t["log_cpu_s"] + steps * t["background_cpu_s_per_step"]) / steps)[0]
                    for t, b in pairs
                ),
                "per_step_loop_cpu": statistics.median(overhead(t, b, "cpu_steps", 0.0)[0] for t, b in pairs),
                "log_call_s": statistics.median(t["log_s"] / max(1, t["log_calls"]) for t, _ in pairs),
                "background_cpu_share": statistics.median(
                    t["background_cpu_s_per_step"] / trimmed_mean(b["cpu_steps"]) for t, b in pairs
                ),
            }
        )
    return rows


def machine() -> dict:
    info = {"cpu": None, "cores": os.cpu_count(), "ram_gib": None, "gpu": None}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated, from {', '.join(SEED_STAGES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--mode",
        choices=("paired", "sequential"),
        default="paired",
        help="paired: bare steps interleaved with the trainer's in one run (default); sequential: separate runs",
    )
    parser.add_argument(
        "--lean",
        action="store_true",
        help="also run the trainer without eval and saves (a cross-check of the per-call timings)",
    )
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="also split the lean trainer's overhead (progress bar, MLflow logging, the accelerate "
        "loop) on the first stage, paired",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the trainer's per-step calls one by one against the bare loop's (first "
        "stage, paired) and one MLflow log call (about half a minute)",
    )
    parser.add_argument("--steps", type=int, default=300, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="untimed optimizer steps before the window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both arms (default 1)")
    parser.add_argument("--samples", type=int, default=400, help="synthetic samples (5%% go to eval)")
    parser.add_argument("--world-tokens", type=int, default=4)
    parser.add_argument("--world-image-size", type=int, default=32)
    parser.add_argument("--tiny-dir", help="tiny model folder (default: $THEWORLD_HOME/tiny)")
    parser.add_argument("--workdir", help="checkpoints and MLflow store (default: a temporary folder, deleted)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in SEED_STAGES]
    if unknown:
        parser.error(f"unknown stages {unknown}; allowed: {list(SEED_STAGES)}")
    if args.warmup < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--warmup, --steps and --repeats must be at least 1")

    import logging

    logging.getLogger("theworld").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    from theworld_core.model.tiny import ensure_tiny_models

    tiny = ensure_tiny_models(Path(args.tiny_dir) if args.tiny_dir else None)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="theworld-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["THEWORLD_PROJECT_DIR"] = str(workdir / "project")  # MLflow store of the trainer runs
    paired = args.mode == "paired"
    load = {"start": os.getloadavg()}
    started = time.perf_counter()
    rows = []
    try:
        # Priming run, discarded: first-use costs of the process (lazy imports, allocator growth).
        prime = stage_config(args, tiny, stages[0], "prime", workdir, 0)
        BareLoop(prime).step()
        for stage in stages:
            runs = []
            for repeat in range(args.repeats):
                run: dict[str, dict] = {}
                if not paired:
                    run["bare"] = run_bare(
                        stage_config(args, tiny, stage, "bare", workdir, repeat), args.warmup, args.steps
                    )
                run.update(
                    run_trainer(
                        stage_config(args, tiny, stage, "full", workdir, repeat), args.warmup, args.steps, paired
                    )
                )
                if args.lean:
                    lean = run_trainer(
                        stage_config(args, tiny, stage, "lean", workdir, repeat), args.warmup, args.steps, paired
                    )
                    run["lean"], run["lean_bare"] = lean["trainer"], lean.get("bare", run["bare"])
                runs.append(run)
                print(
                    f"# {stage} #{repeat + 1}: bare {run['bare']['s_per_step'] * 1e3:.2f} ms/step, "
                    f"trainer {run['trainer']['s_per_step'] * 1e3:.2f} ms/step",
                    file=sys.stderr,
                    flush=True,
                )
            rows.append(summarise(stage, runs, args.steps))
        ablation = run_ablation(args, tiny, stages[0], workdir) if args.ablate else None
        split = breakdown(args, tiny, stages[0], workdir) if args.breakdown else None
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    load["end"] = os.getloadavg()
    print_table(rows, args, elapsed)
    print(f"Load average (1, 5, 15 min) at start {load['start']}, at end {load['end']} on {os.cpu_count()} CPUs.\n")
    if ablation:
        pct = lambda x: f"{100 * x:+.1f} %"  # noqa: E731
        print(f"Where the overhead goes ({stages[0]}, paired, median of {args.repeats}; shares of the bare step):\n")
        print(
            "| variant | overhead: robust | CPU | of which per-step loop (CPU) | background threads (CPU) | log call |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for a in ablation:
            print(
                f"| {a['variant']} | {pct(a['overhead_robust'])} | {pct(a['overhead_cpu'])} "
                f"| {pct(a['per_step_loop_cpu'])} | {pct(a['background_cpu_share'])} | {a['log_call_s'] * 1e3:.2f} ms |"
            )
        print()
    if split:
        base = next(r["bare_s"] for r in split["calls"] if r["call"] == "step total")
        print(
            f"Per-step CPU by call ({split['stage']}, trainer without eval, saves, logging and progress bar, paired "
            f"with the bare loop; thread CPU time, trimmed mean over {split['steps']} steps):\n"
        )
        print("| call | trainer µs | bare µs | extra µs | extra, share of the bare step |")
        print("|---|---:|---:|---:|---:|")
        for r in split["calls"]:
            print(
                f"| {r['call']} | {r['trainer_s'] * 1e6:.0f} | {r['bare_s'] * 1e6:.0f} | {r['extra_s'] * 1e6:+.0f} "
                f"| {100 * r['extra_s'] / base:+.2f} % |"
            )
        every = 10
        per_step = (split["mlflow_log_caller_s"] + split["mlflow_log_threads_s"]) / every
        print(
            f"\nOne MLflow log_metrics ({split['mlflow_metrics']} metrics, local SQLite store, synchronous=False): "
            f"{split['mlflow_log_caller_s'] * 1e3:.2f} ms CPU in the calling thread + "
            f"{split['mlflow_log_threads_s'] * 1e3:.2f} ms in MLflow's logging threads; every {every} steps that is "
            f"{per_step * 1e3:.2f} ms per step ({100 * per_step / base:.1f} % of the bare step).\n"
        )
    print(
        "JSON "
        + json.dumps(
            {
                "ablation": ablation,
                "breakdown": split,
                "loadavg": load,
                "bench": "trainer",
                "machine": machine(),
                "mode": args.mode,
                "threads": args.threads,
                "steps": args.steps,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "batch_size": args.batch_size,
                "world_tokens": args.world_tokens,
                "world_image_size": args.world_image_size,
                "elapsed_s": round(elapsed, 1),
                "stages": rows,
            }
        )
    )
    return 0


def print_table(rows: list[dict], args, elapsed: float) -> None:
    pct = lambda x: f"{100 * x:+.1f} %"  # noqa: E731
    lean = all("lean_s_per_step" in r for r in rows)
    print(
        f"\n{args.mode}, {args.steps} timed steps after {args.warmup} warmup, batch {args.batch_size}, accumulation 1, "
        f"world tokens {args.world_tokens}, world image {args.world_image_size} px, {args.threads} thread(s), "
        f"median of {args.repeats} ({elapsed:.0f} s in all)\n"
    )
    print(
        "| stage | trains | bare s/step | trainer s/step | trainer / bare "
        "| overhead excl. eval: mean | robust (± 95 %) | CPU (± 95 %) | saves | logging | eval "
        + ("| lean trainer - bare: mean, robust, CPU " if lean else "")
        + "| < 5 % |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if lean else "") + "---|")
    for r in rows:
        print(
            f"| {r['stage']} | {', '.join(r['trains'])} | {r['bare_s_per_step']:.4f} | {r['trainer_s_per_step']:.4f} "
            f"| {r['ratio_trainer_vs_bare']:.3f} | {pct(r['overhead_excl_eval_mean'])} "
            f"| {pct(r['overhead_excl_eval_robust'])} ± {100 * r['overhead_excl_eval_robust_ci95']:.1f} "
            f"| {pct(r['overhead_excl_eval_cpu'])} ± {100 * r['overhead_excl_eval_cpu_ci95']:.1f} "
            f"| {pct(r['save_share'])} | {pct(r['log_share'])} | {pct(r['eval_share'])} "
            + (
                f"| {pct(r['lean_overhead_mean'])}, {pct(r['lean_overhead_robust'])}, {pct(r['lean_overhead_cpu'])} "
                if lean
                else ""
            )
            + f"| {'yes' if r['meets_target'] else 'NO'} |"
        )
    print(
        "\nShares are of the bare loop's step time, medians over repeats. mean: window means; robust: 10-90 % "
        "trimmed mean of step-by-step wall differences (same batch at each step), timed saves and log calls "
        "added back; CPU: the same on CPU time (main thread per step, plus the trainer's background threads). "
        "Verdict: robust and CPU both < 5 %."
    )
    print(
        "Split of the CPU overhead: "
        + "; ".join(
            f"{r['stage']}: per-step loop {pct(r['per_step_loop_cpu'])} (wall {pct(r['per_step_loop_robust'])}), "
            f"background threads {pct(r['background_cpu_share'])}"
            for r in rows
        )
    )
    print(
        "Per call (wall): "
        + "; ".join(
            f"{r['stage']}: eval {r['eval_call_s'] * 1e3:.0f} ms ({r['eval_calls_in_window']} in window), "
            f"save {r['save_call_s'] * 1e3:.0f} ms ({r['save_calls_in_window']}), "
            f"log {r['log_call_s'] * 1e3:.2f} ms ({r['log_calls_in_window']})"
            for r in rows
        )
    )
    print(
        "Final train loss, mean of the last 10 steps (the arms train identically): "
        + "; ".join(
            f"{r['stage']}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in r["final_loss"].items() if v is not None and math.isfinite(v))
            for r in rows
        )
        + "\n"
    )


if __name__ == "__main__":
    sys.exit(main())
