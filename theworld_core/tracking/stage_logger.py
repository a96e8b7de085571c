"""Everything a stage reports, behind one object: console lines, MLflow and the Hugging Face Hub push.

The trainer picks its logger once, in setup (`stage_logger_for`): `StageLogger` on rank 0,
`NullStageLogger` (every method does nothing) on the other ranks. It then calls only these methods
and never asks which rank it is on to decide whether to log.

What lands in MLflow (unchanged from when the trainer logged directly):
- params: every stage config key (values cut to 500 characters), `trainable/<component>` (trainable
  parameter counts), `total_steps`, the precision policy (`precision/...`); tags `data_fingerprint`,
  `config_hash` (the resume key), `started_from`; data statistics (`data/...`) at the stage's first step;
- metrics at step `global_step_offset + stage step`, each with `stage_step`;
- the stage output folder as the `stage_output` artifact;
- at the end: tags `stage_status`, `stage_reason`, `hub_<key>` (the hub pusher's report, when
  pushing), metrics `time/setup_s`, `time/train_s`, `time/finish_s` and the data statistics again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from theworld_core.data import stats_as_metrics
from theworld_core.model.components import parameter_report
from theworld_core.tracking.hub_push import card_info_from_result, check_hub_ready, pusher_for

if TYPE_CHECKING:
    from theworld_core.config import StageConfig
    from theworld_core.data import DataStats, PreparedData
    from theworld_core.model.theworld import TheWorld
    from theworld_core.training.result import StageResult

# The stage's console lines keep the trainer's logger name ("theworld.train ...").
log = logging.getLogger("theworld.train")

HUB_CLOSE_TIMEOUT_S = 600.0
"""How long the end of a stage waits for its pushes to finish."""
HUB_ABORT_TIMEOUT_S = 5.0
"""How long a stage that crashed waits for them (the upload thread must not outlive the stage)."""


def stage_logger_for(cfg: StageConfig, *, is_main_process: bool, global_step_offset: int = 0,
                     stage_name: str | None = None) -> StageLogger | NullStageLogger:
    """The logger of this rank: `StageLogger` on the main process, `NullStageLogger` elsewhere.

    Every rank first checks that a hub push can work (`check_hub_ready`): a missing token fails the
    stage before any work, on every rank, not at its first save."""
    check_hub_ready(cfg)
    if not is_main_process:
        return NullStageLogger()
    return StageLogger(cfg, global_step_offset=global_step_offset, stage_name=stage_name)


class StageLogger:
    """Rank 0's reporter: console lines, the stage's MLflow run and, with `push_to_hub`, the hub pusher."""

    def __init__(self, cfg: StageConfig, *, global_step_offset: int = 0, stage_name: str | None = None):
        self.cfg = cfg
        self.stage_name: str = stage_name or cfg.name or Path(cfg.output_dir).name
        self.global_step_offset: int = global_step_offset  # MLflow step = offset + stage step
        self.hub = pusher_for(cfg, stage_name=self.stage_name)  # a HubPusher when push_to_hub, else None

    # ------------------------------------------------------------------ start

    @contextlib.contextmanager
    def open_run(self, run_id: str | None) -> Iterator[str | None]:
        """The stage's MLflow run, active inside the block: `run_id` when it exists (a resumed stage,
        or the pipeline's child run), else a new run in the config's experiment. Yields its id."""
        from theworld_core.tracking.mlflow_runs import stage_run

        names = self.cfg.mlflow_names(default_run_name=self.cfg.name)
        with stage_run(run_id, names.experiment, names.run_name) as run:
            yield run.info.run_id

    def log_stage_start(self, started_from: str, trainable: tuple[str, ...]) -> None:
        notice = self.cfg.wandb_notice(default_run_name=self.cfg.name)
        if notice:
            log.info(notice)
        log.info("stage %s starts from %s; trains %s", self.stage_name, started_from, ", ".join(trainable))

    def log_params(self, model: TheWorld, *, total_steps: int, data: PreparedData, resume_key: str,
                   started_from: str) -> None:
        """The params, tags and first data statistics of a new run (`model` unwrapped)."""
        import mlflow

        params: dict[str, Any] = {k: str(v)[:500] for k, v in self.cfg.model_dump(mode="json").items()}
        params.update({f"trainable/{c}": n.trainable for c, n in parameter_report(model).items()})
        params["total_steps"] = total_steps
        mlflow.log_params(params)
        mlflow.log_metrics(stats_as_metrics(data.stats), step=self.global_step_offset)
        mlflow.set_tags({"data_fingerprint": data.fingerprint, "config_hash": resume_key,
                         "started_from": started_from[:500]})

    def log_precision(self, params: Mapping[str, str]) -> None:
        """The precision policy of a new run (`PrecisionPolicy.as_params()`: `precision/...`)."""
        import mlflow

        mlflow.log_params(dict(params))

    # ------------------------------------------------------------------ during the stage

    def log_metrics(self, metrics: Mapping[str, float], stage_step: int) -> None:
        import mlflow

        mlflow.log_metrics({**metrics, "stage_step": stage_step}, step=self.global_step_offset + stage_step,
                           synchronous=False)

    def on_resume_state_saved(self, path: Path | None, step: int, metrics: Mapping[str, float]) -> None:
        """Queue the hub push of a resume state (`every_save`); the upload runs in the background."""
        if self.hub is not None and path is not None:
            self.hub.on_save(path, step, {"metrics": dict(metrics)})

    # ------------------------------------------------------------------ end

    def log_stage_output(self, final: Path) -> None:
        import mlflow

        mlflow.log_artifacts(str(final), artifact_path="stage_output")

    def log_stage_end(self, result: StageResult, *, timings: Mapping[str, float], data_stats: DataStats,
                      push_final: Path | None) -> None:
        """Status tags, timings, final data statistics; pushes `push_final` (a new stage output) and
        waits for the pushes (at most HUB_CLOSE_TIMEOUT_S), tagging the pusher's report."""
        import mlflow

        mlflow.set_tags({"stage_status": result.status, "stage_reason": result.reason[:500]})
        # Where a stage's time went: building/loading (setup), the loop, the final save + upload.
        mlflow.log_metrics(dict(timings))
        # Streamed sources know their bad-sample counts only once read: log them again at the end.
        mlflow.log_metrics(stats_as_metrics(data_stats), step=self.global_step_offset + result.steps)
        if self.hub is not None:
            if push_final is not None:
                self.hub.on_end(push_final, card_info_from_result(result, self.stage_name))
            report = self.hub.close(timeout=HUB_CLOSE_TIMEOUT_S)
            mlflow.set_tags({f"hub_{k}": str(v)[:500] for k, v in report.items()})
        log.info("stage %s %s after %d steps: %s", self.stage_name, result.status, result.steps, result.reason)

    def close(self) -> None:
        """Always called when the stage ends, also on a crash: no upload thread outlives the stage."""
        if self.hub is not None:
            self.hub.close(timeout=HUB_ABORT_TIMEOUT_S)


class NullStageLogger:
    """The logger of ranks other than 0: the same methods as `StageLogger`, doing nothing."""

    @contextlib.contextmanager
    def open_run(self, run_id: str | None) -> Iterator[str | None]:
        yield None

    def log_stage_start(self, started_from: str, trainable: tuple[str, ...]) -> None:
        pass

    def log_params(self, model: TheWorld, *, total_steps: int, data: PreparedData, resume_key: str,
                   started_from: str) -> None:
        pass

    def log_precision(self, params: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], stage_step: int) -> None:
        pass

    def on_resume_state_saved(self, path: Path | None, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_stage_output(self, final: Path) -> None:
        pass

    def log_stage_end(self, result: StageResult, *, timings: Mapping[str, float], data_stats: DataStats,
                      push_final: Path | None) -> None:
        pass

    def close(self) -> None:
        pass
