"""Typed run configuration: dataclass defaults, YAML presets, command-line overrides.

Every leaf is declared once, with its help text and allowed values, so that the YAML
loader, the command-line parser and ``--help`` all derive from the same declaration.
Validation happens before any process or file is created: an unknown key, a wrong type
or an out-of-range value raises :class:`ConfigError` naming the key, the value and what
is allowed.

A method's settings are declared next to its code (``DINOConfig`` in onlinemix/methods/dino.py)
and join :class:`Config` as a section named after the method, through the method's entry in
``registry.METHODS`` (its ``settings`` reference). ``Config`` knows those sections by name when it
is defined, and imports a section's class the first time it needs it: to make a default section or
to walk the leaves for parsing, ``--help`` or validation. So every process that builds or parses a
config has every method's section, whatever it imported before (a producer unpickling its config in
a spawned process, ``python -m onlinemix.cache`` taking ``--dino.*`` flags), and core imports no
method module when it is itself imported: the methods import core, and importing them from here
would be circular.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from onlinemix.core.errors import UserError
from onlinemix.core.registry import GENERATORS, METHODS, PAIRINGS, resolve

AIMS = ("none", "stale", "hard")  # generator.aim: the producers' order when they cannot cover every position


class ConfigError(UserError, ValueError):
    """A configuration value is unknown, mistyped, out of range or inconsistent."""


def opt(default: Any, help: str, *, low: float | None = None, high: float | None = None,
        choices: tuple[str, ...] | None = None, common: bool = False, fixed_on_resume: bool = False) -> Any:
    """Declare a config leaf with its documentation and allowed values. ``common``: a setting most runs
    set, which ``--help`` lists first; ``fixed_on_resume``: it shapes a checkpoint's weights or optimizer
    state, so ``--resume`` may not change it."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "choices": choices,
                                            "common": common, "fixed_on_resume": fixed_on_resume})


@dataclass
class DataConfig:
    dataset: str = opt("digits", "'digits' (bundled 8x8 handwritten digits, 1,797 images, 10 classes), a prepared "
                       "image store (python -m onlinemix.data prepare), or an ImageFolder directory (one "
                       "sub-directory per class) or webdataset shards (a .tar, a directory of them or a brace "
                       "pattern), which a run prepares into a store under <cache dir>/stores once", common=True)
    resolution: int = opt(32, "side R in pixels of the training views (random resized crops of the stored images)",
                          low=8, high=1024, common=True)
    stored_size: int = opt(0, "side S of the stored real images, which the ring and the cache also hold and the "
                           "views are cropped from; 0 = data.resolution. A prepared store sets it (its --size); for "
                           "ImageNet-style training at 224 the paper's crops want 256", low=0, high=2048)
    store_format: str = opt("raw", "format of a store a run prepares itself: 'raw' (uint8 pixels, fastest reads) or "
                            "'jpeg' (quality 90, about 10x smaller on disk)", choices=("raw", "jpeg"))
    holdout_fraction: float = opt(0.2, "fraction of images held out (never trained on) for the probe's test split",
                                  low=0.05, high=0.9)
    real_fraction: float = opt(1.0, "fraction of the training images the self-supervised trainer (and the producers) "
                               "use: a fixed class-stratified subset (seed 0), nested (the 0.25 subset lies inside the "
                               "0.5 one); the paper's limited-data study uses 0.25 / 0.5 / 1.0", low=1e-6, high=1.0)
    min_crop_scale: float = opt(0.2, "lower bound of RandomResizedCrop's area scale in the two-view recipes "
                                "(0.08 = SimCLR's ImageNet value; 0.2 suits the upscaled 8x8 digits)",
                                low=0.01, high=1.0)


@dataclass
class GeneratorConfig:
    model: str = opt("digits-tiny", "'digits-tiny' (a small image-variation model trained on the bundled digits, "
                     "shipped in the package: python -m onlinemix.tinymodel), 'digits-tiny-student' (its few-step "
                     "student with guidance built in), 'stub' (tiny random-weight diffuser, the "
                     "fastest), 'full-size-random' (the real architecture with random weights, for speed measurements) "
                     "or a hub id / local directory of a StableDiffusionImageVariationPipeline, e.g. "
                     "lambdalabs/sd-image-variations-diffusers", common=True)
    pipeline: str = opt("sd-image-variation", f"which diffusers pipeline generates: {GENERATORS.describe()}",
                        choices=GENERATORS.names())
    revision: str = opt("v2.0", "hub revision of an SD image-variation model (ignored for 'stub', 'digits-tiny', local "
                        "directories and Versatile Diffusion)")
    steps: int = opt(10, "denoising steps per image", low=1, high=1000, common=True)
    guidance: float = opt(3.0, "classifier-free guidance scale k (k <= 1 disables guidance and halves the cost)",
                          low=0.0, high=50.0, common=True)
    resolution: int = opt(0, "side of the generated images before they are resized to data.resolution; "
                          "0 = the size digits-tiny was trained at (8) for it, data.resolution for the others "
                          "(right for the stub; the real model is trained at 512)", low=0, high=2048, common=True)
    scheduler: str = opt("dpm++", "sampler", choices=("dpm++", "ddim", "pndm", "euler"))
    dtype: str = opt("auto", "generator precision; auto = fp16 on GPU, fp32 on CPU",
                     choices=("auto", "fp16", "bf16", "fp32"))
    attention: str = opt("auto", "attention backend; auto = xformers when it loads, else PyTorch SDPA",
                         choices=("auto", "sdpa", "xformers"))
    batch_size: int = opt(16, "images generated per pipeline call", low=1, high=1024)
    channels_last: bool = opt(False, "UNet and VAE in channels_last memory format (faster convolutions on GPUs)")
    compile: bool = opt(False, "torch.compile the UNet (slow first call, faster afterwards)")
    tiny_vae: str = opt("", "hub id or local directory of an AutoencoderTiny decoder (e.g. madebyollin/taesd) "
                        "used instead of the full VAE; '' = the model's own VAE")
    vae_slicing: bool = opt(False, "decode one image at a time (less peak memory, same output)")
    deep_cache_interval: int = opt(1, "reuse the UNet's deep features (DeepCache): a full UNet pass every N steps, "
                                   "the N-1 between run only its outermost blocks on the features cached at the "
                                   "last full pass; 1 = off (docs/generators.md: measured speed and quality)",
                                   low=1, high=50)
    tome_ratio: float = opt(0.0, "token merging in self-attention (ToMe for SD, tomesd): the share of tokens merged "
                            "in the full-resolution transformer blocks; 0 = off", low=0.0, high=0.75)
    guidance_fraction: float = opt(1.0, "classifier-free guidance on the first fraction of the UNet calls only; the "
                                   "rest run the conditional pass alone (half their cost); 1 = every step",
                                   low=0.0, high=1.0)
    aim: str = opt("none", "which images producers generate for first when they cannot cover every position ahead "
                   "of the trainers (docs/aim.md): 'none' = in the trainers' order; 'stale' = images whose newest "
                   "variation has served most and is oldest, or that have none; 'hard' = images whose last "
                   "pair (real and synthetic, or two real views) the model matched worst", choices=AIMS)
    strength: str = opt("fixed", "how different each variation is from its image (noise on its CLIP image "
                        "embedding, docs/aim.md): 'fixed' = generator.noise for every image; 'adaptive' = each "
                        "image's level moves within [noise_min, noise_max] from the model's pair similarity: "
                        "pairs easier than the batch's median get more noise next time, harder ones less",
                        choices=("fixed", "adaptive"))
    noise: float = opt(0.0, "noise on the image embedding, relative to its norm, of every variation (generator."
                       "strength=fixed) or of an image's first one (adaptive); 0 = the model's own variations",
                       low=0.0, high=2.0)
    noise_min: float = opt(0.0, "lowest noise level generator.strength=adaptive gives an image", low=0.0, high=2.0)
    noise_max: float = opt(0.5, "highest noise level generator.strength=adaptive gives an image", low=0.0, high=2.0)
    seed: int = opt(0, "base seed; each image's seed derives from (seed, image id, epoch)", low=0)
    stub_seed: int = opt(0, "seed of the tiny stub diffuser's random weights", low=0)
    cpu_threads: int = opt(1, "torch threads per producer when it runs on the CPU", low=1, high=256)


@dataclass
class ProducerConfig:
    max_restarts: int = opt(3, "times dead producers are restarted (in all) before the job stops", low=0, high=1000)
    lead_factor: float = opt(1.2, "claim images this many 'generation times' ahead of the trainers (measured "
                             "trainer rate x measured batch time), so pairs arrive just in time; 0 = claim at "
                             "the trainers' position", low=0.0, high=100.0)
    stuck_s: float = opt(300.0, "a live producer whose loop has not turned for this long (stopped, or a hung GPU "
                         "call) is reported once and counted (metrics: producer_stalls); still stuck after twice "
                         "as long, it is killed and restarted (within max_restarts). Longer than the slowest "
                         "batch, torch.compile's first call included; 0 = never", low=0.0, high=86_400.0)
    max_pairs_per_epoch: int = opt(0, "generation budget: a node's producers generate at most about this many pairs "
                                   "per epoch of training, paced along it (by the time the trainers are at "
                                   "position p, at most budget x p / positions per epoch, plus a batch), so that "
                                   "generation stays as scarce as a slower generator would keep it; 0 = no limit",
                                   low=0)
    memory_fraction: float = opt(0.0, "largest share of its GPU's memory a producer's PyTorch allocator may take "
                                 "(torch.cuda.set_per_process_memory_fraction), e.g. 0.3 when it shares a trainer's "
                                 "GPU (gen_devices); 0 = no limit", low=0.0, high=1.0)


@dataclass
class RingConfig:
    slots: int = opt(2048, "number of (real, synthetic) pair slots in shared memory", low=1, high=10_000_000)
    verify_checksums: bool = opt(True, "check each pair's CRC32 when a trainer copies it out")


@dataclass
class StalenessConfig:
    max_reuse: int = opt(4, "times one synthetic view may serve before it is retired", low=1, high=1_000_000)
    max_age: int = opt(4, "epochs after which a synthetic view is too old to serve", low=0, high=1_000_000)
    policy: str = opt("cached", "what a trainer does when an image has no acceptable synthetic view in the ring: "
                      "'cached' = at once an older variation from the disk cache (cache.enabled), else a real "
                      "view: never slower than training without generation; 'real' = at once a second augmented "
                      "real view; 'wait' for a producer (bounded by wait_timeout_s, then as 'cached'), which "
                      "slows the trainers to the producers' pace when generation is slower than training",
                      choices=("wait", "cached", "real"), common=True)
    wait_timeout_s: float = opt(5.0, "longest a batch waits for missing views under the 'wait' policy",
                                low=0.0, high=3600.0)


@dataclass
class CacheConfig:
    enabled: bool = opt(True, "producers write every generated pair to the on-disk cache, and trainers read "
                        "older variations from it (staleness.policy=cached, offline mode)")
    dir: str = opt("", "cache directory, shared by runs (and by nodes, on a shared filesystem); "
                   "empty = <output_dir>/cache")
    shard_pairs: int = opt(256, "pairs per cache shard; a producer commits a shard when it is full or after "
                           "flush_s", low=1, high=1_000_000)
    flush_s: float = opt(2.0, "commit a partly filled shard at the end of a producer batch this many seconds "
                         "after the last commit: pairs of slow generation reach the trainers at their next cache "
                         "refresh, and a killed producer loses at most this much", low=0.0, high=86_400.0)
    max_gb: float = opt(0.0, "size limit in GB: beyond it the oldest shards are evicted (0 = no limit)",
                        low=0.0, high=1e9)
    min_coverage: float = opt(0.95, "offline mode refuses to start when a smaller fraction of the training "
                              "images has a cached variation", low=0.0, high=1.0)
    fingerprint: str = opt("", "offline mode: the generator fingerprint (or a prefix of it) to train from, "
                           "when the cache holds pairs of several generators for this dataset and guidance")
    verify_reads: bool = opt(True, "check each cached image's CRC32 when a trainer reads it")
    format: str = opt("raw", "how new cache shards store the synthetic images: 'raw' uint8, lossless, read in place; "
                      "'jpeg', several times smaller, decoded on read (on the GPU when training there). Each shard "
                      "records its format, so a cache may hold both", choices=("raw", "jpeg"))
    jpeg_quality: int = opt(95, "JPEG quality of cache.format=jpeg shards", low=1, high=100)


@dataclass
class TrainConfig:
    method: str = opt("simclr", "training method (onlinemix/methods/; settings in the section named after it, "
                      "e.g. dino.*): " + METHODS.describe(), choices=METHODS.names(), common=True,
                      fixed_on_resume=True)
    pairing: str = opt("mixdiff", "view composition (onlinemix/views/compose.py): " + PAIRINGS.describe()
                       + ". A missing synthetic view falls back to the real image", choices=PAIRINGS.names(),
                       common=True)
    sequential_real_epochs: int = opt(0, "pairing 'sequential': epochs on real pairs before switching to synthetic "
                                      "ones; 0 = half of train.epochs", low=0, high=100_000)
    augmentation: str = opt("simclr", "view augmentation recipe (onlinemix/views/recipes.py): 'simclr' (MixDiff's real / "
                            "synthetic branch recipes; DINO's multi-crop recipe for dino) or 'no_augmentation' "
                            "(resize and flip only; DINO keeps its crops and drops colour, blur, solarisation)",
                            choices=("simclr", "no_augmentation"))
    backbone: str = opt("tinycnn", "backbone network", choices=("tinycnn", "resnet18", "resnet50"), common=True,
                        fixed_on_resume=True)
    width: int = opt(32, "channel width of the tinycnn backbone", low=4, high=1024, fixed_on_resume=True)
    epochs: int = opt(10, "training epochs over the real images", low=0, high=100_000, common=True)
    batch_size: int = opt(128, "real images per batch per trainer rank", low=2, high=65536, common=True)
    optimizer: str = opt("adamw", "optimizer (onlinemix/methods/optim.py); biases and norm parameters get no weight decay "
                         "(and no LARS trust ratio)", choices=("adamw", "sgd", "lars"),
                         fixed_on_resume=True)
    lr: float = opt(2e-3, "peak learning rate (before train.lr_scaling); linear warm-up, then cosine decay to "
                    "train.final_lr", low=0.0, high=100.0, common=True)
    lr_scaling: str = opt("none", "'linear' multiplies train.lr by global batch / 256 (SimCLR, BarlowTwins, DINO's "
                          "rule); 'none' uses it as given", choices=("none", "linear"))
    final_lr: float = opt(0.0, "learning rate at the end of the cosine decay (not scaled)", low=0.0, high=100.0)
    momentum: float = opt(0.9, "momentum of sgd and lars (ignored by adamw)", low=0.0, high=0.9999)
    weight_decay: float = opt(1e-4, "weight decay (decoupled for adamw)", low=0.0, high=10.0)
    clip_grad: float = opt(0.0, "clip the global gradient norm to this value (accelerator.clip_grad_norm_); "
                           "0 = off. DINO uses 3.0 (per parameter in the official code, global here)",
                           low=0.0, high=1e6)
    pair_weighting: bool = opt(False, "weight each pair's term of the loss by how well the model matches its two "
                               "views (cosine similarity of their embeddings, mapped to [0, 1], detached, batch mean "
                               "1), so that a variation that lost its image counts less (docs/aim.md)")
    warmup_epochs: float = opt(1.0, "epochs of linear learning-rate warm-up", low=0.0, high=10_000.0)
    seed: int = opt(0, "seed of the model initialisation, data order and augmentations", low=0)
    cpu_threads: int = opt(0, "torch threads of a trainer on the CPU; 0 = cores left after the producers",
                           low=0, high=256)
    augment_backend: str = opt("auto", "what makes the views: 'torchvision' (v2, one call per image, CPU: the ground "
                               "truth), 'torch' (the whole batch in a few tensor ops, on the training device), "
                               "'compiled' (torch with hue compiled into one C++ loop by TorchInductor, CPU only; "
                               "seconds of compiling at start), 'triton' (fused kernels, CUDA only); 'auto' = triton "
                               "on CUDA, on the CPU compiled for views of 128 px or more and torch below. The choice "
                               "and why are logged", choices=("auto", "torchvision", "torch", "compiled", "triton"))
    prefetch: int = opt(2, "batches the input pipeline makes ahead on a worker thread (pair lookup, gather, views, "
                        "copy to the device) while the current step runs; 0 = each batch in the training loop",
                        low=0, high=64)
    checkpoint_every: int = opt(0, "save a checkpoint every N steps (0 = by time only, and at the end)", low=0)
    checkpoint_every_s: float = opt(1800.0, "also save one when this many seconds have passed since the last (or "
                                    "the start): a run killed without warning loses at most that much; 0 = off",
                                    low=0.0)
    keep_checkpoints: int = opt(2, "complete checkpoints kept in the run directory, the newest; older ones are "
                                "deleted once a newer one is complete; 0 = keep all", low=0, high=1_000_000)
    log_every: int = opt(10, "write a metrics line every N steps", low=1)
    collective_timeout_s: float = opt(3600.0, "how long a rank waits in a collective (NCCL, gloo) before the job is "
                                      "declared hung; above the longest work one rank does alone (the kNN probe "
                                      "over the training split, a checkpoint save): NCCL's own default is 600",
                                      low=60.0)


@dataclass
class ProbeConfig:
    enabled: bool = opt(True, "after training, fit a linear probe on frozen features of real images")
    epochs: int = opt(300, "full-batch optimisation steps of the probe", low=1, high=100_000)
    lr: float = opt(0.05, "probe learning rate (Adam)", low=1e-6, high=10.0)
    weight_decay: float = opt(1e-4, "probe weight decay", low=0.0, high=10.0)
    knn_every: int = opt(1, "during training, every N epochs, score held-out real images by weighted kNN "
                         "against the training split's features (logged, and saved in metrics.jsonl; 0 = off)",
                         low=0, high=100_000)
    linear_every: int = opt(0, "during training, every N epochs, also fit the linear probe (as at the end of the "
                            "run) and save its accuracy in metrics.jsonl (0 = off)", low=0, high=100_000)
    knn_k: int = opt(20, "neighbours of the weighted kNN", low=1, high=100_000)
    knn_temperature: float = opt(0.07, "temperature of the weighted kNN's exp(similarity / T) votes",
                                 low=1e-4, high=100.0)


@dataclass
class LinearEvalConfig:
    """The paper's linear evaluation protocol (``python -m onlinemix.eval --protocol linear``): a linear layer on
    the frozen backbone, trained on augmented real images. Defaults from solo-learn's linear evaluation, which
    MixDiff builds on (scripts/linear/imagenet-100/*.yaml, solo/args/linear.py): SGD, momentum 0.9, no weight
    decay, batch 256, lr 0.1 per 256 images (its BYOL / Barlow Twins configs), 100 epochs, lr divided by 10 at
    epochs 60 and 80 (MultiStepLR; here at the same fractions of linear_eval.epochs)."""
    lr_milestones: typing.ClassVar[tuple[float, ...]] = (0.6, 0.8)  # fractions of the epochs
    lr_gamma: typing.ClassVar[float] = 0.1
    epochs: int = opt(100, "epochs of the linear classifier over the training images", low=1, high=100_000)
    batch_size: int = opt(256, "images per SGD step", low=1, high=65536)
    lr: float = opt(0.1, "SGD learning rate per 256 images, scaled linearly with linear_eval.batch_size (solo-learn's "
                    "configs raise it to 0.3 for DINO and 1.0 for SimCLR)", low=1e-6, high=100.0)
    momentum: float = opt(0.9, "SGD momentum", low=0.0, high=0.9999)
    weight_decay: float = opt(0.0, "SGD weight decay", low=0.0, high=10.0)


class MethodSettings:
    """Base of a method's config section: a dataclass of ``opt`` leaves, declared in the method's module
    and named by its entry in ``registry.METHODS``."""

    def check_consistency(self) -> None:
        """Reject values that are valid one by one but cannot run (called by ``Config.check_consistency``)."""


def _new_section(reference: str) -> MethodSettings:
    """A method's section with its defaults."""
    return resolve(reference)()


def _with_method_sections(cls: type) -> type:
    """Insert after ``train`` (which chooses the method) one field per method that has settings, named
    after it, holding the section its entry in ``registry.METHODS`` names (``build_method`` hands the
    method its own); the section's class is imported on first use."""
    annotations: dict[str, Any] = {}
    for name, annotation in cls.__annotations__.items():
        annotations[name] = annotation
        if name == "train":
            for method, reference in METHODS.settings().items():
                annotations[method] = MethodSettings
                setattr(cls, method, field(default_factory=partial(_new_section, reference),
                                           metadata={"section": reference}))
    cls.__annotations__ = annotations
    return cls


@dataclass
@_with_method_sections
class Config:
    gen_gpus: int = opt(1, "producer processes per node; each takes one GPU after the node's trainer ranks' "
                        "(cuda:T..cuda:T+gen_gpus-1 for T trainer ranks), or runs on the CPU when there is no GPU",
                        low=0, high=64, common=True)
    gen_devices: str = opt("", "comma-separated devices of the node's producers, one producer each, instead of "
                           "gen_gpus' placement: e.g. cuda:0 (one GPU shared with the trainer, time-sliced), "
                           "cuda:6,cuda:7, cpu; '' = gen_gpus")
    output_dir: str = opt("runs", "directory under which each run gets its own sub-directory", common=True)
    run_name: str = opt("", "name of the run directory (default: timestamp, method and pairing)", common=True)
    report_to: str = opt("auto", "experiment tracker of the main process (accelerate's): 'tensorboard' (event files "
                         "in the run directory), 'wandb', 'none'; 'auto' = tensorboard when it is installed. "
                         "metrics.jsonl is always written", choices=("auto", "tensorboard", "wandb", "none"))
    offline: bool = opt(False, "cache-warm offline mode: train from the disk cache alone, with no producer "
                        "process (the paper's precomputed setting); images without a cached variation get a "
                        "real second view", common=True)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    producer: ProducerConfig = field(default_factory=ProducerConfig)
    ring: RingConfig = field(default_factory=RingConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Here, one section per method with settings, named after it: simclr, barlowtwins, dino (_with_method_sections).
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    linear_eval: LinearEvalConfig = field(default_factory=LinearEvalConfig)

    def producer_device_list(self) -> list[str]:
        """``gen_devices`` as a list ([] = place ``gen_gpus`` producers after the trainers)."""
        if not self.gen_devices.strip():
            return []
        devices = [d.strip() for d in self.gen_devices.split(",")]
        bad = [d for d in devices if not re.fullmatch(r"cpu|cuda:\d+", d)]
        if bad:
            raise ConfigError(f"gen_devices={self.gen_devices!r}: {', '.join(repr(d) for d in bad)} is not a device; "
                              "expected a comma-separated list of 'cuda:N' and 'cpu', e.g. cuda:0 or cuda:6,cuda:7")
        if len(devices) > 64:
            raise ConfigError(f"gen_devices lists {len(devices)} devices: a node runs at most 64 producers")
        return devices

    @property
    def producers(self) -> int:
        """Producer processes per node: one per ``gen_devices`` entry when it is set, else ``gen_gpus``."""
        return len(self.producer_device_list()) or self.gen_gpus

    def cache_root(self) -> Path:
        return Path(self.cache.dir) if self.cache.dir else Path(self.output_dir) / "cache"

    def store_root(self) -> Path:
        """Where runs prepare the image stores of ImageFolder and webdataset datasets (shared by runs)."""
        return self.cache_root() / "stores"

    def check_consistency(self) -> None:
        """Reject combinations that are individually valid but cannot run."""
        self.producer_device_list()
        if self.offline and not self.cache.enabled:
            raise ConfigError("offline=true trains from the disk cache: it needs cache.enabled=true")
        if needs_synthetic_views(self) and self.producers < 1 and not self.offline:
            raise ConfigError(f"train.pairing={self.train.pairing} needs at least one producer: gen_gpus=0 is not "
                              "allowed (use offline=true to train from the disk cache, or train.pairing=real for "
                              "plain SSL)")
        for f in dataclasses.fields(self):
            if "section" in f.metadata:
                getattr(self, f.name).check_consistency()
        self.check_aim()
        if self.staleness.policy == "wait" and self.staleness.wait_timeout_s <= 0:
            raise ConfigError("staleness.policy=wait needs staleness.wait_timeout_s > 0 "
                              "(use staleness.policy=real to never wait)")
        if needs_synthetic_views(self) and not self.offline:
            self.check_ring_capacity(trainers_on_node=1)
        min_bytes = self.cache_shard_bytes()
        if self.cache.enabled and 0 < self.cache.max_gb * 1e9 < min_bytes:
            raise ConfigError(f"cache.max_gb={self.cache.max_gb:g} cannot hold one cache shard of cache.shard_pairs="
                              f"{self.cache.shard_pairs} images at data.resolution={self.data.resolution}, so every "
                              f"shard would be evicted as soon as it is written: set cache.max_gb to at least "
                              f"{math.ceil(min_bytes / 1e6) / 1e3:g} (0 = no limit), or lower cache.shard_pairs")

    def check_aim(self) -> None:
        """The aiming settings (docs/aim.md) must describe something that can run."""
        g = self.generator
        if g.noise_min > g.noise_max:
            raise ConfigError(f"generator.noise_min={g.noise_min:g} is above generator.noise_max={g.noise_max:g}")
        if g.strength == "adaptive" and not g.noise_min <= g.noise <= g.noise_max:
            raise ConfigError(f"generator.strength=adaptive starts every image at generator.noise={g.noise:g}, which "
                              f"must lie within [noise_min, noise_max] = [{g.noise_min:g}, {g.noise_max:g}]")
        if (g.noise or g.strength == "adaptive") and g.pipeline != "sd-image-variation":
            raise ConfigError(f"generator.noise and generator.strength=adaptive perturb the CLIP image embedding of "
                              f"the sd-image-variation pipeline; generator.pipeline={g.pipeline} does not support them")
        if self.train.pair_weighting and self.train.method == "supervised":
            raise ConfigError("train.pair_weighting weighs the pairs of a self-supervised loss; train.method="
                              "supervised has none")

    def cache_shard_bytes(self) -> int:
        """An upper bound of one full cache shard on disk: its raw synthetic images (a JPEG shard is smaller),
        the .npy header and its commit record (ids, seeds, epochs, CRC32s and lengths as JSON, under 64 bytes
        an image)."""
        return 128 + 256 + self.cache.shard_pairs * (3 * (self.data.stored_size or self.data.resolution) ** 2 + 64)

    def check_dataset_size(self, train_images: int, ranks: int) -> None:
        """Every step takes a whole global batch of distinct training images: the training split
        must hold at least one."""
        b = self.train.batch_size
        if train_images >= b * ranks:
            return
        if train_images // ranks >= 2:
            fix = f"lower train.batch_size to at most {train_images // ranks}"
        elif train_images >= 2:  # a pair of images per rank at least: a batch of one has no negatives
            fix = f"use more images or at most {train_images // 2} trainer rank(s)"
        else:
            fix = "use a dataset with at least 2 training images (or a lower data.holdout_fraction)"
        raise ConfigError(f"data.dataset={self.data.dataset} has {train_images} training images (after the "
                          f"data.holdout_fraction={self.data.holdout_fraction:g} hold-out, at data.real_fraction="
                          f"{self.data.real_fraction:g}), fewer than one global batch of {b * ranks} "
                          f"(train.batch_size={b} x {ranks} rank(s)): {fix}")

    def check_ring_capacity(self, trainers_on_node: int) -> None:
        """The ring must hold every local trainer's batch plus one batch in flight per producer;
        otherwise producers cannot place a whole batch ahead of the trainers and every batch stalls."""
        needed = trainers_on_node * self.train.batch_size + self.producers * self.generator.batch_size
        if self.ring.slots < needed:
            raise ConfigError(
                f"ring.slots={self.ring.slots} cannot hold {trainers_on_node} trainer batch(es) of "
                f"train.batch_size={self.train.batch_size} plus one batch of generator.batch_size="
                f"{self.generator.batch_size} per producer ({self.producers} producer(s)): need at least {needed}")


def needs_synthetic_views(cfg: Config) -> bool:
    """Whether a run consumes synthetic views, so needs producers and a ring: every pairing but
    'real' (whatever the method; 'sequential' too, for its synthetic epochs)."""
    return cfg.train.pairing != "real"


# ----------------------------------------------------------------------------- parsing

def _is_section(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp)


def _config_key(f: dataclasses.Field) -> str:
    """A field's key in presets, flags, messages and config.yaml: its name, less the trailing
    underscore that keeps a Python keyword usable as a name (``lambda_`` -> ``barlowtwins.lambda``)."""
    return f.name.removesuffix("_")


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    """A section's fields by config key."""
    return {_config_key(f): f for f in dataclasses.fields(cls)}


def _typed_fields(cls: type) -> dict[str, tuple[dataclasses.Field, type]]:
    """A section's fields by config key, with their types (a method's section imported from its module)."""
    hints = typing.get_type_hints(cls)
    return {key: (f, resolve(f.metadata["section"]) if "section" in f.metadata else hints[f.name])
            for key, f in _fields(cls).items()}


# Keys that moved into a method's own section: an old preset or flag is told the new key.
MOVED_KEYS: dict[str, str] = {
    "train.proj_dim": "simclr.proj_dim",
    "train.temperature": "simclr.temperature",
    "train.barlowtwins_projector": "barlowtwins.projector",
    "train.barlowtwins_lambda": "barlowtwins.lambda",
    **{f"train.dino_{key}": f"dino.{key}" for key in (
        "out_dim", "hidden_dim", "bottleneck_dim", "use_bn", "norm_last_layer", "student_temp", "teacher_temp",
        "warmup_teacher_temp", "warmup_teacher_temp_epochs", "momentum", "center_momentum",
        "freeze_last_layer_epochs", "global_crop_min", "local_crops")},
}


def _unknown_key(prefix: str, name: str, known: typing.Iterable[str], allowed: str = "") -> ConfigError:
    """The error for key ``prefix + name``: where it moved, else the closest of the ``known`` names."""
    key = f"{prefix}{name}"
    if key in MOVED_KEYS:
        return ConfigError(f"unknown key '{key}': it is now '{MOVED_KEYS[key]}'")
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{key}'{hint}{allowed}")


def leaves(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field, type]]:
    """All leaf fields as (dotted key, field, type), sections expanded."""
    out = []
    for key, (f, tp) in _typed_fields(cls).items():
        if _is_section(tp):
            out += leaves(tp, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", f, tp))
    return out


def _allowed(f: dataclasses.Field, tp: type) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    parts = [tp.__name__]
    if m.get("low") is not None:
        parts.append(f">= {m['low']}")
    if m.get("high") is not None:
        parts.append(f"<= {m['high']}")
    return " ".join(parts)


def _coerce(key: str, value: Any, f: dataclasses.Field, tp: type, from_text: bool) -> Any:
    """Convert and check one value; raise ConfigError naming key, value and what is allowed."""
    bad = ConfigError(f"{key}={value!r} is not valid: expected {_allowed(f, tp)}")
    if from_text and tp is not str:
        text = str(value).strip().lower()
        try:
            if tp is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise bad
                value = text in ("true", "1", "yes")
            else:
                value = tp(text)
        except ValueError:
            raise bad from None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad from None
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise bad
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise bad
    if m.get("low") is not None and value < m["low"]:
        raise bad
    if m.get("high") is not None and value > m["high"]:
        raise bad
    if tp is float and value != value:
        raise bad
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, from_text: bool) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    known = _typed_fields(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise _unknown_key(prefix, str(name), known, f"; allowed in this section: {', '.join(known)}")
        f, tp = known[name]
        if _is_section(tp):
            kwargs[f.name] = _build(tp, value, f"{key}.", from_text)
        else:
            kwargs[f.name] = _coerce(key, value, f, tp, from_text)
    return cls(**kwargs)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _nest(dotted: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def check_resume_overrides(saved: Config, resumed: Config) -> None:
    """Refuse, before anything loads, a --resume that changes what the checkpoint's state is shaped by
    (the leaves declared ``fixed_on_resume``)."""
    fixed = [key for key, f, _ in leaves() if f.metadata["fixed_on_resume"]]
    old, new = _flat(to_dict(saved)), _flat(to_dict(resumed))
    changed = [f"{key} {old[key]!r} -> {new[key]!r}" for key in fixed if old[key] != new[key]]
    if changed:
        raise ConfigError(f"--resume cannot change {', '.join(changed)}: the checkpoint's weights and optimizer "
                          f"state are shaped by them (fixed on resume: {', '.join(fixed)}); start a new "
                          "run for another setting")


def _flat(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in nested.items():
        flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return flat


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as nested plain values under its keys: what presets and config.yaml hold."""
    out = {}
    for key, f in _fields(type(cfg)).items():
        value = getattr(cfg, f.name)
        out[key] = to_dict(value) if _is_section(value) else value
    return out


def read_preset(path: Path, including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML preset's values. ``base: OTHER.yaml`` (relative to the file) loads OTHER first and
    lets this file override it, so one experiment is a few lines on top of its recipe."""
    if not path.is_file():
        what = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
        raise ConfigError(f"config file {path} {what}" + (f" (the base of {including[-1]})" if including else ""))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = (path.parent / str(base)).resolve()
    if base_path in including or base_path == path.resolve():
        raise ConfigError(f"config file {path}: base {base} includes itself")
    return _merge(read_preset(base_path, (*including, path.resolve())), data)


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None) -> Config:
    """Defaults, then the YAML preset at ``path`` (and its bases), then textual ``overrides`` (dotted keys)."""
    data = read_preset(Path(path)) if path is not None else {}
    cfg = _build(Config, data, "", from_text=False)
    if overrides:
        cfg = _apply_text_overrides(cfg, overrides)
    cfg.check_consistency()
    return cfg


def parse_value(key: str, text: str) -> Any:
    """The value of a known dotted ``key`` given as text, converted and range-checked as declared:
    how commands check their own flags that stand for a config key."""
    (f, tp), = [(f, tp) for k, f, tp in leaves() if k == key]
    return _coerce(key, text, f, tp, from_text=True)


def _apply_text_overrides(cfg: Config, overrides: dict[str, str]) -> Config:
    types = {key: (f, tp) for key, f, tp in leaves()}
    typed = {}
    for key, text in overrides.items():
        if key not in types:
            raise _unknown_key("", key, types)
        f, tp = types[key]
        typed[key] = _coerce(key, text, f, tp, from_text=True)
    return _build(Config, _merge(to_dict(cfg), _nest(typed)), "", from_text=False)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
