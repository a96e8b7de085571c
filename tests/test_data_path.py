"""The data path and the feature cache in training: what a user relies on before turning them on.

- a streamed source read by 2 processes x 2 DataLoader workers: every train sample is read exactly
  once per epoch (its image loaded once, by one reader), and the processes stop at the same batch;
- the map-style order: the same batches on a resume, disjoint across processes, `skip` never reads;
- the collator refuses a batch whose placeholder counts do not match what the model writes;
- training with the feature cache equals training without it (stage 1 and stage 2 configs), the
  counters reach the stage's MLflow run, and an encoder that trains is never served from the cache;
- a damaged entry is dropped and encoded again during training; a rerun with one more image
  encodes exactly that image; `feature_cache: off` writes nothing; a folder that cannot hold the
  cache gives one clear warning and the stage trains uncached.
"""

from __future__ import annotations

import hashlib
import logging
import os
from functools import partial
from pathlib import Path

import pytest
import torch
from stage_helpers import Calls, small_cfg, weights

from theworld_core.data import SOURCES, Source, SourceRecord, prepare_data
from theworld_core.data.loading import EpochBatches, ShardedStream, default_num_workers, even_batches
from theworld_core.features.keys import image_key
from theworld_core.training.trainer import StageTrainer


@pytest.fixture(autouse=True)
def local_project(tmp_path, monkeypatch):
    """Each test keeps its MLflow store and default cache folder under its own project folder."""
    project = tmp_path / "project"
    monkeypatch.setenv("THEWORLD_PROJECT_DIR", str(project))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return project


# ---------------------------------------------------------------------------------------------
# streamed sources: one read per sample per epoch across workers and processes
# ---------------------------------------------------------------------------------------------

COUNTED = 60


def _counted_records(log_dir: str):
    from io import BytesIO

    from PIL import Image

    def load(index: int) -> bytes:
        with open(Path(log_dir) / f"reads-{os.getpid()}.txt", "a") as handle:
            handle.write(f"{index}\n")
        buffer = BytesIO()
        Image.new("RGB", (8, 8), (index * 4 % 256, index % 7 * 30, 90)).save(buffer, format="PNG")
        return buffer.getvalue()

    for index in range(COUNTED):
        yield SourceRecord(
            id=f"counted-{index}",
            group=f"counted-{index}",
            text=f"caption {index}",
            prompt=None,
            load=partial(load, index),
        )


def _counted_source(cfg) -> Source:
    log_dir = cfg.dataset_name.removeprefix("counted:")
    return Source(
        kind="counted",
        description="counted test images",
        records=partial(_counted_records, log_dir),
        static_fingerprint={"counted": COUNTED, "log": log_dir},
    )


def _reads(log_dir: Path) -> list[int]:
    return [int(line) for path in log_dir.glob("reads-*.txt") for line in path.read_text().split()]


def _rank_main(rank: int, data, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stream = ShardedStream(data.train_shard, seed=3, rank=rank, processes=2, workers=2, buffer_size=7)
    loader = DataLoader(stream, batch_size=4, num_workers=2, collate_fn=lambda rows: [r["id"] for r in rows])
    stream.set_epoch(0)
    ids = [sample_id for batch in loader for sample_id in batch]
    Path(out_dir, f"epoch0-rank{rank}.txt").write_text("\n".join(ids))
    stream.set_epoch(1)
    batches = sum(1 for _ in even_batches(loader, dist.group.WORLD))
    Path(out_dir, f"even-rank{rank}.txt").write_text(str(batches))
    dist.destroy_process_group()


def test_stream_reads_every_sample_once_across_2_processes_x_2_workers(tmp_path, monkeypatch):
    reads = tmp_path / "reads"
    reads.mkdir()
    monkeypatch.setitem(SOURCES, "counted:", _counted_source)
    from theworld_core.config import DataConfig

    data = prepare_data(
        DataConfig(dataset_name=f"counted:{reads}", streaming=True, eval_fraction=0.1), cache_dir=tmp_path / "datasets"
    )
    eval_ids = {row["id"] for row in data.eval}
    for path in reads.glob("*.txt"):  # preparation read the eval samples: count the epoch alone
        path.unlink()

    torch.multiprocessing.start_processes(
        _rank_main, args=(data, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )

    seen = [line for rank in (0, 1) for line in (tmp_path / f"epoch0-rank{rank}.txt").read_text().split()]
    train_ids = {f"counted-{i}" for i in range(COUNTED)} - eval_ids
    assert eval_ids and len(seen) == len(set(seen)), "a sample was trained twice in one epoch"
    assert set(seen) == train_ids, "a train sample was left out"
    # Each image was loaded exactly once in each epoch (epoch 0 fully; epoch 1 up to the even stop).
    counts = {index: _reads(reads).count(index) for index in range(COUNTED)}
    train_indices = {int(i.split("-")[1]) for i in train_ids}
    assert all(counts[i] in (1, 2) for i in train_indices) and all(
        counts[i] == 0 for i in range(COUNTED) if i not in train_indices
    )
    first_epoch_reads = sum(min(c, 1) for c in counts.values())
    assert first_epoch_reads == len(train_ids)
    # Both processes stopped at the same batch although their shards differ in size.
    assert (tmp_path / "even-rank0.txt").read_text() == (tmp_path / "even-rank1.txt").read_text()


def test_stream_order_is_seeded_per_epoch(tmp_path, monkeypatch):
    reads = tmp_path / "reads"
    reads.mkdir()
    monkeypatch.setitem(SOURCES, "counted:", _counted_source)
    from theworld_core.config import DataConfig

    data = prepare_data(
        DataConfig(dataset_name=f"counted:{reads}", streaming=True, eval_fraction=0.1), cache_dir=tmp_path / "datasets"
    )
    stream = ShardedStream(data.train_shard, seed=3, buffer_size=8)

    def order(epoch):
        stream.set_epoch(epoch)
        return [row["id"] for row in stream]

    assert order(0) == order(0) != order(1)
    assert sorted(order(0)) == sorted(order(1))


def test_epoch_batches_split_processes_and_resume_without_reading():
    ranks = [EpochBatches(10, 2, seed=5, rank=rank, processes=2) for rank in (0, 1)]
    for sampler in ranks:
        sampler.epoch = 1
    batches = [list(sampler) for sampler in ranks]
    assert len(batches[0]) == len(batches[1]) == len(ranks[0]) == 3
    flat = [i for rank in batches for batch in rank for i in batch]
    assert set(flat) == set(range(10)) and len(flat) == 10  # 10 = 2 x 5: no padding needed
    ranks[0].skip = 2
    assert list(ranks[0]) == batches[0][2:]
    one = EpochBatches(10, 4, seed=5)
    one.epoch = 1
    assert sorted(i for batch in one for i in batch) == list(range(10))
    padded = EpochBatches(5, 2, seed=5, rank=1, processes=2)
    assert len(list(padded)) == len(padded) == 2  # 5 samples: each process gets 3 (one wrapped around)


def test_the_trainers_loader_follows_the_epoch():
    """accelerate's DataLoaderShard sets the epoch on the batch sampler at every pass."""
    from accelerate.data_loader import DataLoaderShard

    sampler = EpochBatches(12, 3, seed=7)
    loader = DataLoaderShard(list(range(12)), batch_sampler=sampler, collate_fn=list)
    orders = {}
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        orders.setdefault(epoch, []).append([i for batch in loader for i in batch])
    assert orders[0][0] == orders[0][1] == EpochBatches(12, 3, seed=7).positions()
    assert orders[1][0] != orders[0][0] and sorted(orders[1][0]) == list(range(12))


def test_default_workers_leave_a_core_for_the_step():
    assert default_num_workers(1, cores=2) == 1
    assert default_num_workers(8, cores=96) == 8  # 12 cores per process: 11, capped
    assert default_num_workers(8, cores=48) == 5
    assert default_num_workers(8, cores=8) == 1
    assert default_num_workers(1, cores=64) == 8  # capped


def _worker_batch(index):
    """What a collator in a worker returns: small tensors of several dtypes, a large one, nesting."""
    from theworld_core.training.batches import BY_VALUE_MAX_BYTES, small_tensors_by_value

    large = torch.arange(BY_VALUE_MAX_BYTES // 4 + 1, dtype=torch.float32) + index
    batch = {
        "input_ids": torch.arange(12, dtype=torch.long).reshape(3, 4) + index,
        "mask": torch.tensor([[True, False]]),
        "features": {"vision": torch.full((2, 3), 0.5 + index, dtype=torch.bfloat16), "empty": torch.empty(0, 5)},
        "rows": [torch.tensor([index])],
        "large": large,
        "keys": ["a", "b"],
    }
    return small_tensors_by_value(batch)


def test_small_tensors_leave_workers_by_value_and_arrive_as_plain_tensors():
    """The training process receives from a real worker exactly the tensors the collator made:
    dtypes, shapes and values kept, nesting kept, large tensors still shared (not copied)."""
    loader = torch.utils.data.DataLoader(range(2), batch_size=None, num_workers=1, collate_fn=_worker_batch)
    for index, batch in enumerate(loader):
        assert type(batch["input_ids"]) is torch.Tensor and batch["input_ids"].dtype == torch.long
        assert torch.equal(batch["input_ids"], torch.arange(12).reshape(3, 4) + index)
        assert batch["mask"].dtype == torch.bool and batch["mask"].tolist() == [[True, False]]
        vision = batch["features"]["vision"]
        assert vision.dtype == torch.bfloat16 and torch.equal(vision, torch.full((2, 3), 0.5 + index).bfloat16())
        assert batch["features"]["empty"].shape == (0, 5)
        assert batch["rows"][0].tolist() == [index] and batch["keys"] == ["a", "b"]
        assert batch["large"].is_shared()  # shared memory, the route for images and features
        assert not batch["input_ids"].is_shared()  # bytes in the batch's message
        batch["input_ids"] += 1  # writable, as a collated tensor is


KILLED_WITH_WORKERS = """
import os, signal, sys
from functools import partial
import torch
from theworld_core.training.batches import exit_with_parent, small_tensors_by_value

def batch(index):  # 16 x 64 KiB by value: far more than a pipe holds
    return small_tensors_by_value({"ids": [torch.full((8192,), index, dtype=torch.long) for _ in range(16)]})

loader = torch.utils.data.DataLoader(range(64), batch_size=None, collate_fn=batch, num_workers=1,
    persistent_workers=True, prefetch_factor=4, worker_init_fn=partial(exit_with_parent, os.getpid()))
iterator = iter(loader)
next(iterator)
print(loader._iterator._workers[0].pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_end_with_a_killed_training_process(tmp_path):
    """SIGKILL the training process while its worker has batches queued: the worker ends too (it
    would wait forever to flush them, holding the stdout pipe a supervisor reads to its end)."""
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_WITH_WORKERS],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(repo)},
        cwd=tmp_path,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    worker = int(killed.stdout.split()[0])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{worker}").exists()


# ---------------------------------------------------------------------------------------------
# the collator checks placeholder counts (the model no longer reads them back per step)
# ---------------------------------------------------------------------------------------------


def test_collator_refuses_wrong_placeholder_counts(tiny_paths):
    from PIL import Image

    from theworld_core.config import ModelConfig
    from theworld_core.model.theworld import TheWorld

    model = TheWorld.from_base(
        ModelConfig(
            model_name=str(tiny_paths.gemma),
            cosmos_model_name=str(tiny_paths.cosmos),
            world_tokens=4,
            world_image_size=32,
        )
    )
    builder = model.builder
    sample = builder.encode(Image.new("RGB", (32, 32), (200, 10, 10)), "Describe this image.", "red")
    assert builder.collate([sample])["input_ids"].shape[0] == 1
    broken = dict(sample)
    broken["input_ids"] = sample["input_ids"].clone()
    broken["input_ids"][broken["input_ids"] == model.token_ids.soft] = builder.tokenizer.pad_token_id
    with pytest.raises(ValueError, match=r"batch row 0 holds 0 world placeholder tokens where the model writes 4"):
        builder.collate([sample, broken][1:])
    doubled = dict(sample)
    doubled["input_ids"] = torch.cat(
        [sample["input_ids"], sample["input_ids"][sample["input_ids"] == builder.image_token_id][:1]]
    )
    with pytest.raises(ValueError, match=r"batch row 1 holds 5 image placeholder tokens"):
        builder.collate(
            [
                sample,
                {
                    **sample,
                    "input_ids": doubled["input_ids"],
                    "labels": torch.cat([sample["labels"], sample["labels"][:1]]),
                    "attention_mask": torch.cat([sample["attention_mask"], sample["attention_mask"][:1]]),
                    "token_type_ids": torch.cat([sample["token_type_ids"], sample["token_type_ids"][:1]]),
                },
            ]
        )


# ---------------------------------------------------------------------------------------------
# the feature cache in training
# ---------------------------------------------------------------------------------------------

EPOCHS_CFG = {
    "synthetic_samples": 14,
    "batch_size": 4,
    "max_steps": 9,
    "eval_steps": 9,
    "save_steps": 9,
    "logging_steps": 3,
    "learning_rate": 1e-3,
    "num_workers": 1,
}
"""About 3 epochs over 12 train samples: the first fills the cache, the next two read it."""


def _train(tiny, out: Path, seed_file: str = "stage1_projection.json", **changes):
    cfg = small_cfg(tiny, out, seed_file, resume_from_checkpoint=None, **{**EPOCHS_CFG, **changes})
    trainer = StageTrainer(cfg)
    result = trainer.run()
    assert result.status == "completed", result.reason
    return trainer, result


def _entries(directory: Path, kind: str) -> list[Path]:
    return sorted((directory / "v1" / kind).glob("*/*.bin"))


@pytest.mark.parametrize(
    ("seed_file", "cached_kinds"),
    [
        ("stage1_projection.json", ("vision", "vae_latent")),
        ("stage2_vision.json", ("vae_latent",)),  # the vision tower trains: never from the cache
    ],
)
def test_training_with_the_cache_equals_training_without(seed_file, cached_kinds, tiny_paths, tmp_path, local_project):
    from mlflow.tracking import MlflowClient

    cache_dir = tmp_path / "features"
    plain, _ = _train(tiny_paths, tmp_path / "plain", seed_file, feature_cache="off", feature_cache_dir=str(cache_dir))
    assert not cache_dir.exists()
    cached, result = _train(tiny_paths, tmp_path / "cached", seed_file, feature_cache_dir=str(cache_dir))
    assert cached.encoders.kinds == cached_kinds
    stats = cached.encoders.cache.stats()
    assert stats["train/feature_cache/hits"] > stats["train/feature_cache/misses"] > 0, stats
    for kind in ("vision", "vae_latent"):
        assert bool(_entries(cache_dir, kind)) == (kind in cached_kinds), kind

    before, after = weights(tmp_path / "plain" / "final"), weights(tmp_path / "cached" / "final")
    assert before.keys() == after.keys()
    for name in before:
        # A SigLIP key bias has no gradient in exact arithmetic (softmax ignores a shift shared by
        # all keys): its gradient is rounding noise, which AdamW turns into steps of about the
        # learning rate. Encoder outputs differ in the last bit with the batch they were computed in
        # (a cached entry comes from epoch 1's batch), so that noise differs: bounded far below the
        # lr x steps = 9e-3 it could reach. Every other weight agrees within 1e-6.
        atol = 1e-4 if name.endswith("self_attn.k_proj.bias") and "vision_tower" in name else 1e-6
        worst = float((after[name] - before[name]).abs().max())
        assert worst <= atol, f"{name}: {worst:.3g}"

    client = MlflowClient(tracking_uri=f"sqlite:///{local_project}/mlflow.db")
    logged = client.get_run(result.mlflow_run_id).data.metrics
    assert logged["train/feature_cache/hits"] > 0 and logged["train/feature_cache/enabled"] == 1.0
    assert (
        logged["train/feature_cache/hits"] + logged["train/feature_cache/misses"]
        <= stats["train/feature_cache/hits"] + stats["train/feature_cache/misses"]
    )
    assert plain.encoders.kinds == ()


def test_no_encoder_is_cached_when_all_train(tiny_paths, tmp_path):
    cache_dir = tmp_path / "features"
    trainer, _ = _train(
        tiny_paths,
        tmp_path / "out",
        "stage4_full.json",
        max_steps=3,
        eval_steps=3,
        save_steps=3,
        feature_cache_dir=str(cache_dir),
    )
    assert trainer.encoders.kinds == ()
    assert not _entries(cache_dir, "vision") and not _entries(cache_dir, "vae_latent")


def test_damaged_entry_is_encoded_again_during_training(tiny_paths, tmp_path):
    cache_dir = tmp_path / "features"
    _train(tiny_paths, tmp_path / "first", feature_cache_dir=str(cache_dir), max_steps=3)
    damaged = _entries(cache_dir, "vision")[:2] + _entries(cache_dir, "vae_latent")[:1]
    sizes = {path: path.stat().st_size for path in damaged}
    for path in damaged:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # a truncated write
    trainer, _ = _train(tiny_paths, tmp_path / "second", feature_cache_dir=str(cache_dir))
    stats = trainer.encoders.cache.stats()
    assert stats["train/feature_cache/corrupt"] == len(damaged) and stats["train/feature_cache/enabled"] == 1.0
    for path in damaged:  # encoded and written again, whole: its checksum holds
        data = path.read_bytes()
        assert len(data) > sizes[path] // 2 and hashlib.sha256(data[:-32]).digest() == data[-32:]


def test_rerun_with_one_more_image_encodes_exactly_that_image(tiny_paths, tmp_path):
    cache_dir = tmp_path / "features"
    base = _train_split_keys(tiny_paths, tmp_path, 14)
    count = next(
        n
        for n in range(15, 40)
        if _train_split_keys(tiny_paths, tmp_path, n) - base
        and len(_train_split_keys(tiny_paths, tmp_path, n) - base) == 1
        and len(_train_split_keys(tiny_paths, tmp_path, n)) == len(base) + 1
    )
    _train(tiny_paths, tmp_path / "first", feature_cache_dir=str(cache_dir), synthetic_samples=14)
    trainer, _ = _train(
        tiny_paths, tmp_path / "second", feature_cache_dir=str(cache_dir), synthetic_samples=count, max_steps=12
    )
    stats = trainer.encoders.cache.stats()
    assert stats["train/feature_cache/vision/misses"] == 1 and stats["train/feature_cache/vae_latent/misses"] == 1, (
        stats
    )
    assert len(_entries(cache_dir, "vision")) == len(base) + 1


def _train_split_keys(tiny, tmp_path, samples: int) -> set[str]:
    from theworld_core.model.inputs import prepare_stage_data

    cfg = small_cfg(
        tiny, tmp_path / "probe", resume_from_checkpoint=None, **{**EPOCHS_CFG, "synthetic_samples": samples}
    )
    return {image_key(row["image"]) for row in prepare_stage_data(cfg).train}


def test_off_writes_nothing_and_a_bad_folder_trains_uncached(tiny_paths, tmp_path, caplog):
    off_dir = tmp_path / "off"
    trainer, _ = _train(tiny_paths, tmp_path / "a", feature_cache="off", feature_cache_dir=str(off_dir), max_steps=3)
    assert not off_dir.exists() and trainer.encoders.kinds == ()

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="theworld.feature_cache"):
        trainer, result = _train(tiny_paths, tmp_path / "b", feature_cache_dir=str(blocker / "cache"), max_steps=3)
    assert result.steps == 3 and trainer.encoders.kinds == ()
    warnings = [r.getMessage() for r in caplog.records if r.name == "theworld.feature_cache"]
    assert len(warnings) == 1 and "a file stands where a folder is needed" in warnings[0], warnings
    assert "Training goes on without it" in warnings[0]


def test_workers_started_by_spawn_train(tiny_paths, tmp_path):
    """A served flow run is a spawned process, so its DataLoader workers are spawned too: the
    collator, the data and the cache flag must pickle (a bound trainer method does not)."""
    import multiprocessing

    before = multiprocessing.get_start_method()
    multiprocessing.set_start_method("spawn", force=True)
    try:
        _, result = _train(tiny_paths, tmp_path / "out", max_steps=3, eval_steps=3, save_steps=3)
    finally:
        multiprocessing.set_start_method(before, force=True)
    assert result.steps == 3


def test_cached_epochs_skip_preprocessing(tiny_paths, tmp_path, monkeypatch):
    """Counted in the training loop (num_workers 0: the collator runs in this process): with the
    cache the image processor and the VAE view run in the first epoch only, and not at all once
    every image is cached; an encoder that trains (stage 2's vision tower) is preprocessed every time."""
    calls, seen = Calls(monkeypatch), {}
    original = StageTrainer._train

    def counted(self):
        calls.take()
        try:
            return original(self)
        finally:
            seen["calls"] = calls.take()

    monkeypatch.setattr(StageTrainer, "_train", counted)
    cache_dir = str(tmp_path / "features")
    runs = {
        "off": ("stage1_projection.json", "off"),
        "empty": ("stage1_projection.json", "auto"),
        "warm": ("stage1_projection.json", "auto"),
        "stage2": ("stage2_vision.json", "auto"),
    }
    counts = {}
    for name, (seed_file, mode) in runs.items():
        trainer, result = _train(
            tiny_paths,
            tmp_path / name,
            seed_file,
            num_workers=0,
            do_eval=False,
            max_steps=None,
            num_epochs=3,
            feature_cache=mode,
            feature_cache_dir=cache_dir,
        )
        counts[name] = seen["calls"]
        train = len(trainer.data.train)
        assert result.steps == 3 * trainer.steps_per_epoch
    rows = 3 * train  # three epochs
    assert counts["off"] == (rows, rows)
    # With the cache, one image more: a blank one, checking once per stage that the token layout
    # built without pixels is the processor's.
    assert counts["empty"] == (train + 1, train)  # epoch 1 only
    assert counts["warm"] == (1, 0)
    assert counts["stage2"] == (rows + 1, 0)  # the vision tower trains: preprocessed; the VAE latents are cached
