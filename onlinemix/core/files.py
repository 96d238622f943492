"""What every module that writes files relies on: crash-safe writes, JSON that other tools can
read, and an early check that a directory can take files.

A file written in place can be seen half-written by a reader or after a crash; every shard,
record and store chunk goes through :func:`write_atomically` (temporary name, fsync, rename).
Python's ``json`` writes NaN and Infinity as bare words that are not JSON, so a statistic that is
undefined (the mean age of no synthetic view, a distance of no samples) would make a file other
tools reject. Every JSON the package writes goes through :func:`json_text`: non-finite numbers
become ``null``, and anything else that is not JSON is an error, not a silent bare word.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` to a temporary name, fsync, rename into place, fsync the directory: a reader
    sees the whole file or none of it, and a failed write (full disk) leaves nothing behind."""
    # Unique per writer: several processes (producers on several nodes) may write one name at once.
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth of lists, tuples and dicts) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_text(value: Any, indent: int | None = None) -> str:
    """Strict JSON of ``value``: NaN and infinities as null (never the bare words NaN / Infinity)."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)


def write_json(path: Path, value: Any, indent: int | None = 2) -> None:
    """Write ``value`` to ``path`` as strict JSON (:func:`json_text`)."""
    path.write_text(json_text(value, indent) + "\n")


def unwritable_reason(directory: Path) -> str | None:
    """Why files cannot be created in ``directory`` (made if missing), or None when they can: checked
    at start, so that a run fails before any work rather than when it first writes."""
    if directory.exists() and not directory.is_dir():
        return "it is a file, not a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{socket.gethostname()}-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None
