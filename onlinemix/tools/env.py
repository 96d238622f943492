"""What a bug report needs, in one command: ``python -m onlinemix env`` (``--json`` for a machine).

The versions that decide behaviour (torch and its CUDA, diffusers, transformers, accelerate, triton,
xformers), what ``auto`` would choose here for attention and views, the shared memory the ring gets,
and any installed package that a folder on ``sys.path`` shadows (the failure that a clone's top-level
folder named like a PyPI package causes, for example).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib.machinery import PathFinder
from pathlib import Path

import torch

import onlinemix
from onlinemix.exchange.ring import SHM_DIR
from onlinemix.generation.generator import xformers_unusable

LIBRARIES = ("torch", "torchvision", "diffusers", "transformers", "accelerate", "huggingface_hub", "safetensors",
             "webdataset", "triton", "xformers", "kernels", "numpy")
REPORT_VIEW_SIZE = 224  # what `train.augment_backend=auto` picks for ImageNet-size views
GiB = 2**30


def version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def project_commit() -> str | None:
    """The checkout's commit (with ``+dirty`` for uncommitted changes), or None outside a git checkout."""
    root = Path(onlinemix.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def gpus() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        found.append({"index": index, "name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(total / GiB, 1), "free_gib": round(free / GiB, 1)})
    return found


def xformers_status() -> tuple[bool, str]:
    """Whether xformers' attention runs here: it loads its kernels and, as diffusers checks, one tiny call works."""
    problem = xformers_unusable()
    if problem is not None:
        return False, problem
    if not torch.cuda.is_available():
        return False, "loads, but its kernels need a CUDA device"
    import xformers.ops

    try:
        q = torch.randn((1, 2, 40), device="cuda", dtype=torch.float16)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as e:
        return False, f"loads, but fails on this GPU ({e.__class__.__name__}: {str(e).splitlines()[0]})"
    return True, "loads and runs"


def triton_kernels_status() -> tuple[bool, str]:
    try:
        import onlinemix_kernels.augment  # noqa: F401
    except Exception as e:
        return False, f"{e.__class__.__name__}: {e}"
    return True, f"import from {Path(onlinemix_kernels.augment.__file__).parent}"


def view_backend() -> tuple[str, str]:
    from onlinemix.views.backends import choose_backend

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return choose_backend("auto", device, REPORT_VIEW_SIZE)


def shared_memory() -> dict | None:
    try:
        usage = shutil.disk_usage(SHM_DIR)
    except OSError:
        return None
    return {"size_gib": round(usage.total / GiB, 2), "free_gib": round(usage.free / GiB, 2)}


def _is_editable(dist: metadata.Distribution) -> bool:
    direct_url = dist.read_text("direct_url.json")
    return bool(direct_url) and json.loads(direct_url).get("dir_info", {}).get("editable", False)


def shadowed_packages() -> list[str]:
    """Installed packages whose import name resolves somewhere other than where they were installed.

    A folder of the current directory (``python -m``, pytest) or of a script's folder that carries the
    same name as an installed package wins over site-packages; every import of that package then gets
    the wrong code. Editable installs live outside site-packages by design and are not checked."""
    conflicts = []
    for name, distributions in sorted(metadata.packages_distributions().items()):
        if not name.isidentifier():
            continue
        dists = [metadata.distribution(d) for d in dict.fromkeys(distributions)]
        if any(_is_editable(d) for d in dists):
            continue
        try:  # the file system's answer for sys.path as it is now, whether or not the name was imported
            spec = PathFinder.find_spec(name, sys.path)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        locations = [spec.origin] if spec.origin and spec.origin not in ("built-in", "frozen") else []
        locations += list(spec.submodule_search_locations or [])
        if not locations:
            continue
        roots = [Path(str(d.locate_file(""))).resolve() for d in dists]
        where = Path(locations[0]).resolve()
        if not any(where.is_relative_to(root) for root in roots):
            owner = ", ".join(f"{d.metadata['Name']} {d.version}" for d in dists)
            conflicts.append(f"import name {name!r} resolves to {where}, not the installed {owner}")
    return conflicts


def collect() -> dict:
    """Everything the report prints, as plain data."""
    attention_ok, attention_why = xformers_status()
    kernels_ok, kernels_why = triton_kernels_status()
    backend, backend_why = view_backend()
    return {
        "onlinemix": {"version": onlinemix.__version__, "commit": project_commit(),
                      "location": str(Path(onlinemix.__file__).resolve().parent)},
        "python": f"{platform.python_version()} ({platform.python_implementation()}) at {sys.executable}",
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": {"version": torch.__version__, "cuda_build": torch.version.cuda,
                  "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                  "cuda_available": torch.cuda.is_available()},
        "gpus": gpus(),
        "libraries": {name: version_of(name) for name in LIBRARIES},
        "xformers": {"usable": attention_ok, "why": attention_why},
        "attention_auto": "xformers" if attention_ok else "sdpa",
        "triton_kernels": {"load": kernels_ok, "why": kernels_why},
        "view_backend_auto": {"backend": backend, "view_size": REPORT_VIEW_SIZE, "why": backend_why},
        "shm": shared_memory(),
        "conflicts": shadowed_packages(),
    }


def format_report(info: dict) -> str:
    lines = [f"onlinemix {info['onlinemix']['version']} (commit {info['onlinemix']['commit'] or 'unknown'}) "
             f"at {info['onlinemix']['location']}",
             f"Python {info['python']}", f"platform: {info['platform']}, {info['cpus']} CPUs"]
    t = info["torch"]
    lines.append(f"torch {t['version']}: CUDA build {t['cuda_build'] or 'none'}, cuDNN {t['cudnn'] or 'none'}, "
                 f"CUDA {'available' if t['cuda_available'] else 'not available'}")
    lines += [f"GPU {g['index']}: {g['name']} (sm {g['capability']}), {g['memory_gib']} GiB, {g['free_gib']} GiB free"
              for g in info["gpus"]] or ["GPUs: none"]
    lines.append("libraries: " + ", ".join(f"{name} {v or '(not installed)'}" for name, v in info["libraries"].items()))
    lines.append(f"xformers: {info['xformers']['why']}")
    lines.append(f"attention (generator.attention=auto): {info['attention_auto']}")
    lines.append(f"Triton kernels: {'load' if info['triton_kernels']['load'] else 'do not load'} "
                 f"({info['triton_kernels']['why']})")
    v = info["view_backend_auto"]
    lines.append(f"views (train.augment_backend=auto, {v['view_size']} px): {v['backend']} ({v['why']})")
    shm = info["shm"]
    lines.append(f"{SHM_DIR}: {shm['size_gib']} GiB, {shm['free_gib']} GiB free" if shm else f"{SHM_DIR}: not available")
    lines += [f"conflict: {c}" for c in info["conflicts"]] or ["conflicts: none"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m onlinemix env",
                                     description="Print the versions, devices and choices a bug report needs.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 1 if info["conflicts"] else 0
