"""Batch composition for contrastive training over a cached catalog.

With `hard_fraction` > 0, part of each batch is drawn in groups of products that share an article
type (KG-FLIP-style attribute-aware negatives: "red tshirts" must then beat "blue tshirts", not
only "watches"); the rest is drawn uniformly. Sampling is seeded per epoch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class CatalogBatchSampler:
    """Index batches over `n` products; `types[i]` is product i's article type (the hard-negative key)."""

    def __init__(
        self, types: Sequence[str], batch_size: int, *, hard_fraction: float = 0.0, group_size: int = 16, seed: int = 0
    ) -> None:
        if not 0.0 <= hard_fraction <= 1.0:
            raise ValueError(f"hard_fraction must be within [0, 1], got {hard_fraction}")
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {batch_size}")
        self.n, self.batch_size = len(types), batch_size
        self.hard_fraction, self.group_size, self.seed = hard_fraction, group_size, seed
        by_type: dict[str, list[int]] = {}
        for i, kind in enumerate(types):
            by_type.setdefault(kind, []).append(i)
        self.groups = [np.array(rows) for rows in by_type.values() if len(rows) >= 2]
        self.weights = np.array([len(g) for g in self.groups], dtype=np.float64)
        self.weights /= max(self.weights.sum(), 1.0)

    def __len__(self) -> int:
        return max(1, self.n // self.batch_size)

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, 31])
        order = rng.permutation(self.n)
        hard = int(round(self.hard_fraction * self.batch_size)) if self.groups else 0
        for step in range(len(self)):
            uniform = order[step * self.batch_size : (step + 1) * self.batch_size][: self.batch_size - hard]
            picked: list[int] = []
            while len(picked) < hard:
                group = self.groups[int(rng.choice(len(self.groups), p=self.weights))]
                take = min(self.group_size, hard - len(picked), len(group))
                picked += [int(i) for i in rng.choice(group, size=take, replace=False)]
            batch = np.unique(np.concatenate([uniform, np.array(picked, dtype=np.int64)]))
            yield rng.permutation(batch)


class ShardedBatchSampler:
    """`torch.utils.data.DistributedSampler` for catalog batches: every process draws the same global
    batch (one seed, `set_epoch`), then keeps its equal share of it.

    Sharding the batch, not the catalog, keeps a batch what it is on one process: its hard-negative
    groups span the global batch, and the gathered losses see exactly the single-process batch. A
    global batch that does not divide by the process count loses its last few rows (at most
    world_size - 1), so the shards stay equal, as the gathers and the gradient average need.
    """

    def __init__(self, sampler: CatalogBatchSampler, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not within a world of {world_size}")
        if sampler.batch_size < 2 * world_size:
            raise ValueError(f"batch size {sampler.batch_size} leaves fewer than 2 rows to each of {world_size} processes")
        self.sampler, self.rank, self.world_size = sampler, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def shard(self, batch: np.ndarray) -> np.ndarray:
        """This process's rows of a global batch: the rank-th of world_size equal contiguous slices."""
        size = len(batch) // self.world_size
        return batch[self.rank * size : (self.rank + 1) * size]

    def __iter__(self) -> Iterator[np.ndarray]:
        for batch in self.sampler.epoch(self.epoch):
            yield self.shard(batch)
