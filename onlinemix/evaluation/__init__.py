"""Scoring a backbone on real images: the kNN and linear probes a run ends with (and monitors during
training) and the ``python -m onlinemix.eval`` protocols on saved runs.

Builds on: core, data, views, methods, training.
"""
