"""The configured method, built: ``build_method`` and the ``StepInfo`` the trainer hands it each step.

Each method lives in its own module with its settings (onlinemix/methods/simclr.py, barlow_twins.py,
dino.py, supervised.py) and is chosen by name through ``registry.METHODS``.
"""

from __future__ import annotations

from onlinemix.core.config import Config
from onlinemix.core.registry import METHODS
from onlinemix.methods.backbones import seeded_backbone
from onlinemix.methods.base import SSLMethod, StepInfo
from onlinemix.methods.supervised import Supervised

__all__ = ["SSLMethod", "StepInfo", "build_method"]


def build_method(cfg: Config, num_classes: int) -> SSLMethod:
    """The configured method (``train.method``, resolved through ``registry.METHODS``) with a fresh
    backbone and its own config section (``cfg.simclr``, ``cfg.barlowtwins``, ``cfg.dino``); the
    initial weights depend on train.seed only. ``num_classes`` sizes the supervised classifier."""
    cls = METHODS.load(cfg.train.method)
    backbone = seeded_backbone(cfg.train)
    if cls is Supervised:
        return Supervised(backbone, num_classes)
    method = cls(backbone, getattr(cfg, cfg.train.method))
    method.weigh_pairs = cfg.train.pair_weighting
    return method
