"""From uint8 pairs to a method's float views: the augmentation recipes as data (:mod:`recipes`), their
per-sample parameters (:mod:`params`) and view sets (:mod:`specs`), one module per batched backend's parts
(:mod:`torch_backend` with :mod:`resample`, :mod:`photometric`, :mod:`compiled`, :mod:`buffers`; the Triton
kernels live in the top-level ``kernels/`` package), and the composition a trainer calls (:mod:`compose`).

Builds on: core, exchange (the batch of pairs it composes).
"""
