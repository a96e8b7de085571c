"""A stage's batches: the train loader (workers, pinned memory, each process reading its own part),
the steps an epoch takes, and the running statistics between two log lines.

Materialised data is dealt out by `EpochBatches` (a seeded order per epoch, the same on a resume);
streamed data by `ShardedStream` (record i to reader i mod processes x workers), so every sample is
read once per epoch however many processes and workers read it (docs/stages.md#data-path).
A worker sends small tensors inside the batch's message (`small_tensors_by_value`) and ends with
its training process (`exit_with_parent`).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils.data import get_worker_info

from theworld_core.config import StageConfig
from theworld_core.data.images import to_rgb
from theworld_core.data.loading import EpochBatches, ShardedStream, default_num_workers
from theworld_core.features.cache import tensor_bytes, tensor_from_bytes
from theworld_core.features.encoders import PIXELS, FeatureLookup
from theworld_core.features.keys import image_key


class BatchCollator:
    """Rows -> a CPU batch, in the DataLoader workers. A plain object (the input builder and the
    feature lookup), so it pickles to workers started by spawn or forkserver, as a served flow
    run's are.

    With the feature cache on (`lookup`), each row's entries are read and checked here first; a row
    whose entry is sound skips that encoder's preprocessing (the 896 px image processor, the VAE
    view), and the batch carries the token layout, the cached features of those rows
    (`cached_features`, `feature_rows`), pixels for the other rows only, the rows' `image_keys` and
    the worker's cache counts, for `CachedEncoders.fill`.
    """

    def __init__(self, builder, lookup: FeatureLookup | None = None):
        self.builder, self.lookup = builder, lookup
        if lookup is not None:
            builder.layout_without_pixels()  # checked once here; the workers get the answer with the builder

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        batch = self._collate(rows)
        return small_tensors_by_value(batch) if get_worker_info() is not None else batch

    def _collate(self, rows: list[dict]) -> dict[str, Any]:
        builder = self.builder
        if self.lookup is None:
            return builder.collate([builder.encode(r["image"], r["prompt"], r["text"]) for r in rows])
        images = [to_rgb(r["image"]) for r in rows]
        keys = [image_key(image) for image in images]
        found = self.lookup.read(keys)
        hit = {kind: [tensor is not None for tensor in tensors] for kind, tensors in found.items()}
        no_hits = [False] * len(rows)
        samples = [
            builder.encode(
                image,
                row["prompt"],
                row["text"],
                vision=not hit.get("vision", no_hits)[i],
                world=not hit.get("vae_latent", no_hits)[i],
            )
            for i, (image, row) in enumerate(zip(images, rows))
        ]
        batch = builder.collate_tokens(samples)
        for pixel_key in PIXELS.values():
            pixels = [sample[pixel_key] for sample in samples if pixel_key in sample]
            if pixels:
                batch[pixel_key] = torch.stack(pixels)
        batch["image_keys"] = keys
        batch["feature_rows"] = {kind: [i for i, is_hit in enumerate(hits) if is_hit] for kind, hits in hit.items()}
        batch["cached_features"] = {
            kind: torch.stack([t for t in tensors if t is not None])
            for kind, tensors in found.items()
            if any(hit[kind])
        }
        batch["feature_cache_counts"] = self.lookup.reader.take_counts()
        return batch


BY_VALUE_MAX_BYTES = 256 * 1024
"""Tensors up to this size leave a worker inside the batch's pipe message (`small_tensors_by_value`)."""


class _ByValue:
    """A small tensor that pickles as its bytes and unpickles as a plain tensor.

    A DataLoader worker hands each tensor of a batch to the training process as a shared-memory
    file, and each file's descriptor crosses over its own authenticated socket connection (about
    0.5 ms each on this project's CI box): for token ids, masks and labels that costs more than
    copying their bytes. Large tensors (images, features) keep the shared-memory route.
    """

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __reduce__(self):
        return tensor_from_bytes, (tensor_bytes(self.tensor), self.tensor.dtype, tuple(self.tensor.shape))


def small_tensors_by_value(batch: dict[str, Any]) -> dict[str, Any]:
    """`batch` (nested dicts and lists) with every CPU tensor of at most BY_VALUE_MAX_BYTES wrapped
    to travel by value from a DataLoader worker; the training process receives plain tensors."""

    def wrap(value):
        if isinstance(value, torch.Tensor):
            small = value.device.type == "cpu" and value.numel() * value.element_size() <= BY_VALUE_MAX_BYTES
            return _ByValue(value) if small else value
        if isinstance(value, dict):
            return {key: wrap(item) for key, item in value.items()}
        if isinstance(value, list):
            return [wrap(item) for item in value]
        return value

    return wrap(batch)


def exit_with_parent(parent_pid: int, worker_id: int | None = None) -> None:
    """A DataLoader `worker_init_fn`: the worker ends within a second of its training process.

    A worker whose training process was killed (out of memory, a cancelled flow run) notices and
    ends its loop, but its exit then waits to flush batches into a pipe nobody reads once that pipe
    is full (batches of small tensors travel inside it): it would stay forever, holding whatever the
    training process had open, e.g. the stdout a supervisor waits on. A watcher thread ends it.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def steps_per_epoch(cfg: StageConfig, train: Any, num_processes: int) -> int:
    """Optimizer steps in one pass over `train` (a stream of unknown length takes `max_steps`)."""
    try:
        samples = len(train)
    except TypeError:
        samples = None
    if samples is None:
        if cfg.max_steps is None:
            raise ValueError(
                "streaming source of unknown length: set max_steps (or num_samples) so the schedule has an end"
            )
        return cfg.max_steps
    batches = math.ceil(samples / (cfg.batch_size * num_processes))
    return max(1, math.ceil(batches / cfg.gradient_accumulation_steps))


def build_train_loader(cfg: StageConfig, data: Any, accelerator, collate: Callable[[list[dict]], dict]):
    """(loader, workers per process): batches on the accelerator's device, workers decoding and
    preprocessing beside the step, pinned memory and non-blocking copies on CUDA, persistent workers."""
    from accelerate.data_loader import DataLoaderShard

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))  # this machine's cores
    num_workers = cfg.num_workers if cfg.num_workers is not None else default_num_workers(local_processes)
    on_cuda = accelerator.device.type == "cuda"
    options: dict[str, Any] = {"num_workers": num_workers, "pin_memory": on_cuda}
    if num_workers:
        options.update(
            persistent_workers=True, prefetch_factor=4, worker_init_fn=partial(exit_with_parent, os.getpid())
        )
    common = {"device": accelerator.device, "_non_blocking": on_cuda, "collate_fn": collate, **options}
    dataset = data.train
    if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__len__"):
        if data.train_shard is None:
            raise ValueError("a streamed train split needs PreparedData.train_shard (prepare_data streaming=True)")
        stream = ShardedStream(
            data.train_shard,
            seed=cfg.seed,
            rank=accelerator.process_index,
            processes=accelerator.num_processes,
            workers=num_workers,
        )
        return DataLoaderShard(stream, batch_size=cfg.batch_size, **common), num_workers
    batches = EpochBatches(
        len(dataset), cfg.batch_size, seed=cfg.seed, rank=accelerator.process_index, processes=accelerator.num_processes
    )
    return DataLoaderShard(dataset, batch_sampler=batches, **common), num_workers


class TrainWindow:
    """Running training statistics between two log lines, summed on the device: nothing is read
    back to the host until `metrics()` (at logging steps), so the micro-step never waits for the GPU."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        # This rank's summed answer-token loss and answer tokens, on the device (read at log time):
        # train/loss is their ratio over all ranks, the estimator the gradients follow.
        self.loss_sum: torch.Tensor | None = None
        self.loss_tokens: torch.Tensor | None = None
        self.samples = 0
        self.tokens: torch.Tensor | int = 0
        self.start = time.perf_counter()

    def add(self, loss_sum: torch.Tensor, loss_tokens: torch.Tensor, batch: dict, processes: int) -> None:
        self.loss_sum = loss_sum if self.loss_sum is None else self.loss_sum + loss_sum
        self.loss_tokens = loss_tokens if self.loss_tokens is None else self.loss_tokens + loss_tokens
        self.samples += batch["input_ids"].shape[0] * processes
        self.tokens = self.tokens + batch["attention_mask"].sum() * processes

    def metrics(self) -> dict[str, float]:
        """Throughput (the loss sums are read by the caller, reduced over ranks)."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {"train/samples_per_s": self.samples / elapsed, "train/tokens_per_s": float(self.tokens) / elapsed}
