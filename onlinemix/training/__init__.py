"""The training loop's parts beside ``onlinemix/train.py``: starting a node's generation and opening its
caches, the input pipeline that prepares batches ahead of the step, run directories and checkpoints, metrics and
experiment trackers.

Builds on: core, data, cache, exchange, generation, views, methods.
"""
