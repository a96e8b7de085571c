"""Everything a stage reports, behind one object: console lines, MLflow and the Hugging Face Hub push.

The trainer picks its logger once, in setup (`stage_logger_for`): `StageLogger` on rank 0,
`NullStageLogger` (every method does nothing) on the other ranks. It then calls only these methods
and never asks which rank it is on to decide whether to log.

What lands in MLflow:
- params: the stage config keys that mean something for this stage (`stage_params`: no key of a
  feature that is off, no unset key; values cut to 500 characters), `trainable/<component>`
  (trainable parameter counts), `total_steps`, the precision policy (`precision/...`), and the
  sample counts `data/train`, `data/eval`, `data/total` (`data/bad` and `data/bad/<reason>` only
  when non-zero); tags `data_fingerprint`, `config_hash` (the resume key), `started_from`;
- inputs: the training and evaluation data as MLflow datasets (`stage_datasets`: source, digest =
  the data fingerprint's first 16 hex digits, profile with the full fingerprint and the counts),
  contexts `training` and `eval`;
- metrics at step `global_step_offset + stage step`, each with `stage_step` (learning rates as
  `train/lr/<group>`: the UI orders chart sections by name, eval/ and train/ first); system metrics
  (`system/...`, MLflow's sampler) when the run's `theworld.log_system_metrics` tag is "true"; with
  the feature cache on, its counters `train/feature_cache/...` (hits, misses, bytes, encode seconds saved;
  summed over ranks) at every logging step;
- the stage output folder as the `stage_output` artifact;
- at the end: tags `stage_status`, `stage_reason`, `hub_<key>` (the hub pusher's report, when
  pushing), metrics `walltime/setup_s`, `walltime/train_s`, `walltime/finish_s`; a streamed source's counts
  (known only once read) as the `data/...` params then; `tracking_status` (complete | incomplete) and
  `tracking_issue`.

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


def stage_logger_for(
    cfg: StageConfig, *, is_main_process: bool, global_step_offset: int = 0, stage_name: str | None = None
) -> StageLogger | NullStageLogger:
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
        self._counts_logged = False  # log_params logged the data counts
        self.tracking: TrackingReport | None = None  # set by finish_tracking

    # ------------------------------------------------------------------ start

    @contextlib.contextmanager
    def open_run(self, run_id: str | None) -> Iterator[str | None]:
        """The stage's MLflow run, active inside the block: `run_id` when it exists (a resumed stage,
        or the pipeline's child run), else a new run in the config's experiment. Yields its id.

        System metrics are sampled while it is active when the run's `theworld.log_system_metrics`
        tag (the pipeline's `mlflow.log_system_metrics`) is "true".

        Opens the output folder's tracking outbox first, which sends what an earlier run there left
        undelivered. The run is ended FINISHED (FAILED on an exception) when the block ends, directly
        when MLflow has everything, else through the outbox."""
        from theworld_core.tracking.mlflow_runs import configure_tracking, release_stage_run, start_stage_run

        names = self.cfg.mlflow_names(default_run_name=self.cfg.name)
        uri = configure_tracking()
        self.outbox = TrackingOutbox(self.cfg.output_dir)
        try:
            run, owned = start_stage_run(
                run_id, names.experiment, names.run_name, log_system_metrics=system_metrics_setting(run_id)
            )
        except Exception as error:
            self.outbox.close(timeout=0)
            raise TrackingUnavailable(
                f"stage {self.stage_name}: cannot open its MLflow run at {uri} ({type(error).__name__}: "
                f"{str(error)[:300]}); nothing was trained. Start the tracking server (or unset MLFLOW_TRACKING_URI "
                "for the local store) and run again"
            ) from error
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

    def log_params(
        self, model: TheWorld, *, total_steps: int, data: PreparedData, resume_key: str, started_from: str
    ) -> None:
        """The params, tags and first data statistics of a new run (`model` unwrapped)."""
        params: dict[str, Any] = {k: str(v)[:500] for k, v in stage_params(self.cfg.model_dump(mode="json")).items()}
        params.update({f"trainable/{c}": n.trainable for c, n in parameter_report(model).items()})
        params["total_steps"] = total_steps
        if data.stats.complete:  # a stream's counts grow while it is read: logged at the end
            params.update(data_count_params(data.stats))
            self._counts_logged = True
        self.outbox.log_params(self.run_id, params)
        self.outbox.log_inputs(
            self.run_id, [(dataset._to_mlflow_entity(), context) for dataset, context in stage_datasets(self.cfg, data)]
        )
        self.outbox.set_tags(
            self.run_id,
            {"data_fingerprint": data.fingerprint, "config_hash": resume_key, "started_from": started_from[:500]},
        )

    def log_precision(self, params: Mapping[str, str]) -> None:
        """The precision policy of a new run (`PrecisionPolicy.as_params()`: `precision/...`)."""
        self.outbox.log_params(self.run_id, params)

    # ------------------------------------------------------------------ during the stage

    def log_metrics(self, metrics: Mapping[str, float], stage_step: int) -> None:
        """Metrics at the pipeline-global step; learning rates (`lr/<group>`) as `train/lr/<group>`,
        so the MLflow UI's chart sections (alphabetical by prefix) start with eval/ and train/."""
        named = {f"train/{k}" if k.startswith("lr/") else k: v for k, v in metrics.items()}
        self.outbox.log_metrics(
            self.run_id, {**named, "stage_step": stage_step}, step=self.global_step_offset + stage_step
        )

    def log_feature_cache(
        self, stats: Mapping[str, float], disabled_reason: str | None, kinds: tuple[str, ...]
    ) -> None:
        """Once per stage, a console line on the feature cache (its `train/feature_cache/...` counters, summed
        over ranks, go to MLflow with the train metrics). `kinds`: what this stage caches."""
        if getattr(self, "_feature_cache_noted", False):
            return
        self._feature_cache_noted = True
        if disabled_reason is not None:
            log.info("feature cache off (%s): frozen encoders run on every step", disabled_reason)
        elif not kinds:
            log.info("feature cache not used: no encoder is frozen in this stage")
        else:
            log.info(
                "feature cache: %d hits, %d misses so far (%.0f%% hit rate)",
                stats.get("train/feature_cache/hits", 0),
                stats.get("train/feature_cache/misses", 0),
                100 * stats.get("train/feature_cache/hit_rate", 0.0),
            )

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
            log.warning(
                "cannot check what MLflow run %s holds (%s): logging the stage output again", self.run_id, error
            )
            logged, have = None, set()
        if "artifacts" not in self.outbox.pending_ops(self.run_id) and logged != local_files:
            log.info(
                "MLflow run %s lacks this stage output (%s): logging %s",
                self.run_id,
                "none logged" if logged is None else "another one logged",
                final,
            )
            self.log_stage_output(final)
        for step, loss in eval_history:
            if self.global_step_offset + int(step) not in have and math.isfinite(loss):
                self.log_metrics({"eval/loss": loss}, int(step))

    def log_stage_end(
        self, result: StageResult, *, timings: Mapping[str, float], data_stats: DataStats, push_final: Path | None
    ) -> None:
        """Status tags, timings, final data statistics; pushes `push_final` (a new stage output) and
        waits for the pushes (at most HUB_CLOSE_TIMEOUT_S), tagging the pusher's report."""
        self.outbox.set_tags(self.run_id, {"stage_status": result.status, "stage_reason": result.reason[:500]})
        # Where a stage's time went: building/loading (setup), the loop, the final save + upload;
        # `walltime/` sorts after train/ in the UI's chart sections (the trainer names them time/...).
        self.outbox.log_metrics(self.run_id, {walltime_name(k): v for k, v in timings.items()}, step=0)
        # Streamed sources know their counts only once read (a resumed stage logged them before).
        counts = {} if self._counts_logged else data_count_params(data_stats)
        if counts:
            counts = {k: v for k, v in counts.items() if k not in self._logged_params()}
        if counts:
            self.outbox.log_params(self.run_id, counts)
        if self.hub is not None:
            if push_final is not None:
                self.hub.on_end(push_final, card_info_from_result(result, self.stage_name))
            report = self.hub.close(timeout=HUB_CLOSE_TIMEOUT_S)
            self.outbox.set_tags(self.run_id, {f"hub_{k}": str(v)[:500] for k, v in report.items()})
        log.info("stage %s %s after %d steps: %s", self.stage_name, result.status, result.steps, result.reason)

    def _logged_params(self) -> dict[str, str]:
        """The run's params as MLflow has them (after what waits in the outbox); {} when it cannot say."""
        from mlflow.tracking import MlflowClient

        self.outbox.flush(TRACKING_ABORT_TIMEOUT_S)
        try:
            return MlflowClient().get_run(self.run_id).data.params
        except Exception:  # noqa: BLE001 - unreachable: the counts go to the outbox and wait there
            return {}

    def finish_tracking(
        self, end_status: str | None = None, timeout: float = TRACKING_CLOSE_TIMEOUT_S
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


def walltime_name(key: str) -> str:
    """`time/<x>` -> `walltime/<x>`: MLflow's UI orders chart sections by name, eval/ and train/ lead."""
    return f"walltime/{key.removeprefix('time/')}" if key.startswith("time/") else key


# ---------------------------------------------------------------------------------------------
# What a stage run shows: params that mean something, the data as MLflow datasets.
# ---------------------------------------------------------------------------------------------

_SWITCHED_KEYS: dict[str, tuple[str, ...]] = {
    # switch key -> the keys that mean nothing while it is off (False / None)
    "log_to_wandb": ("wandb_project", "wandb_run_name"),
    "push_to_hub": ("hub_model_id", "hub_strategy", "hub_private_repo"),
    "inject_fault": ("inject_fault_step",),
    "enable_world": ("num_world_steps", "max_world_steps", "world_tokens", "world_image_size", "world_projector"),
}
_OPT_IN_FLAGS = ("log_to_wandb", "push_to_hub", "use_gradient_checkpointing", "carry_optimizer_state", "streaming")
"""Boolean switches that are off (False) unless a config turns them on: logged only when on."""
_URL_LIST_KEYS = (
    "fetch_timeout_s",
    "fetch_retries",
    "fetch_backoff_s",
    "fetch_max_bytes",
    "fetch_concurrency",
    "image_cache_dir",
)
_SYNTHETIC_KEYS = ("synthetic_samples", "synthetic_image_size")


def stage_params(config: dict[str, Any]) -> dict[str, Any]:
    """The stage config keys worth a column in MLflow: every key, except unset ones (None), opt-in
    switches that are off (`log_to_wandb`, `push_to_hub`, ...), the keys of a feature that is off
    (wandb, hub, fault injection, the world branch), and the data keys of other kinds of source
    (`synthetic_*` for a real source; `fetch_*`, `dataset_split` for `synthetic`)."""
    drop: set[str] = {k for k in _OPT_IN_FLAGS if config.get(k) is False}
    for switch, keys in _SWITCHED_KEYS.items():
        if switch in config and not config[switch]:
            drop.update(keys)
    source = str(config.get("dataset_name", ""))
    if source == "synthetic":
        drop.update((*_URL_LIST_KEYS, "dataset_split"))
    else:
        drop.update(_SYNTHETIC_KEYS)
        if Path(source).expanduser().exists():
            drop.add("dataset_split")  # read by hub datasets only
    return {k: v for k, v in config.items() if v is not None and k not in drop}


def data_count_params(stats: DataStats) -> dict[str, str]:
    """`data/train`, `data/eval`, `data/total`; `data/bad`, `data/bad_fraction` and `data/bad/<reason>`
    only when samples were bad; `data/complete` "false" when a stream was not read to its end."""
    params = {"data/train": str(stats.train), "data/eval": str(stats.eval), "data/total": str(stats.total)}
    if stats.bad:
        params.update({"data/bad": str(stats.bad), "data/bad_fraction": f"{stats.bad_fraction:.4f}"})
        params.update({f"data/bad/{reason}": str(n) for reason, n in sorted(stats.bad_reasons.items()) if n})
    if not stats.complete:
        params["data/complete"] = "false"
    return params


DATASET_DIGEST_CHARS = 16
"""MLflow keeps a dataset digest in 36 characters: the digest is the fingerprint's start, the
profile holds all of it."""


def stage_datasets(cfg: StageConfig, data: PreparedData) -> list[tuple[Any, str]]:
    """The stage's training and evaluation data as MLflow datasets, with their input contexts.

    Metadata only (no rows are copied): the source (a hub dataset, a local file or folder, a URL, or
    the synthetic generator's settings), the digest (the data fingerprint's first 16 hex digits),
    the schema of a sample and a profile with the full fingerprint and the sample counts."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, DataType, Schema

    class _ProfiledDataset(MetaDataset):
        def __init__(self, *args, profile: dict[str, Any], **kwargs):
            self._profile = profile
            super().__init__(*args, **kwargs)

        @property
        def profile(self) -> dict[str, Any]:
            return self._profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    stats = data.stats
    schema = Schema(
        [
            ColSpec(DataType.string, "id"),
            ColSpec(DataType.binary, "image"),
            ColSpec(DataType.string, "prompt"),
            ColSpec(DataType.string, "text"),
        ]
    )
    source = _dataset_source(cfg)
    base = _dataset_base_name(cfg.dataset_name)
    common = {
        "fingerprint": data.fingerprint,
        "source": data.source,
        "total_samples": stats.total,
        "bad_samples": stats.bad,
        "counts_complete": stats.complete,
    }
    return [
        (
            _ProfiledDataset(
                source,
                name=f"{base}-{split}",
                digest=data.fingerprint[:DATASET_DIGEST_CHARS],
                schema=schema,
                profile={"split": split, "num_samples": count, **common},
            ),
            context,
        )
        for split, count, context in (("train", stats.train, "training"), ("eval", stats.eval, "eval"))
    ]


def _dataset_base_name(dataset_name: str) -> str:
    text = dataset_name.rstrip("/")
    if text.startswith(("http://", "https://")):
        text = text.split("?")[0]
    return (text.rsplit("/", 1)[-1] if "/" in text and Path(text).expanduser().exists() else text)[-200:] or "data"


def _dataset_source(cfg: StageConfig):
    """The MLflow dataset source of `cfg.dataset_name`."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    name = cfg.dataset_name
    if name == "synthetic":
        return CodeDatasetSource(
            {
                "generator": "theworld synthetic",
                "seed": str(cfg.seed),
                "samples": str(cfg.synthetic_samples),
                "image_size": str(cfg.synthetic_image_size),
            }
        )
    if name.startswith(("http://", "https://")):
        return HTTPDatasetSource(name)
    path = Path(name).expanduser()
    if path.exists():
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        return resolve_dataset_source(path.resolve().as_uri())
    from theworld_core.data.hub import hub_dataset_id

    return HuggingFaceDatasetSource(path=hub_dataset_id(name), split=cfg.dataset_split)


def system_metrics_setting(run_id: str | None) -> bool | None:
    """Whether MLflow samples system metrics in the stage run: the run's `theworld.log_system_metrics`
    tag (the pipeline sets it from `mlflow.log_system_metrics`); None, MLflow's own switch
    (`MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`), for a run without the tag. False, with a warning, when
    psutil (which MLflow's sampler needs) is missing: the stage trains regardless."""
    import importlib.util

    from theworld_core.tracking.mlflow_runs import SYSTEM_METRICS_TAG, configure_tracking

    if run_id is None:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    configure_tracking()
    try:
        wanted = mlflow.get_run(run_id).data.tags.get(SYSTEM_METRICS_TAG)
    except MlflowException:
        return None
    if wanted is None:
        return None
    if wanted.lower() != "true":
        return False
    if importlib.util.find_spec("psutil") is None:
        log.warning(
            "mlflow.log_system_metrics is true but psutil is not installed: no system metrics (pip install psutil)"
        )
        return False
    return True


class NullStageLogger:
    """The logger of ranks other than 0: the same methods as `StageLogger`, doing nothing."""

    @contextlib.contextmanager
    def open_run(self, run_id: str | None) -> Iterator[str | None]:
        yield None

    def log_stage_start(self, started_from: str, trainable: tuple[str, ...]) -> None:
        pass

    def log_params(
        self, model: TheWorld, *, total_steps: int, data: PreparedData, resume_key: str, started_from: str
    ) -> None:
        pass

    def log_precision(self, params: Mapping[str, str]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], stage_step: int) -> None:
        pass

    def log_feature_cache(
        self, stats: Mapping[str, float], disabled_reason: str | None, kinds: tuple[str, ...]
    ) -> None:
        pass

    def on_resume_state_saved(self, path: Path | None, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def log_stage_output(self, final: Path) -> None:
        pass

    def complete_finished_stage(self, final: Path, eval_history: list[list[float]]) -> None:
        pass

    def log_stage_end(
        self, result: StageResult, *, timings: Mapping[str, float], data_stats: DataStats, push_final: Path | None
    ) -> None:
        pass

    def finish_tracking(self, end_status: str | None = None, timeout: float = 0.0) -> None:
        return None

    def close(self) -> None:
        pass
