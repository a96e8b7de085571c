"""The stage trainer, end to end on the tiny models: what a user of `theworld train` checks.

- the seed's three JSON stage files run as written (tiny models swapped in), stage after stage;
- a SIGKILLed `theworld train` resumes and ends with the same weights as an uninterrupted run;
- a stage transition loads the previous stage output, starts a fresh optimizer and schedule,
  trains what the new freeze flags say, and a broken unfreeze is caught by the freeze audit;
- a changed config is refused on resume (`--fresh` starts over);
- the train and eval splits the trainer uses are disjoint;
- NaN loss, out of memory, exploding gradients and a plateau end the stage with a result, not a crash;
- MLflow holds the metrics, params, tags and the stage output artifact;
- `save_total_limit`, atomic checkpoints, and an idempotent rerun of a finished stage.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from theworld_core.config import load_stage_config
from theworld_core.model.components import FreezeAuditError, parameters_by_component
from theworld_core.model.theworld import TheWorld
from theworld_core.training import trainer as trainer_module
from theworld_core.training.launch import train_stage
from theworld_core.training.result import resume_key
from theworld_core.training.trainer import StageTrainer

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "configs" / "seed"
THEWORLD_CLI = Path(sys.executable).parent / "theworld"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def tiny_swap(tiny, output_dir) -> dict:
    """The only keys a test changes in a seed file: tiny bases, small world branch, synthetic data,
    its own output folder, no hub push."""
    return dict(
        model_name=str(tiny.gemma),
        cosmos_model_name=str(tiny.cosmos),
        world_tokens=4,
        world_image_size=32,
        dataset_name="synthetic",
        synthetic_samples=100,
        synthetic_image_size=32,
        output_dir=str(output_dir),
        push_to_hub=False,
    )


def small_cfg(tiny, output_dir, seed_file: str = "stage1_projection.json", **changes):
    """A seed stage file with the tiny swap and a short, fast schedule (materialised data, batch 4,
    no accumulation, 20 steps, evaluate/save every 10); `changes` override any of it."""
    schedule = dict(
        streaming=False,
        batch_size=4,
        gradient_accumulation_steps=1,
        max_steps=20,
        warmup_steps=2,
        eval_steps=10,
        save_steps=10,
        logging_steps=5,
    )
    return load_stage_config(SEED / seed_file).with_changes(**{**tiny_swap(tiny, output_dir), **schedule, **changes})


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def manifest(directory) -> dict:
    return json.loads((Path(directory) / "manifest.json").read_text())


def unwrapped(trainer: StageTrainer) -> TheWorld:
    return trainer.accelerator.unwrap_model(trainer.model)


def component_params(model, component: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in parameters_by_component(model)[component]}


def raw_optimizer(trainer: StageTrainer) -> torch.optim.Optimizer:
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)


def seed_file_values(path: Path) -> dict:
    """The seed file parsed independently of the package's loader (its only comments are `//`
    line comments outside strings)."""
    text = re.sub(r"//[^\n]*", "", path.read_text())
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


@pytest.fixture(autouse=True)
def local_mlflow(tmp_path, monkeypatch):
    """Each test tracks into its own project folder (SQLite under it), never a shared server."""
    project = tmp_path / "project"
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return project


def mlflow_client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")


@pytest.fixture(scope="module")
def stage1(tiny_paths, tmp_path_factory):
    """Stage 1 as the seed writes it (batch 4 x accumulation 4, streaming), tiny models swapped in,
    8 steps with a resume state every 4. Shared by the stage-chain and transition tests."""
    root = tmp_path_factory.mktemp("stage1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THEWORLD_PROJECT_DIR", str(root / "project"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = load_stage_config(SEED / "stage1_projection.json").with_changes(
            **tiny_swap(tiny_paths, root / "stage1_projection"),
            max_steps=8,
            warmup_steps=2,
            eval_steps=4,
            save_steps=4,
            logging_steps=4,
        )
        result = train_stage(cfg)
    return cfg, result


# ---------------------------------------------------------------------------------------------
# 1. the seed's JSON files, stage 1 -> 2 -> 3
# ---------------------------------------------------------------------------------------------


def test_seed_configs_parse_as_written():
    for name in ("stage1_projection.json", "stage2_vision.json", "stage3_language.json"):
        cfg = load_stage_config(SEED / name)
        for key, value in seed_file_values(SEED / name).items():
            assert getattr(cfg, key) == value, f"{name}: {key} loaded as {getattr(cfg, key)!r}, file says {value!r}"
    assert load_stage_config(SEED / "stage2_vision.json").trainable_component_names == (
        "world_projector",
        "gemma_vision",
    )
    assert load_stage_config(SEED / "stage3_language.json").trainable_component_names == (
        "world_projector",
        "gemma_vision",
        "gemma_language",
    )


def test_seed_stages_chain_with_tiny_models(stage1, tiny_paths, tmp_path):
    cfg1, result1 = stage1
    assert result1.status == "completed", result1.reason
    assert result1.steps == 8
    assert (Path(cfg1.output_dir) / "final").is_dir()
    assert manifest(result1.stage_output)["components"] == ["world_projector"]
    assert set(weights(result1.stage_output)) and all(n.startswith("world.") for n in weights(result1.stage_output))

    previous, expected = result1.stage_output, ["world_projector"]
    for name, added in (("stage2_vision.json", "gemma_vision"), ("stage3_language.json", "gemma_language")):
        seed_cfg = load_stage_config(SEED / name)
        assert seed_cfg.resume_from_checkpoint.startswith("your-username/")  # the hub id this test replaces
        cfg = seed_cfg.with_changes(
            **tiny_swap(tiny_paths, tmp_path / name.removesuffix(".json")),
            resume_from_checkpoint=str(previous),
            max_steps=4,
            warmup_steps=1,
            eval_steps=2,
            save_steps=2,
            logging_steps=2,
        )
        result = train_stage(cfg)
        assert result.status == "completed", result.reason
        assert result.steps == 4
        assert result.started_from.startswith("stage output"), result.started_from
        final = Path(cfg.output_dir) / "final"
        assert result.stage_output == str(final) and final.is_dir()
        expected = expected + [added]
        assert manifest(final)["components"] == expected
        assert result.trainable[added] > 0
        assert manifest(final)["stage_config"]["learning_rate"] == seed_cfg.learning_rate
        previous = final


# ---------------------------------------------------------------------------------------------
# 2. SIGKILL and resume: same final weights as an uninterrupted run
# ---------------------------------------------------------------------------------------------


def _train_cli(config: Path, *extra: str, log: Path | None = None):
    """`theworld train --config CONFIG --json`: run to the end, or with `log` start it in the
    background (output to that file, so a full pipe can never stall it) and return the process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [str(THEWORLD_CLI), "train", "--config", str(config), "--json", *extra]
    if log is None:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    with open(log, "w") as sink:
        return subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)


def test_sigkill_and_resume_gives_the_same_weights(tiny_paths, tmp_path):
    assert THEWORLD_CLI.is_file(), f"console script missing: {THEWORLD_CLI}"

    def write_config(out: Path) -> Path:
        cfg = small_cfg(
            tiny_paths,
            out,
            max_steps=40,
            warmup_steps=5,
            gradient_accumulation_steps=2,
            eval_steps=10,
            save_steps=10,
            save_total_limit=3,
        )
        path = tmp_path / f"{out.name}.json"
        path.write_text(json.dumps(cfg.model_dump(mode="json", exclude_unset=True), indent=2))
        return path

    out_a, out_b = tmp_path / "A", tmp_path / "B"
    config_a, config_b = write_config(out_a), write_config(out_b)
    diff = {k for k, v in json.loads(config_a.read_text()).items() if json.loads(config_b.read_text()).get(k) != v}
    assert diff == {"output_dir"}

    done_a = _train_cli(config_a)
    assert done_a.returncode == 0, done_a.stderr[-3000:]
    result_a = json.loads(done_a.stdout)
    assert result_a["status"] == "completed" and result_a["steps"] == 40

    log_b = tmp_path / "B-killed.log"
    proc = _train_cli(config_b, log=log_b)
    try:
        deadline = time.monotonic() + 240
        while not (out_b / "checkpoint-10").is_dir():
            assert proc.poll() is None, f"B ended before checkpoint-10: {log_b.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint-10 within 240 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out_b / "final").exists(), "B finished before it could be killed: nothing was tested"

    done_b = _train_cli(config_b)
    assert done_b.returncode == 0, done_b.stderr[-3000:]
    assert "resumed" in done_b.stderr, done_b.stderr[-3000:]
    result_b = json.loads(done_b.stdout)
    assert result_b["status"] == "completed" and result_b["steps"] == 40
    assert result_b["started_from"].startswith("resumed")

    final_a, final_b = weights(out_a / "final"), weights(out_b / "final")
    assert final_a.keys() == final_b.keys() and final_a
    for name in final_a:
        assert torch.allclose(final_a[name], final_b[name], rtol=0, atol=1e-6), name
    # The eval losses along the way agree too (the resumed run kept the history before the kill).
    hist_a, hist_b = result_a["eval_history"], result_b["eval_history"]
    assert [s for s, _ in hist_a] == [s for s, _ in hist_b] == [10, 20, 30, 40]
    assert all(math.isclose(a, b, rel_tol=0, abs_tol=1e-6) for (_, a), (_, b) in zip(hist_a, hist_b))


# ---------------------------------------------------------------------------------------------
# 3. stage transition with changed freeze flags
# ---------------------------------------------------------------------------------------------


def stage2_cfg(tiny, output_dir, resume_from, **changes):
    return small_cfg(tiny, output_dir, "stage2_vision.json", resume_from_checkpoint=str(resume_from), **changes)


def test_transition_loads_stage_output_with_fresh_optimizer(stage1, tiny_paths, tmp_path):
    cfg1, result1 = stage1
    final1 = Path(result1.stage_output)
    cfg2 = stage2_cfg(tiny_paths, tmp_path / "stage2", final1)
    pretrained = TheWorld.from_base(cfg2.model_part())
    pretrained_vision = component_params(pretrained, "gemma_vision")
    assert pretrained_vision

    trainer = StageTrainer(cfg2)
    trainer.setup()
    model = unwrapped(trainer)
    assert trainer.started_from.startswith("stage output"), trainer.started_from
    saved = weights(final1)
    world = component_params(model, "world_projector")
    assert saved.keys() == world.keys()
    for name, tensor in saved.items():
        assert torch.equal(world[name], tensor), f"{name} is not stage 1's saved weight"
    for name, tensor in component_params(model, "gemma_vision").items():
        assert torch.equal(tensor, pretrained_vision[name]), f"{name} is not the pretrained weight"
    assert len(raw_optimizer(trainer).state) == 0, "a stage transition must start a fresh optimizer"
    assert trainer.scheduler.last_epoch == 0 and trainer.state.step == 0
    # A fresh warmup: the first optimizer step trains at lr / warmup_steps (never at 0).
    for group in trainer.optimizer.param_groups:
        assert math.isclose(group["lr"], cfg2.learning_rate / cfg2.warmup_steps), (group["name"], group["lr"])
    assert tuple(trainer.trainable) == ("world_projector", "gemma_vision")
    trainable_now = {c for c, ps in parameters_by_component(model).items() if any(p.requires_grad for _, p in ps)}
    assert trainable_now == {"world_projector", "gemma_vision"}
    groups = {g["name"].split("/")[0] for g in trainer.optimizer.param_groups}
    assert groups == {"world_projector", "gemma_vision"}

    result = trainer.run()
    assert result.status == "completed", result.reason
    trained = weights(result.stage_output)
    assert set(pretrained_vision) <= set(trained), "the stage output lacks vision weights"
    changed = {n for n, t in pretrained_vision.items() if not torch.equal(trained[n], t)}
    # The vision tower itself must train, not only Gemma's multi-modal projector.
    assert any(n.startswith("gemma.model.vision_tower.") for n in changed), sorted(changed)
    assert any(n.startswith("gemma.model.multi_modal_projector.") for n in changed), sorted(changed)
    assert any(not torch.equal(trained[n], saved[n]) for n in saved), "stage 2 did not change the world projector"


def test_unfrozen_vision_gets_sane_gradients(tiny_paths, tmp_path):
    """Stage 2 on the tiny bases: the unfrozen vision tower receives a gradient and the first
    gradient norm is far from the divergence limit (else stage 2 "diverges" at step 1)."""
    cfg = small_cfg(tiny_paths, tmp_path / "stage2", "stage2_vision.json", resume_from_checkpoint=None)
    trainer = StageTrainer(cfg)
    trainer.setup()
    model = unwrapped(trainer)
    projection = model.gemma.model.multi_modal_projector.mm_input_projection_weight
    assert float(projection.abs().sum()) > 0, (
        "the tiny Gemma's multi_modal_projector.mm_input_projection_weight is all zeros: image features "
        "are zero, the vision tower gets no gradient"
    )
    batch = trainer.encoders.fill(next(iter(trainer._train_loader(0))))  # as the loop does (feature cache)
    _, loss = trainer.model(**batch)
    loss.backward()
    tower = [(n, p.grad) for n, p in model.named_parameters() if n.startswith("gemma.model.vision_tower.")]
    assert any(g is not None and g.abs().sum() > 0 for _, g in tower), "the vision tower got no gradient"
    norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
    assert norm < cfg.divergence_grad_norm / 10, f"first gradient norm {norm:.4g}"


def _drop_vision_in_set_trainable(monkeypatch):
    original = TheWorld.set_trainable

    def broken(self, components):  # silently ignores the vision unfreeze, reports what it did
        return original(self, [c for c in components if c != "gemma_vision"])

    monkeypatch.setattr(TheWorld, "set_trainable", broken)


def _drop_vision_in_trainable_components(monkeypatch):
    original = trainer_module.trainable_components
    monkeypatch.setattr(
        trainer_module, "trainable_components", lambda flags: tuple(c for c in original(flags) if c != "gemma_vision")
    )


def _set_trainable_lies(monkeypatch):
    original = TheWorld.set_trainable

    def lying(self, components):  # keeps vision frozen but claims it unfroze it
        original(self, [c for c in components if c != "gemma_vision"])
        return tuple(components)

    monkeypatch.setattr(TheWorld, "set_trainable", lying)


@pytest.mark.parametrize(
    "breakage",
    [_drop_vision_in_set_trainable, _drop_vision_in_trainable_components, _set_trainable_lies],
    ids=["set_trainable_ignores_flag", "trainable_components_drops_it", "set_trainable_lies"],
)
def test_broken_unfreeze_is_caught_by_the_audit(breakage, stage1, tiny_paths, tmp_path, monkeypatch):
    cfg2 = stage2_cfg(tiny_paths, tmp_path / "stage2", stage1[1].stage_output, max_steps=10, save_steps=10)
    assert "gemma_vision" in cfg2.trainable_component_names
    breakage(monkeypatch)
    with pytest.raises(FreezeAuditError, match="gemma_vision"):
        train_stage(cfg2)
    assert not (tmp_path / "stage2" / "final").exists()


def test_carry_optimizer_state_restores_world_moments_only(stage1, tiny_paths, tmp_path):
    cfg1, _ = stage1
    resume_state = Path(cfg1.output_dir) / "checkpoint-8"
    assert (resume_state / "optimizer.pt").is_file()
    saved = torch.load(resume_state / "optimizer.pt", weights_only=False)["state"]
    assert saved and all(n.startswith("world.") for n in saved)

    cfg2 = stage2_cfg(tiny_paths, tmp_path / "stage2", resume_state, carry_optimizer_state=True)
    trainer = StageTrainer(cfg2)
    trainer.setup()
    assert trainer.started_from.startswith("stage output"), trainer.started_from  # a transition, not a resume
    assert trainer.state.step == 0 and trainer.scheduler.last_epoch == 0
    name_of = {id(p): n for n, p in unwrapped(trainer).named_parameters()}
    state = raw_optimizer(trainer).state
    carried = {name_of[id(p)]: s for p, s in state.items() if s}
    assert set(carried) == set(saved), "exactly the world parameters' moments are carried"
    for name, s in carried.items():
        assert torch.equal(s["exp_avg"], saved[name]["exp_avg"]), name
        assert torch.equal(s["exp_avg_sq"], saved[name]["exp_avg_sq"]), name
    vision = {n for n, _ in parameters_by_component(unwrapped(trainer))["gemma_vision"]}
    assert not vision & set(carried)
    # The stage keeps its own learning rate (stage 2's, not stage 1's).
    assert {g["initial_lr"] for g in trainer.optimizer.param_groups} == {cfg2.learning_rate}


# ---------------------------------------------------------------------------------------------
# 4. changed config on resume
# ---------------------------------------------------------------------------------------------


def test_changed_config_on_resume_is_refused_and_fresh_starts_over(tiny_paths, tmp_path):
    out = tmp_path / "stage"
    cfg = small_cfg(tiny_paths, out, max_steps=10, learning_rate=1e-4)
    assert train_stage(cfg).status == "completed"

    # Unfreezing a component is a training change too (the reference implementation ignored it).
    with pytest.raises(ValueError, match=r"freeze_gemma_vision: True -> False"):
        train_stage(cfg.with_changes(freeze_gemma_vision=False))

    changed = cfg.with_changes(learning_rate=3e-4)
    with pytest.raises(ValueError) as err:
        train_stage(changed)
    message = str(err.value)
    assert "learning_rate" in message and "0.0001" in message and "0.0003" in message, message
    assert "--fresh" in message

    result = train_stage(changed, fresh=True)
    assert result.status == "completed" and result.steps == 10
    assert result.started_from == "pretrained bases"
    assert manifest(out / "final")["stage_config"]["learning_rate"] == 3e-4
    state = json.loads((out / "checkpoint-10" / "trainer_state.json").read_text())
    assert state["config_hash"] == resume_key(changed) != resume_key(cfg)


# ---------------------------------------------------------------------------------------------
# 5. train/eval disjointness as the trainer sees it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streaming", [False, True])
def test_trainer_train_and_eval_splits_are_disjoint(streaming, tiny_paths, tmp_path):
    trainer = StageTrainer(small_cfg(tiny_paths, tmp_path / "stage", streaming=streaming, eval_fraction=0.2))
    trainer.setup()
    train_ids = [row["id"] for row in trainer.data.train.select_columns(["id"])]
    eval_ids = [row["id"] for row in trainer.data.eval.select_columns(["id"])]
    assert train_ids and eval_ids
    assert len(set(train_ids)) == len(train_ids) and len(set(eval_ids)) == len(eval_ids)
    assert not set(train_ids) & set(eval_ids)
    assert len(set(train_ids)) + len(set(eval_ids)) == 100
    assert {row["id"] for row in trainer._eval_rows()} <= set(eval_ids)


# ---------------------------------------------------------------------------------------------
# 6. divergence and out of memory end the stage with a result
# ---------------------------------------------------------------------------------------------


def test_nan_loss_gives_diverged_result(tiny_paths, tmp_path):
    out = tmp_path / "stage"
    hook = lambda step, loss: loss * float("nan") if step == 5 else loss  # noqa: E731
    result = StageTrainer(small_cfg(tiny_paths, out), loss_hook=hook).run()
    assert result.status == "diverged", result.reason
    assert result.evidence["step"] == 5
    assert math.isnan(result.evidence["loss"])
    assert result.stage_output is None and not (out / "final").exists()
    assert result.steps == 4


def test_out_of_memory_gives_oom_result(tiny_paths, tmp_path):
    out = tmp_path / "stage"

    def hook(step, loss):
        if step == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return loss

    result = StageTrainer(small_cfg(tiny_paths, out, batch_size=6), loss_hook=hook).run()
    assert result.status == "oom", result.reason
    assert result.evidence["batch_size"] == 6
    assert result.evidence["step"] == 3
    assert result.stage_output is None and not (out / "final").exists()


def test_exploding_gradient_gives_diverged_result(tiny_paths, tmp_path):
    out = tmp_path / "stage"
    hook = lambda step, loss: loss * 1e8 if step == 3 else loss  # noqa: E731
    cfg = small_cfg(tiny_paths, out, learning_rate=1e-7)  # tiny lr: the check must not depend on it
    assert cfg.divergence_grad_norm == 1000
    result = StageTrainer(cfg, loss_hook=hook).run()
    assert result.status == "diverged", result.reason
    assert result.evidence["step"] == 3
    assert result.evidence["grad_norm"] > 1000
    assert "gradient norm" in result.reason
    assert not (out / "final").exists()


# ---------------------------------------------------------------------------------------------
# 7. plateau ends the stage early
# ---------------------------------------------------------------------------------------------


def test_plateau_ends_the_stage_early(tiny_paths, tmp_path):
    cfg = small_cfg(
        tiny_paths,
        tmp_path / "stage",
        max_steps=200,
        eval_steps=5,
        save_steps=50,
        # window and patience 15 = 3 evaluations at eval_steps 5, as the plateau rule needs (docs/stages.md#plateau)
        plateau_min_steps=10,
        plateau_window_steps=15,
        plateau_patience_steps=15,
        plateau_min_improvement=0.5,
    )
    result = train_stage(cfg)
    assert result.status == "plateaued", result.reason
    assert 10 <= result.steps < 200
    assert result.steps % 5 == 0
    # The reason carries the numbers: the threshold and the losses it compared.
    assert "50%" in result.reason, result.reason
    history = dict((int(s), loss) for s, loss in result.eval_history)
    assert f"{min(history.values()):.6g}" in result.reason, (result.reason, history)
    assert result.stage_output and (Path(result.stage_output) / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# 8. MLflow
# ---------------------------------------------------------------------------------------------


def test_mlflow_run_has_metrics_params_tags_and_stage_output(tiny_paths, tmp_path, local_mlflow):
    cfg = small_cfg(tiny_paths, tmp_path / "stage", wandb_project="tw-trainer-test", wandb_run_name="mlflow-check")
    trainer = StageTrainer(cfg)
    result = trainer.run()
    assert result.status == "completed", result.reason
    client = mlflow_client(local_mlflow)
    run = client.get_run(result.mlflow_run_id)

    assert client.get_experiment(run.info.experiment_id).name == "tw-trainer-test"
    assert run.info.run_name == "mlflow-check"

    metrics = set(run.data.metrics)
    for key in ("train/loss", "eval/loss", "train/grad_norm", "train/samples_per_s", "train/tokens_per_s"):
        assert key in metrics, (key, sorted(metrics))
    group_names = [g["name"] for g in trainer.optimizer.param_groups]
    assert len(group_names) >= 2  # world_projector/decay and world_projector/no_decay
    for name in group_names:
        assert f"train/lr/{name}" in metrics, (name, sorted(metrics))
    train_loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(train_loss_steps) == [5, 10, 15, 20]
    eval_loss = client.get_metric_history(run.info.run_id, "eval/loss")
    assert sorted(m.step for m in eval_loss) == [10, 20]

    params = run.data.params
    assert float(params["learning_rate"]) == cfg.learning_rate
    assert int(params["trainable/world_projector"]) == result.trainable["world_projector"] > 0
    for frozen in ("gemma_vision", "gemma_language", "cosmos_vae"):
        assert int(params[f"trainable/{frozen}"]) == 0
    assert run.data.tags["data_fingerprint"] == result.data_fingerprint

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "stage_output")}
    assert "stage_output/manifest.json" in artifacts
    assert "stage_output/model.safetensors" in artifacts


# ---------------------------------------------------------------------------------------------
# 9. save_total_limit and atomic checkpoints
# ---------------------------------------------------------------------------------------------


def test_save_total_limit_keeps_newest_and_no_temporary_folder(tiny_paths, tmp_path):
    out = tmp_path / "stage"
    result = train_stage(small_cfg(tiny_paths, out, max_steps=30, save_steps=10, save_total_limit=2))
    assert result.status == "completed"
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-20", "checkpoint-30"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    assert (out / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# 10. a finished stage is not trained again
# ---------------------------------------------------------------------------------------------


def test_finished_stage_rerun_does_not_train_again(tiny_paths, tmp_path):
    out = tmp_path / "stage"
    cfg = small_cfg(tiny_paths, out)
    first = train_stage(cfg)
    assert first.status == "completed"
    final = out / "final"
    stamp = (final.stat().st_mtime_ns, (final / "model.safetensors").stat().st_mtime_ns)
    before = weights(final)

    calls = []

    def counting(step, loss):
        calls.append(step)
        return loss

    again = StageTrainer(cfg, loss_hook=counting).run()
    assert calls == [], "the finished stage trained again"
    assert again.status == "completed" and again.steps == first.steps
    assert again.stage_output == first.stage_output
    assert (final.stat().st_mtime_ns, (final / "model.safetensors").stat().st_mtime_ns) == stamp
    after = weights(final)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert again.mlflow_run_id == first.mlflow_run_id
