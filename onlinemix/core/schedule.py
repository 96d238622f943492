"""The order in which trainers see real images: a pure function of (seed, epoch).

The trainers build it once per node and hand the same object to their producers (it travels in
their job), so a *position* is all a producer needs to know which image a trainer will ask for next. Each node has a ring and producers of its
own that serve only its trainers, so positions count the samples of one node's trainers from
the start of training: node n of N takes slice n of each global batch (its ranks' slices,
side by side). With one node, a position is a sample index of the whole run.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class EpochSchedule:
    """Seeded per-epoch permutation of the training ids, cut into full global batches; positions
    are those of node ``node`` of ``nodes`` (each takes ``node_batch`` = global batch / nodes a step)."""

    def __init__(self, train_ids: np.ndarray, global_batch: int, seed: int, node: int = 0, nodes: int = 1) -> None:
        if global_batch % nodes or not 0 <= node < nodes:
            raise ValueError(f"node {node} of {nodes} cannot take an equal slice of a global batch of {global_batch}")
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self.global_batch = global_batch
        self.seed = seed
        self.node, self.nodes = node, nodes
        self.node_batch = global_batch // nodes
        self.steps_per_epoch = len(self.train_ids) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_ids)} training images cannot fill one global batch of {global_batch}")
        self.positions_per_epoch = self.steps_per_epoch * self.node_batch
        self._order = lru_cache(maxsize=4)(self._compute_order)

    def __getstate__(self) -> dict:
        """Pickled for the producers without its cache of orders (an lru_cache does not pickle)."""
        return {k: v for k, v in self.__dict__.items() if k != "_order"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._order = lru_cache(maxsize=4)(self._compute_order)

    def _compute_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return self.train_ids[rng.permutation(len(self.train_ids))[: self.steps_per_epoch * self.global_batch]]

    def epoch_of(self, positions: np.ndarray | int) -> np.ndarray | int:
        return positions // self.positions_per_epoch

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty_like(positions)
        epochs = positions // self.positions_per_epoch
        step, offset = np.divmod(positions % self.positions_per_epoch, self.node_batch)
        in_epoch = step * self.global_batch + self.node * self.node_batch + offset  # this node's slice of the step
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._order(int(epoch))[in_epoch[sel]]
        return out

    def rank_positions(self, step: int, local_rank: int, local_batch: int) -> np.ndarray:
        """Positions a rank of this node trains on at a global step: its slice of the node's slice."""
        start = step * self.node_batch + local_rank * local_batch
        return np.arange(start, start + local_batch, dtype=np.int64)


def variation_seed(base_seed: int, image_id: int, epoch: int) -> int:
    """Seed of one image's variation in one epoch: new each epoch, reproducible across runs."""
    return int(np.random.SeedSequence([base_seed, image_id, epoch]).generate_state(1)[0])
