"""The operator's view: README "Operating it" run line by line, `prefect.yaml` generated from
stages.yaml, `--version`, the profiles in `--help` and in errors, `theworld data sample`.

The slow test reads the code block of README.md's "Operating it" section and runs its lines for real
in a temporary copy of the project (the same files the Docker image holds): a fresh PATH without the
virtual environment (the block's `source .venv/bin/activate` must put it there), its own
PREFECT_HOME, the README's `prefect server start` on a free 127.0.0.1 port instead of 4200. Lines
ending in `&` run in the background (their own process group, stopped by PID at the end); the test
waits where a person would: for the server's health, for the served deployment, for the flow run
`prefect deployment run` started to complete, and for the run the `--notify` line triggers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from servers import free_port, stop_process_group, wait_http_ok
from test_deploy import Prefect, tail

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
STAGES_YAML = REPO / "stages.yaml"
PREFECT_YAML = REPO / "prefect.yaml"
# What a project copy needs to run the pipeline (as docker/Dockerfile.cpu copies it).
PROJECT_FILES = ("pyproject.toml", "README.md", "stages.yaml", "prefect.yaml", "configs", "flows", "theworld_core")


def cli(capsys, *args: str, cwd: Path | None = None) -> tuple[int, str]:
    """`theworld ARGS` in this process: (exit code, stdout + stderr); --help/--version exit with 0."""
    from flows.cli import main

    before = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
    finally:
        os.chdir(before)
    out = capsys.readouterr()
    return code, out.out + out.err


# --- fast: prefect.yaml, --version, profiles ---------------------------------------------------------


def test_committed_prefect_yaml_is_what_stages_yaml_generates(capsys):
    """The header's own command with --check passes on the committed file: it has not drifted."""
    header = PREFECT_YAML.read_text().splitlines()[0]
    command = re.search(r"`theworld (deployment prefect-yaml [^`]*)`", header)
    assert command, f"prefect.yaml does not start with the command that generates it: {header!r}"
    code, out = cli(capsys, *command.group(1).split(), "--check", cwd=REPO)
    assert code == 0, f"prefect.yaml has drifted from stages.yaml; run `theworld {command.group(1)}`:\n{out}"


def test_prefect_yaml_carries_the_served_settings():
    """The committed file is the full-size base config's, with the settings `theworld serve` gives
    the deployment: cron and time zone, the trigger on the config's dataset (not any dataset),
    concurrency 1 ENQUEUE, and parameters for the worker's folder."""
    from flows.deployment import dataset_resource_id, deployment_settings
    from theworld_core.config import load_pipeline_config

    cfg = load_pipeline_config(STAGES_YAML)
    served = deployment_settings(cfg, "stages.yaml", None)
    deployment = yaml.safe_load(PREFECT_YAML.read_text())["deployments"][0]
    assert (
        deployment["entrypoint"] == "flows/multistage.py:multistage" and deployment["work_pool"]["name"] == "theworld"
    )
    assert deployment["parameters"] == {"stages_yaml": "stages.yaml", "profile": None, "force": False}
    assert (
        [(s["cron"], s["timezone"]) for s in deployment["schedules"]]
        == [(s.cron, s.timezone) for s in served["schedules"]]
        == [(cfg.schedule.cron, cfg.schedule.timezone)]
    )
    [trigger] = deployment["triggers"]
    assert trigger["expect"] == [cfg.schedule.new_data_event]
    assert (
        trigger["match"]
        == {"prefect.resource.id": dataset_resource_id(cfg)}
        == {"prefect.resource.id": "theworld.data.datacomp"}
    )
    assert deployment["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}


def test_check_reports_a_drifted_prefect_yaml(tmp_path, capsys):
    """--check exits 1 naming the command to run; writing then checking again passes."""
    shutil.copy(STAGES_YAML, tmp_path / "stages.yaml")
    (tmp_path / "prefect.yaml").write_text(PREFECT_YAML.read_text().replace("cron: 0 3 * * *", "cron: 0 4 * * *"))
    code, out = cli(
        capsys, "deployment", "prefect-yaml", "stages.yaml", "--out", "prefect.yaml", "--check", cwd=tmp_path
    )
    assert code == 1 and "-  - cron: 0 4 * * *" in out and "+  - cron: 0 3 * * *" in out, out
    assert "run `theworld deployment prefect-yaml stages.yaml --out prefect.yaml`" in out, out
    code, out = cli(
        capsys, "deployment", "prefect-yaml", "stages.yaml", "--profile", "local", "--out", "local.yaml", cwd=tmp_path
    )
    assert code == 0, out
    local = yaml.safe_load((tmp_path / "local.yaml").read_text())["deployments"][0]
    assert local["schedules"] == [] and local["parameters"]["profile"] == "local"
    assert local["triggers"][0]["match"] == {"prefect.resource.id": "theworld.data.images"}
    code, out = cli(
        capsys,
        "deployment",
        "prefect-yaml",
        "stages.yaml",
        "--profile",
        "local",
        "--out",
        "local.yaml",
        "--check",
        cwd=tmp_path,
    )
    assert code == 0 and "up to date" in out, out


def unwrapped(text: str) -> str:
    """`text` without whitespace: argparse wraps help lines (inside long paths too)."""
    return "".join(text.split())


def test_version(capsys):
    from theworld_core.version import code_version

    code, out = cli(capsys, "--version")
    assert code == 0 and out.startswith("theworld 0.") and code_version() in out, out


@pytest.mark.parametrize(
    "command",
    [["run"], ["serve"], ["plan"], ["data"], ["data", "add"], ["data", "notify"], ["deployment", "prefect-yaml"]],
)
def test_help_lists_the_profiles(capsys, command):
    names = list(yaml.safe_load(STAGES_YAML.read_text())["profiles"])
    assert {"tiny", "local"} <= set(names)
    code, out = cli(capsys, *command, "--help", cwd=REPO)
    assert code == 0
    assert unwrapped(f"profiles in stages.yaml: {', '.join(names)}") in unwrapped(out), out


def test_help_lists_the_profiles_of_the_named_file(tmp_path, capsys):
    other = tmp_path / "mine.yaml"
    other.write_text(STAGES_YAML.read_text().replace("\n  local:\n", "\n  laptop:\n"))
    code, out = cli(capsys, "serve", str(other), "--help")
    assert code == 0 and unwrapped(f"profiles in {other}: tiny, laptop") in unwrapped(out), out


def test_unknown_profile_names_the_profiles(capsys):
    code, out = cli(capsys, "plan", "stages.yaml", "--profile", "nope", cwd=REPO)
    assert code == 2 and "profile: 'nope' is not allowed: must be one of 'tiny', 'local'" in out, out


def test_data_sample_feeds_data_add(tmp_path, capsys):
    """`data sample` writes PNGs and a captions file `data add --captions` reads; --start gives other
    images; the folder is what profile `local` reads."""
    code, out = cli(capsys, "data", "sample", "data/new", "--count", "5", cwd=tmp_path)
    assert code == 0, out
    code, out = cli(capsys, "data", "sample", "data/more", "--count", "3", "--start", "5", cwd=tmp_path)
    assert code == 0, out
    rows = [json.loads(line) for line in (tmp_path / "data/new/captions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all((tmp_path / "data/new" / r["file_name"]).is_file() and r["text"] for r in rows)
    new, more = ({p.read_bytes() for p in (tmp_path / "data" / d).glob("*.png")} for d in ("new", "more"))
    assert len(more) == 3 and not new & more
    for folder in ("new", "more"):
        sources = sorted(str(p) for p in (tmp_path / "data" / folder).glob("*.png"))
        code, out = cli(
            capsys,
            "data",
            "add",
            *sources,
            "--to",
            "data/images",
            "--captions",
            f"data/{folder}/captions.jsonl",
            cwd=tmp_path,
        )
        assert code == 0, out
    from theworld_core.config import load_pipeline_config
    from theworld_core.data import prepare_data

    before = Path.cwd()
    os.chdir(tmp_path)
    try:
        cfg = load_pipeline_config(STAGES_YAML, profile="local")
        assert prepare_data(cfg.data, cache_dir=tmp_path / "cache").stats.total == 8
    finally:
        os.chdir(before)


def test_data_add_notify_refuses_a_folder_the_config_does_not_read(tmp_path, capsys):
    """Before anything is copied (and before the Prefect API is asked)."""
    shutil.copy(STAGES_YAML, tmp_path / "stages.yaml")
    cli(capsys, "data", "sample", "new", "--count", "1", cwd=tmp_path)
    image = str(next((tmp_path / "new").glob("*.png")))
    code, out = cli(capsys, "data", "add", image, "--to", "data/images", "--caption", "x", "--notify", cwd=tmp_path)
    assert code == 2 and "--to data/images is not the data stages.yaml (no --profile) reads" in out, out
    assert "'datacomp'" in out and "profile `local` reads ./data/images" in out and "tiny, local" in out, out
    code, out = cli(
        capsys,
        "data",
        "add",
        image,
        "--to",
        "elsewhere",
        "--caption",
        "x",
        "--notify",
        "--profile",
        "local",
        cwd=tmp_path,
    )
    assert code == 2 and "'./data/images'" in out, out
    assert not (tmp_path / "data").exists() and not (tmp_path / "elsewhere").exists()


# --- slow: the README's lines, for real ---------------------------------------------------------------


def readme_operating_lines() -> list[str]:
    """The command lines of the first ```bash block under "## Operating it" in README.md."""
    section = README.read_text().split("\n## Operating it\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block, "README.md's Operating it section has no ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def without_comment(line: str) -> str:
    return re.sub(r"\s+#\s.*$", "", line).strip()


def fresh_machine_env(tmp_path: Path, project: Path) -> dict[str, str]:
    """No Prefect/MLflow/TheWorld settings and no virtual environment on PATH; this test's own
    PREFECT_HOME and model cache; offline; the copy's code first on the import path."""
    venv_bin = str(Path(sys.prefix) / "bin")
    path = os.pathsep.join(
        p
        for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        if p and Path(p).resolve() != Path(venv_bin).resolve()
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_", "MLFLOW_", "THEWORLD_")) and k not in ("VIRTUAL_ENV", "PYTHONPATH")
    }
    env.update(
        {
            "PATH": path,
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "THEWORLD_HOME": str(tmp_path / "theworld-home"),
            "PYTHONPATH": str(project),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            # a served flow run is picked up within a second (the default polls every 10 s)
            "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        }
    )
    return env


class Shell:
    """Runs README lines one at a time in `project`, carrying exported variables from line to line
    (as one interactive shell would); `cmd &` lines start in their own process group."""

    def __init__(self, project: Path, env: dict[str, str], logs: Path):
        self.project, self.env, self.logs = project, env, logs
        self.state = logs / "exported.sh"
        self.state.write_text("")
        self.background: list[tuple[str, subprocess.Popen, Path]] = []

    def run(self, line: str, timeout: float = 300) -> str:
        script = f"set -e\nsource {self.state}\ncd {self.project}\n{line}\nexport -p > {self.state}\n"
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.project,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(proc, grace=2)
            raise AssertionError(f"README line ran over {timeout:.0f} s: {line}") from None
        assert proc.returncode == 0, f"README line failed ({proc.returncode}): {line}\n{out[-6000:]}"
        return out

    def start(self, line: str, name: str) -> tuple[subprocess.Popen, Path]:
        command = without_comment(line)
        assert command.endswith("&"), line
        log = self.logs / f"{name}.log"
        script = f"source {self.state}\ncd {self.project}\nexec {command[:-1].strip()}\n"
        with open(log, "wb") as out:  # `exec`: the PID is the command's own
            proc = subprocess.Popen(
                ["bash", "-c", script],
                cwd=self.project,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.background.append((name, proc, log))
        return proc, log

    def stop_all(self) -> dict[str, int | None]:
        """Newest first, by PID: SIGTERM, a second one a second later (a served process ignores the
        first while it winds down), then the process group's remains."""
        codes = {}
        for name, proc, _ in reversed(self.background):
            for _ in range(2):
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=1)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            codes[name] = proc.returncode
            stop_process_group(proc, grace=5)
        return codes


def copy_project(target: Path) -> Path:
    target.mkdir()
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file():
        pytest.skip(f"the tests do not run in a virtual environment ({venv} has no bin/activate)")
    (target / ".venv").symlink_to(venv)  # what scripts/bootstrap.sh makes
    return target


def wait_for(what: str, check, timeout: float, proc: subprocess.Popen, log: Path, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode} while waiting for {what}:\n{tail(log)}"
        found = check()
        if found:
            return found
        time.sleep(poll)
    raise AssertionError(f"no {what} after {timeout:.0f} s:\n{tail(log)}")


@pytest.mark.e2e
def test_readme_operating_lines_run_as_written(tmp_path):
    lines = readme_operating_lines()
    roles = {
        "activate": [i for i, line in enumerate(lines) if without_comment(line) == "source .venv/bin/activate"],
        "server": [i for i, line in enumerate(lines) if "prefect server start" in line],
        "serve": [i for i, line in enumerate(lines) if re.match(r"theworld serve\b", line)],
        "run": [i for i, line in enumerate(lines) if re.match(r"prefect deployment run multistage/full\b", line)],
        "notify": [i for i, line in enumerate(lines) if " --notify" in without_comment(line)],
    }
    assert all(len(found) == 1 for found in roles.values()), f"README Operating it: expected one line each: {roles}"
    assert roles["activate"][0] < roles["server"][0] < roles["serve"][0] < roles["run"][0] < roles["notify"][0]
    assert "--profile local" in lines[roles["serve"][0]] and "--profile local" in lines[roles["notify"][0]]
    assert "4200" in lines[roles["server"][0]], "the server line's port is what the test replaces"
    port = free_port()
    lines = [line.replace("4200", str(port)) for line in lines]

    project = copy_project(tmp_path / "project")
    logs = tmp_path / "logs"
    logs.mkdir()
    shell = Shell(project, fresh_machine_env(tmp_path, project), logs)
    api = f"http://127.0.0.1:{port}/api"
    timings: dict[str, float] = {}
    prefect = None
    start = time.monotonic()
    try:
        for index, line in enumerate(lines):
            began = time.monotonic()
            if index == roles["server"][0]:
                server, server_log = shell.start(line, "prefect-server")
                wait_http_ok(f"{api}/health", server, server_log, 180)
                prefect = Prefect(api)
            elif index == roles["serve"][0]:
                serve, serve_log = shell.start(line, "serve")
                deployment = wait_for(
                    "deployment multistage/full", lambda p=prefect: _deployment(p), 180, serve, serve_log
                )
                assert deployment.parameters == {
                    "stages_yaml": str((project / "stages.yaml").resolve()),
                    "profile": "local",
                    "force": False,
                }
                assert deployment.schedules == [], "profile local has no nightly run"
                # Prefect creates the deployment first and its trigger's automation right after.
                automations = wait_for(
                    "the deployment's new-data trigger",
                    lambda p=prefect, d=deployment: p.client.read_resource_related_automations(
                        f"prefect.deployment.{d.id}"
                    ),
                    60,
                    serve,
                    serve_log,
                )
                assert [(a.trigger.expect, dict(a.trigger.match.root)) for a in automations] == [
                    ({"theworld.data.updated"}, {"prefect.resource.id": "theworld.data.images"})
                ]
            elif index == roles["run"][0]:
                out = shell.run(line, timeout=120)
                run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
                assert run_id, out
                done = prefect.wait_final(run_id.group(1), 900, serve_log)
                assert done.state.is_completed(), f"{done.state}:\n{tail(serve_log)}"
                assert not (done.state.message or "").startswith("no new data"), done.state
                known = {str(r.id) for r in prefect.manual_runs(deployment.id)}
            elif index == roles["notify"][0]:
                out = shell.run(line)
                assert "emitted theworld.data.updated about theworld.data.images" in out, out

                def new_runs(p=prefect, deployment_id=deployment.id, known=known):
                    return [r for r in p.manual_runs(deployment_id) if str(r.id) not in known]

                triggered = wait_for("flow run started by the new-data event", new_runs, 120, serve, serve_log)
                assert len(triggered) == 1 and triggered[0].parameters["profile"] == "local", triggered
            else:
                out = shell.run(line)
                if index == roles["activate"][0]:
                    found = shutil.which("theworld", path=_exported(shell, "PATH"))
                    assert found and Path(found).resolve().parent == (Path(sys.prefix) / "bin").resolve(), (
                        f"source .venv/bin/activate did not put the venv's theworld on PATH (found {found})"
                    )
            timings[without_comment(line)[:40]] = round(time.monotonic() - began, 1)
        rows = (project / "data" / "images" / "metadata.jsonl").read_text().splitlines()
        assert len(rows) == 64, len(rows)  # 48 + 16 images, the README's counts
    finally:
        if prefect is not None:
            prefect.close()
        codes = shell.stop_all()
        print(f"README Operating it: {time.monotonic() - start:.0f} s; per line (s): {timings}; exit codes: {codes}")
    assert codes["serve"] is not None, "theworld serve still ran after two SIGTERMs"


def _deployment(prefect: Prefect):
    from prefect.exceptions import ObjectNotFound

    try:
        return prefect.client.read_deployment_by_name("multistage/full")
    except ObjectNotFound:
        return None


def _exported(shell: Shell, name: str) -> str:
    """A variable as the README's shell has it after the lines so far."""
    found = re.search(rf"^declare -x {name}=\"(.*)\"$", shell.state.read_text(), re.MULTILINE)
    return found.group(1) if found else ""
