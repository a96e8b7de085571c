"""Integrity and rigor: the evaluation cadence the plateau rule needs, a full disk during a save,
and a hub push that never lands.

- Cadence: a stage file or a pipeline file whose `eval_steps` cannot feed the plateau rule (3
  evaluations in the window, 3 since the best) loads with a `PlateauCadenceWarning` naming the keys,
  their values and where they were written; the shipped `stages.yaml` loads without one.
- Disk full: saves into a real, small tmpfs (mounted in a private mount namespace by `unshare -m`;
  skipped where that is not permitted) fail with "no space left on <folder>: ... needs about N MB"
  and leave the earlier states as they were.
- Hub: with a fake hub on 127.0.0.1 that refuses every push, `theworld train` trains, saves, and
  exits 3 with the failure named; the stage stays `completed`, so the gate passes it on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import yaml
from test_hub import REPO, TOKEN, _stage_output, hub, hub_stage_config  # noqa: F401  (hub: the fake hub fixture)

from theworld_core.config import GateConfig, StageConfig, load_pipeline_config, load_stage_config
from theworld_core.config.stage_file import PlateauCadenceWarning, plateau_cadence_problems
from theworld_core.tracking.hub_push import EXIT_HUB_PUSH_FAILED, HUB_EVIDENCE_KEY, HubPusher, push_failure

ROOT = Path(__file__).resolve().parents[1]
STAGES_YAML = ROOT / "stages.yaml"
SEED = ROOT / "configs" / "seed"


def _cadence_warnings(load) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load()
    return [str(w.message) for w in caught if issubclass(w.category, PlateauCadenceWarning)]


# ============================================================================== cadence


@pytest.mark.parametrize("profile", [None, "tiny", "local"])
def test_shipped_stages_yaml_feeds_the_plateau_rule(profile):
    assert _cadence_warnings(lambda: load_pipeline_config(STAGES_YAML, profile=profile)) == []
    stages = load_pipeline_config(STAGES_YAML, profile=profile).resolved_stages()
    for stage in stages:
        assert (
            stage.plateau.window_steps >= 3 * stage.eval_steps and stage.plateau.patience_steps >= 3 * stage.eval_steps
        )
    if profile is None:
        assert {(s.eval_steps, s.plateau.window_steps, s.plateau.patience_steps) for s in stages} == {
            (1000, 5000, 3000)
        }


def test_sparse_cadence_in_a_pipeline_file_is_warned_with_key_paths(tmp_path):
    doc = yaml.safe_load(STAGES_YAML.read_text())
    doc["defaults"]["eval_steps"] = 5000  # the cadence the issue reports: one evaluation per window
    doc["stages"][2]["plateau_patience_steps"] = 20000  # the language stage waits long enough
    doc["profiles"]["tiny"]["plateau"]["window_steps"] = 20  # two evaluations at the tiny profile's 10
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))

    lines = _cadence_warnings(lambda: load_pipeline_config(path))
    assert (
        "plateau.window_steps: 5000 is shorter than 3 evaluations at defaults.eval_steps 5000 (holds 1 of the 3 "
        "evaluations the window rule needs, so it never fires): set eval_steps to at most 1666 or "
        "plateau_window_steps to at least 15000 (stages 'projection', 'vision', 'language', 'full')"
    ) in lines
    assert (
        "plateau.patience_steps: 3000 is shorter than 3 evaluations at defaults.eval_steps 5000 (the patience rule "
        "also waits for 3 evaluations without a new best: it acts as 15000 steps): set eval_steps to at most 1000 "
        "or plateau_patience_steps to at least 15000 (stages 'projection', 'vision', 'full')"
    ) in lines
    # Every profile is checked, as for problems; a value a profile wrote is named where it wrote it.
    assert any(
        line.startswith(
            "profiles.tiny.plateau.window_steps: 20 is shorter than 3 evaluations at "
            "profiles.tiny.defaults.eval_steps 10"
        )
        for line in lines
    ), lines
    # A profile that keeps the base's cadence (multi_gpu) repeats the base's lines word for word;
    # Python's default warning filter shows each once.
    assert len(set(lines)) == 3, lines


def test_sparse_cadence_in_a_stage_file_is_warned_with_the_file(tmp_path):
    # The guide's stage files evaluate every 5000 steps: the window rule (5000) could never fire.
    lines = _cadence_warnings(lambda: load_stage_config(SEED / "stage1_projection.json"))
    assert [line.split(": ")[1] for line in lines] == ["plateau_window_steps", "plateau_patience_steps"]
    assert all(line.startswith(str(SEED / "stage1_projection.json")) for line in lines)

    dense = tmp_path / "dense.json"
    dense.write_text(json.dumps({"eval_steps": 1000}))
    assert _cadence_warnings(lambda: load_stage_config(dense)) == []


@pytest.mark.parametrize(
    ("changes", "keys"),
    [
        ({}, []),  # the defaults: every 1000, window 5000, patience 3000
        ({"eval_steps": 2000}, ["plateau_window_steps", "plateau_patience_steps"]),
        ({"eval_steps": 2000, "plateau_patience_steps": 6000}, ["plateau_window_steps"]),
        ({"eval_steps": 1500}, ["plateau_patience_steps"]),  # 3 x 1500 = 4500 <= 5000, but > patience 3000
        ({"eval_steps": 1001}, ["plateau_patience_steps"]),
        ({"eval_steps": 5000, "do_eval": False}, []),  # no evaluation: no plateau rule to feed
        ({"eval_steps": 5000, "max_steps": 9999}, []),  # the stage ends before min_steps (10000)
        (
            {"eval_steps": 5000, "max_steps": 9999, "plateau_min_steps": 0},
            ["plateau_window_steps", "plateau_patience_steps"],
        ),
    ],
)
def test_cadence_problems(changes, keys):
    got = plateau_cadence_problems(StageConfig(**changes))
    assert [key for key, _, _ in got] == keys


# ============================================================================== disk full

_WORKER = textwrap.dedent('''
    """Inside a private mount namespace, with a small tmpfs at argv[1]: saves that run out of space."""
    import json, shutil, sys
    from pathlib import Path

    import torch

    from theworld_core.cli import main as theworld
    from theworld_core.config import ModelConfig, load_stage_config
    from theworld_core.model.components import trainable_components
    from theworld_core.model.stage_output import DiskFullError, read_manifest, save_stage_output, verify_stage_output
    from theworld_core.model.theworld import TheWorld
    from theworld_core.training import checkpoint as ckpt
    from theworld_core.training.optim import build_optimizer, optimizer_state_by_name

    mount, gemma, cosmos, seed, work = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])
    report = {}

    def fill(leave: int) -> None:
        """A ballast file that leaves `leave` bytes free."""
        ballast = mount / "ballast"
        ballast.unlink(missing_ok=True)
        ballast.write_bytes(b"\\0" * max(0, shutil.disk_usage(mount).free - leave))

    def model_and_state(flags):
        model = TheWorld.from_base(ModelConfig(model_name=gemma, cosmos_model_name=cosmos, world_tokens=4, world_image_size=32))
        model.set_trainable(trainable_components(flags))
        opt, names = build_optimizer(model, 1e-3, 0.0)
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        opt.step()  # real AdamW moments
        return model, optimizer_state_by_name(opt, names)

    # 1. The library: a resume state, then one that does not fit; then the stage output.
    model, optim = model_and_state({"freeze_gemma_vision": True, "freeze_gemma_language": False, "freeze_cosmos_vae": True})
    out = mount / "lib"
    def save(step):
        return ckpt.save_resume_state(out, model, optim, {"last_epoch": step}, ckpt.TrainerState(step=step), {}, 5)
    size = sum(p.stat().st_size for p in save(10).iterdir())
    final_size = sum(p.stat().st_size for p in save_stage_output(model, out / "final").iterdir())
    fill(size // 2)
    try:
        save(20)
    except DiskFullError as exc:
        report.update(resume_message=str(exc), errno=exc.errno, needed=exc.needed_bytes, size=size)
    fill(final_size // 3)
    try:
        save_stage_output(model, out / "final")
    except DiskFullError as exc:
        report.update(final_message=str(exc))
    report["entries"] = sorted(p.name for p in out.iterdir())
    report["latest"] = ckpt.latest_resume_state(out).name
    verify_stage_output(out / "final", read_manifest(out / "final"))
    (mount / "ballast").unlink()
    report["after_freeing"] = save(30).name
    shutil.rmtree(out)

    # 2. `theworld train`: the first resume state fits, the second does not.
    projection, optim = model_and_state({"freeze_gemma_vision": True, "freeze_gemma_language": True, "freeze_cosmos_vae": True})
    cfg = load_stage_config(seed).with_changes(
        model_name=gemma, cosmos_model_name=cosmos, world_tokens=4, world_image_size=32, dataset_name="synthetic",
        synthetic_samples=60, synthetic_image_size=32, streaming=False, batch_size=4, gradient_accumulation_steps=1,
        max_steps=10, warmup_steps=2, eval_steps=5, save_steps=5, logging_steps=5, mixed_precision="no",
        output_dir=str(mount / "stage"), name="stage1", push_to_hub=False)
    config = work / "stage.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    # A projection-only resume state is about the size of this one; leave room for one and a half.
    probe = ckpt.save_resume_state(mount / "probe", projection, optim, {}, ckpt.TrainerState(step=1), {}, 5)
    one = sum(p.stat().st_size for p in probe.iterdir())
    shutil.rmtree(mount / "probe")
    fill(one * 3 // 2)
    report["cli_rc"] = theworld(["train", "--config", str(config)])
    report["cli_entries"] = sorted(p.name for p in (mount / "stage").iterdir())
    report["cli_latest"] = ckpt.latest_resume_state(mount / "stage").name
    print("REPORT " + json.dumps(report))
''')


def _unshare_prefix() -> list[str] | None:
    """The command prefix that runs a shell in a private mount namespace where tmpfs may be mounted."""
    if not shutil.which("unshare") or sys.platform != "linux":
        return None
    for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
        probe = subprocess.run(
            [*prefix, "sh", "-c", "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if probe.returncode == 0:
            return prefix
    return None


def test_disk_full_during_saves_names_the_folder_and_the_size_and_keeps_earlier_states(tiny_paths, tmp_path, capfd):
    prefix = _unshare_prefix()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs in a private mount namespace here (unshare -m / -rm not permitted)")
    mount = tmp_path / "small-disk"
    mount.mkdir()
    (tmp_path / "worker.py").write_text(_WORKER)
    env = {**os.environ, "THEWORLD_PROJECT_DIR": str(tmp_path / "project"), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    script = (
        f'mount -t tmpfs -o size=64m tmpfs "{mount}" && exec "{sys.executable}" "{tmp_path / "worker.py"}" '
        f'"{mount}" "{tiny_paths.gemma}" "{tiny_paths.cosmos}" "{SEED / "stage1_projection.json"}" "{tmp_path}"'
    )
    done = subprocess.run(
        [*prefix, "sh", "-c", script], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False
    )
    report_line = next((line for line in done.stdout.splitlines() if line.startswith("REPORT ")), None)
    assert done.returncode == 0 and report_line, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_line.removeprefix("REPORT "))

    lib = mount / "lib"
    assert report["resume_message"].startswith(f"no space left on {lib}: resume state checkpoint-20 needs about ")
    assert "the earlier resume states are kept (newest: checkpoint-10)" in report["resume_message"]
    assert report["errno"] == 28 and report["needed"] >= report["size"]  # the estimate covers the real size
    assert report["final_message"].startswith(f"no space left on {lib}: the stage output final/ needs about ")
    assert "the stage output already in final/ is kept" in report["final_message"]
    assert report["entries"] == ["checkpoint-10", "final"]  # no temporary folder left behind
    assert report["latest"] == "checkpoint-10" and report["after_freeing"] == "checkpoint-30"

    # `theworld train`: one line on stderr, no traceback, exit 1; checkpoint-5 is there to resume from.
    assert report["cli_rc"] == 1
    assert (
        f"theworld train: error: no space left on {mount / 'stage'}: resume state checkpoint-10 needs about"
        in done.stderr
    )
    assert "the earlier resume states are kept (newest: checkpoint-5)" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # The MLflow records still arrive: the outbox keeps in memory what its file on the full disk cannot hold.
    assert "tracking incomplete" not in done.stderr, done.stderr[-3000:]
    assert report["cli_latest"] == "checkpoint-5"
    assert not [name for name in report["cli_entries"] if ".tmp-" in name]


# ============================================================================== hub push that never lands


def test_push_failure_says_when_the_hub_lacks_the_stage_output(hub, tmp_path):  # noqa: F811
    folder = _stage_output(tmp_path / "final")
    ok = HubPusher(REPO, "every_save", endpoint=hub.url)
    ok.on_save(folder, 5)
    ok.on_end(folder, {"step": 10})
    assert push_failure(ok.close(timeout=60)) is None

    # An earlier save landed, the final push could not even be staged: the hub holds an old state.
    partial = HubPusher(REPO, "every_save", endpoint=hub.url)
    partial.on_save(folder, 5)
    deadline = time.monotonic() + 60
    while partial.report()["uploads_done"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    partial.on_end(tmp_path / "missing", {"step": 10})
    line = push_failure(partial.close(timeout=30))
    assert line.startswith(
        f"hub push to {REPO} failed: the final stage output did not reach it (1 of 2 upload(s) failed; "
        "last error: cannot stage missing for upload"
    )

    hub.mode = "fail"
    failing = HubPusher(REPO, "every_save", endpoint=hub.url)
    failing.on_save(folder, 5)
    line = push_failure(failing.close(timeout=60))
    assert line.startswith(f"hub push to {REPO} failed: every push failed (1 of 1 upload(s) failed; last error: ")
    assert TOKEN not in line

    hub.mode = "hang"
    hanging = HubPusher(REPO, "end", endpoint=hub.url)
    hanging.on_end(folder, {"step": 10})
    line = push_failure(hanging.close(timeout=1.0))
    assert "the final stage output did not reach it" in line and "abandoned" in line
    hub.release.set()


def test_theworld_train_exits_3_when_every_push_fails_and_the_stage_stays_usable(
    hub, tiny_paths, tmp_path, monkeypatch, capsys
):  # noqa: F811
    from huggingface_hub import constants
    from mlflow.tracking import MlflowClient

    from theworld_core.cli import main as theworld
    from theworld_core.model.stage_output import read_manifest, verify_stage_output
    from theworld_core.training.gate import StageOutcome, decide

    hub.mode = "fail"  # every push: HTTP 500 (echoing the Authorization header)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(tmp_path / "project"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = hub_stage_config(tiny_paths, tmp_path)
    config = tmp_path / "stage1.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))

    assert theworld(["train", "--config", str(config), "--json"]) == EXIT_HUB_PUSH_FAILED
    out, err = capsys.readouterr()
    result = json.loads(out[out.index("{") :])
    assert f"theworld train: error: hub push to {REPO} failed: the final stage output did not reach it (" in err
    assert TOKEN not in out + err

    # Training completed and saved: the stage output is good, and the reason says the push failed.
    assert result["status"] == "completed"
    assert result["reason"].startswith(f"reached 10 steps; hub push to {REPO} failed: ")
    final = Path(result["stage_output"])
    verify_stage_output(final, read_manifest(final))
    report = result["evidence"][HUB_EVIDENCE_KEY]
    assert report["final_requested"] and not report["pushed_final"] and report["uploads_done"] == 0
    assert report["uploads_failed"] >= 1 and hub.commits == []
    tags = (
        MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'project'}/mlflow.db")
        .get_run(result["mlflow_run_id"])
        .data.tags
    )
    assert tags["hub_pushed_final"] == "False" and tags["stage_status"] == "completed"

    # The gate passes a completed stage on, whatever happened on the hub.
    outcome = StageOutcome(
        name="stage1",
        attempt=1,
        status=result["status"],
        eval_loss=result["eval_loss"],
        task_accuracy=None,
        steps=result["steps"],
        batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=cfg.learning_rate,
        max_grad_norm=cfg.max_grad_norm,
        warmup_steps=2,
        max_steps=10,
        stage_output_uri=str(final),
        reason=result["reason"],
        evidence=result["evidence"],
    )
    decision = decide(outcome, [], GateConfig(), retries_used=0, is_last_stage=False)
    assert outcome.succeeded and decision.action == "next", decision
