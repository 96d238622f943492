"""Generation hundreds to thousands of times slower than training, where users run it: on the virtual
clock, with the product's own claim, eviction and lookup code (onlinemix.tools.simulate) and the planner."""

from __future__ import annotations

import time

import numpy as np
import pytest

from onlinemix.cache import CacheReader, ShardWriter
from onlinemix.core.config import load_config
from onlinemix.generation.worker import CacheSink, Pairs, Work
from onlinemix.tools.plan import DeviceRates, predict_split
from onlinemix.tools.simulate import Rates, simulate

TRAIN_IMG_S = 2400.0  # one trainer device (a ResNet-50 on a GPU)
IMAGES = 8960         # 70 steps of one default trainer batch (128) an epoch


def config(**overrides: str):
    return load_config(None, {k.replace("__", "."): v for k, v in overrides.items()})


def run(cfg, ratio: float, producers: int, trainers: int, epochs: int):
    step_s = cfg.train.batch_size / TRAIN_IMG_S
    return simulate(cfg, IMAGES, Rates(TRAIN_IMG_S / ratio, step_s), producers=producers, trainers=trainers,
                    epochs=epochs)


def test_pairs_claimed_epochs_ahead_serve_the_occurrence_they_were_made_for() -> None:
    # 1:1000: a batch of 16 takes a producer 6.7 s, while the trainer goes through 16,000 positions, 1.8
    # epochs and 8 rings of the default 2048 slots. Every view is served once, so its age tells when.
    cfg = config(staleness__policy="real", staleness__max_reuse="1")
    sim = run(cfg, 1000, producers=7, trainers=1, epochs=20)
    # Only the first batch of each producer, claimed before it knew how long a batch takes, is late.
    late = sum(e.fresh for e in sim.epochs if e.mean_age > 0)
    assert late <= 7 * cfg.generator.batch_size
    assert sum(e.fresh for e in sim.epochs) - late >= 0.8 * sim.generated
    # Nothing is lost: every pair serves, those of the last epochs too.
    assert sim.evicted_unserved == sim.unserved_at_end == 0
    assert sum(e.fresh for e in sim.epochs) == sim.generated
    # The producers never wait for room: they publish at their summed rate until the end is within their lead.
    made = sum(e.generated for e in sim.epochs[:-2])
    assert made >= 0.95 * 7 * 2.4 * sum(e.epoch_s for e in sim.epochs[:-2]) - 7 * cfg.generator.batch_size


@pytest.mark.parametrize("ratio, producers, epochs", [(1000, 1, 100), (100, 4, 20), (3000, 7, 40)])
def test_the_default_never_throttles_the_trainers_and_reuses_every_pair(ratio: float, producers: int,
                                                                         epochs: int) -> None:
    cfg = config()  # the default policy
    trainers = 8 - producers
    sim = run(cfg, ratio, producers, trainers, epochs)
    trained = epochs * (IMAGES // (trainers * 128)) * trainers * 128
    assert trained / sim.wall_s >= 0.98 * trainers * TRAIN_IMG_S
    ring_only = run(config(staleness__policy="real"), ratio, producers, trainers, epochs).total()
    total = sim.total()
    assert total.fresh + total.cached + total.disk >= ring_only.fresh + ring_only.cached > 0
    # Ring views served again, up to max_reuse, in the later epochs of their images.
    assert ring_only.cached > ring_only.fresh


@pytest.mark.parametrize("ratio, producers, policy", [(10, 4, "cached"), (100, 7, "cached"), (300, 2, "wait")])
def test_the_planner_matches_a_simulation_of_the_whole_run(ratio: float, producers: int, policy: str) -> None:
    cfg = config(staleness__policy=policy, train__epochs="24")
    trainers = 8 - producers
    split = predict_split(cfg, DeviceRates(TRAIN_IMG_S / ratio, TRAIN_IMG_S), producers, trainers, 1, IMAGES,
                          cfg.staleness.max_age + 3)
    full = run(cfg, ratio, producers, trainers, 24)
    total = full.total()
    trained = 24 * (IMAGES // (trainers * 128)) * trainers * 128
    assert split.throughput_img_s == pytest.approx(trained / full.wall_s, rel=0.05)
    assert split.synthetic == pytest.approx((total.fresh + total.cached + total.disk) / total.views, rel=0.05)
    assert split.variations_per_image == pytest.approx(total.new_variations / IMAGES, rel=0.05)
    assert split.throttled == (policy == "wait")


def test_a_batch_handed_to_the_cache_is_readable_at_the_trainers_next_refresh(tmp_path) -> None:
    # Slow generation: a batch of 16 every few seconds, far fewer than a shard's 256 pairs.
    writer = ShardWriter(tmp_path, "key", {"dataset": "test"}, 4, shard_pairs=256, flush_s=0.05)
    sink, reader = CacheSink(writer, required=False), CacheReader(tmp_path, "key", 4)
    images = np.zeros((16, 3, 4, 4), dtype=np.uint8)
    for batch in range(2):
        time.sleep(0.06)  # the batch's generation outlasts flush_s
        ids = np.arange(16 * batch, 16 * batch + 16)
        work = Work(ids, [0] * 16, np.zeros(16, dtype=np.int64), ids)
        sink.put(Pairs(work, images, images, np.zeros(16, dtype=np.float32)))
        assert reader.refresh() == 16  # the whole batch, not its first pair only: nothing waits for the next batch
    assert writer.committed == 32


def test_slowly_generated_pairs_reach_the_trainers_from_the_disk_cache_within_a_refresh() -> None:
    # 1:1000 with one producer: a batch every 6.7 s. Its pairs serve from the ring in the epoch they were made
    # for, and from the disk cache at any later occurrence of their images, from the next refresh (10 s) on.
    cfg = config(staleness__max_reuse="1")
    sim = run(cfg, 1000, producers=1, trainers=1, epochs=12)
    made = [end for _, end, _ in sim.batches]
    epoch_s = sim.epochs[0].epoch_s
    first_disk = next(e.epoch for e in sim.epochs if e.disk)
    assert first_disk * epoch_s <= made[0] + 10.0 + epoch_s  # served in the epoch after the first refresh at most
    assert sim.disk_images == sim.generated
