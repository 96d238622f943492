"""Batched colour, blur and normalisation operations with per-sample factors, on float images in [0, 1].

Each function is torchvision.transforms.v2.functional's operation of the same name with a (B,) tensor of
factors instead of one float, written to work in place on (B, 3, H, W) float32 batches. They follow
torchvision's definitions: brightness scales and clamps; contrast blends with the mean of the grayscale
image; saturation blends with the grayscale image; hue rotates the HSV hue; grayscale uses
(0.2989, 0.587, 0.114); blur convolves with a normalised Gaussian of torchvision's sampling over reflect
padding; solarisation inverts values at or above the threshold. Hue uses the closed form of the HSV round
trip (channel = V - (V - min) * clamp(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6), equal to torchvision's
piecewise p/q/t selection up to float rounding (1e-6).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from onlinemix.views.recipes import IMAGENET_MEAN, IMAGENET_STD, SOLARIZE_THRESHOLD

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
_HUE_SEXTANT = (5.0, 3.0, 1.0)  # the HSV -> RGB offsets n of R, G, B
_TINY = 1e-30


def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.to(torch.float32).view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma, in torchvision's order of operations."""
    r, g, b = x.unbind(dim=1)
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul_(_per_sample(factor)).clamp_(0.0, 1.0)


def adjust_contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * ratio + (1 - ratio) * mean luma, clamped. The mean luma is the luma of the channel means (a linear
    map: the same value, read in one pass instead of making the luma image first)."""
    ratio = _per_sample(factor)
    mean = grayscale(x.mean(dim=(-2, -1), keepdim=True))
    return x.mul_(ratio).add_(mean * (1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * ratio + (1 - ratio) * luma, clamped: the blend as one multiply-add pass over x."""
    ratio = _per_sample(factor)
    return torch.addcmul(grayscale(x).mul_(1.0 - ratio), x, ratio, out=x).clamp_(0.0, 1.0)


def _equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1.0 where a == b, else 0.0, written as float (a bool result takes a far slower path on CPUs)."""
    return torch.eq(a, b, out=torch.empty_like(a))


def adjust_hue_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `factor` (a fraction of the circle, in [-0.5, 0.5]); value and saturation stay.

    Branch-free, in 28 tensor ops over whole images (the three output channels at once where it can):
    which channel holds the maximum is a 0/1 float mask (R first, then G, as torchvision), and the periodic
    ramp clamp(min(k, 4 - k), 0, 1) over k = (n + 6 H) mod 6 is clamp(2 - 6 d, 0, 1) with d the distance
    of (k - 2) / 6 to the nearest integer, applied as V - span * ramp clamped to [min, V]. No
    comparison-select or remainder runs on whole images (both are several times slower than arithmetic
    on CPUs).
    """
    r, g, b = x.unbind(dim=1)
    v, low = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    span = v - low
    inv = span.clamp_min(_TINY).mul_(6.0).reciprocal_().squeeze(1)  # span 0: every difference below is 0 too
    is_r = _equal(v.squeeze(1), r)
    is_g = _equal(v.squeeze(1), g)
    is_g.addcmul_(is_g, is_r, value=-1.0)                              # G is the max and R is not
    # the hue in turns, less 2/3: ((r - g) if B is the max, (b - r) - 2 span if G is, (g - b) - 4 span if R is)
    # / (6 span)
    across, other = r - g, b - r
    across.addcmul_(other.sub_(across), is_g)
    across.addcmul_(torch.sub(g, b, out=other).sub_(across), is_r)
    hue = across.mul_(inv).sub_(is_g, alpha=1.0 / 3.0).sub_(is_r, alpha=2.0 / 3.0).unsqueeze(1)
    offsets = _hue_offsets.__wrapped__(x.device) if torch.compiler.is_compiling() else _hue_offsets(x.device)
    turns = torch.add(hue, _per_sample(factor).add(offsets))              # (k - 2) / 6 of each channel
    distance = turns.sub_(torch.round(turns, out=x)).abs_()              # x's values are no longer read
    top = torch.add(v, span, alpha=-2.0)                                  # V - span * (2 - 6 d)
    torch.addcmul(top, distance, span.mul_(6.0), out=x)
    return x.clamp_(low, v)


@functools.lru_cache(maxsize=None)
def _hue_offsets(device: torch.device) -> torch.Tensor:
    """(1, 3, 1, 1): (4 - 2 + n) / 6 of R, G, B (the hue above is 4 sextants short; the ramp's argument is
    k - 2). Cached in eager mode; traced uncached when compiled (a constant of the compiled code)."""
    return torch.tensor([(2.0 + n) / 6.0 for n in _HUE_SEXTANT], device=device).view(1, 3, 1, 1)


def to_grayscale_(x: torch.Tensor) -> torch.Tensor:
    """rgb_to_grayscale with 3 output channels."""
    return x.copy_(grayscale(x).expand_as(x))


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B,) sigmas -> (B, K) float32 1-D kernels, as torchvision's _get_gaussian_kernel1d computes them."""
    lim = (kernel_size - 1) / (2.0 * 2.0 ** 0.5)
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32, device=sigma.device)
    return torch.softmax(x[None].div(sigma.to(torch.float32)[:, None]).pow(2).neg(), dim=1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, one sigma per sample: two passes of K multiply-adds."""
    kernels = gaussian_kernels(sigma, kernel_size)
    pad = kernel_size // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    height, width = x.shape[-2:]
    across = torch.zeros(*x.shape[:2], height + 2 * pad, width, dtype=x.dtype, device=x.device)
    for k in range(kernel_size):
        across.addcmul_(padded[..., k:k + width], kernels[:, k].view(-1, 1, 1, 1))
    out = torch.zeros_like(x)
    for k in range(kernel_size):
        out.addcmul_(across[..., k:k + height, :], kernels[:, k].view(-1, 1, 1, 1))
    return out


def solarize_(x: torch.Tensor) -> torch.Tensor:
    """Values >= 0.5 become 1 - x: the same as min(x, 1 - x), two cheap passes instead of a select."""
    assert SOLARIZE_THRESHOLD == 0.5, "min(x, 1 - x) inverts exactly the values >= 0.5"
    return torch.minimum(x, 1.0 - x, out=x)


@functools.lru_cache(maxsize=None)
def _imagenet_stats(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device).view(3, 1, 1)
    return mean, torch.tensor(IMAGENET_STD, dtype=dtype, device=device).view(3, 1, 1)


def normalize_(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std, as v2.Normalize: subtract, then divide."""
    mean, std = _imagenet_stats(x.dtype, x.device)
    return x.sub_(mean).div_(std)
