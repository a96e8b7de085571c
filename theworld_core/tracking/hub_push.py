"""Pushing stage outputs to the Hugging Face hub, in the background, never at training's expense.

The stage JSON files push every stage to `hub_model_id` (`push_to_hub`, `hub_strategy` `every_save`
or `end`) and start the next stage from it (`"resume_from_checkpoint": "owner/name"`); see
docs/checkpoints.md#where-stage-outputs-go. Here:

- `check_hub_ready(cfg)`: called before a stage loads anything; raises `ValueError` when
  `push_to_hub` is on and no token is available (naming HF_TOKEN / HF_TOKEN_PATH, never a value)
  or the hub is switched off (HF_HUB_OFFLINE).
- `HubPusher(repo_id, strategy, private)`: `on_save(folder, step)` at every resume-state save
  (`every_save` only), `on_end(folder, card_info)` once with the final stage output (both
  strategies), `close(timeout)` at the end of the stage. Each push uploads the stage output files
  (`model.safetensors`, `manifest.json`) plus a generated `README.md` model card to the repo's
  `main` branch, one commit per push whose message names the stage and the step. There are no
  per-checkpoint branches: the repo's history keeps the older pushes.
- Uploads run on one background thread, one at a time. A save that is still waiting when a newer
  save (or the end) arrives is dropped ("superseded"): only the newest state is worth the bandwidth.
  The files are hard-linked (copied where linking is impossible) into a private staging folder
  next to the source when queued, so `save_total_limit` may delete the checkpoint meanwhile.
- Failures (network, permissions, a hub error) are caught, logged as warnings and counted in
  `report()`; they never raise into the caller. `close(timeout)` returns after at most `timeout`
  seconds even when an upload hangs (the thread is a daemon and is abandoned).
- `push_failure(report)`: one line when the pushes left the hub without this stage's output (the
  final push was asked for and did not land, or every push failed), else None. The trainer puts
  the report in `StageResult.evidence["hub_push"]` and appends that line to the result's reason;
  `theworld train` then exits with `EXIT_HUB_PUSH_FAILED` (3). The status stays `completed` /
  `plateaued`: the stage output on disk and in MLflow is good, so the gate and the next stage use it.

The token is read when an upload starts (`token_getter`, by default HF_TOKEN or the file named by
HF_TOKEN_PATH) and handed only to `HfApi`. Every message this module logs or reports, and the
model card, pass through `redact`, which removes the token, any `hf_...` token-shaped string (30+
characters after `hf_`) and
the value of every secret-looking environment variable (`*TOKEN*`, `*SECRET*`, `*PASSWORD*`,
`*API_KEY*`, ...).

The trainer reaches this module only through `tracking.stage_logger.StageLogger` (the hub as a
data source is another module: `theworld_core/data/hub.py`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from theworld_core.model.base import hf_token

log = logging.getLogger("theworld.hub")

Strategy = Literal["every_save", "end"]
STRATEGIES: tuple[str, ...] = ("every_save", "end")
UPLOADED_FILES: tuple[str, ...] = ("model.safetensors", "manifest.json")
"""Files of a stage output (or of a resume state: its optimizer and RNG files are never pushed)."""
CARD_FILE = "README.md"
LIBRARY_NAME = "theworld"
CARD_TAGS: tuple[str, ...] = ("theworld", "gemma3", "cosmos", "world-model", "vision-language", "multistage-training")
TOKEN_ENV, TOKEN_PATH_ENV = "HF_TOKEN", "HF_TOKEN_PATH"

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TOKEN_SHAPED = re.compile(r"\bhf_[A-Za-z0-9]{30,}")  # HF user tokens: hf_ + 34 letters/digits
_SECRET_ENV_NAME = re.compile(r"TOKEN|SECRET|PASSW(OR)?D|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.IGNORECASE)
REDACTED = "***"
HUB_EVIDENCE_KEY = "hub_push"
"""Key of the pusher's report in `StageResult.evidence`."""
EXIT_HUB_PUSH_FAILED = 3
"""`theworld train`'s exit status when the stage trained but its output did not reach the hub."""


# ============================================================================== secrets


def secret_values(extra: tuple[str | None, ...] = ()) -> set[str]:
    """Strings that must never be shown: `extra` plus the values of secret-looking env variables."""
    values = {v for v in extra if v}
    values.update(
        v
        for k, v in os.environ.items()
        if _SECRET_ENV_NAME.search(k) and not k.upper().startswith("TOKENIZERS") and len(v) >= 6
    )
    return values


def redact(text: str, secrets: set[str] | None = None) -> str:
    """`text` with every secret value and every `hf_...` token-shaped string replaced by `***`."""
    for value in sorted(secrets if secrets is not None else secret_values(), key=len, reverse=True):
        text = text.replace(value, REDACTED)
    return _TOKEN_SHAPED.sub(REDACTED, text)


# ============================================================================== fail fast


def check_hub_ready(cfg: Any) -> None:
    """Raise `ValueError` before training when `cfg.push_to_hub` cannot work; do nothing otherwise.

    Checks, without any network call: a repo id is set, a token is available (HF_TOKEN, or a
    readable non-empty file named by HF_TOKEN_PATH) and the hub is not switched off
    (HF_HUB_OFFLINE). The message names the variables, never a value. Whether the token may write
    to the repo is only known at the first upload (a failure there is reported, not raised).
    """
    if not getattr(cfg, "push_to_hub", False):
        return
    repo_id = getattr(cfg, "hub_model_id", None)
    if not repo_id:
        raise ValueError("push_to_hub is true but hub_model_id is not set: name the hub repo as 'owner/name'")
    if hf_token() is None:
        path = os.environ.get(TOKEN_PATH_ENV)
        why = ""
        if path:
            why = f" ({TOKEN_PATH_ENV} names {path!r}, which " + (
                "is empty)" if Path(path).is_file() else "does not exist)"
            )
        raise ValueError(
            f"push_to_hub is true (hub_model_id {repo_id!r}) but no Hugging Face token was found{why}: "
            f"set the {TOKEN_ENV} environment variable to a token with write access, or {TOKEN_PATH_ENV} to a "
            "file holding one (never put the token in a config file)"
        )
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise ValueError(
            f"push_to_hub is true (hub_model_id {repo_id!r}) but HF_HUB_OFFLINE is set: uploads need the hub; "
            "unset HF_HUB_OFFLINE or set push_to_hub to false"
        )


# ============================================================================== model card


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _base_label(entry: Mapping[str, Any] | None) -> tuple[str | None, str]:
    """(hub id or None, markdown text) of a manifest base entry; local folders show their name only."""
    entry = entry or {}
    source = str(entry.get("id") or "")
    if _HUB_ID.match(source) and not Path(source).expanduser().exists():
        text = f"[`{source}`](https://huggingface.co/{source})"
        if entry.get("revision"):
            text += f", revision `{entry['revision']}`"
        if entry.get("commit"):
            text += f", commit `{str(entry['commit'])[:12]}`"
        return source, text
    name = Path(source).name if source else "unknown"
    return None, f"a local folder (`{name}`)"


def model_card(repo_id: str, manifest: Mapping[str, Any], card_info: Mapping[str, Any] | None = None) -> str:
    """The README.md of a pushed stage output: YAML front matter, stage, bases, components, metrics, loading.

    `card_info` (all optional): `stage` (name), `step`, `status`, `reason`, `metrics` (name -> number).
    The result is passed through `redact`.
    """
    from huggingface_hub import ModelCardData

    info = dict(card_info or {})
    stage_config = manifest.get("stage_config") or {}
    stage = info.get("stage") or stage_config.get("name") or "unnamed stage"
    bases = manifest.get("base") or {}
    gemma_id, gemma_text = _base_label(bases.get("gemma"))
    cosmos_id, cosmos_text = _base_label(bases.get("cosmos"))
    hub_bases = [b for b in (gemma_id, cosmos_id) if b]
    data = ModelCardData(library_name=LIBRARY_NAME, base_model=hub_bases or None, tags=list(CARD_TAGS))

    lines = ["---", data.to_yaml().strip(), "---", "", f"# {repo_id}", ""]
    lines += [
        (
            "A [TheWorld](https://github.com/kasohrab/theworld) stage output: Gemma 3 (vision-language) and the "
            "Cosmos world model's VAE encoder, joined by trained world projection layers, trained by progressive "
            "unfreezing."
        ),
        "",
        (
            "This repository holds only what training changed: `model.safetensors` has the parameters of the "
            "components trained so far, `manifest.json` the base models, architecture fingerprint and configs. "
            "The frozen pretrained weights are loaded from the base models, and loading onto a different base "
            "is refused."
        ),
        "",
        "## Stage",
        "",
        "| | |",
        "|---|---|",
        f"| stage | `{stage}` |",
    ]
    if info.get("step") is not None:
        lines.append(f"| optimizer step | {info['step']} |")
    if info.get("status"):
        reason = str(info.get("reason") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| status | {info['status']}" + (f": {reason}" if reason else "") + " |")
    lines += ["", "## Base models", "", f"- Gemma 3: {gemma_text}", f"- Cosmos VAE (encoder only): {cosmos_text}", ""]

    params = manifest.get("parameters") or {}
    counts: dict[str, int] = {}
    for name, shape in params.items():
        component = _component_of(name)
        n = 1
        for d in shape:
            n *= int(d)
        counts[component] = counts.get(component, 0) + n
    lines += ["## Components", "", "| component | trained | parameters saved |", "|---|---|---|"]
    trained = set(manifest.get("components") or [])
    for component in ("world_projector", "gemma_vision", "gemma_language", "cosmos_vae"):
        saved = counts.get(component, 0)
        lines.append(f"| {component} | {'yes' if component in trained else 'no (pretrained)'} | {saved:,} |")
    flags = {
        k: stage_config[k]
        for k in ("freeze_gemma_vision", "freeze_gemma_language", "freeze_cosmos_vae")
        if k in stage_config
    }
    if flags:
        lines += ["", "Freeze flags of this stage: " + ", ".join(f"`{k}: {_fmt(v)}`" for k, v in flags.items()) + "."]
    hyper = {
        k: stage_config[k]
        for k in ("learning_rate", "batch_size", "gradient_accumulation_steps", "max_steps")
        if stage_config.get(k) is not None
    }
    if hyper:
        lines += ["", "Training: " + ", ".join(f"`{k}: {_fmt(v)}`" for k, v in hyper.items()) + "."]

    metrics = info.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if v is not None]

    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from theworld_core.model.theworld import TheWorld",
        "",
        f'model = TheWorld.from_pretrained("{repo_id}")',
        "```",
        "",
        'Start the next stage from it with `"resume_from_checkpoint": "' + repo_id + '"` in its stage config '
        "(a fresh optimizer and warmup; newly unfrozen components start from their pretrained weights).",
        "",
    ]
    return redact("\n".join(lines))


def _component_of(name: str) -> str:
    try:
        from theworld_core.model.components import component_of

        return component_of(name) or "other"
    except Exception:  # noqa: BLE001 - the card must never fail on an unexpected name
        return "other"


def card_info_from_result(result: Any, stage: str | None = None) -> dict[str, Any]:
    """`on_end`'s `card_info` from a trainer `StageResult` (status, steps, eval and train losses)."""
    metrics = {
        "eval_loss": getattr(result, "eval_loss", None),
        "best_eval_loss": getattr(result, "best_eval_loss", None),
        "train_loss": getattr(result, "train_loss", None),
    }
    return {
        "stage": stage,
        "step": getattr(result, "steps", None),
        "status": getattr(result, "status", None),
        "reason": getattr(result, "reason", None),
        "metrics": {k: v for k, v in metrics.items() if v is not None},
    }


# ============================================================================== pusher


@dataclass
class _Job:
    kind: Literal["save", "end"]
    staged: Path
    step: int | None
    commit_message: str


@dataclass
class _Stats:
    done: int = 0
    failed: int = 0
    superseded: int = 0
    last_error: str | None = None
    last_commit: str | None = None
    last_step: int | None = None
    pushed_final: bool = False
    final_requested: bool = False


class HubPusher:
    """Uploads stage outputs to `repo_id` on a background thread (see the module docstring).

    `endpoint` (default: huggingface_hub's, i.e. HF_ENDPOINT or huggingface.co) and `stage_name`
    (for commit messages and the card) are optional. Safe to call from the training loop: `on_save`
    and `on_end` only link files and queue; nothing they do raises.
    """

    def __init__(
        self,
        repo_id: str,
        strategy: Strategy = "every_save",
        private: bool = False,
        token_getter: Callable[[], str | None] = hf_token,
        *,
        endpoint: str | None = None,
        stage_name: str | None = None,
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"hub_strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
        if not _HUB_ID.match(repo_id or ""):
            raise ValueError(f"hub repo id {repo_id!r} is not of the form 'owner/name'")
        self.repo_id, self.strategy, self.private = repo_id, strategy, bool(private)
        self.endpoint, self.stage_name = endpoint, stage_name
        self._token_getter = token_getter
        self._cond = threading.Condition()
        self._pending: list[_Job] = []
        self._current: _Job | None = None
        self._closing = False
        self._cancelled = False
        self._thread: threading.Thread | None = None
        self._repo_created = False
        self._stats = _Stats()
        self._timed_out = False  # a close() gave up on an upload

    # ------------------------------------------------------------------ public

    def on_save(self, folder: str | Path, step: int, card_info: Mapping[str, Any] | None = None) -> bool:
        """Queue a push of the resume state / stage output `folder` (its weights and manifest) at `step`.

        Only for `every_save`; a no-op returning False for `end`. A still-waiting older save is
        dropped. Returns whether the push was queued."""
        if self.strategy != "every_save":
            return False
        info = {"step": step, **(card_info or {})}
        message = f"{self._stage_label(folder)}: checkpoint at step {step}"
        return self._queue("save", folder, step, info, message)

    def on_end(self, folder: str | Path, card_info: Mapping[str, Any] | None = None) -> bool:
        """Queue the push of the final stage output `folder` (both strategies); waiting saves are dropped."""
        info = dict(card_info or {})
        with self._cond:
            self._stats.final_requested = True
        step = info.get("step")
        status = info.get("status")
        message = f"{self._stage_label(folder, info)}: final stage output" + (
            f" at step {step}" if step is not None else ""
        )
        if status:
            message += f" ({status})"
        return self._queue("end", folder, step, info, message)

    def close(self, timeout: float = 600.0) -> dict[str, Any]:
        """Let the queued pushes finish for at most `timeout` seconds, then return `report()`.

        Pushes still waiting at the deadline are dropped (counted under `pending` with `timed_out`
        true); one in progress is abandoned on its daemon thread. Later `on_save`/`on_end` are ignored."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._pending or self._current is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            timed_out = bool(self._pending or self._current is not None)
            self._timed_out = self._timed_out or timed_out
            if timed_out:
                self._cancelled = True
                dropped, self._pending = self._pending, []
                self._cond.notify_all()
            else:
                dropped = []
        for job in dropped:
            shutil.rmtree(job.staged, ignore_errors=True)
        report = self.report()
        if timed_out:
            report["pending"] = len(dropped) + (1 if report["in_progress"] else 0)
            log.warning(
                "hub: push to %s not finished after %.0f s; %d upload(s) abandoned",
                self.repo_id,
                timeout,
                report["pending"],
            )
        return report

    def report(self) -> dict[str, Any]:
        """Counts and the last error, for logs and MLflow tags (no token, no env values)."""
        with self._cond:
            s = self._stats
            return {
                "repo_id": self.repo_id,
                "strategy": self.strategy,
                "uploads_done": s.done,
                "uploads_failed": s.failed,
                "superseded": s.superseded,
                "pending": len(self._pending),
                "in_progress": self._current is not None,
                "last_step": s.last_step,
                "last_commit": s.last_commit,
                "pushed_final": s.pushed_final,
                "final_requested": s.final_requested,
                "timed_out": self._timed_out,
                "last_error": s.last_error,
            }

    # ------------------------------------------------------------------ queueing

    def _stage_label(self, folder: str | Path, info: Mapping[str, Any] | None = None) -> str:
        name = (info or {}).get("stage") or self.stage_name
        if not name:
            try:
                manifest = json.loads((Path(folder) / "manifest.json").read_text())
                name = (manifest.get("stage_config") or {}).get("name")
            except Exception:  # noqa: BLE001
                name = None
        return f"stage {name}" if name else "stage"

    def _queue(
        self, kind: Literal["save", "end"], folder: str | Path, step: int | None, info: dict, message: str
    ) -> bool:
        with self._cond:
            if self._closing:
                log.warning("hub: %s push of %s ignored: the pusher is closed", kind, Path(folder).name)
                return False
        try:
            staged = self._stage(Path(folder), info)
        except Exception as exc:  # noqa: BLE001 - never fails training
            self._record_failure(f"cannot stage {Path(folder).name} for upload: {type(exc).__name__}: {exc}")
            return False
        job = _Job(kind, staged, step, redact(message))
        dropped: list[_Job] = []
        queued = False
        with self._cond:
            if self._closing:  # closed while staging
                dropped.append(job)
            else:
                queued = True
                keep = []
                for old in self._pending:
                    (dropped if old.kind == "save" else keep).append(old)
                self._pending = keep + [job]
                self._stats.superseded += len(dropped)
                self._ensure_thread()
                self._cond.notify_all()
        for old in dropped:
            shutil.rmtree(old.staged, ignore_errors=True)
        return queued

    def _stage(self, folder: Path, info: Mapping[str, Any]) -> Path:
        """Link the files into a private folder next to `folder` and write the model card there."""
        missing = [f for f in UPLOADED_FILES if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder.name} lacks {', '.join(missing)}")
        staged = folder.parent / f".hub-upload-{uuid.uuid4().hex[:10]}"
        staged.mkdir(parents=True)
        try:
            for name in UPLOADED_FILES:
                try:
                    os.link(folder / name, staged / name)
                except OSError:
                    shutil.copy2(folder / name, staged / name)
            manifest = json.loads((staged / "manifest.json").read_text())
            card_info = {"stage": self.stage_name, **{k: v for k, v in info.items() if v is not None}}
            (staged / CARD_FILE).write_text(model_card(self.repo_id, manifest, card_info), encoding="utf-8")
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        return staged

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._worker, name="theworld-hub-push", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ worker

    def _worker(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending or self._cancelled:
                    return
                job = self._current = self._pending.pop(0)
            try:
                self._upload(job)
            finally:
                shutil.rmtree(job.staged, ignore_errors=True)
                with self._cond:
                    self._current = None
                    self._cond.notify_all()

    def _upload(self, job: _Job) -> None:
        token = None
        try:
            token = self._token_getter()
            if not token:
                raise RuntimeError(f"no Hugging Face token: set {TOKEN_ENV} (or {TOKEN_PATH_ENV} to a file holding it)")
            from huggingface_hub import HfApi

            from theworld_core.version import code_version

            api = HfApi(endpoint=self.endpoint, token=token, library_name=LIBRARY_NAME, library_version=code_version())
            if not self._repo_created:
                api.create_repo(self.repo_id, private=self.private, exist_ok=True, repo_type="model")
                self._repo_created = True
            commit = api.upload_folder(
                repo_id=self.repo_id,
                folder_path=str(job.staged),
                repo_type="model",
                commit_message=job.commit_message,
                allow_patterns=[*UPLOADED_FILES, CARD_FILE],
            )
        except BaseException as exc:  # a failed push never reaches training
            detail = f"{type(exc).__name__}: {exc}"
            self._record_failure(f"{job.commit_message}: {detail}", token)
            if not isinstance(exc, Exception):
                raise
            return
        with self._cond:
            s = self._stats
            s.done += 1
            s.last_step = job.step
            s.last_commit = (
                redact(
                    str(getattr(commit, "oid", None) or getattr(commit, "commit_url", "") or ""),
                    secret_values((token,)),
                )
                or None
            )
            s.pushed_final = s.pushed_final or job.kind == "end"
        log.info("hub: pushed to %s (%s)", self.repo_id, job.commit_message)

    def _record_failure(self, message: str, token: str | None = None) -> None:
        text = redact(message, secret_values((token,)))
        if len(text) > 1000:
            text = text[:997] + "..."
        with self._cond:
            self._stats.failed += 1
            self._stats.last_error = text
            failed = self._stats.failed
        log.warning("hub: push to %s failed (%d failed so far): %s", self.repo_id, failed, text)


def push_failure(report: Mapping[str, Any] | None) -> str | None:
    """One line when a stage's pushes (its pusher's `report()`) left the hub without the stage's
    output, else None: the final push was asked for and did not land, or no push landed at all."""
    if not report:
        return None
    failed, done = report.get("uploads_failed") or 0, report.get("uploads_done") or 0
    if report.get("final_requested") and not report.get("pushed_final"):
        what = "the final stage output did not reach it"
    elif failed and not done:
        what = "every push failed"
    else:
        return None
    why = [f"{failed} of {failed + done} upload(s) failed"]
    if report.get("timed_out"):
        why.append("an upload was still running when the stage ended and was abandoned")
    if report.get("last_error"):
        why.append(f"last error: {' '.join(str(report['last_error']).split())[:300]}")
    return f"hub push to {report.get('repo_id')} failed: {what} ({'; '.join(why)})"


def pusher_for(cfg: Any, stage_name: str | None = None, **kwargs: Any) -> HubPusher | None:
    """A `HubPusher` for a stage config with `push_to_hub` on (else None), after `check_hub_ready`."""
    if not getattr(cfg, "push_to_hub", False):
        return None
    check_hub_ready(cfg)
    return HubPusher(
        cfg.hub_model_id,
        cfg.hub_strategy,
        cfg.hub_private_repo,
        stage_name=stage_name or getattr(cfg, "name", None),
        **kwargs,
    )
