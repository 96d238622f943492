"""The plain-torch batched augmentation backend: uint8 sources + `ViewParams` -> normalised views.

It defines what a view is for every batched backend: the Triton kernels (`onlinemix_kernels.augment`) are
tested against it. Operations run in torchvision's order (augment.build_transform): crop + resize on
uint8 (equal to torchvision bit for bit), flip, scaling to [0, 1] (one op with the conversion to float),
ColorJitter's four operations in each sample's drawn order, grayscale, Gaussian blur, solarisation,
ImageNet normalisation.

The batch is sorted once by ColorJitter order (24 permutations, plus "no jitter"). Crops are resized a
block of the sorted batch at a time (`BLOCK_BYTES` of float pixels): on the CPU by torchvision's own uint8
kernel (`resample.resized_crops`, a call per sample, or one when the block shares a box), elsewhere by the
gathered tables (`resample.resample`: few calls per view). Then each group of
samples sharing an order gets every colour operation as one in-place tensor op, and grayscale, blur and
solarisation touch the subset of the group that draws them. On the CPU, groups are cut into chunks of
about `CPU_CHUNK_BYTES`, so that the dozens of passes over each chunk stay in the cache (one 224 px image
per chunk: at that size each op's data, not its call, is the cost).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from onlinemix.views.params import ViewParams
from onlinemix.views.photometric import (
    adjust_brightness_,
    adjust_contrast_,
    adjust_hue_,
    adjust_saturation_,
    gaussian_blur,
    normalize_,
    solarize_,
    to_grayscale_,
)
from onlinemix.views.resample import ResampleTable, resample, resample_table, resized_crops

CPU_CHUNK_BYTES = 1 << 20  # float pixels per chunk on the CPU: with the temporaries, about one core's L2
BLOCK_BYTES = 8 << 20      # float pixels resized per call of the tables' resize
NATIVE_RESIZE_DEVICES = ("cpu",)  # where torchvision's own resize kernel, per sample, beats the tables' gathers
ColourOps = tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...]  # by ColorJitter's operation id
_COLOUR_OPS: ColourOps = (adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)
_NO_JITTER = -1
_TO_UNIT = 1.0 / 255  # v2.ToDtype(float32, scale=True): levels (uint8, or float32 integers) times this


def jitter_order_codes(params: ViewParams) -> torch.Tensor:
    """(B,) int64: one code per ColorJitter order (base-4 digits of the permutation), -1 without jitter."""
    digits = params.order.to(torch.int64) * torch.tensor([64, 16, 4, 1], device=params.order.device)
    return torch.where(params.jitter, digits.sum(dim=1), torch.full_like(params.jitter, _NO_JITTER,
                                                                          dtype=torch.int64))


def sample_groups(params: ViewParams, chunk: int, block: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A permutation of the batch that puts samples sharing their ColorJitter order next to each other, and
    the (start, length) ranges of the permuted batch that share one order, each at most `chunk` long and
    none crossing a multiple of `block`."""
    codes, perm = jitter_order_codes(params).sort(stable=True)
    counts = torch.unique_consecutive(codes, return_counts=True)[1].tolist()
    ranges, start = [], 0
    for count in counts:
        end = start + count
        while start < end:
            length = min(chunk, end - start, block - start % block)
            ranges.append((start, length))
            start += length
    return perm, ranges


def crop_tables(params: ViewParams) -> tuple[ResampleTable, ResampleTable]:
    """The vertical and horizontal resampling tables of every sample's crop (the flip reverses the latter)."""
    rows = resample_table(params.top, params.height, params.size, params.interpolation)
    cols = resample_table(params.left, params.width, params.size, params.interpolation, reverse=params.flip)
    return rows, cols


def _is_whole_image(params: ViewParams, height: int, width: int) -> bool:
    """Every box is the whole image and already at the output size: torchvision's resize returns it as is."""
    return (height == width == params.size and bool((params.top == 0).all()) and bool((params.left == 0).all())
            and bool((params.height == height).all()) and bool((params.width == width).all()))


@dataclass(frozen=True)
class _Decisions:
    """The per-sample choices of (part of) the sorted batch as Python lists, read per group without tensor
    calls (at 224 px a group is one view, and those calls cost about 40 us of it)."""

    jitter: list[bool]
    order: list[list[int]]
    grayscale: list[bool]
    blur: list[bool]
    solarize: list[bool]

    @classmethod
    def of(cls, params: ViewParams) -> _Decisions:
        return cls(params.jitter.tolist(), params.order.tolist(), params.grayscale.tolist(), params.blur.tolist(),
                   params.solarize.tolist())

    def narrow(self, start: int, length: int) -> _Decisions:
        return _Decisions(*(getattr(self, f.name)[start:start + length] for f in fields(self)))


def _on_subset(x: torch.Tensor, mask: list[bool],
               fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply fn(rows, positions) in place to the rows of x where mask (n,) holds; returns x."""
    if all(mask):
        result = fn(x, torch.arange(len(mask), device=x.device))
        if result is not x:
            x.copy_(result)
    elif any(mask):
        positions = torch.tensor([i for i, chosen in enumerate(mask) if chosen], device=x.device)
        x.index_copy_(0, positions, fn(x.index_select(0, positions), positions))
    return x


def colour_ops(compiled: bool) -> ColourOps:
    """ColorJitter's four operations by operation id: eager, or with hue compiled (`compiled_ops`)."""
    if not compiled:
        return _COLOUR_OPS
    from onlinemix.views.compiled import compiled_hue  # imports TorchInductor: only when chosen

    return (*_COLOUR_OPS[:3], compiled_hue())


def _colour_jitter_(x: torch.Tensor, params: ViewParams, decisions: _Decisions, factors: torch.Tensor,
                    ops: ColourOps) -> torch.Tensor:
    """ColorJitter in the group's shared order (the group's first sample's)."""
    if not decisions.jitter[0]:
        return x
    for op in decisions.order[0]:
        if params.jitter_ops[op]:
            ops[op](x, factors[:, op])
    return x


def _colour_group_(x: torch.Tensor, params: ViewParams, decisions: _Decisions, factors: torch.Tensor,
                   sigma: torch.Tensor, ops: ColourOps) -> torch.Tensor:
    """float32 values in [0, 1] (n, 3, S, S) of samples sharing a ColorJitter order -> their normalised views,
    in place.

    `params` gives the batch's settings, `decisions` the group's choices; factors (n, 4) and sigma (n,) are
    on the values' device.
    """
    _colour_jitter_(x, params, decisions, factors, ops)
    _on_subset(x, decisions.grayscale, lambda rows_, _: to_grayscale_(rows_))
    _on_subset(x, decisions.blur, lambda rows_, at: gaussian_blur(rows_, sigma[at], params.blur_kernel))
    _on_subset(x, decisions.solarize, lambda rows_, _: solarize_(rows_))
    return normalize_(x)


def crop_boxes(params: ViewParams) -> torch.Tensor:
    """(B, 4) int64: each sample's crop box as (top, left, height, width)."""
    return torch.stack([params.top, params.left, params.height, params.width], dim=1)


def _block_levels(images: torch.Tensor, index: torch.Tensor, params: ViewParams,
                  tables: list[ResampleTable] | None) -> torch.Tensor:
    """Levels (n, 3, S, S) of the block of sources images[index], flipped where drawn: float32 from the tables,
    or uint8 from torchvision's own resize where there are none (converted where they are used)."""
    if tables is None:
        return resized_crops(images, index.cpu(), crop_boxes(params), params.flip, params.size, params.interpolation)
    return resample(images.index_select(0, index), *tables)


def chunk_size(params: ViewParams, device: torch.device) -> int:
    """Samples per group chunk: the whole batch on accelerators, cache-sized on the CPU."""
    if device.type != "cpu":
        return params.batch
    return max(1, CPU_CHUNK_BYTES // (3 * params.size * params.size * 4))


def augment_views(images: torch.Tensor, params: ViewParams, dtype: torch.dtype = torch.float32,
                  compiled: bool = False, out: torch.Tensor | None = None,
                  rows: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised (B, 3, S, S) of `dtype`, each image with its own parameters.

    `params` may live on the CPU whatever the images' device (decisions read it there; the tables and
    factors move to the images' device). `compiled` runs hue compiled by TorchInductor (`compiled_ops`).
    Given `out` (N, 3, S, S) of `dtype` on the images' device, sample b's view is written to its row
    rows[b] (`rows`: (B,) int64 on the CPU, default 0 .. B-1), the other rows are left as they are, and
    `out` is returned: views of several recipes fill one batch without a scatter copy.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] != params.batch:
        raise ValueError(f"{images.shape[0]} images for {params.batch} sets of parameters")
    if rows is not None and (out is None or rows.shape != (params.batch,)):
        raise ValueError(f"rows must come with out and give one row per sample ({params.batch}), got "
                         f"{None if rows is None else tuple(rows.shape)}")
    device = images.device
    if out is None:
        out = torch.empty(params.batch, 3, params.size, params.size, dtype=dtype, device=device)
    elif out.dtype != dtype or out.device != device or out.shape[1:] != (3, params.size, params.size):
        raise ValueError(f"out must be (N, 3, {params.size}, {params.size}) {dtype} on {device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    host = params.to("cpu")
    block = max(1, BLOCK_BYTES // (3 * params.size * params.size * 4))
    perm, ranges = sample_groups(host, chunk_size(params, device), block)
    use_tables = device.type not in NATIVE_RESIZE_DEVICES and not _is_whole_image(host, *images.shape[2:])
    host = host.select(perm)  # grouped by ColorJitter order: each group is a slice
    tables = [t.to(device) for t in crop_tables(host)] if use_tables else None
    decisions = _Decisions.of(host)
    factors, sigma = host.factors().to(device), host.sigma.to(device)
    ops = colour_ops(compiled)
    targets = perm if rows is None else rows.to(torch.int64)[perm]  # the output row of each sorted sample
    out_rows = targets.tolist()
    perm, targets = perm.to(device), targets.to(device)
    levels, block_start = None, 0
    for start, length in ranges:
        if start % block == 0:  # ranges never cross a block boundary, so each block begins with one
            block_start = start
            n = min(block, host.batch - block_start)
            levels = _block_levels(images, perm.narrow(0, block_start, n), host.narrow(block_start, n),
                                   None if tables is None else [t.narrow(block_start, n) for t in tables])
        group = levels.narrow(0, start - block_start, length)
        first = out_rows[start]
        in_out = dtype == torch.float32 and out_rows[start:start + length] == list(range(first, first + length))
        x = (torch.mul(group, _TO_UNIT, out=out.narrow(0, first, length)) if in_out
             else group.to(torch.float32).mul_(_TO_UNIT))
        _colour_group_(x, host, decisions.narrow(start, length), factors.narrow(0, start, length),
                       sigma.narrow(0, start, length), ops)
        if not in_out:
            out.index_copy_(0, targets.narrow(0, start, length), x.to(dtype))
    return out
