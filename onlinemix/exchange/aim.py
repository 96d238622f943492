"""Generation aimed by the trainers: which images get the scarce fresh variations, and how different they are.

Producers make far fewer variations than trainers consume, and only the trainers see what each pair
taught the model. So after every step the trainers write one score per image into the ring's image
table (:meth:`~onlinemix.exchange.ring.TrainerPort.publish_scores`), and producers that cannot cover every
position the trainers pass generate first for the highest-scoring images (:func:`choose_positions`),
still for positions ahead of the trainers, so each pair is on time for the batch that needs it.
``generator.aim`` picks the score:

- ``none``: no scores; producers generate in the trainers' order (claims of one batch each).
- ``stale``: how worn the image's variation is: 1 + the times it had served + its age in epochs; an image
  whose second view was real (no variation was there for it) scores infinity.
- ``hard``: how badly the model matched the image's last pair: 1 - the cosine similarity of the embeddings
  of its two views, in [0, 2], whether the second view was a variation or, for want of one, a second real
  view. So where generation is scarce and most images have never had a variation, it still ranks them by
  how slowly the model learns them (the examples that gain most from augmentation, TADA).

An image no batch has held yet scores infinity: every aim ranks it first.

``generator.strength=adaptive`` moves each image's noise level (how far its next variation strays from
the image, :mod:`onlinemix.generation.generator`) by the same similarity: a pair the model matched more
easily than the batch's median gets a step more noise, a harder one a step less, within
``[noise_min, noise_max]``.
"""

from __future__ import annotations

import numpy as np

from onlinemix.core.config import GeneratorConfig
from onlinemix.exchange.ring import TrainerPort

NOISE_STEPS = 4  # an adaptive level crosses [noise_min, noise_max] in this many steps


def stale_scores(uses: np.ndarray, age: np.ndarray) -> np.ndarray:
    """Score of images whose second view was synthetic: ``uses`` times it had served before, ``age`` epochs old."""
    return (1 + uses + age).astype(np.float32)


def hard_scores(similarity: np.ndarray) -> np.ndarray:
    """Score of images from the cosine similarity of their last pair's embeddings (real and synthetic, or two
    real views)."""
    return (1 - similarity).astype(np.float32)


def next_noise(levels: np.ndarray, similarity: np.ndarray, low: float, high: float) -> np.ndarray:
    """Each image's noise level after a step: one step up where its pair was easier to match (higher similarity)
    than the median of those given, one down where harder, unchanged at the median; kept within [low, high]."""
    if len(similarity) == 0:
        return levels
    step = (high - low) / NOISE_STEPS
    direction = np.sign(similarity - np.median(similarity))
    return np.clip(levels + step * direction, low, high).astype(np.float32)


def choose_positions(positions: np.ndarray, scores: np.ndarray, most: int) -> np.ndarray:
    """The (at most) ``most`` positions of the highest scores, in position order; ties go to the earlier
    position, so that without scores (all equal) this is the trainers' order."""
    if len(positions) <= most:
        return positions
    # O(n), not a sort: a claim may span tens of thousands of positions for a batch of a few images.
    threshold = np.partition(scores, len(scores) - most)[len(scores) - most]  # the most-th highest score
    above = np.flatnonzero(scores > threshold)
    ties = np.flatnonzero(scores == threshold)[: most - len(above)]
    return positions[np.sort(np.concatenate([above, ties]))]


def is_aimed(cfg: GeneratorConfig) -> bool:
    """Whether the trainers publish anything for the producers: a score to aim by, or adaptive noise levels."""
    return cfg.aim != "none" or cfg.strength == "adaptive"


class AimPublisher:
    """A trainer rank's side: after each step, the scores and noise levels of the images it trained on."""

    def __init__(self, port: TrainerPort, cfg: GeneratorConfig) -> None:
        self.port = port
        self.aim = cfg.aim
        self.adaptive = cfg.strength == "adaptive"
        self.low, self.high = cfg.noise_min, cfg.noise_max

    def describe(self) -> str:
        """The settings in force, for the run's log."""
        order = {"none": "producers generate in the trainers' order", "stale": "the most worn variations first",
                 "hard": "the pairs the model matches worst first"}[self.aim]
        strength = (f"noise adapted per image within [{self.low:g}, {self.high:g}]" if self.adaptive
                    else "noise fixed")
        return f"aim {self.aim} ({order}); {strength}"

    def publish(self, ids: np.ndarray, synthetic: np.ndarray, uses: np.ndarray, age: np.ndarray,
                similarity: np.ndarray | None) -> None:
        """One step's rows: image ids, whether their second view was synthetic, how often it had served before
        and its age, and the (B,) cosine similarity of each row's two views (None when the method has none)."""
        if self.aim == "stale":
            self.port.publish_scores(ids, np.where(synthetic, stale_scores(uses, age), np.float32(np.inf)))
        if similarity is None:
            return
        if self.aim == "hard":
            self.port.publish_scores(ids, hard_scores(similarity))
        rows = np.flatnonzero(synthetic)
        if self.adaptive and len(rows):
            levels = next_noise(self.port.noise_levels(ids[rows]), similarity[rows], self.low, self.high)
            self.port.publish_noise(ids[rows], levels)
