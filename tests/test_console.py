"""The console of `theworld run`: one readable line per event that matters.

The slow test runs `theworld run --profile tiny` (the repo's stages.yaml, its tiny profile shortened
to 10 steps a stage; all four stages, so stages 3 and 4 switch activation checkpointing on) in a
temporary project folder as a new user would: THEWORLD_PROJECT_DIR set, no PREFECT_API_URL (the
command's temporary Prefect server), no MLFLOW_TRACKING_URI (SQLite in the folder). It reads the
whole console and checks what is there (the stage starts, evaluations, gate decisions with their
reasons, the champion, task runs named by stage) and what is not (an httpx line per API request,
FutureWarnings, datasets/transformers/MLflow progress bars, Prefect lines without a task name).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from servers import run_theworld

REPO = Path(__file__).resolve().parents[1]
STAGES = ["projection", "vision", "language", "full"]
LINE = re.compile(r"^\d\d:\d\d:\d\d (\S+)\s+(.*)$")


# --- fast: the console format -----------------------------------------------------------------------


@pytest.fixture
def console(monkeypatch):
    """configure_console(), then Prefect's logging set-up as its import runs it (it must leave the
    console to ours); the loggers restored afterwards."""
    from prefect.logging.configuration import setup_logging

    from theworld_core.logs import configure_console

    names = ("", "theworld", "prefect", "prefect.flow_runs", "prefect.task_runs")
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers)) for name in names}
    for key in (
        "HF_DATASETS_DISABLE_PROGRESS_BARS",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
        "MLFLOW_LOGGING_LEVEL",
    ):
        monkeypatch.delenv(key, raising=False)
    logging.getLogger("theworld").setLevel(logging.NOTSET)
    configure_console()
    setup_logging(incremental=False)
    yield
    for name, (level, handlers) in saved.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).handlers[:] = handlers


@pytest.mark.filterwarnings("ignore:Logger .prefect.:UserWarning")  # outside a flow run: no API to send to
def test_console_lines_name_their_task_run_and_drop_library_chatter(console, capsys):
    logging.getLogger("httpx").info('HTTP Request: POST http://127.0.0.1:4200/api/logs/ "HTTP/1.1 201 Created"')
    logging.getLogger("theworld.train").info("stage projection starts from pretrained bases")
    logging.getLogger("prefect.task_runs").info(
        "Finished in state Completed()", extra={"task_run_name": "train-projection", "flow_run_name": "calm-lynx"}
    )
    logging.getLogger("prefect.flow_runs").info("champion: full", extra={"flow_run_name": "calm-lynx"})
    logging.getLogger("some.library").warning("disk almost full")
    lines = capsys.readouterr().err.splitlines()
    assert not [line for line in lines if "HTTP Request" in line], lines
    parsed = [LINE.match(line).groups() for line in lines]
    assert parsed == [
        ("train", "stage projection starts from pretrained bases"),
        ("train-projection", "Finished in state Completed()"),
        ("calm-lynx", "champion: full"),
        ("some.library", "WARNING: disk almost full"),
    ], lines
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_a_line_logged_while_the_step_bar_is_drawn_starts_on_a_line_of_its_own(console, capsys):
    from tqdm.auto import tqdm

    bar = tqdm(total=10, desc="projection", unit="step", file=sys.stderr)
    bar.update(3)
    logging.getLogger("theworld.feature_cache").info("feature cache: 40 hits, 0 misses so far (100% hit rate)")
    bar.update(7)
    bar.close()
    out = capsys.readouterr().err
    # What a terminal shows: the text after the last carriage return of each line.
    shown = [line.split("\r")[-1] for line in out.split("\n")]
    logged = [line for line in shown if "feature cache:" in line]
    assert len(logged) == 1 and LINE.match(logged[0]), out
    assert LINE.match(logged[0]).groups() == (
        "feature_cache",
        "feature cache: 40 hits, 0 misses so far (100% hit rate)",
    )
    assert any(line.startswith("projection: 100%") for line in shown), out  # the bar goes on below it


# --- slow: a whole run's console --------------------------------------------------------------------


def short_tiny_profile(path: Path) -> Path:
    """The repo's stages.yaml with its tiny profile cut to 10 steps a stage, all four stages kept."""
    from theworld_core.config import parse_pipeline_yaml

    doc = parse_pipeline_yaml((REPO / "stages.yaml").read_text(encoding="utf-8"))
    tiny = doc["profiles"]["tiny"]
    tiny["defaults"].update(max_steps=10, save_steps=10, eval_steps=5, eval_max_samples=16)
    tiny["data"].update(synthetic_samples=120, eval_fraction=0.15)
    tiny["plateau"].update(window_steps=5, patience_steps=5, min_steps=10)
    tiny["gate"].update(diverged_warmup_steps=5, regression_tolerance=10.0)  # all four stages run
    tiny.update(eval_task_samples=2, eval_generations=1)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.e2e
def test_run_console_has_one_line_per_event(tmp_path):
    from theworld_core.model.tiny import ensure_tiny_models

    home = tmp_path / "theworld-home"
    ensure_tiny_models(home / "tiny")
    project = tmp_path / "project"
    project.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "THEWORLD_", "HF_"))}
    env.update(
        {
            "THEWORLD_PROJECT_DIR": str(project),
            "THEWORLD_HOME": str(home),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "DO_NOT_TRACK": "true",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "PYTHONPATH": str(REPO),
        }
    )
    stages_yaml = short_tiny_profile(tmp_path / "stages.yaml")

    result = run_theworld(
        ["run", str(stages_yaml), "--profile", "tiny"], env, project, tmp_path / "console.log", timeout=900
    )
    out = result.output
    assert result.returncode == 0, out[-6000:]

    # not there
    assert "httpx" not in out and "HTTP Request:" not in out, "an httpx line per Prefect API call"
    assert "FutureWarning" not in out and "DeprecationWarning" not in out, out[-6000:]
    for bar in (
        "Generating train split",
        "Loading weights",
        "Writing model shards",
        "Downloading artifacts",
        "Uploading artifacts",
    ):
        assert bar not in out, f"progress bar {bar!r} on the console"
    assert "prefect.task_runs" not in out and "prefect.flow_runs" not in out, "a Prefect line without its run's name"
    assert "Error logging to API" not in out, out[-3000:]

    lines = [LINE.match(line).groups() for line in out.replace("\r", "\n").splitlines() if LINE.match(line)]
    finished = [source for source, message in lines if message.startswith("Finished in state")]
    for stage in STAGES:
        assert f"train-{stage}" in finished and f"evaluate-{stage}" in finished, finished
        assert f"gate-{stage}" in finished and f"plateau-{stage}" in finished, finished
        assert (f"train-{stage}", f"stage {stage} starts from") in [
            (s, m[: len(f"stage {stage} starts from")]) for s, m in lines
        ], f"no start line of {stage}"
        assert any(
            re.match(rf"stage {stage} attempt 1 evaluated: eval loss \d+\.\d{{4}}, task accuracy", m) for _, m in lines
        ), f"no evaluation line of {stage}"
        gate = [m for _, m in lines if m.startswith(f"stage {stage} attempt 1: ")]
        assert len(gate) == 1 and " -> next: eval_loss " in gate[0], gate  # the decision with its reason
    # the feature cache's line per stage; the last stage trains every encoder, so it has nothing to serve
    assert ("train-full", "feature cache not used: no encoder is frozen in this stage") in lines, lines
    assert not re.search(r"\]\d\d:\d\d:\d\d ", out), "a log line glued to the end of a progress bar"
    champion = [m for _, m in lines if m.startswith("champion: ")]
    assert len(champion) == 1 and re.match(
        r"champion: \w+, registered as models:/theworld/1 \(alias @champion\)", champion[0]
    ), champion
    # the trainer's step bar is the one progress bar: one per stage
    assert all(re.search(rf"^{stage}: +\d+%", out, re.MULTILINE) or f"\r{stage}:" in out for stage in STAGES)

    # the temporary Prefect server is gone with the command
    url = re.search(r"temporary API server on (http://127\.0\.0\.1:\d+/api)", out)
    assert url, out[:2000]
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"{url.group(1)}/health", timeout=2)
