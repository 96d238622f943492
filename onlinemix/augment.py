"""SimCLR view augmentations (torchvision.transforms.v2) applied per image to uint8 batches.

v2 transforms draw one set of random parameters per call, so a batch tensor would get
the same crop for every image; SSL needs independent views, hence one call per image.
The real branch uses Gaussian blur, the synthetic branch solarisation, as in MixDiff.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def simclr_views(resolution: int, synthetic: bool) -> v2.Compose:
    blur_kernel = max(3, (resolution // 10) | 1)
    last = (v2.RandomSolarize(threshold=0.5, p=0.2) if synthetic
            else v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5))
    return v2.Compose([
        v2.RandomResizedCrop(resolution, scale=(0.2, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        last,
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def augment_batch(transform: v2.Compose, images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, R, R), each image with its own random parameters."""
    return torch.stack([transform(img) for img in images])


def augment_second_views(images: torch.Tensor, is_synthetic: torch.Tensor, real_transform: v2.Compose,
                         synthetic_transform: v2.Compose) -> torch.Tensor:
    """Second branch: synthetic views get the synthetic recipe, real fallbacks the real one."""
    return torch.stack([(synthetic_transform if syn else real_transform)(img)
                        for img, syn in zip(images, is_synthetic.tolist())])
