"""Everything a stage reports, behind one object: console lines, MLflow and the Hugging Face Hub push.

The trainer picks its logger once, in setup (`stage_logger_for`): `StageLogger` on rank 0,
`NullStageLogger` (every method does nothing) on the other ranks. It then calls only these methods
and never asks which rank it is on to decide whether to log.

What lands in MLflow (unchanged from when the trainer logged directly):
- params: every stage config key (values cut to 500 characters), `trainable/<component>` (trainable
  parameter counts), `total_steps`; tags `data_fingerprint`, `config_hash` (the resume key),
  `started_from`; data statistics (`data/...`) at the stage's first step;
- metrics at step `global_step_offset + stage step`, each with `stage_step`;
- the stage output folder as the `stage_output` artifact;
- at the end: tags `stage_status`, `stage_reason`, `hub_<key>` (the hub pusher's report, when
  pushing), metrics `time/setup_s`, `time/train_s`, `time/finish_s` and the data statistics again;
  `tracking_status` (complete | incomplete) and `tracking_issue`.

How it lands there: through the stage's `TrackingOutbox` (tracking/outbox.py), never from the
training thread: each record is appended to `OUTPUT_DIR/tracking-outbox.jsonl` and a background
thread delivers it, so a slow or dead tracking server never stalls training. At the end the stage
waits for delivery (at most TRACKING_CLOSE_TIMEOUT_S, and only while the server answers); what is
left is sent by the next run in the output folder. A stage that had already finished checks that
its run holds the stage output and its eval metrics, and logs what is missing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from theworld_core.data import stats_as_metrics
from theworld_core.model.components import parameter_report
from theworld_core.tracking.hub_push import card_info_from_result, check_hub_ready, pusher_for
from theworld_core.tracking.outbox import TrackingOutbox, TrackingReport

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
TRACKING_CLOSE_TIMEOUT_S = 900.0
"""How long the end of a stage waits for its records (the stage output upload above all) to reach
MLflow while the server answers; an unreachable server ends the wait after one more attempt."""
TRACKING_ABORT_TIMEOUT_S = 10.0
"""The same for a stage that crashed."""
STAGE_OUTPUT_ARTIFACT = "stage_output"


class TrackingUnavailable(RuntimeError):
    """The stage's MLflow run cannot be opened: nothing was trained."""


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
        self.outbox: TrackingOutbox | None = None  # open inside open_run
        self.run_id: str | None = None
        self._owns_run = False  # open_run started the run (it ends it)
        self.tracking: TrackingReport | None = None  # set by finish_tracking

    # ------------------------------------------------------------------ start

    @contextlib.contextmanager
    def open_run(self, run_id: str | None) -> Iterator[str | None]:
        """The stage's MLflow run, active inside the block: `run_id` when it exists (a resumed stage,
        or the pipeline's child run), else a new run in the config's experiment. Yields its id.

        Opens the output folder's tracking outbox first, which sends what an earlier run there left
        undelivered. The run is ended FINISHED (FAILED on an exception) when the block ends, directly
        when MLflow has everything, else through the outbox."""
        from theworld_core.tracking.mlflow_runs import configure_tracking, release_stage_run, start_stage_run

        names = self.cfg.mlflow_names(default_run_name=self.cfg.name)
        uri = configure_tracking()
        self.outbox = TrackingOutbox(self.cfg.output_dir)
        try:
            run, owned = start_stage_run(run_id, names.experiment, names.run_name)
        except Exception as error:
            self.outbox.close(timeout=0)
            raise TrackingUnavailable(
                f"stage {self.stage_name}: cannot open its MLflow run at {uri} ({type(error).__name__}: "
                f"{str(error)[:300]}); nothing was trained. Start the tracking server (or unset MLFLOW_TRACKING_URI "
                "for the local store) and run again") from error
        self.run_id, self._owns_run = run.info.run_id, owned
        status = "FAILED"
        try:
            yield self.run_id
            status = "FINISHED"
        finally:
            if self.tracking is None:  # a crash: finish_tracking was not reached
                self.finish_tracking(end_status=status, timeout=TRACKING_ABORT_TIMEOUT_S)
            if owned:
                # With records still waiting, the end waits with them (in the outbox file).
                release_stage_run(self.run_id, None if self.tracking.pending else status)

    def log_stage_start(self, started_from: str, trainable: tuple[str, ...]) -> None:
        notice = self.cfg.wandb_notice(default_run_name=self.cfg.name)
        if notice:
            log.info(notice)
        log.info("stage %s starts from %s; trains %s", self.stage_name, started_from, ", ".join(trainable))

    def log_params(self, model: TheWorld, *, total_steps: int, data: PreparedData, resume_key: str,
                   started_from: str) -> None:
        """The params, tags and first data statistics of a new run (`model` unwrapped)."""
        params: dict[str, Any] = {k: str(v)[:500] for k, v in self.cfg.model_dump(mode="json").items()}
        params.update({f"trainable/{c}": n.trainable for c, n in parameter_report(model).items()})
        params["total_steps"] = total_steps
        self.outbox.log_params(self.run_id, params)
        self.outbox.log_metrics(self.run_id, stats_as_metrics(data.stats), step=self.global_step_offset)
        self.outbox.set_tags(self.run_id, {"data_fingerprint": data.fingerprint, "config_hash": resume_key,
                                           "started_from": started_from[:500]})

    # ------------------------------------------------------------------ during the stage

    def log_metrics(self, metrics: Mapping[str, float], stage_step: int) -> None:
        self.outbox.log_metrics(self.run_id, {**metrics, "stage_step": stage_step},
                                step=self.global_step_offset + stage_step)

    def on_resume_state_saved(self, path: Path | None, step: int, metrics: Mapping[str, float]) -> None:
        """Queue the hub push of a resume state (`every_save`); the upload runs in the background."""
        if self.hub is not None and path is not None:
            self.hub.on_save(path, step, {"metrics": dict(metrics)})

    # ------------------------------------------------------------------ end

    def log_stage_output(self, final: Path) -> None:
        self.outbox.log_artifacts(self.run_id, final, STAGE_OUTPUT_ARTIFACT)

    def complete_finished_stage(self, final: Path, eval_history: list[list[float]]) -> None:
        """For a stage that had already finished: log the stage output unless the run holds this very
        one (its manifest's per-file sha256), and every `eval/loss` point the run lacks."""
        from mlflow.tracking import MlflowClient

        self.outbox.flush(TRACKING_CLOSE_TIMEOUT_S)  # what an earlier run left undelivered goes first
        client = MlflowClient()
        local_files = json.loads((Path(final) / "manifest.json").read_text()).get("files")
        try:
            logged = _logged_manifest_files(client, self.run_id)
            have = {int(m.step) for m in client.get_metric_history(self.run_id, "eval/loss")}
        except Exception as error:  # noqa: BLE001 - unreachable: log it all, the outbox keeps it
            log.warning("cannot check what MLflow run %s holds (%s): logging the stage output again",
                        self.run_id, error)
            logged, have = None, set()
        if "artifacts" not in self.outbox.pending_ops(self.run_id) and logged != local_files:
            log.info("MLflow run %s lacks this stage output (%s): logging %s", self.run_id,
                     "none logged" if logged is None else "another one logged", final)
            self.log_stage_output(final)
        for step, loss in eval_history:
            if self.global_step_offset + int(step) not in have and math.isfinite(loss):
                self.log_metrics({"eval/loss": loss}, int(step))

    def log_stage_end(self, result: StageResult, *, timings: Mapping[str, float], data_stats: DataStats,
                      push_final: Path | None) -> None:
        """Status tags, timings, final data statistics; pushes `push_final` (a new stage output) and
        waits for the pushes (at most HUB_CLOSE_TIMEOUT_S), tagging the pusher's report."""
        self.outbox.set_tags(self.run_id, {"stage_status": result.status, "stage_reason": result.reason[:500]})
        # Where a stage's time went: building/loading (setup), the loop, the final save + upload.
        self.outbox.log_metrics(self.run_id, dict(timings), step=0)
        # Streamed sources know their bad-sample counts only once read: log them again at the end.
        self.outbox.log_metrics(self.run_id, stats_as_metrics(data_stats), step=self.global_step_offset + result.steps)
        if self.hub is not None:
            if push_final is not None:
                self.hub.on_end(push_final, card_info_from_result(result, self.stage_name))
            report = self.hub.close(timeout=HUB_CLOSE_TIMEOUT_S)
            self.outbox.set_tags(self.run_id, {f"hub_{k}": str(v)[:500] for k, v in report.items()})
        log.info("stage %s %s after %d steps: %s", self.stage_name, result.status, result.steps, result.reason)

    def finish_tracking(self, end_status: str | None = None, timeout: float = TRACKING_CLOSE_TIMEOUT_S
                        ) -> TrackingReport:
        """Wait (at most `timeout`, and only while MLflow answers) for the stage's records to arrive;
        tag `tracking_status`. When some cannot be delivered they stay in the outbox file, with the
        run's end (`end_status`, when this logger opened the run) after them. Returns what reached MLflow."""
        if self.tracking is not None:
            return self.tracking
        end_status = end_status if self._owns_run else None
        if self.outbox.flush(timeout):
            self.outbox.set_tags(self.run_id, {"tracking_status": "complete", "tracking_issue": ""})
        self.tracking = self.outbox.close(timeout=min(timeout, 60.0))
        if not self.tracking.complete:
            log.warning("stage %s: tracking incomplete: %s", self.stage_name, self.tracking.issue)
            tags = {"tracking_status": "incomplete", "tracking_issue": self.tracking.issue[:4000]}
            if self.tracking.pending:  # after the records still waiting in the file (the outbox has stopped)
                self.outbox.set_tags(self.run_id, tags)
                if end_status is not None:
                    self.outbox.end_run(self.run_id, end_status)
            else:  # MLflow answers but refused some records
                with contextlib.suppress(Exception):
                    from mlflow.tracking import MlflowClient

                    MlflowClient().log_batch(self.run_id, tags=[_tag(k, v) for k, v in tags.items()])
        return self.tracking

    def close(self) -> None:
        """Always called when the stage ends, also on a crash: no upload thread outlives the stage."""
        if self.hub is not None:
            self.hub.close(timeout=HUB_ABORT_TIMEOUT_S)


def _tag(key: str, value: str):
    from mlflow.entities import RunTag

    return RunTag(key, value)


def _logged_manifest_files(client, run_id: str) -> dict | None:
    """The `files` field (per-file sha256 and size) of the stage output manifest logged to `run_id`,
    None when the run holds none."""
    import tempfile

    if not client.list_artifacts(run_id, STAGE_OUTPUT_ARTIFACT):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, f"{STAGE_OUTPUT_ARTIFACT}/manifest.json", tmp)
        except OSError:
            return None
        try:
            return json.loads(Path(path).read_text()).get("files")
        except (OSError, ValueError):
            return None


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

    def log_metrics(self, metrics: Mapping[str, float], stage_step: int) -> None:
        pass

    def on_resume_state_saved(self, path: Path | None, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_stage_output(self, final: Path) -> None:
        pass

    def complete_finished_stage(self, final: Path, eval_history: list[list[float]]) -> None:
        pass

    def log_stage_end(self, result: StageResult, *, timings: Mapping[str, float], data_stats: DataStats,
                      push_final: Path | None) -> None:
        pass

    def finish_tracking(self, end_status: str | None = None, timeout: float = 0.0) -> None:
        return None

    def close(self) -> None:
        pass
