"""Images cut from a photograph (matplotlib's sample Grace Hopper), for the benchmarks whose speeds depend on
content, as JPEG and PNG sizes and decode times do: random noise or digits would compress unlike photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def sample_photo() -> Image.Image:
    """The photograph, in RGB."""
    import matplotlib.cbook

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as img:
        return img.convert("RGB")


def photo_folder(root: Path, n: int, classes: int, seed: int = 0) -> Path:
    """An ImageFolder tree of ``n`` ImageNet-shaped JPEGs in ``classes`` classes: random crops of the photograph,
    333-500 x 250-375 px, quality 90."""
    photo = sample_photo()
    rng = np.random.default_rng(seed)
    w, h = photo.size
    for i in range(n):
        cw, ch = int(rng.integers(w // 3, w)), int(rng.integers(h // 3, h))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        size = (int(rng.integers(333, 501)), int(rng.integers(250, 376)))
        crop = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        (root / f"class{i % classes:02d}").mkdir(parents=True, exist_ok=True)
        crop.save(root / f"class{i % classes:02d}" / f"{i:06d}.jpg", quality=90)
    return root


def photo_pairs(resolution: int, n_distinct: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_distinct`` (real, synthetic) uint8 pairs of random square crops (a quarter to all of the area, random
    flips) of the photograph, resized to ``resolution``."""
    photo = sample_photo()
    rng = np.random.default_rng(seed)
    w, h = photo.size

    def crop() -> torch.Tensor:
        side = int(min(w, h) * np.sqrt(rng.uniform(0.25, 1.0)))
        x, y = rng.integers(0, w - side + 1), rng.integers(0, h - side + 1)
        out = photo.crop((x, y, x + side, y + side)).resize((resolution, resolution), Image.Resampling.BICUBIC)
        arr = np.asarray(out)[:, ::-1] if rng.random() < 0.5 else np.asarray(out)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    return torch.stack([crop() for _ in range(n_distinct)]), torch.stack([crop() for _ in range(n_distinct)])
