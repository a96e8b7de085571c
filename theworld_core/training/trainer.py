"""The stage trainer: one stage, `setup -> train -> evaluate -> save`, on accelerate.

Run through `training.launch.train_stage` (alone: `theworld train --config FILE.json`; or by the
pipeline). Every rank runs the loop; rank 0 alone evaluates and writes, and broadcasts what the
others must know (under FSDP every rank joins the evaluation and the gathers a save needs; rank 0
still writes). The optimizer step itself is `training.step.OptimizerStep`. What a stage reports (console, MLflow, the hub push) goes through one logger
object (`tracking.stage_logger`), a no-op on ranks other than 0.

Where a stage starts from, in order:
1. the newest resume state in `output_dir` (unless `fresh`): the stage continues exactly;
2. `resume_from_checkpoint`: a stage output (a stage transition: trained weights loaded, newly
   unfrozen components at their pretrained weights, fresh optimizer and warmup, optimizer moments
   carried for parameters that stay trainable when `carry_optimizer_state`) or a resume state of
   another output folder (continued exactly, as 1);
3. the pretrained bases with a fresh world projector.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from theworld_core.config import StageConfig
from theworld_core.data.loading import EpochBatches, even_batches
from theworld_core.features.cache import FeatureCache
from theworld_core.features.encoders import CachedEncoders
from theworld_core.model.components import (
    audit_step,
    gradient_presence,
    parameter_report,
    snapshot,
    trainable_components,
)
from theworld_core.model.inputs import prepare_stage_data
from theworld_core.model.precision import PrecisionPolicy, apply_precision, check_precision, resolve_precision
from theworld_core.model.stage_output import (
    apply_stage_output,
    checkpoint_folder,
    is_intact_stage_output,
    read_manifest,
    save_stage_output,
    stage_output_tensors,
)
from theworld_core.model.theworld import TheWorld
from theworld_core.tracking.hub_push import HUB_EVIDENCE_KEY, push_failure
from theworld_core.tracking.stage_logger import NullStageLogger, StageLogger, stage_logger_for
from theworld_core.training import checkpoint as ckpt
from theworld_core.training.batches import BatchCollator, TrainWindow, build_train_loader, steps_per_epoch
from theworld_core.training.evaluation import evaluate_loss, post_stage_evaluation, reusable_loss
from theworld_core.training.optim import (
    build_optimizer,
    build_schedule,
    group_learning_rate,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
    refuse_unavailable_options,
)
from theworld_core.training.plateau import PlateauTracker
from theworld_core.training.result import StageResult, changed_training_keys, resume_key
from theworld_core.training.sharding import gathered_state, shard_model, shard_optimizer_state, take_over_fsdp
from theworld_core.training.step import LossHook, OptimizerStep, StopStage, injected_fault

if TYPE_CHECKING:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from theworld_core.data import PreparedData
    from theworld_core.model.inputs import InputBuilder

log = logging.getLogger("theworld.train")


class StageTrainer:
    def __init__(
        self,
        cfg: StageConfig,
        *,
        fresh: bool = False,
        mlflow_run_id: str | None = None,
        global_step_offset: int = 0,
        loss_hook: LossHook | None = None,
        evaluate_after: dict[str, int] | None = None,
    ):
        # ---- what the caller asked for
        self.cfg: StageConfig = cfg
        self.fresh: bool = fresh  # ignore resume states in output_dir
        self.mlflow_run_id: str | None = mlflow_run_id  # the run to log into (the pipeline's child run)
        self.global_step_offset: int = global_step_offset  # MLflow step = offset + stage step
        self.loss_hook: LossHook | None = loss_hook or injected_fault(cfg.inject_fault, cfg.inject_fault_step)
        self.output_dir: Path = Path(cfg.output_dir)
        self.evaluate_after: dict[str, int] | None = evaluate_after  # the pipeline's `eval_request`

        # ---- built by setup()
        self.accelerator: Accelerator | None = None
        self.logger: StageLogger | NullStageLogger = NullStageLogger()  # StageLogger on rank 0 once set up
        self.data: PreparedData | None = None
        self.state: ckpt.TrainerState = ckpt.TrainerState(config_hash=resume_key(cfg))  # what a resume state restores
        self.model: TheWorld | None = None  # wrapped by accelerate once set up (DDP with several ranks)
        self.builder: InputBuilder | None = None  # encodes and collates rows
        self.encoders: CachedEncoders | None = None  # the frozen encoders behind the feature cache
        self.num_workers: int = 0  # DataLoader workers per process (cfg.num_workers or the CPU default)
        self._loader = None  # the train DataLoader, kept across epochs (persistent workers)
        self._even_group = None  # CPU process group that ends streamed epochs together
        # Components the stage trains, from the config's freeze flags (what the freeze audit expects).
        self.trainable: tuple[str, ...] = cfg.trainable_component_names
        self.optimizer: torch.optim.Optimizer | None = None  # accelerate's wrapper around AdamW / AdamW8bit
        self.step: OptimizerStep | None = None  # micro-batches, token-mean gradients, clipping, update
        self.sharded: bool = False  # FSDP2 (`distributed: fsdp` in several processes): saves and evals are collective
        self.precision: PrecisionPolicy | None = None  # dtypes of trainable/frozen parameters, autocast
        self.group_names: list[list[str]] = []  # parameter names of each optimizer group (state is saved by name)
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.tracker: PlateauTracker = PlateauTracker(cfg.plateau)
        self.steps_per_epoch: int = 0  # optimizer steps per pass over the training data
        self.total_steps: int = 0  # max_steps, or the epochs in optimizer steps
        self.started_from: str = ""  # "resumed DIR", "stage output SOURCE" or "pretrained bases"

        # ---- set while running
        self.run_id: str | None = None  # this stage's MLflow run (None on ranks other than 0)
        self.timings: dict[str, float] = {}  # time/setup_s, time/train_s, time/finish_s
        self.progress: tqdm | None = None  # the step progress bar (shown on rank 0)
        self._last_train_loss: float | None = None  # mean train loss (all ranks) of the last logging window

    def run(self) -> StageResult:
        """Set up, train to the end (max steps, epochs or plateau), evaluate, save; report throughout."""
        started = time.perf_counter()
        self.setup()
        self.timings = {"time/setup_s": time.perf_counter() - started}
        self.logger.log_stage_start(self.started_from, self.trainable)
        with self.logger.open_run(self.mlflow_run_id or self.state.mlflow_run_id) as run_id:  # resumed: same run
            previous_run = self.state.mlflow_run_id
            self.run_id = self.state.mlflow_run_id = run_id
            # A new run (a fresh stage, or a resumed one the pipeline gave a new child run) gets the params.
            if self.state.step == 0 or previous_run != run_id:
                self.logger.log_params(
                    self.accelerator.unwrap_model(self.model),
                    total_steps=self.total_steps,
                    data=self.data,
                    resume_key=self.state.config_hash,
                    started_from=self.started_from,
                )
                self.logger.log_precision(self.precision.as_params())
            try:
                started = time.perf_counter()
                status, reason, evidence = self._train()
                self.timings["time/train_s"] = time.perf_counter() - started
                return self._finish(status, reason, evidence)
            finally:
                self.logger.close()  # a crash must not leave the upload thread behind
                self._end_distributed()

    # ================================================================== setup

    def setup(self) -> None:
        """Devices, logger, data, model (from where the stage starts), optimizer and schedule."""
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        cfg = self.cfg
        on_gpu = torch.cuda.is_available()
        refuse_unavailable_options(cfg, cuda=on_gpu)  # before any work: no data read, no model loaded
        self.precision = resolve_precision(
            cfg.mixed_precision, "cuda" if on_gpu else "cpu", bf16_supported=on_gpu and torch.cuda.is_bf16_supported()
        )
        distributed = take_over_fsdp(cfg.distributed)  # before the Accelerator: its FSDP plugin stays off
        self.accelerator = Accelerator(
            mixed_precision=self.precision.effective,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            cpu=not on_gpu,
            # Frozen-by-design parameters (e.g. the VAE's temporal convs on one frame) get no gradient.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        # Before any work: a hub push that cannot work fails here, on every rank.
        self.logger = stage_logger_for(
            cfg,
            is_main_process=self.accelerator.is_main_process,
            global_step_offset=self.global_step_offset,
            stage_name=cfg.name or self.output_dir.name,
        )
        set_seed(cfg.seed)
        with self.accelerator.main_process_first():  # rank 0 fills the data cache, the others read it
            self.data = prepare_stage_data(cfg)
        self.state = ckpt.TrainerState(config_hash=resume_key(cfg))
        self.model = TheWorld.from_base(cfg.model_part())
        # Before any saved weights go in: a trained fp32 weight loaded into a bf16 parameter would be
        # rounded, and an exact resume would not be exact.
        apply_precision(self.model, self.precision, cfg.trainable_component_names)
        resume_dir, transition_dir = self._choose_start()
        if transition_dir is not None:
            apply_stage_output(self.model, transition_dir, read_manifest(transition_dir))
        if resume_dir is not None:
            apply_stage_output(self.model, resume_dir, read_manifest(resume_dir))
        self.builder = self.model.builder
        # What the audit expects comes from the config, not from the code that applied it, so a
        # broken unfreeze cannot make the audit agree with it.
        self.model.set_trainable(trainable_components(cfg.freeze_flags))
        self.trainable = cfg.trainable_component_names
        check_precision(self.model, self.precision)  # trainable fp32, frozen in the compute dtype
        if cfg.use_gradient_checkpointing:
            self.model.gemma.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        # Feature cache: built on the unwrapped model, after the freeze flags (a trainable encoder is never cached),
        # before sharding (the cache keys hash the full frozen weights).
        cache = FeatureCache(cfg.feature_cache_dir, max_gb=cfg.feature_cache_max_gb, mode=cfg.feature_cache)
        self.encoders = CachedEncoders(
            self.model, cache, precision=self.accelerator.mixed_precision, autocast=self.accelerator.autocast
        )
        self.sharded = distributed == "fsdp" and self.accelerator.num_processes > 1
        if self.sharded:  # before the optimizer: sharding replaces the parameters
            shard_model(self.model, self.accelerator.device)

        optimizer, self.group_names = build_optimizer(
            self.model,
            cfg.learning_rate,
            cfg.weight_decay,
            cfg.component_learning_rates,
            optimizer=cfg.optimizer,
            device_type=self.accelerator.device.type,
        )
        self.steps_per_epoch = steps_per_epoch(cfg, self.data.train, self.accelerator.num_processes)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * self.steps_per_epoch))
        self.scheduler = build_schedule(cfg.lr_scheduler, optimizer, cfg.warmup_steps, self.total_steps)
        self.tracker = PlateauTracker(cfg.plateau)
        if resume_dir is not None:
            self._restore(resume_dir, optimizer)
        elif transition_dir is not None and cfg.carry_optimizer_state and ckpt.is_resume_state(transition_dir):
            carried = load_optimizer_state_by_name(
                optimizer,
                self.group_names,
                self._local(ckpt.load_torch(transition_dir, "optimizer.pt")),
                restore_groups=False,
            )
            log.info("carried optimizer moments for %d parameters that stay trainable", len(carried))
        if self.sharded:  # accelerate would wrap the sharded model in DDP
            self.optimizer = self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.step = OptimizerStep(
            self.accelerator,
            self.model,
            self.optimizer,
            self.scheduler,
            max_grad_norm=cfg.max_grad_norm,
            divergence_grad_norm=cfg.divergence_grad_norm,
            loss_hook=self.loss_hook,
            batch_size=cfg.batch_size,
        )

    def _local(self, saved_optimizer_state: dict) -> dict:
        """Saved (full) optimizer state as this rank's shards when sharded."""
        return shard_optimizer_state(saved_optimizer_state, self.model) if self.sharded else saved_optimizer_state

    def _choose_start(self) -> tuple[Path | None, Path | None]:
        """(resume state to continue, stage output to transition from); at most one is set."""
        cfg = self.cfg
        if self.accelerator.is_main_process:
            ckpt.remove_partial_writes(self.output_dir)
        latest = None if self.fresh else ckpt.latest_resume_state(self.output_dir)
        if latest is not None:
            self._check_resumable(latest)
            self.started_from = f"resumed {latest}"
            return latest, None
        if cfg.resume_from_checkpoint:
            source = checkpoint_folder(cfg.resume_from_checkpoint)
            if ckpt.is_resume_state(source) and ckpt.load_trainer_state(source).config_hash == self.state.config_hash:
                self.started_from = f"resumed {cfg.resume_from_checkpoint}"
                return source, None
            self.started_from = f"stage output {cfg.resume_from_checkpoint}"
            return None, source
        self.started_from = "pretrained bases"
        return None, None

    def _check_resumable(self, directory: Path) -> None:
        """Refuse a resume state saved under another resume key (its `TrainerState.config_hash`)."""
        saved = ckpt.load_trainer_state(directory)
        if saved.config_hash == self.state.config_hash:
            return
        before = read_manifest(directory).get("stage_config") or {}
        changed = changed_training_keys(before, self.cfg.model_dump(mode="json"))
        raise ValueError(
            f"output_dir {self.output_dir} holds a resume state ({directory.name}) of a different stage config "
            f"({'; '.join(changed) or 'config changed'}). To continue it, restore the config; to start this config "
            f"afresh, pass --fresh or use a new output_dir; for a stage transition point resume_from_checkpoint at "
            f"{self.output_dir / ckpt.FINAL_DIR}"
        )

    def _restore(self, directory: Path, optimizer) -> None:
        load_optimizer_state_by_name(
            optimizer, self.group_names, self._local(ckpt.load_torch(directory, "optimizer.pt"))
        )
        self.scheduler.load_state_dict(ckpt.load_torch(directory, "scheduler.pt"))
        self.state = ckpt.load_trainer_state(directory)
        if self.state.plateau:  # empty when the state was saved before the stage's first evaluation
            self.tracker.load_state_dict(self.state.plateau)
        ckpt.restore_rng(ckpt.load_torch(directory, "rng.pt"))

    # ================================================================== train

    def _train_loader(self, epoch: int, skip_batches: int = 0):
        """This epoch's batches on the device, in a seeded order (the same on a resume), each process
        reading its own part; the first `skip_batches` left out (a resumed epoch).

        Workers decode and preprocess beside the step (`num_workers`); on CUDA into pinned memory,
        copied without blocking. The loader lives across epochs (persistent workers).
        """
        acc = self.accelerator
        if self._loader is None:
            lookup = self.encoders.lookup() if self.encoders is not None else None  # the model is on its device now
            self._loader, self.num_workers = build_train_loader(
                self.cfg, self.data, acc, BatchCollator(self.builder, lookup)
            )
        loader = self._loader
        loader.set_epoch(epoch)
        if isinstance(loader.batch_sampler, EpochBatches):
            loader.batch_sampler.skip = skip_batches  # skipped batches are never read
        else:
            loader.skip_batches = skip_batches  # a stream is read up to where it stopped
        if acc.num_processes == 1 or isinstance(loader.batch_sampler, EpochBatches):
            return loader
        if self._even_group is None:
            import torch.distributed as dist

            self._even_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return even_batches(loader, self._even_group)

    def _train(self) -> tuple[str, str, dict]:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        if state.finished:
            return state.finished, "stage had already finished in this output_dir", {}
        audit_pending = state.step == 0
        before = snapshot(acc.unwrap_model(self.model)) if audit_pending else None
        self.model.train()
        window = TrainWindow()
        from tqdm.auto import tqdm

        self.progress = tqdm(
            total=self.total_steps,
            initial=state.step,
            desc=cfg.name or self.output_dir.name,
            unit="step",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
        )
        try:
            while state.step < self.total_steps:
                loader = self._train_loader(state.epoch, skip_batches=state.batches_in_epoch)
                for batch in loader:
                    batch = self.encoders.fill(batch)  # cached features in place of frozen encoders' pixels
                    loss_sum, tokens = self.step.micro_batch(batch, state.step + 1)
                    state.batches_in_epoch += 1
                    window.add(loss_sum, tokens, batch, acc.num_processes)
                    if not self.step.sync_gradients:
                        continue
                    grad_norm = self.step.gradients_ready(state.step + 1)
                    # The schedule gives step 1 a learning rate above 0 (optim.build_schedule), so the
                    # first step of a stage is the one the freeze audit checks.
                    had_grad = gradient_presence(acc.unwrap_model(self.model)) if audit_pending else None
                    self.step.apply()
                    if audit_pending:
                        audit_step(acc.unwrap_model(self.model), before, had_grad, self.trainable)
                        audit_pending = False
                    state.step += 1
                    self._after_step(window, grad_norm)
                    if state.step >= self.total_steps:
                        break
                else:
                    self.encoders.flush()  # the next epoch finds every entry of this one
                    state.epoch += 1
                    state.batches_in_epoch = 0
        except StopStage as stop:
            return stop.status, stop.reason, stop.evidence
        finally:
            self.encoders.flush()
            self.progress.close()
        reason = f"reached {self.total_steps} steps" + ("" if cfg.max_steps else f" ({cfg.num_epochs:g} epochs)")
        return "completed", reason, {}

    def _after_step(self, window: TrainWindow, grad_norm: float) -> None:
        cfg, state = self.cfg, self.state
        self.progress.update(1)
        if state.step % cfg.logging_steps == 0:
            metrics = window.metrics()  # the window's device sums are read here, not per micro-step
            if window.loss_tokens is not None:  # token-weighted over the window, all ranks
                sums = torch.stack([window.loss_sum.float(), window.loss_tokens.float()])
                if self.accelerator.num_processes > 1:
                    sums = self.accelerator.reduce(sums, reduction="sum")
                loss_sum, tokens = sums.tolist()
                metrics["train/loss"] = loss_sum / max(tokens, 1.0)
            metrics.update(self._feature_cache_metrics())
            metrics["train/grad_norm"] = grad_norm
            for group in self.optimizer.param_groups:
                metrics[f"lr/{group['name']}"] = group_learning_rate(group)
            self._last_train_loss = self.step.last_train_loss = metrics.get("train/loss", self._last_train_loss)
            self.progress.set_postfix(loss=f"{self._last_train_loss:.4f}", refresh=False)
            self.logger.log_metrics(metrics, state.step)
            window.reset()
        if cfg.do_eval and state.step % cfg.eval_steps == 0:
            self._evaluate_and_check_plateau()
        if state.step % cfg.save_steps == 0:
            self._save_resume_state()

    def _feature_cache_metrics(self) -> dict[str, float]:
        """The cache's counters summed over ranks (`train/feature_cache/...`); empty when the stage caches nothing."""
        if self.encoders is None or self.cfg.feature_cache == "off":  # the same on every rank: a collective follows
            return {}
        stats = self.encoders.cache.stats()
        names = [name for name in stats if name not in ("train/feature_cache/hit_rate", "train/feature_cache/enabled")]
        if self.accelerator.num_processes > 1:
            local = torch.tensor(
                [stats[name] for name in names] + [stats["train/feature_cache/enabled"]],
                dtype=torch.float64,
                device=self.accelerator.device,
            )
            summed = self.accelerator.reduce(local, reduction="sum").tolist()
            stats = dict(zip(names, summed[:-1]))
            stats["train/feature_cache/enabled"] = (
                summed[-1] / self.accelerator.num_processes
            )  # share of ranks with it on
        hits, misses = stats["train/feature_cache/hits"], stats["train/feature_cache/misses"]
        stats["train/feature_cache/hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
        self.logger.log_feature_cache(stats, self.encoders.cache.disabled_reason, self.encoders.kinds)
        return stats

    def _end_distributed(self) -> None:
        """Ranks leave together and tear down their process group (else one may crash at exit)."""
        if self.accelerator.num_processes <= 1:
            return
        self.accelerator.wait_for_everyone()
        self.model = self.optimizer = None
        self.accelerator.free_memory()
        import gc

        gc.collect()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ================================================================== evaluate

    def evaluate(self) -> float:
        """Mean answer-token loss on the held-out split (rank 0 computes; all ranks get it)."""
        from accelerate.utils import broadcast_object_list

        value = [float("nan")]
        if self.accelerator.is_main_process or self.sharded:  # sharded: every rank joins the forward's gathers
            value[0] = evaluate_loss(
                self.accelerator.unwrap_model(self.model),
                self._eval_rows(),
                self.cfg.batch_size,
                self.accelerator.device,
                precision=self.precision,
            )
        if self.accelerator.num_processes > 1:
            broadcast_object_list(value)
        return value[0]

    def _eval_rows(self):
        rows = self.data.eval
        if self.cfg.eval_max_samples is not None and len(rows) > self.cfg.eval_max_samples:
            rows = rows.select(range(self.cfg.eval_max_samples))
        return rows

    def _evaluate_and_check_plateau(self) -> None:
        loss = self.evaluate()
        state = self.state
        state.eval_history.append([state.step, loss])
        verdict = self.tracker.update(state.step, loss)
        state.plateau = self.tracker.state_dict()
        self.logger.log_metrics({"eval/loss": loss}, state.step)
        if verdict.plateaued:
            raise StopStage("plateaued", verdict.reason, {"plateau": _plain(verdict)})

    def _post_stage_evaluation(self) -> dict | None:
        """The pipeline's evaluation (`evaluate_after`) on the model in memory, its output saved (one process only)."""
        if self.evaluate_after is None or self.accelerator.distributed_type != "NO":
            return None
        loss = reusable_loss(self.state.eval_history, self.state.step, self.precision)
        model = self.accelerator.unwrap_model(self.model)
        return post_stage_evaluation(model, self.data.eval, self.cfg, self.precision, loss=loss, **self.evaluate_after)

    # ================================================================== save

    def _save_resume_state(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        self.state.plateau = self.tracker.state_dict()
        path = None
        if acc.is_main_process or self.sharded:  # sharded: every rank joins the gathers
            tensors = stage_output_tensors(acc.unwrap_model(self.model), keep=acc.is_main_process)
            moments = optimizer_state_by_name(getattr(self.optimizer, "optimizer", self.optimizer), self.group_names)
            moments = gathered_state(moments, keep=acc.is_main_process) if self.sharded else moments
        if acc.is_main_process:  # rank 0 writes
            path = ckpt.save_resume_state(
                self.output_dir,
                acc.unwrap_model(self.model),
                moments,
                self.scheduler.state_dict(),
                self.state,
                self.cfg.model_dump(mode="json"),
                self.cfg.save_total_limit,
                tensors=tensors,
            )
        self.logger.on_resume_state_saved(path, self.state.step, self._latest_metrics())
        acc.wait_for_everyone()

    def _latest_metrics(self) -> dict[str, float]:
        metrics = {"eval_loss": self.state.eval_history[-1][1]} if self.state.eval_history else {}
        if self._last_train_loss is not None:
            metrics["train_loss"] = self._last_train_loss
        return metrics

    def _finish(self, status: str, reason: str, evidence: dict) -> StageResult:
        """The last evaluation and save of a stage that ended well, its stage output, and its result."""
        finish_started = time.perf_counter()
        cfg, state, acc = self.cfg, self.state, self.accelerator
        final = None
        already_final = state.finished is not None
        if status in ("completed", "plateaued"):
            if cfg.do_eval and (not state.eval_history or state.eval_history[-1][0] != state.step):
                try:
                    self._evaluate_and_check_plateau()
                except StopStage:
                    pass  # the stage ends anyway; the verdict is in the history
            state.finished = status
            if not already_final:
                self._save_resume_state()
            final = self.output_dir / ckpt.FINAL_DIR
            # Also when a kill came between the finished resume state and final/, or final/ is damaged: write it now.
            if not already_final or not is_intact_stage_output(final):
                model = acc.unwrap_model(self.model)
                tensors = stage_output_tensors(model, keep=acc.is_main_process) if self.sharded else None
                if acc.is_main_process:  # rank 0 writes (sharded: what every rank gathered)
                    save_stage_output(model, final, stage_config=cfg.model_dump(mode="json"), tensors=tensors)
                self.logger.log_stage_output(final)
            else:
                # A kill before the upload, or a tracking server that was down, can leave the run without
                # the output or metrics: log what it lacks.
                self.logger.complete_finished_stage(final, state.eval_history)
        evaluation = self._post_stage_evaluation() if final is not None else None  # while the upload runs
        losses = [loss for _, loss in state.eval_history if math.isfinite(loss)]
        result = StageResult(
            status=status,
            reason=reason,
            steps=state.step,
            output_dir=str(self.output_dir),
            stage_output=str(final) if final else None,
            eval_loss=state.eval_history[-1][1] if state.eval_history else None,
            best_eval_loss=min(losses) if losses else None,
            train_loss=self._last_train_loss,
            eval_history=state.eval_history,
            trainable={c: n.trainable for c, n in parameter_report(acc.unwrap_model(self.model)).items()},
            data_fingerprint=self.data.fingerprint,
            mlflow_run_id=self.run_id,
            started_from=self.started_from,
            evidence=evidence,
            already_finished=already_final,
            evaluation=evaluation,
        )
        # Where a stage's time went: building/loading (setup), the loop, the final save + upload (the
        # post-stage evaluation apart: the pipeline logs it as walltime/evaluate_s).
        self.timings["time/finish_s"] = time.perf_counter() - finish_started - (evaluation or {}).get("seconds", 0.0)
        self.logger.log_stage_end(
            result,
            timings=self.timings,
            data_stats=self.data.stats,
            push_final=final if final is not None and not already_final else None,
        )
        tracking = self.logger.finish_tracking(end_status="FINISHED")  # None on ranks other than 0
        if tracking is not None:
            result = replace(
                result,
                tracking_incomplete=tracking.issue,
                stage_output_logged=final is not None and not tracking.stage_output_missing,
            )
        hub = getattr(self.logger, "hub", None)  # rank 0 with push_to_hub: the pushes are done (or abandoned)
        if hub is not None:
            report = hub.report()
            failure = push_failure(report)
            # The status stays: the stage output is good, so the gate and the next stage use it.
            result = replace(
                result,
                evidence={**result.evidence, HUB_EVIDENCE_KEY: report},
                reason=f"{result.reason}; {failure}" if failure else result.reason,
            )
        return result


def _plain(obj) -> Any:
    try:
        return asdict(obj)
    except TypeError:
        return dict(obj.__dict__)
