"""The self-supervised methods behind one interface (backbone, heads, loss, the views they take): SimCLR,
BarlowTwins, DINO and the supervised baseline, with their losses, backbones and optimisers.

Builds on: core, views.
"""
