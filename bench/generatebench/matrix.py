"""The rows bench/generate.py measures: one factor at a time around a baseline (the package's defaults), then
the fastest values combined; or the whole cartesian product."""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch

from onlinemix.generation.generator import resolve_dtype

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

FACTORS = ("dtype", "attention", "steps", "batch", "compile", "channels_last", "tiny_vae")


@dataclasses.dataclass(frozen=True)
class Spec:
    """The settings of one row, a value per factor."""

    dtype: str
    attention: str
    steps: int
    batch: int
    compile: bool
    channels_last: bool
    tiny_vae: bool


def factor_values(args: argparse.Namespace, dtypes: list[str], tiny_vae_dir: str | None) -> dict[str, list]:
    """Every value of every factor the flags ask for (compile and tiny VAE on only when asked and possible)."""
    return {"dtype": dtypes, "attention": args.attentions, "steps": args.steps, "batch": args.batch_sizes,
            "compile": [False, True] if args.compile else [False], "channels_last": args.channels_last,
            "tiny_vae": [False, True] if tiny_vae_dir else [False]}


def baseline_spec(values: dict[str, list], device: torch.device) -> Spec:
    """The package's defaults, each taken from its factor's values when there, else the first value (the
    largest batch when 16 is not listed)."""
    def pick(factor: str, preferred: object) -> object:
        return preferred if preferred in values[factor] else values[factor][0]
    auto_dtype = DTYPE_NAMES[resolve_dtype("auto", device)]
    batch = 16 if 16 in values["batch"] else max(values["batch"])
    return Spec(dtype=pick("dtype", auto_dtype), attention=pick("attention", "sdpa"), steps=pick("steps", 10),
                batch=batch, compile=pick("compile", False), channels_last=pick("channels_last", False),
                tiny_vae=pick("tiny_vae", False))


def design(values: dict[str, list], base: Spec, full: bool) -> list[tuple[str, Spec]]:
    """(label, spec) rows: the cartesian product, or the baseline plus one row per other value of each factor."""
    if full:
        specs = [Spec(*combo) for combo in itertools.product(*(values[f] for f in FACTORS))]
        rows = [("baseline" if s == base else "full", s) for s in specs]
        return sorted(rows, key=lambda r: r[0] != "baseline")
    rows = [("baseline", base)]
    for factor in FACTORS:
        for v in values[factor]:
            spec = dataclasses.replace(base, **{factor: v})
            if spec != base:
                rows.append((factor, spec))
    return rows


def combined_spec(rows: list[dict], base: Spec, values: dict[str, list]) -> tuple[Spec, int | None]:
    """For dtype, attention, compile and channels_last: the value fastest in its own one-factor rows (baseline
    included), at the largest batch and the baseline's steps, tiny VAE off; and the index of the row that
    already measured that combination, if one did."""
    chosen = {}
    for factor in ("dtype", "attention", "compile", "channels_last"):
        candidates = [r for r in rows if r["status"] == "ok" and r["factor"] in ("baseline", factor)]
        if candidates:
            chosen[factor] = max(candidates, key=lambda r: r["img_s"])[factor]
    spec = dataclasses.replace(base, batch=max(values["batch"]), tiny_vae=False, **chosen)
    same = [i for i, r in enumerate(rows) if Spec(**{f: r[f] for f in FACTORS}) == spec]
    return spec, (same[0] if same else None)


def row_name(r: dict) -> str:
    """A row's settings in a few words, for progress bars and reports."""
    return (f"{r['dtype']} {r['attention']} {r['steps']} steps b={r['batch']}"
            + (" compile" if r["compile"] else "") + (" channels_last" if r["channels_last"] else "")
            + (" tiny-vae" if r["tiny_vae"] else ""))
