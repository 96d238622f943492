"""``python -m onlinemix.cache`` (``onlinemix-cache``): warm, inspect, verify, export, import and migrate
the on-disk cache of generated images. Every subcommand takes the training config (``--config FILE`` and
the same ``--section.key VALUE`` flags as training), so ``--cache.dir``, ``--data.dataset`` and the
``--generator.*`` settings mean exactly what they mean to a training run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from onlinemix.cache.maintenance import (
    describe_keys,
    format_info,
    format_verify,
    key_info,
    not_a_cache,
    quarantined,
    verify_key,
)
from onlinemix.cache.migrate import format_migrate, migrate
from onlinemix.cache.store import FORMAT_VERSION, CacheError
from onlinemix.cache.transfer import export, import_tars
from onlinemix.core.cli import add_config_options, at_least, parse_config_args, stop_on_sigterm, stopped_by
from onlinemix.core.config import Config, ConfigError, DataConfig, load_config
from onlinemix.core.files import json_text
from onlinemix.data import DataError, RealImages, load_real_images
from onlinemix.generation.warm import default_workers, summary, warm

COMMANDS = {
    "warm": "generate the variations of every training image into the cache (the paper's precompute): "
            "only the (image, variation) pairs missing from the cache, with N worker processes; resumable",
    "info": "per cache key: generator, images covered, variations-per-image histogram, shards, disk use, "
            "uncommitted leftovers",
    "verify": "check every committed shard against its record's CRC32s and shape; move corrupt ones to "
              "quarantine/<key>/ (exit status 1 when anything was quarantined); list orphan shards",
    "export": "write the cache as webdataset tar shards: each synthetic image as stored (lossless PNG for raw "
              "shards, the JPEG itself for jpeg shards)",
    "import": "read exported webdataset tar shards into the cache (their synthetic images; also tars of the old "
              "layout's real + synthetic pairs), skipping variations already there",
    "migrate": "convert a cache written in the old layout (real + synthetic pairs) in place to synthetic-only "
               "shards in --cache.format (raw: bit for bit); resumable; stop runs writing the cache first",
}

EPILOG = """examples:
  python -m onlinemix.cache warm --variations 4 --cache.dir /data/cache          # digits, stub generator
  python -m onlinemix.cache warm --producers 8 --data.dataset /data/imagenet100/train --data.resolution 224 \\
      --generator.model lambdalabs/sd-image-variations-diffusers --generator.resolution 512 --cache.dir /data/cache
  python -m onlinemix.cache info --coverage --cache.dir /data/cache
  python -m onlinemix.cache verify --cache.dir /data/cache
  python -m onlinemix.cache export --out /data/cache-tars --cache.dir /data/cache
  python -m onlinemix.cache import /data/cache-tars --cache.dir /other/cache
  python -m onlinemix.cache migrate --cache.dir /data/cache                      # after upgrading from format 1
Run `python -m onlinemix.cache SUBCOMMAND --help` for a subcommand's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onlinemix.cache", description=__doc__.split("\n\n")[0].replace("\n", " "), epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    commands = {}
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", type=Path, default=None, help="YAML preset (see configs/); flags override it")
        commands[name] = p
    commands["warm"].add_argument("--producers", type=at_least(1), default=None, metavar="N",
                                  help="worker processes, one generator each (default: one per visible GPU, "
                                       "or 1 on the CPU)")
    commands["warm"].add_argument("--variations", type=at_least(1), default=1, metavar="K",
                                  help="variations per training image (default 1); variation k uses the seed an "
                                       "online run uses in epoch k and is stored with epoch=k")
    commands["info"].add_argument("--coverage", action="store_true",
                                  help="load each key's dataset (decoding its images) to report the fraction of "
                                       "its training images covered")
    commands["info"].add_argument("--json", action="store_true", help="print JSON instead of text")
    commands["verify"].add_argument("--quarantine-orphans", action="store_true",
                                    help="also move shards without a commit record to quarantine (do not use "
                                         "while a writer may be between writing a shard and its record)")
    commands["export"].add_argument("--out", type=Path, required=True, metavar="DIR",
                                    help="directory for the tar shards, named <key>-NNNNNN.tar")
    commands["export"].add_argument("--key", action="append", default=[], metavar="PREFIX",
                                    help="export only keys starting with PREFIX (repeatable; default all keys)")
    commands["export"].add_argument("--with-real", action="store_true",
                                    help="also write each pair's real image (real.png), read by id from the key's "
                                         "dataset, for readers outside onlinemix (import does not need it)")
    commands["export"].add_argument("--samples-per-tar", type=at_least(1), default=10_000, metavar="N",
                                    help="pairs per tar shard (default 10000)")
    commands["import"].add_argument("sources", nargs="+", metavar="SRC",
                                    help="tar shard, directory of tar shards, or brace pattern 's-{000..009}.tar'")
    for p in commands.values():
        add_config_options(p)
    return parser


def run_warm(cfg: Config, args: argparse.Namespace) -> int:
    workers = args.producers or default_workers()
    result = warm(cfg, args.variations, workers)
    print(summary(result))
    return 128 + stopped_by(result.interrupted) if result.interrupted else 0


def real_images_of(desc: dict, cfg: Config) -> RealImages:
    """The real images of the dataset a key was made for, at the key's resolution (its stored size)."""
    data = DataConfig(dataset=desc["dataset"], resolution=desc["resolution"], holdout_fraction=cfg.data.holdout_fraction)
    return load_real_images(data, cfg.store_root())


def train_ids_of(desc: dict, cfg: Config) -> np.ndarray | None:
    """The training ids of the dataset a key was made for, or None (with a note) when it cannot be loaded."""
    try:
        return real_images_of(desc, cfg).train_ids.numpy()
    except (KeyError, DataError, OSError) as e:
        print(f"note: cannot load the dataset of this key to measure coverage ({e})", file=sys.stderr)
        return None


def run_info(cfg: Config, args: argparse.Namespace) -> int:
    root = cfg.cache_root()
    keys = describe_keys(root)
    infos = [key_info(root, key, desc, train_ids_of(desc, cfg) if args.coverage else None)
             for key, desc in keys.items()]
    held = quarantined(root)
    if args.json:
        print(json_text({"root": str(root), "keys": infos, "quarantine": held}, indent=2))
        return 0
    problem = not_a_cache(root)
    print(f"cache {root}: {len(infos)} key(s)" + (f" ({problem})" if problem else ""))
    for info in infos:
        print(format_info(info))
    for key, n in held.items():
        print(f"quarantine/{key}: {n} file(s) set aside by verify")
    return 0


def run_verify(cfg: Config, args: argparse.Namespace) -> int:
    root = cfg.cache_root()
    problem = not_a_cache(root)
    if problem:  # nothing verified is not "every shard is good"
        raise CacheError(f"{problem}; give --cache.dir the directory that training and `cache warm` write "
                         "(default <output_dir>/cache)")
    results = [verify_key(root, key, args.quarantine_orphans) for key in describe_keys(root)]
    for res in results:
        print(format_verify(res))
    moved = sum(len(r["corrupt"]) for r in results)
    print(f"verify: {len(results)} key(s), {moved} corrupt file(s) moved to {root / 'quarantine'}" if moved
          else f"verify: {len(results)} key(s), every committed shard is good")
    return 1 if moved else 0


def run_export(cfg: Config, args: argparse.Namespace) -> int:
    def real_of(desc: dict) -> Callable[[int], np.ndarray]:
        images = real_images_of(desc, cfg).images
        if images.shape[-1] != desc["resolution"]:
            raise DataError(f"dataset {desc['dataset']} gives {images.shape[-1]} px images, the cache holds "
                            f"{desc['resolution']} px variations")
        return lambda real_id: images[real_id].numpy()

    written = export(cfg.cache_root(), args.out, args.key, args.samples_per_tar, real_of if args.with_real else None)
    for key, n in written.items():
        print(f"exported {n} pairs of {key} to {args.out}/{key}-*.tar")
    return 0


def run_import(cfg: Config, args: argparse.Namespace) -> int:
    added, skipped, keys = import_tars(cfg.cache_root(), args.sources, cfg.cache.shard_pairs, cfg.cache.format,
                                       cfg.cache.jpeg_quality)
    print(f"imported {added} pairs, skipped {skipped} already cached; key(s) {', '.join(keys) or 'none'}")
    return 0


def run_migrate(cfg: Config, args: argparse.Namespace) -> int:
    results = migrate(cfg.cache_root(), cfg.cache.format, cfg.cache.jpeg_quality)
    for res in results:
        print(format_migrate(res))
    moved = sum(len(r["corrupt"]) for r in results)
    print(f"migrate: {len(results)} key(s) in cache format {FORMAT_VERSION}" + (f"; {moved} corrupt shard(s) moved to "
                                                                    f"{cfg.cache_root() / 'quarantine'}" if moved else ""))
    return 1 if moved else 0


RUNNERS = {"warm": run_warm, "info": run_info, "verify": run_verify, "export": run_export, "import": run_import,
           "migrate": run_migrate}


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_config_args(build_parser(), argv)
    stop_on_sigterm()
    try:
        cfg = load_config(args.config, overrides)
        code = RUNNERS[args.command](cfg, args)
    except (ConfigError, CacheError, DataError) as e:
        sys.exit(f"onlinemix.cache {args.command}: {e}")
    except KeyboardInterrupt as e:
        print(f"onlinemix.cache {args.command}: interrupted ({stopped_by(e).name})", file=sys.stderr)
        sys.exit(128 + stopped_by(e))
    sys.exit(code)


if __name__ == "__main__":
    main()
