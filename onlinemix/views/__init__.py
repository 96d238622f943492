"""From uint8 pairs to a method's float views: the augmentation recipes as data (:mod:`recipes`), their
per-sample parameters (:mod:`params`) and view sets (:mod:`specs`); the backends that make views
(:mod:`backends`: torchvision per image, the batched torch backend of :mod:`torch_backend` with
:mod:`resample`, :mod:`photometric`, :mod:`compiled` and :mod:`buffers`, and the fused Triton kernels of
the top-level ``kernels/`` package); and the composition a trainer calls (:mod:`compose`).

Builds on: core, exchange (the batch of pairs it composes).
"""
