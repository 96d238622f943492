"""The producers' claim with generation aimed by the trainers against the claim in the trainers' order.

Where generation is scarce (one GPU making a few pairs/s, trainers eating thousands of images/s), an aimed
claim (``generator.aim=hard``) spans every position the trainers pass while one batch is generated and
picks the batch's images by their scores; an unaimed one takes the next ``generator.batch_size``
positions. Both run ``RingWork.next`` as a producer does (claim, skip images with an unused view, seeds,
noise levels), on a ring whose image table has one row per image of a dataset of ``images``, with the
trainers moving at ``rate`` positions/s and a producer batch timed at ``batch_s``.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from onlinemix.core.config import load_config
from onlinemix.core.schedule import EpochSchedule
from onlinemix.exchange.ring import PairRing, TrainerPort
from onlinemix.generation.producer import RingWork, producer_port

NODE_BATCH = 1024  # positions the trainers look up at once


def time_claims(aim: str, images: int, rate: float, batch_s: float, repeats: int) -> tuple[float, int]:
    """Median seconds of one ``RingWork.next`` under ``generator.aim=aim``, and the positions a claim spans."""
    cfg = load_config(None, {"generator.aim": aim, "generator.strength": "adaptive" if aim != "none" else "fixed",
                             "ring.slots": "8192", "producer.lead_factor": "1.2"})
    ring = PairRing.local(cfg.ring.slots, images=images)
    schedule = EpochSchedule(np.arange(images), NODE_BATCH, seed=0)
    port = producer_port(ring, cfg, NODE_BATCH, producers=1, index=0)
    work = RingWork(port, schedule, cfg)
    trainers = TrainerPort(ring, leader=True)
    trainers.publish_scores(np.arange(images), np.random.default_rng(0).random(images).astype(np.float32))
    trainers.publish_speed(round(rate), 1.0)
    port.observe_batch(batch_s)
    seconds, spanned = [], 0
    for i in range(repeats):
        trainers.publish_position(i * round(rate * batch_s))  # the trainers moved on during the last batch
        started = time.perf_counter()
        batch = work.next()
        seconds.append(time.perf_counter() - started)
        spanned = int(ring.header.gen_pos) - i * round(rate * batch_s) - port.lead()
        assert batch is not None and len(batch.ids) == cfg.generator.batch_size
    return statistics.median(seconds), spanned


def bench_claims(images: int, rate: float, batch_s: float, repeats: int) -> dict:
    """Aimed and unaimed claims side by side; the ratio, and the aimed claim's share of a producer batch."""
    plain_s, plain_span = time_claims("none", images, rate, batch_s, repeats)
    aimed_s, aimed_span = time_claims("hard", images, rate, batch_s, repeats)
    return {"images": images, "trainer_rate": rate, "batch_s": batch_s, "repeats": repeats,
            "plain_claim_s": plain_s, "aimed_claim_s": aimed_s, "plain_span": plain_span, "aimed_span": aimed_span,
            "aimed_over_plain": aimed_s / plain_s, "aimed_share_of_batch": aimed_s / batch_s}
