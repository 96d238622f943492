"""Synthetic images in the cache's shards, as the benchmarks write them: image i's one variation is
``images[i]``, under a key of the benchmark's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onlinemix.cache.store import ShardWriter


def description(key: str) -> dict[str, Any]:
    """What a benchmark's cache entries say they are: no generator, no dataset but the benchmark."""
    return {"fingerprint": key, "identity": {}, "dataset": "bench"}


def write_shards(root: Path, key: str, images: np.ndarray, shard_pairs: int, **options: Any) -> ShardWriter:
    """Commit every image through ``ShardWriter`` (``options``: its format and quality) and close it."""
    writer = ShardWriter(root, key, description(key), images.shape[-1], shard_pairs, flush_s=float("inf"), **options)
    for i, image in enumerate(images):
        writer.add(i, i, 0, image)
    writer.close()
    return writer
