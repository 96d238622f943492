"""The named choices a run is built from: methods, pairings and generator pipelines.

Each registry maps a name to a ``"module:attribute"`` reference and a one-line description.
The configuration takes its allowed values and ``--help`` text from here, and the code that
builds a run resolves a name with :meth:`Registry.load`. References are imported on first use,
so a module that is only needed when chosen (Versatile Diffusion's deprecated pipeline) is never
imported otherwise. Adding a method, pairing or generator is one entry here plus its implementation.

A method with settings also names its config section (``settings``), a dataclass declared in the
method's own module: the config gives it a section named after the method (``dino.*``) and imports it
when a config is first built or listed (see onlinemix/core/config.py). These references are strings,
as the targets are, so that core imports no stage above it: the layer test reads import statements
and does not see them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


def resolve(reference: str) -> Any:
    """The object at ``"package.module:attribute"``, its module imported now if it was not yet."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class Entry:
    target: str         # "package.module:attribute"
    description: str
    settings: str = ""  # "package.module:attribute" of the entry's config section; "" = it has none


class Registry:
    """Names -> lazily imported objects, with the description ``--help`` shows for each."""

    def __init__(self, key: str, entries: dict[str, Entry]) -> None:
        self.key = key  # the config key that chooses among the entries, for error messages
        self._entries = dict(entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def describe(self) -> str:
        """'name' = description; ... for every entry, in registration order."""
        return "; ".join(f"'{name}' = {entry.description}" for name, entry in self._entries.items())

    def load(self, name: str) -> Any:
        """The object registered as ``name``, imported now if it was not yet."""
        if name not in self._entries:
            raise KeyError(f"unknown {self.key} {name!r}; known: {', '.join(self._entries)}")
        return resolve(self._entries[name].target)

    def settings(self) -> dict[str, str]:
        """Name -> reference of the config section, for the entries that have one, in registration order."""
        return {name: entry.settings for name, entry in self._entries.items() if entry.settings}


METHODS = Registry("train.method", {
    "simclr": Entry("onlinemix.methods.simclr:SimCLR", "NT-Xent, negatives gathered across ranks",
                    settings="onlinemix.methods.simclr:SimCLRConfig"),
    "barlowtwins": Entry("onlinemix.methods.barlow_twins:BarlowTwins", "cross-correlation of the two branches",
                         settings="onlinemix.methods.barlow_twins:BarlowTwinsConfig"),
    "dino": Entry("onlinemix.methods.dino:DINO", "self-distillation, EMA teacher, multi-crop",
                  settings="onlinemix.methods.dino:DINOConfig"),
    "supervised": Entry("onlinemix.methods.supervised:Supervised",
                        "linear classifier on the backbone, cross-entropy on the real images' labels, views from "
                        "the pairing: the paper's supervised baseline"),
})

PAIRINGS = Registry("train.pairing", {
    "mixdiff": Entry("onlinemix.views.compose:MixDiff", "(real, synthetic variation)"),
    "real": Entry("onlinemix.views.compose:Real", "two views of the real image (plain SSL, no producers)"),
    "synthetic": Entry("onlinemix.views.compose:Synthetic", "two views of the synthetic image (the paper's 'Syn' models)"),
    "mixing": Entry("onlinemix.views.compose:Mixing",
                    "each sample uses its real or its synthetic image (50/50, seeded) for both views"),
    "sequential": Entry("onlinemix.views.compose:Sequential",
                        "'real' for train.sequential_real_epochs epochs (0 = half of train.epochs), then 'synthetic'"),
})

GENERATORS = Registry("generator.pipeline", {
    "sd-image-variation": Entry("onlinemix.generation.generator:DiffusersVariationGenerator",
                                "Stable Diffusion image variations (the paper's main generator)"),
    "versatile": Entry("onlinemix.generation.versatile:VersatileVariationGenerator",
                       "Versatile Diffusion's image variation (its alternative; default weights "
                       "shi-labs/versatile-diffusion)"),
})
