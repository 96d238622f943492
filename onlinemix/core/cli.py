"""What the command lines share: one flag per config key, derived from the config declaration,
and how the eval and stats commands run and report their users' errors."""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from onlinemix.core.config import ConfigError, leaves, parse_value
from onlinemix.core.errors import UserError

COMMON_SETTINGS = "common settings"


def add_config_options(parser: argparse.ArgumentParser, common: argparse._ArgumentGroup | None = None) -> None:
    """One ``--section.key`` flag per config leaf (dest = the dotted key, default None = not given);
    ``config_overrides`` collects the ones given. Shared by every command that takes a config.

    ``--help`` lists the leaves declared ``common`` first, in ``common`` (a new "common settings" group
    when not given; a command adds its own everyday flags to it), then every other leaf in an "advanced
    SECTION settings" group per section: the few settings most runs change are not lost among the
    hundred that tune a method or the pipeline."""
    if common is None:
        common = parser.add_argument_group(COMMON_SETTINGS)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, f, tp in leaves():
        section = key.split(".")[0] if "." in key else "run"
        group = common if f.metadata["common"] else groups.setdefault(
            section, parser.add_argument_group(f"advanced {section} settings"))
        flags = ["--" + key.replace("_", "-")]
        if "_" in key:
            flags.append("--" + key)
        help_text = f.metadata["help"]
        if f.metadata.get("choices"):
            help_text += f" ({' | '.join(f.metadata['choices'])})"
        # A bare boolean flag (``--offline``) means true; ``--offline false`` also works.
        boolean = {"nargs": "?", "const": "true"} if tp is bool else {}
        group.add_argument(*flags, dest=key, default=None, metavar=tp.__name__.upper(),
                           help=f"{help_text} [default: {f.default}]", **boolean)
    parser.set_defaults(**{key: None for key, _, _ in leaves()})


def config_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The config overrides the user actually gave (dotted key -> text)."""
    return {key: getattr(args, key) for key, _, _ in leaves() if getattr(args, key) is not None}


def config_value(key: str) -> Callable[[str], Any]:
    """An argparse ``type`` for a command's flag that stands for config key ``key`` (``--guidance``
    for ``generator.guidance``): the value is parsed and range-checked as the config declares it,
    so a command never runs with a value that training would refuse (a negative or NaN guidance)."""
    def parse(text: str) -> Any:
        try:
            return parse_value(key, text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (flags without a config key: counts of images, workers)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not valid: expected an integer >= {low}")
        return value

    parse.__name__ = "int"
    return parse


def parse_config_args(parser: argparse.ArgumentParser,
                      argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parsed args and the config overrides given. A ``--section.key`` flag the config does not
    declare is passed on as an override too, so that loading the config names it with the key it
    moved to or the closest known one, instead of argparse's bare 'unrecognized arguments'."""
    args, rest = parser.parse_known_args(argv)
    overrides = config_overrides(args)
    unrecognized = []
    while rest:
        flag = rest.pop(0)
        name, has_value, value = flag.removeprefix("--").partition("=")
        if not flag.startswith("--") or "." not in name:
            unrecognized.append(flag)
            continue
        if not has_value:
            value = rest.pop(0) if rest and not rest[0].startswith("--") else "true"
        overrides[name.replace("-", "_")] = value
    if unrecognized:
        parser.error(f"unrecognized arguments: {' '.join(unrecognized)}")
    return args, overrides


def positive_number(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (rates, durations)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not valid: expected a finite number > 0")
    return value


positive_number.__name__ = "number"
# Usage lines for commands that take every config key as a flag: argparse's own lists them all (70 lines
# before each argument error); --help still does.
CONFIG_FLAGS_USAGE = "[--config FILE] [--section.key VALUE ...]  (--help lists every option)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onlinemix.train",
        usage=f"%(prog)s [--resume auto|RUN_DIR|CHECKPOINT_DIR] [--gen-gpus N] {CONFIG_FLAGS_USAGE}",
        description="Self-supervised training with synthetic views generated on the fly (MixDiff). "
                    "Producers run a Stable Diffusion image-variation model and fill a shared-memory ring of "
                    "(real, synthetic) pairs; trainers consume it through accelerate. With no arguments, trains "
                    "the embedded default: SimCLR + MixDiff, tiny convnet, bundled digits, digits-tiny variation model, CPU.")
    common = parser.add_argument_group(COMMON_SETTINGS)
    common.add_argument("--config", type=Path, default=None,
                        help="YAML preset (see configs/); command-line flags override it")
    common.add_argument("--resume", default=None, metavar="auto|RUN_DIR|CHECKPOINT_DIR",
                        help="continue a run from a complete checkpoint, with its saved config (flags given here "
                             "still override it, e.g. more --train.epochs): RUN_DIR's newest, that checkpoint "
                             "directory, or 'auto': the newest of run --run-name in --output-dir (of any run "
                             "there without --run-name)")
    add_config_options(parser, common)
    return parser


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    """Parsed args and the config overrides the user actually gave (dotted key -> text)."""
    return parse_config_args(build_parser(), argv)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (workers stopped, shared memory released, committed work kept)."""


def stop_on_sigterm() -> None:
    """Make SIGTERM raise :class:`Terminated` in the main thread, so it stops a command as Ctrl-C does."""
    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)


class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (a cluster's preemption) while entered (training and its last
    checkpoint): the first one is recorded in ``received`` for the training loop, which stops after its
    current step with a checkpoint. A second Ctrl-C stops at once, as outside training; more SIGTERMs
    change nothing: under a scheduler plus accelerate or torchrun a trainer often gets one from each, and
    the preemption checkpoint is what they all ask for."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopRequests:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        """The handlers from before; after a stop request, SIGTERM stays ignored while the process winds up."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.received is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt()


def stopped_by(e: KeyboardInterrupt) -> signal.Signals:
    """The signal behind a KeyboardInterrupt; a command stopped by it exits with 128 + its number, as a
    shell reports a process killed by it: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    return signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT


def run_command(run: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    """The eval and stats command lines: INFO logging, and their users' errors as an exit message."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop_on_sigterm()
    try:
        run(args)
    except (UserError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt as e:
        print(f"interrupted ({stopped_by(e).name})", file=sys.stderr)
        sys.exit(128 + stopped_by(e))
