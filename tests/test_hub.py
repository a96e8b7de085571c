"""Hub push and resume, without the internet.

Uploads go to a fake hub the test starts on 127.0.0.1 that implements the four endpoints
huggingface_hub 2.x uses for `create_repo` + `upload_folder` (repos/create, validate-yaml,
preupload, commit; files answered as "regular" so their bytes arrive inline, base64). Downloads
come from a temporary HF cache laid out as huggingface_hub writes it, with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import save_file

from theworld_core.tracking.hub_push import (
    HubPusher,
    card_info_from_result,
    check_hub_ready,
    model_card,
    pusher_for,
    redact,
)

TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"
REPO = "someone/theworld-stage1"


# ============================================================================== fake hub


class FakeHub:
    """Records every request; `mode` is ok, fail (HTTP 500 echoing the auth header) or hang."""

    def __init__(self):
        self.requests: list[dict] = []
        self.commits: list[dict] = []
        self.created: list[dict] = []
        self.mode = "ok"
        self.release = threading.Event()  # unblocks "hang" (and "gate") requests
        self.gate_entered = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output quiet
                pass

            def do_GET(self):
                self._handle()

            def do_POST(self):
                self._handle()

            def _reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                hub.requests.append(
                    {"method": self.command, "path": path, "auth": self.headers.get("Authorization"), "body": body}
                )
                if path == "/api/repos/create":
                    if hub.mode in ("hang", "gate"):
                        hub.gate_entered.set()
                        hub.release.wait(30)
                        if hub.mode == "hang":
                            return self._reply(500, {"error": "released"})
                    if hub.mode == "fail":
                        auth = self.headers.get("Authorization", "")
                        return self._reply(500, {"error": f"internal error while checking {auth}"})
                    payload = json.loads(body)
                    hub.created.append(payload)
                    return self._reply(200, {"url": f"{hub.url}/{payload['organization']}/{payload['name']}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {"errors": [], "warnings": []})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path)
                if m:
                    files = json.loads(body)["files"]
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                for f in files
                            ]
                        },
                    )
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path)
                if m:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(x["value"] for x in lines if x["key"] == "header")
                    files = {
                        x["value"]["path"]: base64.b64decode(x["value"]["content"]) for x in lines if x["key"] == "file"
                    }
                    other = [x["key"] for x in lines if x["key"] not in ("header", "file")]
                    sha = f"{len(hub.commits) + 1:040x}"
                    hub.commits.append(
                        {
                            "repo": m.group(1),
                            "revision": m.group(2),
                            "message": header["summary"],
                            "files": files,
                            "other": other,
                            "sha": sha,
                        }
                    )
                    return self._reply(200, {"commitUrl": f"{hub.url}/{m.group(1)}/commit/{sha}", "commitOid": sha})
                return self._reply(404, {"error": f"fake hub does not implement {self.command} {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(monkeypatch):
    """The fake hub, with huggingface_hub's offline switch lifted for this test only."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # read once at import; the env var alone is not enough
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    fake = FakeHub()
    yield fake
    fake.close()


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    return caplog


def _manifest(stage: str = "stage1") -> dict:
    return {
        "format": "theworld-stage-output",
        "format_version": 1,
        "components": ["world_projector"],
        "parameters": {"world.projector.weight": [8, 16], "world.projector.bias": [8]},
        "base": {
            "gemma": {"id": "google/gemma-3-4b-it", "revision": None, "commit": "abcdef0123456789abcdef"},
            "cosmos": {"id": "nvidia/Cosmos-Predict2-2B-Video2World", "revision": "main", "commit": None},
        },
        "architecture_fingerprint": "f" * 64,
        "model_config": {},
        "stage_config": {
            "name": stage,
            "freeze_gemma_vision": True,
            "freeze_gemma_language": True,
            "freeze_cosmos_vae": True,
            "learning_rate": 1e-4,
            "push_to_hub": True,
            "hub_model_id": REPO,
        },
    }


def _stage_output(folder: Path, seed: int = 0, stage: str = "stage1") -> Path:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    save_file(
        {"world.projector.weight": torch.randn(8, 16, generator=g), "world.projector.bias": torch.zeros(8)},
        str(folder / "model.safetensors"),
    )
    (folder / "manifest.json").write_text(json.dumps(_manifest(stage)))
    return folder


def _assert_no_token(tmp_path: Path, caplog, report: dict) -> None:
    for record in caplog.records:
        assert TOKEN not in record.getMessage(), record.getMessage()
        assert TOKEN not in str(record.args)
    assert TOKEN not in json.dumps(report)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


# ============================================================================== uploads


def test_end_push_sends_files_card_and_token(hub, logs, tmp_path):
    folder = _stage_output(tmp_path / "out" / "final")
    pusher = HubPusher(REPO, "end", private=True, endpoint=hub.url, stage_name="stage1")

    assert pusher.on_save(folder, 10) is False  # `end` strategy: saves are not pushed
    assert (
        pusher.on_end(
            folder,
            {
                "step": 200,
                "status": "completed",
                "reason": "reached 200 steps",
                "metrics": {"eval_loss": 1.2345678, "train_loss": 1.5},
            },
        )
        is True
    )
    report = pusher.close(timeout=30)

    assert report["uploads_done"] == 1 and report["uploads_failed"] == 0 and report["timed_out"] is False
    assert report["pushed_final"] and report["last_step"] == 200 and report["last_error"] is None
    assert hub.created == [
        {"name": "theworld-stage1", "organization": "someone", "visibility": "private", "type": "model"}
    ]
    [commit] = hub.commits
    assert commit["repo"] == REPO and commit["revision"] == "main" and commit["other"] == []
    assert commit["message"] == "stage stage1: final stage output at step 200 (completed)"
    assert set(commit["files"]) == {"model.safetensors", "manifest.json", "README.md"}
    assert commit["files"]["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert commit["files"]["manifest.json"] == (folder / "manifest.json").read_bytes()

    card = commit["files"]["README.md"].decode()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "theworld"
    assert front["base_model"] == ["google/gemma-3-4b-it", "nvidia/Cosmos-Predict2-2B-Video2World"]
    assert "theworld" in front["tags"]
    for text in (
        "| stage | `stage1` |",
        "| optimizer step | 200 |",
        "completed: reached 200 steps",
        "| world_projector | yes | 136 |",
        "| gemma_language | no (pretrained) | 0 |",
        "`freeze_gemma_vision: true`",
        "| eval_loss | 1.23457 |",
        f'model = TheWorld.from_pretrained("{REPO}")',
        "commit `abcdef012345`",
    ):
        assert text in card, text

    assert {r["path"] for r in hub.requests} <= {
        "/api/repos/create",
        f"/api/models/{REPO}/preupload/main",
        f"/api/models/{REPO}/commit/main",
        "/api/validate-yaml",
    }
    assert hub.requests and all(r["auth"] == f"Bearer {TOKEN}" for r in hub.requests)
    assert not list(folder.parent.glob(".hub-upload-*"))  # staging folders cleaned up
    _assert_no_token(tmp_path, logs, report)


def test_every_save_newer_save_supersedes_a_waiting_one(hub, logs, tmp_path):
    hub.mode = "gate"  # the first upload waits in create_repo until released
    out = tmp_path / "out"
    pusher = HubPusher(REPO, "every_save", endpoint=hub.url, stage_name="stage1")
    first = _stage_output(out / "checkpoint-1", seed=1)
    assert pusher.on_save(first, 1)
    assert hub.gate_entered.wait(10)
    for step in (2, 3):
        assert pusher.on_save(_stage_output(out / f"checkpoint-{step}", seed=step), step)
    import shutil

    shutil.rmtree(out / "checkpoint-3")  # save_total_limit may delete it before the upload starts
    assert pusher.report()["pending"] == 1 and pusher.report()["superseded"] == 1
    hub.release.set()
    report = pusher.close(timeout=30)

    assert [c["message"] for c in hub.commits] == [
        "stage stage1: checkpoint at step 1",
        "stage stage1: checkpoint at step 3",
    ]
    assert report["uploads_done"] == 2 and report["superseded"] == 1 and report["last_step"] == 3
    assert not report["pushed_final"]
    assert len(hub.created) == 1  # the repo is created once per pusher
    assert "| optimizer step | 3 |" in hub.commits[1]["files"]["README.md"].decode()
    assert pusher.on_save(first, 4) is False  # closed
    _assert_no_token(tmp_path, logs, report)


def test_failing_hub_is_reported_not_raised(hub, logs, tmp_path):
    hub.mode = "fail"  # HTTP 500 whose body echoes the Authorization header
    folder = _stage_output(tmp_path / "final")
    pusher = HubPusher(REPO, "every_save", endpoint=hub.url)
    assert pusher.on_save(folder, 5)
    assert pusher.on_end(folder, {"step": 5})
    report = pusher.close(timeout=30)

    assert report["uploads_done"] == 0 and report["uploads_failed"] >= 1 and not report["timed_out"]
    assert "500" in report["last_error"] and "final stage output" in report["last_error"]
    assert "***" in report["last_error"]  # the echoed token was redacted
    assert any("push to someone/theworld-stage1 failed" in r.getMessage() for r in logs.records)
    _assert_no_token(tmp_path, logs, report)


def test_close_returns_within_its_timeout_when_the_hub_hangs(hub, logs, tmp_path):
    hub.mode = "hang"
    pusher = HubPusher(REPO, "every_save", endpoint=hub.url)
    assert pusher.on_save(_stage_output(tmp_path / "checkpoint-1"), 1)
    assert hub.gate_entered.wait(10)
    assert pusher.on_save(_stage_output(tmp_path / "checkpoint-2"), 2)
    start = time.monotonic()
    report = pusher.close(timeout=1.0)
    assert time.monotonic() - start < 3
    assert report["timed_out"] and report["in_progress"] and report["pending"] == 2 and report["uploads_done"] == 0
    hub.release.set()  # the abandoned upload ends (failed) on its daemon thread
    pusher._thread.join(10)
    assert pusher.report()["uploads_failed"] == 1 and len(hub.commits) == 0
    _assert_no_token(tmp_path, logs, pusher.report())


def test_missing_token_at_upload_fails_without_a_request(hub, logs, tmp_path):
    pusher = HubPusher(REPO, "end", endpoint=hub.url, token_getter=lambda: None)
    pusher.on_end(_stage_output(tmp_path / "final"))
    report = pusher.close(timeout=10)
    assert report["uploads_failed"] == 1 and "HF_TOKEN" in report["last_error"]
    assert hub.requests == []


def test_unusable_folder_is_reported_not_raised(hub, logs, tmp_path):
    pusher = HubPusher(REPO, "every_save", endpoint=hub.url)
    assert pusher.on_save(tmp_path / "nowhere", 1) is False
    report = pusher.close(timeout=5)
    assert report["uploads_failed"] == 1 and "model.safetensors" in report["last_error"]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="hub_strategy"):
        HubPusher(REPO, "sometimes")
    with pytest.raises(ValueError, match="owner/name"):
        HubPusher("no-owner", "end")


# ============================================================================== token checks


def test_check_hub_ready(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from theworld_core.config import TrainingConfig

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_hub_ready(TrainingConfig())  # push_to_hub off: nothing to check
    cfg = TrainingConfig(push_to_hub=True, hub_model_id=REPO)
    with pytest.raises(ValueError, match="set the HF_TOKEN environment variable") as err:
        check_hub_ready(cfg)
    assert "HF_TOKEN_PATH" in str(err.value)

    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="does not exist"):
        check_hub_ready(cfg)
    (tmp_path / "token").write_text(TOKEN + "\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "token"))
    check_hub_ready(cfg)  # token from the file

    monkeypatch.delenv("HF_TOKEN_PATH")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    check_hub_ready(cfg)
    assert pusher_for(TrainingConfig()) is None
    pusher = pusher_for(cfg, stage_name="stage1")
    assert (pusher.repo_id, pusher.strategy, pusher.private, pusher.stage_name) == (REPO, "every_save", False, "stage1")
    assert pusher.close(timeout=1)["uploads_done"] == 0
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE") as err:
        check_hub_ready(cfg)
    assert TOKEN not in str(err.value)


def test_redaction_and_card_never_show_secrets(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-value-42")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    text = f"auth {TOKEN} and wandb-secret-value-42 and hf_{'a1' * 17}, hf_short_name stays"
    assert redact(text) == "auth *** and *** and ***, hf_short_name stays"

    manifest = _manifest()
    manifest["stage_config"]["name"] = "stage1"
    manifest["base"]["gemma"] = {"id": "/home/someone/models/tiny-gemma", "revision": None, "commit": None}
    card = model_card(
        REPO, manifest, {"reason": f"leaked {TOKEN}", "status": "completed", "metrics": {"eval_loss": 0.5}}
    )
    assert TOKEN not in card and "wandb-secret-value-42" not in card
    assert "a local folder (`tiny-gemma`)" in card and "/home/someone" not in card
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["nvidia/Cosmos-Predict2-2B-Video2World"]  # local folders are not hub ids

    result = SimpleNamespace(
        status="plateaued", reason="no new best", steps=42, eval_loss=1.0, best_eval_loss=0.9, train_loss=None
    )
    assert card_info_from_result(result, "stage2") == {
        "stage": "stage2",
        "step": 42,
        "status": "plateaued",
        "reason": "no new best",
        "metrics": {"eval_loss": 1.0, "best_eval_loss": 0.9},
    }


# ============================================================================== the trainer pushes through its stage logger


def test_stage_logger_checks_the_token_on_every_rank_and_is_silent_off_rank_0(monkeypatch):
    from huggingface_hub import constants

    from theworld_core.config import TrainingConfig
    from theworld_core.tracking.stage_logger import NullStageLogger, StageLogger, stage_logger_for

    def public(cls) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    # A rank that reports nothing still answers every call the trainer makes.
    assert public(NullStageLogger) == public(StageLogger)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN_PATH", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    cfg = TrainingConfig(push_to_hub=True, hub_model_id=REPO)
    for main in (True, False):  # every rank fails before any work, not only the one that pushes
        with pytest.raises(ValueError, match="HF_TOKEN"):
            stage_logger_for(cfg, is_main_process=main)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert isinstance(stage_logger_for(cfg, is_main_process=False), NullStageLogger)
    logger = stage_logger_for(cfg, is_main_process=True, stage_name="stage1")
    assert isinstance(logger, StageLogger) and logger.hub is not None and logger.hub.stage_name == "stage1"
    logger.close()


def test_trainer_pushes_checkpoints_and_final_output_and_tags_the_run(hub, logs, tiny_paths, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from mlflow.tracking import MlflowClient

    from theworld_core.training.launch import train_stage

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)  # HfApi's default endpoint
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(tmp_path / "project"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = hub_stage_config(tiny_paths, tmp_path)
    result = train_stage(cfg)
    assert result.status == "completed", result.reason

    messages = [c["message"] for c in hub.commits]
    assert messages[0] == "stage stage1: checkpoint at step 5", messages
    assert messages[-1] == "stage stage1: final stage output at step 10 (completed)", messages
    final = Path(result.stage_output)
    assert hub.commits[-1]["files"]["model.safetensors"] == (final / "model.safetensors").read_bytes()
    assert "| status | completed: reached 10 steps |" in hub.commits[-1]["files"]["README.md"].decode()
    tags = (
        MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'project'}/mlflow.db").get_run(result.mlflow_run_id).data.tags
    )
    assert tags["hub_repo_id"] == REPO and tags["hub_pushed_final"] == "True" and tags["hub_uploads_failed"] == "0"
    assert tags["stage_status"] == "completed"
    assert not list(tmp_path.rglob(".hub-upload-*"))  # staging folders cleaned up
    assert not any(t.name == "theworld-hub-push" and t.is_alive() for t in threading.enumerate())
    _assert_no_token(tmp_path, logs, dict(tags))


# ============================================================================== resume from a hub repo id


def _write_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str) -> Path:
    """The standard HF cache layout: blobs by hash, snapshot symlinks, refs/main."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        try:
            os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
        except OSError:  # no symlinks: huggingface_hub then stores files in the snapshot itself
            (snapshot / name).write_bytes(data)
    return snapshot


def test_pushed_stage_output_loads_offline_from_the_hf_cache(hub, tiny_paths, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from theworld_core.config import ModelConfig
    from theworld_core.model.theworld import TheWorld

    cfg = ModelConfig(
        model_name=str(tiny_paths.gemma), cosmos_model_name=str(tiny_paths.cosmos), world_tokens=4, world_image_size=32
    )
    torch.manual_seed(3)
    model = TheWorld.from_base(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("world."):
                p.add_(0.25)  # "trained": differs from a fresh initialisation
    final = model.save_pretrained(tmp_path / "stage1" / "final", stage_config={"name": "stage1"})

    pusher = HubPusher(REPO, "end", endpoint=hub.url)
    pusher.on_end(final, {"step": 7})
    assert pusher.close(timeout=60)["uploads_done"] == 1
    [commit] = hub.commits

    # What the hub holds, as a later `snapshot_download` leaves it in the cache; then offline.
    cache = tmp_path / "hf-cache"
    snapshot = _write_cache(cache, REPO, commit["files"], "0123456789abcdef0123456789abcdef01234567")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import, like HF_HUB_OFFLINE
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no local folder named like the repo

    from theworld_core.model.stage_output import checkpoint_folder

    assert checkpoint_folder(REPO).resolve() == snapshot.resolve()
    loaded = TheWorld.from_pretrained(REPO)
    saved = dict(model.named_parameters())
    for name, p in loaded.named_parameters():
        assert torch.equal(p, saved[name]), name
    assert loaded.trained_components == model.trained_components

    with pytest.raises(Exception, match="(?i)cache|offline|cannot find"):
        checkpoint_folder("someone/never-pushed")


def hub_stage_config(tiny_paths, tmp_path):
    """Stage 1 on the tiny models, 10 steps, pushing every save to the fake hub's REPO."""
    from theworld_core.config import load_stage_config

    seed = Path(__file__).resolve().parents[1] / "configs" / "seed" / "stage1_projection.json"
    return load_stage_config(seed).with_changes(
        model_name=str(tiny_paths.gemma),
        cosmos_model_name=str(tiny_paths.cosmos),
        world_tokens=4,
        world_image_size=32,
        dataset_name="synthetic",
        synthetic_samples=60,
        synthetic_image_size=32,
        streaming=False,
        batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=10,
        warmup_steps=2,
        eval_steps=5,
        save_steps=5,
        logging_steps=5,
        output_dir=str(tmp_path / "stage"),
        name="stage1",
        push_to_hub=True,
        hub_model_id=REPO,
        hub_strategy="every_save",
    )
