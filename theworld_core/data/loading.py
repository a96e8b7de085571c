"""Feeding training: which samples each DataLoader worker and process reads, in which order.

- Map-style data (materialised): `EpochBatches`, a batch sampler over one seeded permutation per
  epoch. Process r of n takes positions r, r + n, ... (padded by wrapping so every process gets the
  same number of batches), so the batches are the same on a resume and `skip` jumps over the
  batches already trained without reading them.
- Streamed data: `ShardedStream`, a torch IterableDataset over `PreparedData.train_shard`. Worker w
  of process r reads shard r x workers + w of (processes x workers): every record is read once per
  epoch, by one reader. A seeded shuffle buffer per shard mixes the order, the same on a resume.
  Shards end unevenly, so with several processes `even_batches` stops every process once one of
  them runs out (the last few batches of an epoch are then not trained on; the next epoch reads
  them again, in another order).
- `default_num_workers`: the DataLoader workers per process when the stage sets none.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, Sampler, get_worker_info

MAX_DEFAULT_WORKERS = 8
"""Cap on the automatic worker count: past this, preprocessing outruns one GPU's step (bench/RESULTS.md)."""
STREAM_SHUFFLE_BUFFER = 1000
"""Samples a streamed shard holds to shuffle (decoded images: keep it bounded)."""


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(local_processes: int, cores: int | None = None) -> int:
    """Workers per process for `num_workers: null`: the cores each process has, less one for the
    process itself (it runs the step), at least 1 and at most MAX_DEFAULT_WORKERS."""
    cores = usable_cores() if cores is None else cores
    return max(1, min(MAX_DEFAULT_WORKERS, cores // max(1, local_processes) - 1))


class EpochBatches(Sampler[list[int]]):
    """This process's batches of one epoch: a permutation seeded by (seed, epoch), dealt round-robin
    to the processes. Set `epoch` (and `skip`, batches to leave out at the start) before iterating;
    the sampler runs in the training process, so this works with persistent workers."""

    def __init__(self, size: int, batch_size: int, *, seed: int, rank: int = 0, processes: int = 1):
        if size <= 0:
            raise ValueError("EpochBatches needs at least one sample")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.processes = rank, processes
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's DataLoaderShard at each pass (`loader.set_epoch(epoch)` first)."""
        self.epoch = epoch

    def positions(self) -> list[int]:
        """This process's sample positions of the epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.processes > 1:  # pad by wrapping around: every process gets as many samples
            per_process = -(-self.size // self.processes)
            order = (order * (per_process * self.processes // self.size + 1))[: per_process * self.processes]
            order = order[self.rank :: self.processes]
        return order

    def __len__(self) -> int:
        per_process = -(-self.size // self.processes)
        return (per_process + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = self.positions()
        for start in range(self.skip * self.batch_size, len(order), self.batch_size):
            yield order[start : start + self.batch_size]


class ShardedStream(IterableDataset):
    """The samples of this process's shards of a streamed source, one shard per DataLoader worker.

    `train_shard(index, count)`: `PreparedData.train_shard`. `epoch` is shared with the workers
    (a process-shared value), so persistent workers see the epoch the training process set.
    """

    def __init__(
        self,
        train_shard: Callable[[int, int], Iterator[dict[str, Any]]],
        *,
        seed: int,
        rank: int = 0,
        processes: int = 1,
        workers: int = 0,
        buffer_size: int = STREAM_SHUFFLE_BUFFER,
    ):
        self.train_shard, self.seed = train_shard, seed
        self.rank, self.processes, self.workers = rank, processes, max(1, workers)
        self.buffer_size = buffer_size
        self._epoch = torch.multiprocessing.Value("q", 0, lock=False)

    @property
    def shard_count(self) -> int:
        return self.processes * self.workers

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def shard_index(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            raise RuntimeError(f"ShardedStream was built for {self.workers} workers but runs in {info.num_workers}")
        return self.rank * self.workers + worker

    def __iter__(self) -> Iterator[dict[str, Any]]:
        index = self.shard_index()
        rng = random.Random(f"{self.seed}/{self._epoch.value}/{index}")
        return _buffer_shuffled(self.train_shard(index, self.shard_count), self.buffer_size, rng)


def _buffer_shuffled(samples: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle through a buffer of `size` (datasets' streaming shuffle): bounded memory, seeded."""
    buffer: list[Any] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = sample
    rng.shuffle(buffer)
    yield from buffer


def even_batches(batches: Iterable[Any], group) -> Iterator[Any]:
    """Yield batches while every process of `group` (a CPU/gloo process group) still has one.

    One small CPU collective per batch, in the loader's thread of control (no device sync): every
    process stops at the same batch, so none waits forever in the gradient all-reduce.
    """
    import torch.distributed as dist

    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        flag = torch.tensor([0 if batch is None else 1], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if int(flag) == 0:
            return
        yield batch
