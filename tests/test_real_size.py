"""What training the real Gemma 3 4B needs from the trainer, checked on the tiny models:

- the precision policy is applied before any saved weight goes in and checked after the freeze
  flags: trainable fp32, frozen in the compute dtype (bf16 where it runs), logged to MLflow;
- every answer token weighs the same in an optimizer step however the step is split into
  micro-batches and accumulation steps (captions of very different lengths);
- `optimizer`: adamw (fused on CUDA, foreach elsewhere) or torchao's adamw_8bit; options this
  machine cannot run are refused before any work; name-keyed optimizer state round-trips;
- no weight decay on embeddings; the first optimizer step trains at lr / warmup_steps;
- batched greedy generation answers what one-at-a-time generation answers; the evaluation loss is
  the token-weighted estimator.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from stage_helpers import small_cfg, weights, write_varied_length_folder

from theworld_core.config.errors import ConfigError
from theworld_core.model.components import parameters_by_component
from theworld_core.model.inputs import END_OF_TURN, answer_token_count
from theworld_core.model.precision import PrecisionError, dtypes_by_component, resolve_precision
from theworld_core.training import trainer as trainer_module
from theworld_core.training.evaluation import evaluate_loss
from theworld_core.training.launch import train_stage
from theworld_core.training.optim import (
    build_optimizer,
    build_schedule,
    load_optimizer_state_by_name,
    optimizer_state_by_name,
)
from theworld_core.training.trainer import StageTrainer


@pytest.fixture(autouse=True)
def local_mlflow(tmp_path, monkeypatch):
    project = tmp_path / "project"
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return project


def unwrapped(trainer: StageTrainer):
    return trainer.accelerator.unwrap_model(trainer.model)


@pytest.fixture(scope="module")
def varied_length_folder(tiny_paths, tmp_path_factory) -> Path:
    from transformers import AutoTokenizer

    folder = write_varied_length_folder(tmp_path_factory.mktemp("varied-length-shapes"))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_paths.gemma))
    captions = [json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()]
    lengths = {len(tokenizer(c + END_OF_TURN, add_special_tokens=False)["input_ids"]) for c in captions}
    assert max(lengths) > 3 * min(lengths), lengths
    return folder


# ---------------------------------------------------------------------------------------------
# 1. precision policy
# ---------------------------------------------------------------------------------------------


def _bf16_on_cpu(monkeypatch):
    """Resolve the policy as on a bf16 GPU (the CPU runs bf16 autocast too): frozen bf16."""
    monkeypatch.setattr(
        trainer_module,
        "resolve_precision",
        lambda mp, device, bf16_supported=None: resolve_precision(mp, device, bf16_supported=True),
    )


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one process-wide state, which refuses a second mixed_precision: each test
    here starts and leaves it unset (the bf16 tests need their own)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_setup_applies_and_checks_the_precision_policy(tiny_paths, tmp_path, monkeypatch, local_mlflow):
    _bf16_on_cpu(monkeypatch)
    cfg = small_cfg(
        tiny_paths,
        tmp_path / "stage",
        "stage2_vision.json",
        resume_from_checkpoint=None,
        max_steps=4,
        eval_steps=4,
        save_steps=4,
        logging_steps=2,
    )
    trainer = StageTrainer(cfg)
    result = trainer.run()
    assert result.status == "completed", result.reason
    dtypes = dtypes_by_component(unwrapped(trainer))
    assert dtypes["world_projector"] == dtypes["gemma_vision"] == ["float32"]
    assert dtypes["gemma_language"] == dtypes["cosmos_vae"] == ["bfloat16"]
    assert math.isfinite(result.eval_loss)
    from mlflow.tracking import MlflowClient

    params = MlflowClient(tracking_uri=f"sqlite:///{local_mlflow}/mlflow.db").get_run(result.mlflow_run_id).data.params
    assert params["precision/effective"] == "bf16" and params["precision/compute_dtype"] == "bfloat16"
    assert params["precision/master_dtype"] == "float32" and params["precision/autocast"] == "true"


def test_stage_output_goes_into_fp32_trainable_weights(tiny_paths, tmp_path, monkeypatch):
    """The policy is applied before the stage output is loaded: the trained fp32 world weights come
    back bit for bit (loaded into bf16 parameters they would be rounded)."""
    _bf16_on_cpu(monkeypatch)
    first = train_stage(small_cfg(tiny_paths, tmp_path / "s1", max_steps=2, eval_steps=2, save_steps=2))
    saved = weights(first.stage_output)
    trainer = StageTrainer(
        small_cfg(tiny_paths, tmp_path / "s2", "stage2_vision.json", resume_from_checkpoint=first.stage_output)
    )
    trainer.setup()
    world = dict(parameters_by_component(unwrapped(trainer))["world_projector"])
    assert saved and all(
        torch.equal(world[n].detach(), t) and world[n].dtype == torch.float32 for n, t in saved.items()
    )


def test_a_parameter_outside_the_policy_fails_setup(tiny_paths, tmp_path, monkeypatch):
    # Without apply_precision the tiny Gemma stays bf16 as on disk, while fp32 is the policy on a CPU.
    monkeypatch.setattr(trainer_module, "apply_precision", lambda model, policy, trainable: {})
    with pytest.raises(PrecisionError, match=r"gemma\.model\..* is bfloat16, expected float32"):
        StageTrainer(small_cfg(tiny_paths, tmp_path / "stage")).setup()


# ---------------------------------------------------------------------------------------------
# 2. every answer token counts once per optimizer step
# ---------------------------------------------------------------------------------------------


def _split_run(tiny, data: Path, out: Path, batch_size: int, accumulation: int, **changes):
    cfg = small_cfg(
        tiny,
        out,
        dataset_name=str(data),
        batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-3,
        max_steps=4,
        warmup_steps=1,
        do_eval=False,
        save_steps=100,
        logging_steps=1,
        **changes,
    )
    trainer = StageTrainer(cfg)
    result = trainer.run()
    assert result.status == "completed", result.reason
    return result


def _relative_difference(a: dict, b: dict) -> float:
    num = math.sqrt(sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in a))
    den = math.sqrt(sum(float(a[n].double().pow(2).sum()) for n in a))
    return num / den


def test_splits_of_an_optimizer_step_train_the_same_weights(tiny_paths, varied_length_folder, tmp_path, local_mlflow):
    """8 x 1, 4 x 2 and 2 x 4 (batch x accumulation) over the same samples. Measured: 1.5e-9 relative
    difference of the weights (6e-7 of the updates); with the loss averaged per micro-batch instead
    (the estimator before) 3.5e-4 / 4.5e-4 of the weights and 14% / 18% of the updates."""
    from mlflow.tracking import MlflowClient

    from theworld_core.model.theworld import TheWorld

    runs = {
        split: _split_run(tiny_paths, varied_length_folder, tmp_path / f"{split[0]}x{split[1]}", *split)
        for split in ((8, 1), (4, 2), (2, 4))
    }
    finals = {split: weights(r.stage_output) for split, r in runs.items()}
    reference = finals[(8, 1)]
    from accelerate.utils import set_seed

    cfg = small_cfg(tiny_paths, tmp_path / "init")
    set_seed(cfg.seed)  # the world projector's initialisation, as the trainer draws it
    initial = {n: p.detach() for n, p in TheWorld.from_base(cfg.model_part()).named_parameters() if n in reference}
    update = {n: reference[n] - initial[n] for n in reference}
    assert _relative_difference(reference, initial) > 1e-3  # training moved the weights
    for split, final in finals.items():
        assert final.keys() == reference.keys() and reference
        difference = _relative_difference(reference, final)
        assert difference < 1e-4, f"{split[0]} x {split[1]}: weights differ from 8 x 1 by {difference:.3g} (relative)"
        update_difference = _relative_difference(update, {n: final[n] - initial[n] for n in final})
        assert update_difference < 1e-4, f"{split[0]} x {split[1]}: updates differ by {update_difference:.3g}"

    # The logged train loss is the same token-weighted estimator in every split.
    client = MlflowClient(tracking_uri=f"sqlite:///{local_mlflow}/mlflow.db")
    histories = {
        split: [m.value for m in sorted(client.get_metric_history(r.mlflow_run_id, "train/loss"), key=lambda m: m.step)]
        for split, r in runs.items()
    }
    for split, history in histories.items():
        assert len(history) == 4
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(history, histories[(8, 1)])), (split, history)


# ---------------------------------------------------------------------------------------------
# 3. optimizer choice, refusals before any work, name-keyed state
# ---------------------------------------------------------------------------------------------


def _no_work(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the option was refused")

    monkeypatch.setattr(trainer_module, "prepare_stage_data", refuse)
    monkeypatch.setattr(trainer_module.TheWorld, "from_base", refuse)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("optimizer", "adamw_8bit", "use 'adamw' here"),
        ("mixed_precision", "fp16", "use 'bf16' (fp32 where bf16 is not supported) or 'no'"),
    ],
)
def test_options_this_machine_cannot_run_are_refused_before_any_work(
    key, value, allowed, tiny_paths, tmp_path, monkeypatch
):
    _no_work(monkeypatch)
    with pytest.raises(ConfigError) as error:
        StageTrainer(small_cfg(tiny_paths, tmp_path / "stage", **{key: value})).setup()
    message = str(error.value)
    assert f"{key}: '{value}' is not allowed on a machine without a CUDA GPU" in message, message
    assert allowed in message, message


def test_adamw_8bit_without_torchao_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)
    from theworld_core.training.optim import check_optimizer_available

    with pytest.raises(ConfigError, match=r"optimizer: 'adamw_8bit' is not allowed without torchao.*`gpu` extra"):
        check_optimizer_available("adamw_8bit", cuda=True)
    check_optimizer_available("adamw", cuda=False)  # always available


@pytest.fixture(scope="module")
def stage3_model(tiny_paths, tmp_path_factory):
    """The tiny TheWorld with world projector, vision and language trainable (fp32, as on a CPU)."""
    from theworld_core.model.precision import apply_precision

    cfg = small_cfg(tiny_paths, tmp_path_factory.mktemp("s3"), "stage3_language.json", resume_from_checkpoint=None)
    from theworld_core.model.theworld import TheWorld

    model = TheWorld.from_base(cfg.model_part())
    apply_precision(model, resolve_precision("no", "cpu"), cfg.trainable_component_names)
    model.set_trainable(cfg.trainable_component_names)
    return cfg, model


def test_embeddings_and_norms_are_not_decayed(stage3_model):
    _, model = stage3_model
    optimizer, names = build_optimizer(model, 1e-4, 0.1, {"gemma_vision": 3e-5})
    decayed = {n for g, ns in zip(optimizer.param_groups, names) if g["weight_decay"] > 0 for n in ns}
    exempt = {n for g, ns in zip(optimizer.param_groups, names) if g["weight_decay"] == 0 for n in ns}
    for embedding in (
        "gemma.model.language_model.embed_tokens.weight",  # tied with lm_head
        "gemma.model.vision_tower.embeddings.position_embedding.weight",
        "world.temporal_embedding.weight",
        "world.marker_embeddings",
    ):
        assert embedding in exempt, embedding
    assert not any("embed_tokens" in n or "position_embedding" in n or "norm" in n for n in decayed)
    assert "gemma.model.vision_tower.embeddings.patch_embedding.weight" in decayed  # a conv, not an embedding
    assert any(n.startswith("gemma.model.language_model.layers.") for n in decayed)
    # Per-component learning rates are per group.
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["gemma_vision/decay"] == lrs["gemma_vision/no_decay"] == 3e-5 and lrs["world_projector/decay"] == 1e-4


def test_adamw_is_foreach_on_cpu(stage3_model):
    _, model = stage3_model
    optimizer, _ = build_optimizer(model, 1e-4, 0.01)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(g["foreach"] and not g["fused"] for g in optimizer.param_groups)
    cuda, _ = build_optimizer(model, 1e-4, 0.01, device_type="cuda")  # state lives on the device: built anywhere
    assert all(g["fused"] and not g["foreach"] for g in cuda.param_groups)


def _toy_model():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.world = torch.nn.Module()
    model.world.proj = torch.nn.Linear(64, 128)  # 8192 weights: torchao quantises tensors of >= 4096 values
    model.world.temporal_embedding = torch.nn.Embedding(4, 64)
    return model


def _step(model, optimizer, scheduler, seed):
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    scheduler.step()


@pytest.mark.parametrize("kind", ["adamw", "adamw_8bit"])
def test_name_keyed_optimizer_state_round_trips(kind):
    """Save by name after 2 steps, restore into a fresh optimizer (through torch.save), step on:
    the same weights as the optimizer that never stopped."""
    if kind == "adamw_8bit":
        pytest.importorskip("torchao.optim", reason="the `gpu` extra (torchao) is not installed")
    a, b = _toy_model(), _toy_model()
    opt_a, names = build_optimizer(a, 1e-2, 0.1, optimizer=kind)
    sched_a = build_schedule("linear", opt_a, 2, 10)
    for seed in (1, 2):
        _step(a, opt_a, sched_a, seed)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer_state_by_name(opt_a, names), "scheduler": sched_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    b.load_state_dict(a.state_dict())
    opt_b, names_b = build_optimizer(b, 1e-2, 0.1, optimizer=kind)
    sched_b = build_schedule("linear", opt_b, 2, 10)
    assert set(load_optimizer_state_by_name(opt_b, names_b, saved["optimizer"])) == {n for n, _ in a.named_parameters()}
    sched_b.load_state_dict(saved["scheduler"])
    if kind == "adamw_8bit":
        moment = opt_b.state[b.world.proj.weight]["exp_avg"]
        assert type(moment).__name__ == "OptimState8bit", type(moment)
    for seed in (3, 4):
        _step(a, opt_a, sched_a, seed)
        _step(b, opt_b, sched_b, seed)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    assert float(opt_a.param_groups[0]["lr"]) == float(opt_b.param_groups[0]["lr"]) > 0


@pytest.mark.parametrize("kind", ["adamw", "adamw_8bit"])
def test_stage_resumed_from_a_resume_state_ends_with_the_same_weights(kind, tiny_paths, tmp_path, monkeypatch):
    """A stage that continues from its step-2 resume state ends where the uninterrupted one does
    (adamw_8bit through the trainer on a CPU: the CUDA refusal is lifted for this test only)."""
    import shutil

    if kind == "adamw_8bit":
        pytest.importorskip("torchao.optim", reason="the `gpu` extra (torchao) is not installed")
        monkeypatch.setattr(trainer_module, "refuse_unavailable_options", lambda cfg, cuda: None)
    cfg = small_cfg(
        tiny_paths,
        tmp_path / "A",
        optimizer=kind,
        max_steps=4,
        warmup_steps=2,
        eval_steps=2,
        save_steps=2,
        save_total_limit=None,
        learning_rate=1e-3,
    )
    first = train_stage(cfg)
    assert first.status == "completed", first.reason
    (tmp_path / "B").mkdir()
    shutil.copytree(tmp_path / "A" / "checkpoint-2", tmp_path / "B" / "checkpoint-2")
    second = train_stage(cfg.with_changes(output_dir=str(tmp_path / "B")))
    assert second.started_from.startswith("resumed"), second.started_from
    a, b = weights(first.stage_output), weights(second.stage_output)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    saved = torch.load(tmp_path / "B" / "checkpoint-4" / "optimizer.pt", weights_only=False)["state"]
    assert saved and all(n.startswith("world.") for n in saved)


def test_first_step_trains_at_lr_over_warmup_and_the_last_step_is_not_zero():
    model = _toy_model()
    optimizer, _ = build_optimizer(model, 1e-3, 0.0)
    scheduler = build_schedule("linear", optimizer, warmup_steps=4, total_steps=10)
    used = []
    for _ in range(10):
        used.append(optimizer.param_groups[0]["lr"])  # what this optimizer step trains at
        optimizer.step()
        scheduler.step()
    assert math.isclose(used[0], 1e-3 / 4) and math.isclose(used[3], 1e-3)  # step 4 = peak
    assert used[-1] > 0 and used == sorted(used[:4]) + sorted(used[4:], reverse=True)


# ---------------------------------------------------------------------------------------------
# 5. evaluation: batched generation, token-weighted loss
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_model(tiny_paths, tmp_path_factory):
    from theworld_core.model.theworld import TheWorld

    cfg = small_cfg(tiny_paths, tmp_path_factory.mktemp("eval"))
    model = TheWorld.from_base(cfg.model_part())
    model.eval()
    return model


def _images(count: int):
    from PIL import Image

    from theworld_core.data.synthetic import render_png, shape_spec

    return [Image.open(io.BytesIO(render_png(shape_spec(0, i), 32))) for i in range(count)]


PROMPTS = [
    "Describe the image.",
    "What is it?",
    "Describe this picture in a few words, colours included.",
    "Hi",
    "Shape?",
    "Tell me about the colour and the shape you see here, please.",
]


def test_batched_generation_answers_as_one_at_a_time(eval_model):
    images = _images(len(PROMPTS))
    alone = [eval_model.generate(i, p, max_new_tokens=10) for i, p in zip(images, PROMPTS)]
    assert eval_model.generate_batch(images, PROMPTS, max_new_tokens=10) == alone
    # Rows that stop at different steps: make a token that one row generates early the end of turn.
    tokenizer = eval_model.processor.tokenizer
    early = tokenizer(alone[1], add_special_tokens=False)["input_ids"][2]
    eos = tokenizer.eos_token
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(early)
    try:
        assert tokenizer.eos_token_id == early
        alone = [eval_model.generate(i, p, max_new_tokens=10) for i, p in zip(images, PROMPTS)]
        assert len({len(a) for a in alone}) > 1, alone
        assert eval_model.generate_batch(images, PROMPTS, max_new_tokens=10) == alone
    finally:
        tokenizer.eos_token = eos


def test_evaluation_loss_weights_every_answer_token_once(eval_model):
    images = _images(5)
    rows = [
        {"image": im, "prompt": "Describe the image.", "text": "a shape" + " and more words" * i}
        for i, im in enumerate(images)
    ]
    builder = eval_model.builder
    total, tokens = 0.0, 0
    for row in rows:
        batch = builder.collate([builder.encode(row["image"], row["prompt"], row["text"])])
        with torch.no_grad():
            _, loss = eval_model(**batch)
        n = answer_token_count(batch["labels"])
        total, tokens = total + float(loss) * n, tokens + n
    for batch_size in (1, 2, 5):
        assert math.isclose(evaluate_loss(eval_model, rows, batch_size, "cpu"), total / tokens, rel_tol=1e-5)
