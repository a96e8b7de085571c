"""The console of every `theworld` command: one readable line per event that matters.

    10:11:08 train-projection   stage projection starts from pretrained bases; trains world_projector
    10:11:12 train-projection   Finished in state Completed()
    10:11:17 gate-projection    Finished in state Completed()
    10:11:17 calm-lynx          stage projection attempt 1: plateaued -> next: eval_loss 6.71 of ...

`configure_console()` sets, before any command runs:
- one handler on the root logger; each line names where it comes from: the Prefect task run
  (`train-projection`), the flow run (its name), or the logger;
- the root logger at WARNING, so libraries' INFO chatter stays out (httpx writes one line per HTTP
  request, i.e. per Prefect API call); the library's own loggers (`theworld.*`) at INFO;
- no progress bars of datasets (split generation), transformers (weight loading, shard writing),
  huggingface_hub or MLflow (artifact transfers), and MLflow's own INFO lines: environment
  variables, so subprocesses (ranks of a distributed stage, `theworld serve`'s flow runs) inherit
  them. The trainer's own step bar stays; lines logged while it is drawn are written above it.

`library_loggers_at_info()` is what a process that did not start through the CLI (a flow run that
Prefect's runner or worker starts) needs so that `theworld.*` INFO lines reach its handlers.
"""

from __future__ import annotations

import logging
import os
import sys

LIBRARY_LOGGER = "theworld"

QUIET_PROGRESS_ENV = {
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Generating train split", map/filter bars
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # hub downloads and transformers' "Loading weights" / "Writing model shards"
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" / "Uploading artifacts"
    # MLflow's loggers have a handler of their own, set up on import, and print INFO lines such as
    # "Creating initial MLflow database tables...": warnings only.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}
"""Set when unset: a user who exports one of them keeps their choice."""


class ConsoleFormatter(logging.Formatter):
    """`HH:MM:SS <source> <message>`; the source is the Prefect task run's name, else the flow run's,
    else the logger's name (`theworld.` dropped)."""

    SOURCE_WIDTH = 18

    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        source = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None) or record.name
        if source.startswith(LIBRARY_LOGGER + "."):
            source = source[len(LIBRARY_LOGGER) + 1 :]
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        line = f"{self.formatTime(record, self.datefmt)} {source:<{self.SOURCE_WIDTH}} {level}{record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class ConsoleHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment (a test's capture, a redirected stream), not the one
    of when it was made. Its class name must not start with "_": Prefect's logging set-up keeps the
    console to a root handler of the user's only when it looks like one."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(ConsoleFormatter())

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """While the trainer's step bar is drawn, the line goes above it (tqdm clears the bar, the line
        is written, the bar is redrawn) instead of being glued to the bar's end."""
        tqdm = sys.modules.get("tqdm")  # not imported yet: no bar is drawn
        if tqdm is None:
            super().emit(record)
            return
        try:
            tqdm.tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001  (logging's own rule: a failed line must not stop the caller)
            self.handleError(record)


def library_loggers_at_info() -> None:
    """`theworld.*` at INFO unless someone set its level (a test, a notebook)."""
    logger = logging.getLogger(LIBRARY_LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def quiet_progress_bars() -> None:
    for key, value in QUIET_PROGRESS_ENV.items():
        os.environ.setdefault(key, value)


def configure_console() -> logging.Handler:
    """The console of a `theworld` command (see the module's docstring); returns its handler.

    Call before Prefect is imported: Prefect then sees a handler of ours on the root logger and
    leaves the console to it (its flow and task run loggers propagate here, carrying their names)."""
    quiet_progress_bars()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, ConsoleHandler):  # called again (tests call main() many times)
            root.removeHandler(handler)
    handler = ConsoleHandler()
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    library_loggers_at_info()
    return handler
