"""``python -m onlinemix.data`` (``onlinemix-data``): prepare, inspect and verify image stores."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from onlinemix.data.prepare import (
    DEFAULT_QUALITY,
    DEFAULT_SIZE,
    MAX_PIXELS,
    Interrupted,
    PrepareError,
    Settings,
    default_workers,
    prepare,
)
from onlinemix.data.store import SKIPPED_FILE, StoreError, store_info, verify_store

EXIT_INTERRUPTED = 130

COMMANDS = {
    "prepare": "decode SRC once into a memory-mapped image store that every process on a node shares; "
               "resumable: run the same command again after Ctrl-C, a kill or a full disk",
    "info": "images, classes, size, format, bytes on disk, skipped images, chunk files present",
    "verify": "check every chunk file's CRC32 (exit status 1 naming each bad chunk)",
}

EPILOG = """examples:
  python -m onlinemix.data prepare /data/imagenet/train --out /data/stores/in1k-raw224 --size 224
  python -m onlinemix.data prepare '/data/in1k-wds/train-{0000..1023}.tar' --out /data/stores/in1k-jpeg256 \\
      --format jpeg --size 256 --classes /data/in1k-wds/classes.txt
  python -m onlinemix.data prepare digits --out runs/stores/digits32 --size 32
  python -m onlinemix.data info /data/stores/in1k-raw224
  python -m onlinemix.data verify /data/stores/in1k-raw224"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onlinemix.data", description="prepare, inspect and verify image stores",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser("prepare", help=COMMANDS["prepare"], description=COMMANDS["prepare"])
    p.add_argument("source", metavar="SRC", help="an ImageFolder directory (SRC/<class>/<image>), a .tar shard, a "
                   "directory of .tar shards, a brace pattern 's-{000..099}.tar' (webdataset samples: an image "
                   "and an integer cls), or 'digits' (the bundled set)")
    p.add_argument("--out", type=Path, required=True, metavar="STORE", help="the store directory")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, metavar="S",
                   help=f"raw: short side resized to S and centre-cropped to S x S; jpeg: longer side capped at "
                        f"S (default {DEFAULT_SIZE})")
    p.add_argument("--format", choices=("raw", "jpeg"), default="raw",
                   help="raw uint8 pixels (fastest reads, 3 S^2 bytes an image) or JPEG (default raw)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY, metavar="Q",
                   help=f"JPEG quality 1..100 (default {DEFAULT_QUALITY})")
    p.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                   help="decoding processes (default: all cores); the store is the same for any N")
    p.add_argument("--chunk-images", type=int, default=0, metavar="N",
                   help="source images per chunk file, the unit of resuming (default: 128 MiB of raw pixels)")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                   help=f"skip images with more pixels, as decompression bombs (default {MAX_PIXELS}, Pillow's)")
    p.add_argument("--classes", type=Path, default=None, metavar="FILE",
                   help="webdataset sources: class names, one per line, line i naming cls i (default: '0', '1', ...)")
    for name in ("info", "verify"):
        q = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        q.add_argument("store", type=Path, metavar="STORE")
        if name == "info":
            q.add_argument("--json", action="store_true", help="print JSON instead of text")
    return parser


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def run_prepare(args: argparse.Namespace) -> int:
    settings = Settings(args.size, args.format, args.quality, args.chunk_images, args.max_pixels)
    result = prepare(args.source, args.out, settings, args.workers, args.classes,
                     progress=not os.environ.get("TQDM_DISABLE"))
    state = ("already complete" if result.already_complete else
             f"{result.chunks_built} chunk(s) built" + (f", {result.chunks_already} kept from an earlier run"
                                                          if result.chunks_already else ""))
    skipped = f"{result.skipped} skipped (listed in {result.root / SKIPPED_FILE})" if result.skipped else "none skipped"
    print(f"store {result.root}: {result.images} images, {skipped}, {result.chunks} chunks, "
          f"{gib(result.data_bytes)}; {state}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    wrong = info["chunks_missing_or_wrong_size"]
    source = info["source"]
    print(f"store        {info['path']} (format version {info['format_version']})\n"
          f"images       {info['images']} in {info['classes']} classes\n"
          f"format       {info['format']}" + (f", quality {info['quality']}" if info["quality"] else "")
          + f", size {info['size']} px\n"
          f"source       {source['kind']} {source['path']} ({source['images']} images, digest {source['digest']})\n"
          f"skipped      {info['skipped']}" + (f" (listed in {Path(info['path']) / SKIPPED_FILE})" if info["skipped"]
                                                else "") + "\n"
          f"bytes        {gib(info['data_bytes'])} of images, {gib(info['bytes_on_disk'])} on disk\n"
          f"checksums    {info['chunks']} chunks, "
          + (f"{len(wrong)} missing or of the wrong size: {', '.join(map(str, wrong[:10]))}"
             if wrong else "all present at their recorded sizes")
          + "; CRC32 not read (run verify)")
    return 1 if wrong else 0


def run_verify(args: argparse.Namespace) -> int:
    problems = verify_store(args.store)
    for line in problems:
        print(f"bad {line}")
    print(f"verify {args.store}: " + (f"{len(problems)} problem(s); prepare the store again into a new directory"
                                      if problems else "every chunk matches its CRC32"))
    return 1 if problems else 0


RUNNERS = {"prepare": run_prepare, "info": run_info, "verify": run_verify}


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = RUNNERS[args.command](args)
    except (PrepareError, StoreError) as e:
        sys.exit(f"onlinemix.data {args.command}: {e}")
    except (KeyboardInterrupt, Interrupted):
        if args.command == "prepare":
            print("onlinemix.data prepare: interrupted; the chunks committed so far are kept: run the same command "
                  "again to resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code)


if __name__ == "__main__":
    main()
