"""The self-supervised methods behind one interface (backbone, heads, loss, the views they take): SimCLR,
BarlowTwins, DINO and the supervised baseline, with their losses, backbones and optimisers.

Each method has its own module (:mod:`simclr`, :mod:`barlow_twins`, :mod:`dino`, :mod:`supervised`) that
also declares its settings, the config section named after it; :mod:`base` holds what they share and
:mod:`build` builds the configured one.

Builds on: core, views.
"""
