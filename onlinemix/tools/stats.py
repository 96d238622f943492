"""Image statistics of synthetic variations per guidance scale (the MixDiff paper's Figure 7).

For a set of real images and each guidance scale k, ``python -m onlinemix.stats`` generates one
variation per image and reports, on the features of an offline extractor:

- *diversity*: the mean cosine distance (1 - cos) between each real image's features and its
  variation's: 0 for copies, larger for variations further from their source;
- the *Frechet distance* between the real and generated feature distributions (Gaussian fits:
  |m1 - m2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))). It is the FID only on Inception v3 features with
  the standard weights; on any other extractor it is labelled as what it is.

Variations come from ``variations_for``, the one place that produces them, so that a cache of
pre-made variations can supply them instead of the generator.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import textwrap
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from onlinemix.cache import CacheError, CacheReader, select_key
from onlinemix.core.cli import at_least, config_value, run_command
from onlinemix.core.config import GeneratorConfig, load_config
from onlinemix.core.files import write_json
from onlinemix.core.schedule import variation_seed
from onlinemix.data import load_real_images
from onlinemix.generation.generator import make_generator
from onlinemix.training.rundir import CONFIG_FILE, load_backbone
from onlinemix.views.recipes import eval_transform

log = logging.getLogger(__name__)

# torchvision names its weight files by the first hex digits of their SHA-256: inception_v3_google-0cc3c7bd.pth
TORCHVISION_INCEPTION_SHA256_PREFIX = "0cc3c7bd"
DEFAULT_GUIDANCE = (2.0, 3.0, 6.0, 8.0, 12.0)  # the scales the paper studies


# ----------------------------------------------------------------------------- the statistics

def _sqrtm_psd(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition."""
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_from_moments(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2)), in float64.

    tr((s1 s2)^(1/2)) = tr((r s2 r)^(1/2)) with r = s1^(1/2): r s2 r is symmetric PSD, so both roots
    come from eigen-decompositions and stay real, unlike a general sqrtm of the product."""
    mu1, s1, mu2, s2 = (t.to(torch.float64) for t in (mu1, s1, mu2, s2))
    r = _sqrtm_psd(s1)
    cross = torch.linalg.eigvalsh(r @ s2 @ r).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * cross)


def gaussian_fit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of features (N, D), N >= 2."""
    x = x.to(torch.float64)
    return x.mean(0), torch.atleast_2d(torch.cov(x.T))


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of two feature sets (N, D) and (M, D)."""
    return frechet_from_moments(*gaussian_fit(x), *gaussian_fit(y))


def mean_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of 1 - cos(a_i, b_i): how far each variation's features moved from its source's."""
    return float((1 - F.cosine_similarity(a.to(torch.float64), b.to(torch.float64), dim=1)).mean())


# ----------------------------------------------------------------------------- feature extractors

@dataclass
class FeatureExtractor:
    name: str
    net: nn.Module
    size: int                  # image side the network sees
    is_inception_fid: bool     # Inception v3 with the standard weights: the Frechet distance is the FID

    @property
    def fd_label(self) -> str:
        if self.is_inception_fid:
            return "FID (Inception v3 pool features, torchvision's standard ImageNet weights)"
        return f"Frechet distance on {self.name} features (not the Inception FID)"

    @torch.no_grad()
    def features(self, images: torch.Tensor, device: torch.device, desc: str, batch_size: int = 256) -> torch.Tensor:
        self.net.to(device).eval()
        norm = eval_transform()
        out = []
        for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
            x = norm(images[i:i + batch_size]).to(device)
            if x.shape[-1] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
            out.append(self.net(x).float().cpu())
        return torch.cat(out)


def run_extractor(run_dir: Path) -> FeatureExtractor:
    """The trained backbone of a run, at the run's resolution."""
    cfg = load_config(run_dir / CONFIG_FILE)
    return FeatureExtractor(f"the trained {cfg.train.backbone} backbone of run {run_dir.resolve().name}",
                            load_backbone(run_dir, cfg), cfg.data.resolution, False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def torchvision_extractor(arch: str, weights: Path, size: int | None = None) -> FeatureExtractor:
    """A torchvision classifier with its head removed, weights from a local file (.pth/.pt or .safetensors)."""
    build = getattr(torchvision.models, arch, None)
    if arch.startswith("_") or not callable(build):
        raise ValueError(f"--arch {arch!r} is not a torchvision.models architecture")
    if not weights.is_file():
        raise FileNotFoundError(f"--weights {weights} does not exist")
    standard = arch == "inception_v3" and _sha256(weights).startswith(TORCHVISION_INCEPTION_SHA256_PREFIX)
    # torchvision's own Inception weights expect its input transform; the architecture otherwise as built.
    kwargs = {"init_weights": False, "transform_input": standard} if arch == "inception_v3" else {}
    net = build(weights=None, **kwargs)
    state = load_file(weights) if weights.suffix == ".safetensors" else torch.load(weights, map_location="cpu",
                                                                                     weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"--weights {weights} does not fit torchvision {arch}: {str(e).splitlines()[0]}") from e
    head = next((a for a in ("fc", "classifier", "heads", "head") if hasattr(net, a)), None)
    if head is None:
        raise ValueError(f"torchvision {arch}: no fc/classifier/heads/head to remove")
    setattr(net, head, nn.Identity())
    return FeatureExtractor(f"torchvision {arch} ({weights.name})", net,
                            size or (299 if arch == "inception_v3" else 224), standard)


# ----------------------------------------------------------------------------- variations and the sweep

def cached_variations(cache: Path, dataset: str, ids: torch.Tensor, resolution: int,
                      guidance: float) -> torch.Tensor | None:
    """One cached variation per image at this guidance scale, or None unless the cache has them all.
    A cache in an older layout is an error that says how to migrate it, not a reason to generate."""
    try:
        key = select_key(cache, dataset, resolution, guidance)
    except CacheError:
        return None
    served = CacheReader(cache, key, resolution).take(ids.tolist())
    if any(s is None for s in served):
        return None
    return torch.stack([s.image for s in served])


def variations_for(images: torch.Tensor, ids: torch.Tensor, gen_cfg: GeneratorConfig, guidance: float,
                   device: torch.device) -> torch.Tensor:
    """One variation per image at guidance scale ``guidance``, seeded by (generator.seed, image id)."""
    generator = make_generator(replace(gen_cfg, guidance=guidance), device, images.shape[-1])
    out = []
    for i in tqdm(range(0, len(images), gen_cfg.batch_size), desc=f"generate k={guidance:g}", unit="batch"):
        seeds = [variation_seed(gen_cfg.seed, int(j), 0) for j in ids[i:i + gen_cfg.batch_size]]
        out.append(generator.generate(images[i:i + gen_cfg.batch_size], seeds).cpu())
    return torch.cat(out)


def sweep(images: torch.Tensor, ids: torch.Tensor, gen_cfg: GeneratorConfig, scales: list[float],
          extractor: FeatureExtractor, device: torch.device, cache: Path | None = None, dataset: str = "") -> dict:
    """Diversity and Frechet distance per guidance scale. Variations come from the disk cache when it
    holds one for every image at that scale (warmed with ``python -m onlinemix.cache warm``), else
    they are generated."""
    real = extractor.features(images, device, "features real")
    half = len(real) // 2
    rows = []
    for k in scales:
        cached = cached_variations(cache, dataset, ids, images.shape[-1], k) if cache is not None else None
        variations = cached if cached is not None else variations_for(images, ids, gen_cfg, k, device)
        fake = extractor.features(variations, device, f"features k={k:g}")
        rows.append({"guidance": k, "diversity": mean_cosine_distance(real, fake),
                     "frechet_distance": frechet_distance(real, fake),
                     "variations": "cache" if cached is not None else "generated"})
    return {"extractor": extractor.name, "fd_label": extractor.fd_label,
            "diversity_definition": "mean cosine distance (1 - cos) between the features of each real image "
                                    "and those of its variation",
            # Frechet distances of few samples are biased upwards: two halves of the real set show the floor.
            "frechet_distance_real_halves": frechet_distance(real[:half], real[half:2 * half]),
            "num_images": len(images), "scales": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib  # lazily: only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["guidance"] for r in result["scales"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ks, [r["diversity"] for r in result["scales"]], "o-")
    ax1.set(xlabel="guidance scale k", ylabel="diversity (mean cosine distance)", title="diversity")
    ax2.plot(ks, [r["frechet_distance"] for r in result["scales"]], "o-")
    ax2.axhline(result["frechet_distance_real_halves"], ls="--", c="grey", label="real vs real (two halves)")
    ax2.set(xlabel="guidance scale k", ylabel="Frechet distance", title=textwrap.fill(result["fd_label"], 60))
    ax2.title.set_fontsize(9)
    ax2.legend()
    fig.suptitle(f"{result['num_images']} images of {result['dataset']}; features: {result['extractor']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="onlinemix.stats",
        description="Diversity and Frechet distance of generated variations against their real images, per "
                    "guidance scale (MixDiff Figure 7). Writes stats.json and stats.png.")
    parser.add_argument("run_dir", type=Path, nargs="?", default=None,
                        help="a run directory: its dataset, generator settings and (by default) trained backbone")
    parser.add_argument("--config", type=Path, default=None, help="take the dataset and generator from this config "
                        "instead of the run's (needs --arch and --weights when no run is given)")
    parser.add_argument("--guidance", type=config_value("generator.guidance"), nargs="+", default=list(DEFAULT_GUIDANCE),
                        help=f"guidance scales (default {' '.join(f'{k:g}' for k in DEFAULT_GUIDANCE)})")
    parser.add_argument("--num-images", type=at_least(2), default=1000, help="real images, a fixed random subset (default 1000)")
    parser.add_argument("--arch", default=None, help="feature extractor: a torchvision architecture, e.g. inception_v3")
    parser.add_argument("--weights", type=Path, default=None, help="local weights file of --arch")
    parser.add_argument("--extractor-size", type=at_least(1), default=None, help="input side of --arch (default 224; 299 for inception_v3)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default RUN_DIR/stats)")
    args = parser.parse_args(argv)
    if args.run_dir is None and args.config is None:
        parser.error("give a run directory or --config")
    if (args.arch is None) != (args.weights is None):
        parser.error("--arch and --weights go together")
    if args.run_dir is None and args.arch is None:
        parser.error("without a run directory the feature extractor must be given with --arch and --weights")
    if args.run_dir is None and args.out is None:
        parser.error("without a run directory give --out")
    return args


def run(args: argparse.Namespace) -> dict:
    if args.run_dir is not None and not (args.run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{args.run_dir} has no {CONFIG_FILE}; is it an onlinemix run directory?")
    cfg = load_config(args.config or args.run_dir / CONFIG_FILE)
    extractor = (torchvision_extractor(args.arch, args.weights, args.extractor_size) if args.arch
                 else run_extractor(args.run_dir))
    real = load_real_images(cfg.data, cfg.store_root())
    ids = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:args.num_images].sort().values
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"dataset": cfg.data.dataset, "resolution": real.size,
              **sweep(real.images[ids], ids, cfg.generator, args.guidance, extractor, device,
                      cfg.cache_root() if cfg.cache.enabled else None, cfg.data.dataset),
              "generator": {k: v for k, v in asdict(cfg.generator).items() if k != "guidance"}}
    out = args.out or args.run_dir / "stats"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "stats.json", result)
    plot(result, out / "stats.png")
    print(format_result(result), flush=True)
    log.info("wrote %s and %s", out / "stats.json", out / "stats.png")
    return result


def format_result(result: dict) -> str:
    lines = [f"{result['num_images']} images of {result['dataset']}; {result['fd_label']}",
             f"  {'k':>6} {'diversity':>10} {'Frechet':>10}"]
    lines += [f"  {r['guidance']:>6g} {r['diversity']:>10.4f} {r['frechet_distance']:>10.4f}" for r in result["scales"]]
    lines.append(f"  real vs real (two halves): Frechet {result['frechet_distance_real_halves']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
