"""Fused Triton kernels for batched view augmentation; reference: onlinemix.views.torch_backend.augment_views.

Given the same `ViewParams`, `augment_views_triton` computes what the torch backend computes:

* `_views_kernel`, one pass from the uint8 source to the normalised view: the crop + resize from the
  same per-sample integer tables (`onlinemix.views.resample`: torchvision's int16 weights, horizontal pass
  rounded and saturated to uint8 before the vertical one, exact integer sums, so the resized pixels equal
  the torch backend's and torchvision's bit for bit; the horizontal pass is recomputed for each vertical
  tap instead of stored), the flip (reversed horizontal table), ColorJitter in each sample's drawn order,
  grayscale, solarisation, normalisation, and the cast to the output dtype. Samples that draw a blur stop
  before solarisation and leave their float32 colours in a scratch buffer.
* `_contrast_sums_kernel` runs first when contrast is on: contrast blends with the mean grayscale of the
  image as it is when contrast runs (after the operations drawn before it), a reduction over the whole
  image, so this pass recomputes the pixels up to that point and writes per-tile partial sums.
* `_blur_rows_kernel` and `_blur_cols_kernel`: the separable Gaussian (torchvision's kernel, reflect
  borders) over the blurred samples only; the second pass solarises, normalises and casts.

Tolerance against the torch backend: resized pixels exact; float32 views within 2e-5 (fused multiply-adds
and reduction order; a value that lands within that of the solarisation threshold may flip, so tests
allow a 1e-4 fraction of outliers); fp16/bf16 views within one unit in the last place of the output dtype
on top of that.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from onlinemix.views.params import BRIGHTNESS, CONTRAST, HUE, SATURATION, ViewParams
from onlinemix.views.photometric import GRAY_WEIGHTS, gaussian_kernels
from onlinemix.views.recipes import IMAGENET_MEAN, IMAGENET_STD
from onlinemix.views.resample import ResampleTable
from onlinemix.views.torch_backend import crop_tables

BLOCK = 1024  # output pixels per program
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _resampled_pixel(src, b, y, x, mask, s_b, s_c, s_h, s_w, H, W, S,
                     row_start, row_weight, row_shift, col_start, col_weight, col_shift,
                     KV: tl.constexpr, KH: tl.constexpr):
    """RGB levels / 255 of output pixels (y, x) of sample b, rounded like torchvision's uint8 resize."""
    shift_y = tl.load(row_shift + b)
    shift_x = tl.load(col_shift + b)
    y0 = tl.load(row_start + b * S + y, mask=mask, other=0)
    x0 = tl.load(col_start + b * S + x, mask=mask, other=0)
    base = src + b.to(tl.int64) * s_b
    acc_r = tl.zeros(y.shape, tl.int32)
    acc_g = tl.zeros(y.shape, tl.int32)
    acc_b = tl.zeros(y.shape, tl.int32)
    for ky in tl.static_range(KV):
        wy = tl.load(row_weight + (b * S + y) * KV + ky, mask=mask, other=0)
        row = tl.minimum(y0 + ky, H - 1) * s_h
        h_r = tl.zeros(y.shape, tl.int32)
        h_g = tl.zeros(y.shape, tl.int32)
        h_b = tl.zeros(y.shape, tl.int32)
        for kx in tl.static_range(KH):
            wx = tl.load(col_weight + (b * S + x) * KH + kx, mask=mask, other=0)
            at = base + row + tl.minimum(x0 + kx, W - 1) * s_w
            h_r += wx * tl.load(at, mask=mask, other=0).to(tl.int32)
            h_g += wx * tl.load(at + s_c, mask=mask, other=0).to(tl.int32)
            h_b += wx * tl.load(at + 2 * s_c, mask=mask, other=0).to(tl.int32)
        half_x = (1 << (shift_x - 1))
        acc_r += wy * tl.minimum(tl.maximum((h_r + half_x) >> shift_x, 0), 255)
        acc_g += wy * tl.minimum(tl.maximum((h_g + half_x) >> shift_x, 0), 255)
        acc_b += wy * tl.minimum(tl.maximum((h_b + half_x) >> shift_x, 0), 255)
    half_y = (1 << (shift_y - 1))
    scale = 1.0 / 255
    r = tl.minimum(tl.maximum((acc_r + half_y) >> shift_y, 0), 255).to(tl.float32) * scale
    g = tl.minimum(tl.maximum((acc_g + half_y) >> shift_y, 0), 255).to(tl.float32) * scale
    bl = tl.minimum(tl.maximum((acc_b + half_y) >> shift_y, 0), 255).to(tl.float32) * scale
    return r, g, bl


@triton.jit
def _tile(S, BLOCK: tl.constexpr):
    """This program's output pixels: flat offsets in the S x S view, their mask, rows and columns."""
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < S * S, offs // S, offs % S


@triton.jit
def _gray(r, g, b):
    return r * 0.2989 + g * 0.587 + b * 0.114


@triton.jit
def _blend(r, g, b, other_r, other_g, other_b, ratio):
    keep = 1.0 - ratio
    r = tl.minimum(tl.maximum(r * ratio + other_r * keep, 0.0), 1.0)
    g = tl.minimum(tl.maximum(g * ratio + other_g * keep, 0.0), 1.0)
    b = tl.minimum(tl.maximum(b * ratio + other_b * keep, 0.0), 1.0)
    return r, g, b


@triton.jit
def _hue_channel(sextant, v, span, n):
    t = sextant + n
    distance = tl.abs(tl.floor(t * (1.0 / 6.0) + 0.5) * 6.0 - t)
    return v - tl.minimum(tl.maximum(2.0 - distance, 0.0), 1.0) * span


@triton.jit
def _hue(r, g, b, factor):
    """photometric.adjust_hue_: the closed-form HSV hue rotation."""
    v = tl.maximum(tl.maximum(r, g), b)
    span = v - tl.minimum(tl.minimum(r, g), b)
    inv = 1.0 / tl.maximum(span, 1e-30)
    sextant = tl.where(v == r, (g - b) * inv, tl.where(v == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    sextant = sextant + (6.0 * factor - 2.0)
    return _hue_channel(sextant, v, span, 5.0), _hue_channel(sextant, v, span, 3.0), \
        _hue_channel(sextant, v, span, 1.0)


@triton.jit
def _colour_op(r, g, b, op, factor_ptr, mean, BRIGHT_ON: tl.constexpr, CONTRAST_ON: tl.constexpr,
               SATURATION_ON: tl.constexpr, HUE_ON: tl.constexpr):
    """ColorJitter operation `op` (0 brightness, 1 contrast, 2 saturation, 3 hue) with its factor."""
    factor = tl.load(factor_ptr + op)
    if op == 0:
        if BRIGHT_ON:
            r = tl.minimum(tl.maximum(r * factor, 0.0), 1.0)
            g = tl.minimum(tl.maximum(g * factor, 0.0), 1.0)
            b = tl.minimum(tl.maximum(b * factor, 0.0), 1.0)
    elif op == 1:
        if CONTRAST_ON:
            r, g, b = _blend(r, g, b, mean, mean, mean, factor)
    elif op == 2:
        if SATURATION_ON:
            gray = _gray(r, g, b)
            r, g, b = _blend(r, g, b, gray, gray, gray, factor)
    else:
        if HUE_ON:
            r, g, b = _hue(r, g, b, factor)
    return r, g, b


@triton.jit
def _finish(out, b, y, x, mask, S, r, g, bl, solarize):
    """Solarise (min(v, 1 - v) inverts exactly the values >= 0.5), normalise, cast and store."""
    if solarize != 0:
        r = tl.minimum(r, 1.0 - r)
        g = tl.minimum(g, 1.0 - g)
        bl = tl.minimum(bl, 1.0 - bl)
    at = out + b.to(tl.int64) * 3 * S * S + y * S + x
    ty = out.dtype.element_ty
    tl.store(at, ((r - 0.485) / 0.229).to(ty), mask=mask)
    tl.store(at + S * S, ((g - 0.456) / 0.224).to(ty), mask=mask)
    tl.store(at + 2 * S * S, ((bl - 0.406) / 0.225).to(ty), mask=mask)


@triton.jit
def _contrast_sums_kernel(src, partial, samples, s_b, s_c, s_h, s_w, H, W, S,
                          row_start, row_weight, row_shift, col_start, col_weight, col_shift, order, factors,
                          KV: tl.constexpr, KH: tl.constexpr, BRIGHT_ON: tl.constexpr,
                          SATURATION_ON: tl.constexpr, HUE_ON: tl.constexpr, BLOCK: tl.constexpr):
    """Per-tile sums of the grayscale image as contrast finds it (after the operations drawn before it)."""
    b = tl.load(samples + tl.program_id(0))
    offs, mask, y, x = _tile(S, BLOCK)
    r, g, bl = _resampled_pixel(src, b, y, x, mask, s_b, s_c, s_h, s_w, H, W, S, row_start, row_weight,
                                row_shift, col_start, col_weight, col_shift, KV, KH)
    before = tl.full([], 1, tl.int32)
    for slot in tl.static_range(4):
        op = tl.load(order + b * 4 + slot)
        if op == 1:
            before = tl.full([], 0, tl.int32)
        if before != 0:
            r, g, bl = _colour_op(r, g, bl, op, factors + b * 4, 0.0, BRIGHT_ON, False, SATURATION_ON, HUE_ON)
    total = tl.sum(tl.where(mask, _gray(r, g, bl), 0.0), axis=0)
    tl.store(partial + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), total)


@triton.jit
def _views_kernel(src, out, scratch, s_b, s_c, s_h, s_w, H, W, S,
                  row_start, row_weight, row_shift, col_start, col_weight, col_shift,
                  jitter, order, factors, means, grayscale, blur, solarize,
                  KV: tl.constexpr, KH: tl.constexpr, BRIGHT_ON: tl.constexpr, CONTRAST_ON: tl.constexpr,
                  SATURATION_ON: tl.constexpr, HUE_ON: tl.constexpr, BLOCK: tl.constexpr):
    """uint8 source -> normalised view (or, for samples drawing a blur, float32 colours in `scratch`)."""
    b = tl.program_id(0)
    offs, mask, y, x = _tile(S, BLOCK)
    r, g, bl = _resampled_pixel(src, b, y, x, mask, s_b, s_c, s_h, s_w, H, W, S, row_start, row_weight,
                                row_shift, col_start, col_weight, col_shift, KV, KH)
    if tl.load(jitter + b) != 0:
        mean = tl.load(means + b)
        for slot in tl.static_range(4):
            op = tl.load(order + b * 4 + slot)
            r, g, bl = _colour_op(r, g, bl, op, factors + b * 4, mean, BRIGHT_ON, CONTRAST_ON, SATURATION_ON,
                                  HUE_ON)
    if tl.load(grayscale + b) != 0:
        gray = _gray(r, g, bl)
        r = gray
        g = gray
        bl = gray
    if tl.load(blur + b) != 0:
        at = scratch + b.to(tl.int64) * 3 * S * S + offs
        tl.store(at, r, mask=mask)
        tl.store(at + S * S, g, mask=mask)
        tl.store(at + 2 * S * S, bl, mask=mask)
    else:
        _finish(out, b, y, x, mask, S, r, g, bl, tl.load(solarize + b))


@triton.jit
def _reflect(i, n):
    i = tl.abs(i)
    return tl.where(i > n - 1, 2 * (n - 1) - i, i)


@triton.jit
def _blur_rows_kernel(scratch, across, samples, kernels, S, KS: tl.constexpr, BLOCK: tl.constexpr):
    """Horizontal Gaussian pass of the blurred samples, float32 scratch -> float32 `across`."""
    b = tl.load(samples + tl.program_id(0))
    offs, mask, y, x = _tile(S, BLOCK)
    base = b.to(tl.int64) * 3 * S * S
    for c in tl.static_range(3):
        acc = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(KS):
            w = tl.load(kernels + b * KS + k)
            xs = _reflect(x + (k - KS // 2), S)
            acc += w * tl.load(scratch + base + c * S * S + y * S + xs, mask=mask, other=0.0)
        tl.store(across + base + c * S * S + offs, acc, mask=mask)


@triton.jit
def _blur_cols_kernel(across, out, samples, kernels, solarize, S, KS: tl.constexpr, BLOCK: tl.constexpr):
    """Vertical Gaussian pass of the blurred samples, then solarisation, normalisation and the cast."""
    b = tl.load(samples + tl.program_id(0))
    offs, mask, y, x = _tile(S, BLOCK)
    base = b.to(tl.int64) * 3 * S * S
    r = tl.zeros([BLOCK], tl.float32)
    g = tl.zeros([BLOCK], tl.float32)
    bl = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(KS):
        w = tl.load(kernels + b * KS + k)
        at = across + base + _reflect(y + (k - KS // 2), S) * S + x
        r += w * tl.load(at, mask=mask, other=0.0)
        g += w * tl.load(at + S * S, mask=mask, other=0.0)
        bl += w * tl.load(at + 2 * S * S, mask=mask, other=0.0)
    _finish(out, b, y, x, mask, S, r, g, bl, tl.load(solarize + b))


def _table_args(table: ResampleTable) -> tuple[torch.Tensor, ...]:
    return table.start.to(torch.int32).contiguous(), table.weight.contiguous(), table.shift.contiguous()


def augment_views_triton(images: torch.Tensor, params: ViewParams,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 (B, 3, H, W) on the device -> normalised (B, 3, S, S) of `dtype`; the torch backend's views."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (B, 3, H, W) images, got {images.dtype} {tuple(images.shape)}")
    if images.shape[0] != params.batch:
        raise ValueError(f"{images.shape[0]} images for {params.batch} sets of parameters")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"unsupported output dtype {dtype}; known: {OUTPUT_DTYPES}")
    # Triton launches on the thread's current CUDA device, whatever the tensors' device: guard it.
    with torch.cuda.device(images.device) if images.device.type == "cuda" else nullcontext():
        return _augment(images, params, dtype)


def _augment(images: torch.Tensor, params: ViewParams, dtype: torch.dtype) -> torch.Tensor:
    device = images.device
    batch, size = params.batch, params.size
    out = torch.empty(batch, 3, size, size, dtype=dtype, device=device)
    if batch == 0:
        return out
    host = params.to("cpu")
    rows, cols = (table.to(device) for table in crop_tables(host))
    dev = host.to(device)
    flags = {name: getattr(dev, name).to(torch.int32).contiguous()
             for name in ("jitter", "grayscale", "blur", "solarize")}
    order = dev.order.to(torch.int32).contiguous()
    factors = dev.factors().contiguous()
    on = dict(BRIGHT_ON=host.jitter_ops[BRIGHTNESS], SATURATION_ON=host.jitter_ops[SATURATION],
              HUE_ON=host.jitter_ops[HUE])
    geometry = (*images.stride(), images.shape[2], images.shape[3], size, *_table_args(rows), *_table_args(cols))
    taps = dict(KV=rows.taps, KH=cols.taps)
    tiles = triton.cdiv(size * size, BLOCK)
    means = torch.zeros(batch, dtype=torch.float32, device=device)
    jittered = host.jitter.nonzero().squeeze(1) if host.jitter_ops[CONTRAST] else host.jitter[:0].long()
    if jittered.numel():
        samples = jittered.to(device=device, dtype=torch.int32)
        partial = torch.empty(samples.numel(), tiles, dtype=torch.float32, device=device)
        _contrast_sums_kernel[(samples.numel(), tiles)](images, partial, samples, *geometry, order, factors,
                                                        **taps, **on, BLOCK=BLOCK)
        means[jittered.to(device)] = partial.sum(dim=1) / (size * size)
    blurred = host.blur.nonzero().squeeze(1)
    scratch = torch.empty_like(out, dtype=torch.float32) if blurred.numel() else out
    _views_kernel[(batch, tiles)](images, out, scratch, *geometry, flags["jitter"], order, factors, means,
                                  flags["grayscale"], flags["blur"], flags["solarize"], **taps, **on,
                                  CONTRAST_ON=host.jitter_ops[CONTRAST], BLOCK=BLOCK)
    if blurred.numel():
        samples = blurred.to(device=device, dtype=torch.int32)
        kernels = gaussian_kernels(dev.sigma, host.blur_kernel).contiguous()
        across = torch.empty_like(scratch)
        grid = (samples.numel(), tiles)
        _blur_rows_kernel[grid](scratch, across, samples, kernels, size, KS=host.blur_kernel, BLOCK=BLOCK)
        _blur_cols_kernel[grid](across, out, samples, kernels, flags["solarize"], size, KS=host.blur_kernel,
                                BLOCK=BLOCK)
    return out


assert GRAY_WEIGHTS == (0.2989, 0.587, 0.114) and IMAGENET_MEAN == (0.485, 0.456, 0.406) \
    and IMAGENET_STD == (0.229, 0.224, 0.225), "the kernels spell these constants out"
