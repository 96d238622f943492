"""Making synthetic variations: the generators (Stable Diffusion image variations, Versatile Diffusion, the
stub, digits-tiny through ``from_pretrained``), the worker that runs one on a device, the producers that fill a
node's ring ahead of its trainers, and the cache warm-up that precomputes variations offline.

Builds on: core, data, cache, exchange.
"""
