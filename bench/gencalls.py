"""The generator's two calls, timed side by side: ``generate`` (what a producer calls: preprocess, per-image
seeds, finite check, resize, uint8) and the bare ``gen.pipe(...)`` call with identical settings on pixels
preprocessed in advance. Their ratio is the wrapper's overhead (bench/generate.py, bench/throughput.py)."""

from __future__ import annotations

import torch
from timing import Timer

from onlinemix.generation.generator import DiffusersVariationGenerator


class GeneratorCalls:
    """``wrapper()`` and ``bare()`` on the same ``batch`` images (``images`` tiled), each returning its seconds.

    Inputs are uint8 CPU tensors, as a producer passes them; outputs stay on the device (the producer's
    ``.cpu()`` copy is not timed); CUDA is synchronised at both ends of every timed call."""

    def __init__(self, gen: DiffusersVariationGenerator, images: torch.Tensor, batch: int, steps: int,
                 guidance: float, device: torch.device) -> None:
        self.gen, self.steps, self.guidance, self.device = gen, steps, guidance, device
        self.batch = images[torch.arange(batch) % images.shape[0]].contiguous()
        self.seeds = list(range(batch))
        with torch.inference_mode():
            self.pixels = gen.preprocess(self.batch)  # the bare call gets already-preprocessed pixels on the device

    def bare(self) -> float:
        """``gen.pipe`` on the preprocessed pixels with the generator's own settings; its seconds."""
        gen = self.gen
        generators = [torch.Generator(gen.device).manual_seed(s) for s in self.seeds]
        with torch.inference_mode(), Timer(self.device) as t:
            gen.pipe(self.pixels, height=gen.gen_size, width=gen.gen_size, num_inference_steps=self.steps,
                     guidance_scale=self.guidance, generator=generators, output_type="pt")
        return t.seconds

    def wrapper(self) -> float:
        """``gen.generate`` on the uint8 batch; its seconds."""
        with Timer(self.device) as t:
            self.generate()
        return t.seconds

    def generate(self) -> torch.Tensor:
        """One untimed ``generate`` call on the batch."""
        return self.gen.generate(self.batch, self.seeds)
