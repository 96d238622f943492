"""The torch backend's hue rotation compiled by TorchInductor into one fused C++ loop, for CPUs.

In eager mode each of hue's 28 tensor operations is a pass over the view, and at 224 px those passes,
not the calls, are its cost: about 0.47 ms of a 1.1 ms view on one core. Inductor fuses them into one
vectorised loop (about 0.2 ms), with the same arithmetic (equal to the eager function within 1e-6).
The other colour operations are one to three passes each; compiled, they ran no faster (some slower),
so they stay eager. This is the CPU counterpart of the fused Triton kernels.

Compiling needs a C++ compiler and takes a few seconds once per process (Inductor caches the generated
code on disk, so later processes mostly pay for tracing); `warm_up` does it before training, with
dynamic shapes so that every batch and view size reuses one compiled function.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch

from onlinemix.views.photometric import adjust_hue_

COMPILE_MIN_SIZE = 128  # views at least this large gain from compiled hue (at 32 px the per-call cost dominates)
_TOLERANCE = 1e-5


@functools.cache
def compiled_hue() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`photometric.adjust_hue_`, compiled (lazily, at its first call) for every shape."""
    return torch.compile(adjust_hue_, dynamic=True, fullgraph=True)


def warm_up() -> float:
    """Compile hue now and check it against the eager function on a small batch; returns the seconds taken.

    Raises RuntimeError if compiling fails (no C++ compiler, say) or the result disagrees."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 9, 7, generator=generator)
    factor = torch.rand(2, generator=generator) - 0.5
    for batched in (x, factor):  # any batch size, 1 included (dynamic shapes would specialise a size of 1)
        torch._dynamo.decorators.mark_unbacked(batched, 0)
    build_log = logging.getLogger("torch.utils.cpp_extension")  # warns that a CPU-only machine has no CUDA
    level, build_log.level = build_log.level, logging.ERROR
    try:
        got = compiled_hue()(x.clone(), factor)
    except Exception as e:  # Inductor raises many kinds: a missing compiler, a failed build, ...
        raise RuntimeError(f"TorchInductor could not compile hue ({e.__class__.__name__}: {e})") from e
    finally:
        build_log.setLevel(level)
    error = float((got - adjust_hue_(x.clone(), factor)).abs().max())
    if not error <= _TOLERANCE:
        raise RuntimeError(f"compiled hue differs from the eager one by {error:.2e} (tolerance {_TOLERANCE:g})")
    return time.perf_counter() - start
