"""``python -m onlinemix.tinymodel train | distill | quality``: train digits-tiny, distil a few-step student of it,
measure their variations."""

from __future__ import annotations

import argparse
import importlib.util
import logging
from dataclasses import fields
from pathlib import Path

import torch

from onlinemix.core.cli import at_least, config_value, run_command
from onlinemix.core.config import DataConfig, GeneratorConfig
from onlinemix.core.files import write_json
from onlinemix.generation.generator import model_location
from onlinemix.tinymodel.distill import DistillSettings, distill
from onlinemix.tinymodel.quality import format_quality, measure
from onlinemix.tinymodel.train import TrainSettings, train
from onlinemix.tools.stats import DEFAULT_GUIDANCE

log = logging.getLogger(__name__)
BUNDLED = "digits-tiny"
STUDENT = "digits-tiny-student"


def add_settings(command: argparse.ArgumentParser, settings: type) -> None:
    """One flag per field of a settings dataclass, with its help and default."""
    for f in fields(settings):
        kind = float if f.type == "float" else at_least(0)
        command.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default,
                             help=f"{f.metadata['help']} [default: {f.default}]")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="onlinemix.tinymodel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train", help="train the pipeline on the digits' training split and save it "
                                    "(with training.json and loss.png)")
    train_cmd.add_argument("--out", type=Path, default=Path(model_location(BUNDLED)),
                           help="pipeline directory (default: the bundled digits-tiny, replaced)")
    add_settings(train_cmd, TrainSettings)
    train_cmd.add_argument("--threads", type=at_least(1), default=1,
                           help="torch threads; the weights depend on it (default 1, as the bundled model)")
    distill_cmd = commands.add_parser("distill", help="distil a few-step student of a variation model with its "
                                      "guidance built in, and save it (with distillation.json and loss.png)")
    distill_cmd.add_argument("--teacher", default=BUNDLED, help="generator.model of the teacher (default digits-tiny)")
    distill_cmd.add_argument("--out", type=Path, default=Path(model_location(STUDENT)),
                             help="student directory (default: the bundled digits-tiny-student, replaced)")
    add_settings(distill_cmd, DistillSettings)
    distill_cmd.add_argument("--threads", type=at_least(1), default=1,
                             help="torch threads; the weights depend on it (default 1, as the bundled student)")
    quality = commands.add_parser("quality", help="class accuracy, distances and diversity of the variations of "
                                  "held-out digits per guidance scale; writes quality.json")
    quality.add_argument("--model", default=BUNDLED, help="generator.model to measure (default digits-tiny)")
    quality.add_argument("--guidance", type=config_value("generator.guidance"), nargs="+",
                         default=list(DEFAULT_GUIDANCE), help="guidance scales (default: the paper's)")
    quality.add_argument("--steps", type=config_value("generator.steps"), default=GeneratorConfig().steps,
                         help="denoising steps (default: the run's)")
    quality.add_argument("--num-images", type=at_least(2), default=359,
                         help="held-out digits measured (default 359: all of them)")
    quality.add_argument("--out", type=Path, default=Path("runs/digits-tiny-quality"), help="output directory")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    if args.command == "train":
        if importlib.util.find_spec("matplotlib") is None:  # checked now, not after the training
            raise ValueError("the training's loss curve needs matplotlib: pip install matplotlib")
        torch.set_num_threads(args.threads)
        settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
        train(args.out, settings)
        log.info("wrote %s", args.out)
        return
    if args.command == "distill":
        torch.set_num_threads(args.threads)
        settings = DistillSettings(**{f.name: getattr(args, f.name) for f in fields(DistillSettings)})
        record = distill(GeneratorConfig(model=args.teacher), DataConfig(), args.out, settings)
        log.info("wrote %s: %d-step student, %d teacher samples, %.0fs", args.out, record["student_steps"],
                 record["training_pairs"], record["seconds"])
        return
    result = measure(GeneratorConfig(model=args.model, steps=args.steps), args.guidance, args.num_images)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "quality.json", result)
    print(format_quality(result), flush=True)
    log.info("wrote %s", args.out / "quality.json")


def main(argv: list[str] | None = None) -> None:
    run_command(run, parse_args(argv))


if __name__ == "__main__":
    main()
