"""Batching: padding collate, aspect-ratio grouped (distributed) batch sampler, DataLoader factory.

Shape legend: B = batch size, H/W = per-image size, Hp/Wp = padded batch size, G = boxes per image.
"""

from __future__ import annotations

import atexit
import functools
import gc
import math
import multiprocessing
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, get_worker_info

from gfldet.distributed import get_rank, get_world_size, is_distributed


def collate(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]], size_divisor: int
            ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Stack images [3, H_i, W_i] (uint8) into [B, 3, Hp, Wp], zero-padded at the bottom/right.

    Hp/Wp are the batch maxima rounded up to a multiple of ``size_divisor`` (so every FPN level
    has an integer size). Targets are returned unchanged: their ``image_size`` is the valid
    region, where ``normalize_batch`` keeps the padding 0 (the mean pixel, as in MMDetection).
    """
    images, targets = zip(*batch, strict=True)
    pad_h = math.ceil(max(img.shape[1] for img in images) / size_divisor) * size_divisor
    pad_w = math.ceil(max(img.shape[2] for img in images) / size_divisor) * size_divisor
    out = images[0].new_zeros((len(images), images[0].shape[0], pad_h, pad_w))
    for i, img in enumerate(images):
        out[i, :, : img.shape[1], : img.shape[2]] = img
    return out, list(targets)


class SeededIndex(int):
    """A dataset index that also carries the seed for that sample's random augmentation.

    It *is* an int, so any dataset can use it as one; ``CocoDetection`` additionally reseeds its
    transform from ``.seed``. This makes augmentation a pure function of (seed, epoch, index),
    independent of the number of workers, of which worker gets the sample, and of resuming.
    """

    seed: int

    def __new__(cls, index: int, seed: int) -> SeededIndex:
        obj = super().__new__(cls, index)
        obj.seed = seed
        return obj

    def __reduce__(self) -> tuple[type, tuple[int, int]]:  # crosses the worker queue pickled
        return (SeededIndex, (int(self), self.seed))


def freeze_heap_for_workers() -> None:
    """Collect, then ``gc.freeze`` every object alive now, right before DataLoader workers fork.

    A garbage collection in a forked worker writes to the header of every object it visits,
    unsharing the parent's pages; frozen objects are never visited, so those pages stay shared
    (the use the ``gc.freeze`` documentation describes). See benchmarks/README.md, coco_scale.py.
    """
    gc.collect()
    gc.freeze()


def _dist_world(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """(world size, rank): the arguments where given, else the default process group's."""
    return (get_world_size() if num_replicas is None else int(num_replicas),
            get_rank() if rank is None else int(rank))


class GroupedBatchSampler(Sampler[list[int]]):
    """Shuffled, aspect-ratio grouped, rank-sharded batch sampler for training.

    Per epoch (from ``seed`` and ``epoch``): one global permutation of the N indices; walking
    it, each index joins the bucket of its group (landscape w/h >= 1, portrait < 1) and a full
    bucket becomes a batch, as in MMDetection's AspectRatioBatchSampler (leftovers become smaller
    batches at the end, or are dropped with ``drop_last``); rank r takes global batches r, r+R,
    ... so that all ranks have the same batch count (DDP deadlocks on an extra step): the global
    list is made divisible by R by splitting the largest batches, repeating batches only with
    fewer indices than ranks.

    Each index is a ``SeededIndex`` with a per-(seed, epoch, index) augmentation seed.
    ``set_epoch(epoch, skip_batches=k)`` before ``iter(loader)`` starts at this rank's k-th batch
    (k = optimizer steps done: a resumed run continues at the exact batch). ``len()`` is the full
    per-rank batch count of an epoch.
    """

    def __init__(self, aspect_ratios: Sequence[float], batch_size: int, seed: int = 0,
                 shuffle: bool = True, group_by_aspect: bool = True,
                 num_replicas: int | None = None, rank: int | None = None,
                 drop_last: bool = False) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.num_replicas, self.rank = _dist_world(num_replicas, rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} not in [0, {self.num_replicas})")
        # Group 1: portrait (w/h < 1), 0: landscape; all in group 0 without grouping.
        ratios = np.asarray(aspect_ratios, dtype=np.float64)
        self.group_ids = ((ratios < 1.0) & group_by_aspect).astype(np.int64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch for the next iteration and how many of its batches to skip."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        self.epoch = int(epoch)
        self.skip_batches = int(skip_batches)

    def __len__(self) -> int:
        # Group sizes do not depend on the permutation, so neither does the batch count.
        sizes = np.bincount(self.group_ids, minlength=1)
        if self.drop_last:
            return int((sizes // self.batch_size).sum()) // self.num_replicas
        total = int((-(-sizes // self.batch_size)).sum())  # -(-a // b): a / b rounded up
        return -(-total // self.num_replicas)

    def global_batches(self, epoch: int) -> list[list[SeededIndex]]:
        """All ranks' batches for ``epoch`` in step order (length divisible by num_replicas)."""
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.group_ids)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        sample_seeds = rng.integers(0, 2**31 - 1, size=n)

        batches: list[list[int]] = []
        buckets: dict[int, list[int]] = {}
        for idx, group in zip(order.tolist(), self.group_ids[order].tolist(), strict=True):
            bucket = buckets.setdefault(group, [])
            bucket.append(idx)
            if len(bucket) == self.batch_size:
                batches.append(buckets.pop(group))
        if not self.drop_last:
            batches.extend(b for _, b in sorted(buckets.items()))

        world = self.num_replicas
        if self.drop_last:
            del batches[len(batches) - len(batches) % world :]
        while len(batches) % world:
            largest = max(range(len(batches)), key=lambda j: len(batches[j]))
            big = batches[largest]
            if len(big) < 2:
                # Fewer indices than ranks: repeat batches, as DistributedSampler pads.
                need = world - len(batches) % world
                batches += [batches[j % len(batches)] for j in range(need)]
                break
            half = (len(big) + 1) // 2
            batches[largest : largest + 1] = [big[:half], big[half:]]
        return [[SeededIndex(i, int(sample_seeds[i])) for i in b] for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.global_batches(self.epoch)[self.rank :: self.num_replicas]
        yield from mine[self.skip_batches :]


class ShardSampler(Sampler[int]):
    """Sequential sampler giving rank r the r-th contiguous slice of range(n) (no padding).

    Shards differ in length by at most one and never repeat an index, so gathered predictions
    are exactly the dataset once. Gathering them across ranks (e.g. all_gather_object) and
    evaluating is the caller's job; concatenating in rank order restores dataset order.
    """

    def __init__(self, n: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        world, rank = _dist_world(num_replicas, rank)
        self.indices = range(n * rank // world, n * (rank + 1) // world)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _worker_init(worker_id: int) -> None:
    """Per-worker setup: ignore stop signals, and seed the dataset's augmentation RNG.

    Deliberately no ``cv2.setNumThreads`` here: with opencv's pthreads backend it deadlocks in a
    forked child once the parent has used cv2's thread pool.
    """
    # scancel, `timeout` and Ctrl-C signal the whole process group. The main process finishes its
    # iteration and checkpoints (trainer.StopRequested); a worker that died of the signal first
    # would turn that into "DataLoader worker is killed". The loader ends its workers afterwards.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    info = get_worker_info()
    # DataLoader already seeds torch/random/numpy per worker from its generator; albumentations'
    # Compose has a private RNG copied from the parent, so without this every worker would draw
    # identical "random" augmentations for unseeded indices.
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(info.seed % 2**32)


@functools.cache  # registered once, after multiprocessing's exit handler: so it runs before it
def _end_workers_at_exit() -> None:
    atexit.register(_kill_daemonic_children)


def _kill_daemonic_children() -> None:
    # Workers ignore SIGTERM (_worker_init), and multiprocessing's exit handler ends daemonic
    # processes with SIGTERM and then waits for them: a loader still alive at exit (held by an
    # exception's traceback) hung the interpreter. SIGTERM first, as multiprocessing would (other
    # daemonic processes end as they always did); then SIGKILL what ignores it: ours only read.
    children = [p for p in multiprocessing.active_children() if p.daemon]
    for process in children:
        process.terminate()
    deadline = time.monotonic() + 1.0
    for process in children:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()


def build_dataloader(dataset: Dataset, batch_size: int, num_workers: int, train: bool, seed: int,
                     distributed: bool, *, size_divisor: int, aspect_ratio_grouping: bool = True,
                     pin_memory: bool | None = None,
                     drop_last: bool = False) -> DataLoader:
    """DataLoader yielding ``(images [B, 3, Hp, Wp], targets list[dict])`` via ``collate``.

    train: ``GroupedBatchSampler`` (shuffled per epoch, grouped by ``dataset.aspect_ratios`` when
      ``aspect_ratio_grouping``). Before each epoch call
      ``loader.batch_sampler.set_epoch(epoch, skip_batches=k)`` (k > 0 only when resuming).
    val: sequential ``ShardSampler`` batches; when distributed each rank gets a disjoint,
      unpadded contiguous part, and the caller gathers the per-rank results.
    ``distributed=True`` reads rank/world size from the initialised default process group.
    """
    if distributed and not is_distributed():
        raise RuntimeError("distributed=True needs an initialised torch.distributed process group")
    world, rank = (get_world_size(), get_rank()) if distributed else (1, 0)
    batch_sampler: Sampler[list[int]]
    if train:
        ratios = getattr(dataset, "aspect_ratios", None)
        if aspect_ratio_grouping and ratios is None:
            raise ValueError("aspect_ratio_grouping needs dataset.aspect_ratios")
        batch_sampler = GroupedBatchSampler(
            ratios if aspect_ratio_grouping else [1.0] * len(dataset),  # type: ignore[arg-type]
            batch_size, seed=seed, group_by_aspect=aspect_ratio_grouping, num_replicas=world,
            rank=rank, drop_last=drop_last)
    else:
        shard = ShardSampler(len(dataset), num_replicas=world, rank=rank)  # type: ignore[arg-type]
        batch_sampler = BatchSampler(shard, batch_size, drop_last=False)

    # Worker base seeds come from this generator; offset by rank so ranks' workers differ.
    if num_workers > 0:
        _end_workers_at_exit()
    generator = torch.Generator()
    generator.manual_seed(int(np.random.SeedSequence([int(seed), rank]).generate_state(1)[0]))
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                      collate_fn=functools.partial(collate, size_divisor=size_divisor),
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      generator=generator, worker_init_fn=_worker_init if num_workers > 0 else None,
                      persistent_workers=num_workers > 0)
