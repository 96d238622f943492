"""bench/aim.py's summary per setting, its Markdown table and its plot."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from aimbench.runs import ORIGINS
from aimbench.stats import interval, paired
from plots import import_pyplot, save_figure
from report import load_line

BASELINE = "uniform"   # the differences are paired against it
REFERENCE = "real"     # the dashed line of the plot
SCORES = {"linear_top1": "linear probe top-1 (%)", "knn_top1": "kNN top-1 (%)"}


def summarize(runs: list[dict[str, Any]], baseline: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Mean and 95% interval of each score over the runs of one setting, the paired difference to the
    baseline's runs of the same seeds, the pairs generated (mean, least, most), the second views' shares by
    origin over all its runs, and its wall seconds per run."""
    out: dict[str, Any] = {}
    for score in SCORES:
        values = {r["seed"]: r[score] for r in runs if r[score] is not None}
        out[score] = interval(list(values.values())) if values else None
        base = {r["seed"]: r[score] for r in baseline or [] if r[score] is not None}
        out[f"{score}_vs_{BASELINE}"] = paired(values, base) if baseline is not None else None
    generated = [r["generated"] for r in runs]
    views = {o: sum(r["views"][o] for r in runs) for o in ORIGINS}
    total = sum(views.values())
    out.update({"generated_mean": statistics.fmean(generated), "generated_min": min(generated),
                "generated_max": max(generated),
                "images_covered_mean": statistics.fmean(r["cache"]["images"] for r in runs),
                "shares": {o: views[o] / total if total else 0.0 for o in ORIGINS},
                "wall_s_mean": statistics.fmean(r["wall_s"] for r in runs),
                "wall_s_total": sum(r["wall_s"] for r in runs),
                "cpu_s_mean": statistics.fmean(r.get("cpu_s", 0.0) for r in runs),
                "warm_s_mean": statistics.fmean(r["warm_s"] for r in runs)})
    return out


def _ci(cell: dict[str, Any] | None, signed: bool = False) -> str:
    """'97.21 [96.80, 97.62]', or the mean alone where one seed leaves the interval unknown."""
    if cell is None:
        return "—"
    fmt = "{:+.2f}" if signed else "{:.2f}"
    if cell["half"] is None:
        return fmt.format(cell["mean"])
    return f"{fmt.format(cell['mean'])} [{fmt.format(cell['low'])}, {fmt.format(cell['high'])}]"


def _generated(s: dict[str, Any]) -> str:
    lo, hi = s["generated_min"], s["generated_max"]
    return f"{lo}" if lo == hi else f"{s['generated_mean']:.0f} ({lo}-{hi})"


def markdown(res: dict[str, Any]) -> str:
    """One row per setting: the two scores with their intervals, their paired differences to uniform, the
    pairs generated, the second views by origin and the wall time per run."""
    lines = [f"| setting | linear top-1 | Δ linear vs {BASELINE} | kNN top-1 | Δ kNN vs {BASELINE} | pairs generated "
             "| images covered | fresh / cached / disk / fallback (%) | s per run | CPU s per run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in res["settings"].items():
        sm = s["summary"]
        shares = (" / ".join(f"{100 * sm['shares'][o]:.0f}" for o in ORIGINS) if any(sm["shares"].values())
                  else "none counted")  # real pairs: no second view has an origin
        lines.append(f"| {name} | {_ci(sm['linear_top1'])} | {_ci(sm[f'linear_top1_vs_{BASELINE}'], True)} "
                     f"| {_ci(sm['knn_top1'])} | {_ci(sm[f'knn_top1_vs_{BASELINE}'], True)} | {_generated(sm)} "
                     f"| {sm['images_covered_mean']:.0f} | {shares} | {sm['wall_s_mean']:.0f} "
                     f"| {sm['cpu_s_mean']:.0f} |")
    c, m = res["config"], res["meta"]
    lines.append(f"\nTop-1 (%) on the {c['heldout']} held-out real digits: mean [95% Student t interval] over seeds "
                 f"{', '.join(map(str, c['seeds']))}; Δ = the paired difference to {BASELINE} over the same seeds. "
                 f"{c['method']}, {c['epochs']} epoch{'s' * (c['epochs'] != 1)}; generation budget {c['budget']} "
                 f"pairs (one per training image), online runs capped at {c['max_pairs_per_epoch']} pairs per epoch. "
                 f"Pairs generated: "
                 f"as the run reports them (precompute: by the warm); images covered: distinct images in the run's "
                 f"cache. Second views over all runs of a setting. {m['total_run_s'] / 60:.1f} min of runs on "
                 f"{m['cpu_count']} cores ({m['cpu']}).")
    if short := budget_shortfalls(res):
        lines.append(f"\nWARNING: online runs left the budget of {c['budget']} pairs unspent, so these settings are "
                     f"not compared at one budget: " + "; ".join(short) + ".")
    return "\n".join(lines)


def short_runs(res: dict[str, Any], name: str, spent: float = 0.95) -> list[dict[str, Any]]:
    """The runs of online setting ``name`` that generated less than ``spent`` of the budget."""
    s = res["settings"][name]
    return [r for r in s["runs"] if s.get("online") and r["generated"] < spent * res["config"]["budget"]]


def budget_shortfalls(res: dict[str, Any]) -> list[str]:
    """Per online setting whose runs left the budget unspent, its fewest pairs and why: the producers stopped
    generating (no pair in the last epoch: they stopped claiming, a fault of the run) or fell behind the cap
    (a generator too slow for it: more epochs lower the cap)."""
    out = []
    for name in res["settings"]:
        if not (short := short_runs(res, name)):
            continue
        stopped = [r for r in short if len(g := r.get("generated_by_epoch", [])) > 1 and g[-1] == g[-2]]
        why = (f"generation stopped before the end in {len(stopped)} of {len(short)} short runs (no pair in "
               f"the last epoch; seed {stopped[0]['seed']}: " + ", ".join(map(str, stopped[0]['generated_by_epoch']))
               + " pairs in all by each epoch's end)" if stopped else
               f"the producers fell behind the cap of {res['config']['max_pairs_per_epoch']} per epoch "
               f"(more --epochs lowers it)")
        out.append(f"{name} generated as few as {min(r['generated'] for r in short)}: {why}")
    return out


def format_report(res: dict[str, Any]) -> str:
    return markdown(res) + "\n" + load_line(res["meta"])


def plot(res: dict[str, Any], path: Path) -> None:
    """Per score, each setting's mean with its 95% interval, hollow where runs left the budget unspent; a dashed
    line at ``real``'s mean."""
    plt = import_pyplot("bench/aim.py")
    names = list(res["settings"])
    fig, axes = plt.subplots(1, len(SCORES), figsize=(4.2 * len(SCORES), 3.6))
    for ax, (score, label) in zip(axes, SCORES.items()):
        cells = [res["settings"][n]["summary"][score] for n in names]
        xs = [i for i, c in enumerate(cells) if c is not None]
        means = [cells[i]["mean"] for i in xs]
        errs = [cells[i]["half"] or 0.0 for i in xs]
        for x, mean, err in zip(xs, means, errs):
            hollow = bool(short_runs(res, names[x]))
            ax.errorbar([x], [mean], yerr=[err], fmt="o", capsize=4, c="C0", mfc="none" if hollow else "C0",
                        label="budget unspent" if hollow else None)
        ref = res["settings"].get(REFERENCE, {}).get("summary", {}).get(score)
        if ref is not None:
            ax.axhline(ref["mean"], ls="--", c="grey", label=f"{REFERENCE} (mean)")
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            unique = dict(zip(labels, handles))
            ax.legend(unique.values(), unique.keys(), fontsize=8, loc="best")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        low, high = ax.get_ylim()
        ax.set(ylabel=label, title=label.split(" (")[0], ylim=(low, min(high, 100.5)))
    c = res["config"]
    seeds = len(c["seeds"])
    fig.suptitle(f"digits, {c['method']}, {c['epochs']} epoch{'s' * (c['epochs'] != 1)}, budget {c['budget']} pairs, "
                 f"{seeds} seed{'s' * (seeds != 1)} (95% t intervals)", fontsize=10)
    save_figure(fig, path)
