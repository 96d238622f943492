"""The plain-torch batched augmentation backend: uint8 sources + `ViewParams` -> normalised views.

It defines what a view is for every batched backend: the Triton kernels (`onlinemix_kernels.augment`) are
tested against it. Operations run in torchvision's order (augment.build_transform): crop + resize on
uint8 (`resample`, equal to torchvision bit for bit), flip, scaling to [0, 1], ColorJitter's four
operations in each sample's drawn order, grayscale, Gaussian blur, solarisation, ImageNet normalisation.

Samples are processed in groups that share their ColorJitter order (24 permutations, plus "no jitter"),
so every colour operation is one in-place tensor op on a whole group; grayscale, blur and solarisation
touch the subset of a group that draws them. On the CPU, groups are further cut into chunks of about
`CPU_CHUNK_BYTES` of float pixels, so that the dozens of passes over each chunk stay in the cache (one
224 px image per chunk: at that size each op's data, not its call, is the cost, and whole-batch passes
run from memory instead of the cache).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from onlinemix.photometric import (adjust_brightness_, adjust_contrast_, adjust_hue_, adjust_saturation_,
                                   gaussian_blur, normalize_, solarize_, to_grayscale_)
from onlinemix.resample import ResampleTable, resample, resample_table
from onlinemix.view_params import ViewParams

CPU_CHUNK_BYTES = 1 << 20  # float pixels per chunk on the CPU: with the temporaries, about one core's L2
_COLOUR_OPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness_, adjust_contrast_, adjust_saturation_, adjust_hue_)  # by ColorJitter's operation id
_NO_JITTER = -1


def jitter_order_codes(params: ViewParams) -> torch.Tensor:
    """(B,) int64: one code per ColorJitter order (base-4 digits of the permutation), -1 without jitter."""
    digits = params.order.to(torch.int64) * torch.tensor([64, 16, 4, 1], device=params.order.device)
    return torch.where(params.jitter, digits.sum(dim=1), torch.full_like(params.jitter, _NO_JITTER,
                                                                          dtype=torch.int64))


def sample_groups(params: ViewParams, chunk: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A permutation of the batch that puts samples sharing their ColorJitter order next to each other, and
    the (start, length) ranges of the permuted batch that share one order, each at most `chunk` long."""
    codes, perm = jitter_order_codes(params).sort(stable=True)
    counts = torch.unique_consecutive(codes, return_counts=True)[1].tolist()
    ranges, start = [], 0
    for count in counts:
        ranges += [(start + i, min(chunk, count - i)) for i in range(0, count, chunk)]
        start += count
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


def _on_subset(x: torch.Tensor, mask: torch.Tensor,
               fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply fn(rows, positions) in place to the rows of x where mask (n,) holds; returns x."""
    positions = mask.nonzero().squeeze(1)
    if positions.numel() == x.shape[0]:
        result = fn(x, positions)
        if result is not x:
            x.copy_(result)
    elif positions.numel():
        x[positions] = fn(x[positions], positions)
    return x


def _colour_jitter_(x: torch.Tensor, params: ViewParams, factors: torch.Tensor) -> torch.Tensor:
    """ColorJitter in the group's shared order (the group's first sample's)."""
    if not bool(params.jitter[0]):
        return x
    for op in params.order[0].tolist():
        if params.jitter_ops[op]:
            _COLOUR_OPS[op](x, factors[:, op])
    return x


def _augment_group(images: torch.Tensor, params: ViewParams, rows: ResampleTable | None,
                   cols: ResampleTable | None, factors: torch.Tensor, sigma: torch.Tensor,
                   into: torch.Tensor | None) -> torch.Tensor:
    """uint8 (n, 3, H, W) -> normalised float32 (n, 3, S, S) for samples sharing a ColorJitter order,
    computed in `into` when given (rows of the output: no staging copy), else in a new tensor.

    `params` is on the CPU (decisions); tables, factors (n, 4) and sigma (n,) are on the images' device.
    """
    if rows is None or cols is None:  # whole image at the output size: only the flip
        levels = _on_subset(images, params.flip, lambda rows_, _: rows_.flip(-1))
    else:
        levels = resample(images, rows, cols)
    x = levels.to(torch.float32) if into is None else into.copy_(levels)
    x.mul_(1.0 / 255)  # v2.ToDtype(float32, scale=True)
    _colour_jitter_(x, params, factors)
    _on_subset(x, params.grayscale, lambda rows_, _: to_grayscale_(rows_))
    _on_subset(x, params.blur, lambda rows_, at: gaussian_blur(rows_, sigma[at.to(x.device)], params.blur_kernel))
    _on_subset(x, params.solarize, lambda rows_, _: solarize_(rows_))
    return normalize_(x)


def chunk_size(params: ViewParams, device: torch.device) -> int:
    """Samples per group chunk: the whole batch on accelerators, cache-sized on the CPU."""
    if device.type != "cpu":
        return params.batch
    return max(1, CPU_CHUNK_BYTES // (3 * params.size * params.size * 4))


def augment_views(images: torch.Tensor, params: ViewParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised (B, 3, S, S) of `dtype`, each image with its own parameters.

    `params` may live on the CPU whatever the images' device (decisions read it there; the tables and
    factors move to the images' device).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] != params.batch:
        raise ValueError(f"{images.shape[0]} images for {params.batch} sets of parameters")
    device = images.device
    perm, ranges = sample_groups(params.to("cpu"), chunk_size(params, device))
    host = params.to("cpu").select(perm)  # grouped by ColorJitter order: each group is a slice
    whole = _is_whole_image(host, images.shape[2], images.shape[3])
    tables = None if whole else [t.to(device) for t in crop_tables(host)]
    factors, sigma = host.factors().to(device), host.sigma.to(device)
    first_rows = perm.tolist()
    perm = perm.to(device)
    out = torch.empty(host.batch, 3, host.size, host.size, dtype=dtype, device=device)
    for start, length in ranges:
        rows, cols = (None, None) if tables is None else (t.narrow(start, length) for t in tables)
        index = perm.narrow(0, start, length)
        first = first_rows[start]
        in_place = dtype == torch.float32 and first_rows[start:start + length] == list(range(first, first + length))
        views = _augment_group(images.index_select(0, index), host.narrow(start, length), rows, cols,
                               factors.narrow(0, start, length), sigma.narrow(0, start, length),
                               out.narrow(0, first, length) if in_place else None)
        if not in_place:
            out.index_copy_(0, index, views.to(dtype))
    return out
