"""onlinemix: self-supervised training with synthetic views generated on the fly (MixDiff)."""

__version__ = "0.1.0"
