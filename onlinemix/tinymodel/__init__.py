"""digits-tiny: a small image-variation model the project trains on its bundled digits and ships.

``python -m onlinemix.tinymodel train`` trains it, ``... quality`` measures its variations. The
trained pipeline lives in ``onlinemix/assets/digits-tiny`` and loads with ``from_pretrained`` like
any hub model (``generator.model: digits-tiny``).

Builds on: core, data, generation, tools.
"""
