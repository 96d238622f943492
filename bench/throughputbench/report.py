"""bench/throughput.py's report and plot."""

from __future__ import annotations

from pathlib import Path

from plots import import_pyplot, save_figure
from report import Column, Table, load_line, on_off, targets_block, torch_lines
from trainstep import STEP_PARTS


GENERATION_TABLE = Table(Column("batch", 5, lambda row: str(row["batch_size"])),
                         Column("wrapper img/s", 13, lambda row: f"{row['wrapper_img_s']:.2f}"),
                         Column("bare img/s", 10, lambda row: f"{row['bare_img_s']:.2f}"),
                         Column("wrapper/bare", 12, lambda row: f"{row['overhead_ratio']:.3f}x"))
STEP_COST_LABELS = (("mixdiff", "MixDiff, warm cache, aimed"), ("simclr", "plain SimCLR (pairing real)"))


def step_cost_table(sc: dict) -> Table:
    """Mean ms per step part and the median step, a row per (key, label) of ``STEP_COST_LABELS``."""
    def part(name: str) -> Column:
        return Column(name, 8, lambda kl: f"{1e3 * sc['parts_s_mean'][kl[0]].get(name, 0.0):.2f}")
    return Table(Column("", 30, lambda kl: kl[1], "<"), *(part(name) for name in STEP_PARTS),
                 Column("median step", 11, lambda kl: f"{1e3 * sc['median_step_s'][kl[0]]:.1f}"))


def ring_table(rg: dict) -> Table:
    """Pairs/s of the ring and of the numpy copy in all, writing and taking: a row per name, "ring" or "numpy"."""
    def rate(title: str, key: str) -> Column:
        return Column(title, 11, lambda name: f"{rg[f'{name}_{key}']:,.0f}")
    return Table(Column("", 6, lambda name: name, "<"), rate("pairs/s", "pairs_s"), rate("write", "write_pairs_s"),
                 rate("take", "take_pairs_s"))


def split_table(sp: dict) -> Table:
    """A row per split: its devices, capacities and modelled throughput per max_reuse (* = the best split)."""
    def reuse(r: int) -> Column:
        return Column(f"reuse {r}", 11, lambda row: f"{row['throughput_img_s'][str(r)]:.1f}"
                      + ("*" if sp["best_gen"][str(r)] == row["gen"] else " "))
    return Table(Column("gen", 3, lambda row: str(row["gen"])), Column("train", 5, lambda row: str(row["train"])),
                 Column("train cap", 10, lambda row: f"{row['train_capacity_img_s']:.1f}"),
                 Column("gen cap", 9, lambda row: f"{row['gen_capacity_img_s']:.1f}"),
                 *(reuse(r) for r in sp["max_reuse"]))


def claims_lines(cl: dict | None) -> list[str]:
    """The aimed claim against the unaimed one (results saved before claims were measured have none)."""
    if cl is None:
        return []
    return [f"Claims (generation scarce: trainers at {cl['trainer_rate']:,.0f} img/s, producer batch "
            f"{cl['batch_s']:g} s, {cl['images']:,} images; median of {cl['repeats']})",
            f"  aimed (hard) {1e3 * cl['aimed_claim_s']:.2f} ms over {cl['aimed_span']:,} positions, unaimed "
            f"{1e3 * cl['plain_claim_s']:.2f} ms over {cl['plain_span']}: {cl['aimed_over_plain']:.1f}x, "
            f"{100 * cl['aimed_share_of_batch']:.3f}% of the batch's time", ""]


def format_report(res: dict) -> str:
    m, c, g, tr, rg, sp = res["meta"], res["config"], res["generation"], res["training"], res["ring"], res["split"]
    sc = res["step_cost"]
    steps, rings, splits = step_cost_table(sc), ring_table(rg), split_table(sp)
    lines = [
        *torch_lines(m),
        f"attention   {m['attention']} ({m['attention_reason']})",
        f"generator   {c['model']}, {m['dtype']}, {c['steps']} steps, guidance {c['guidance']}, {c['scheduler']}, "
        f"{c['gen_size']}px out -> {c['resolution']}px",
        f"date        {m['date']}",
        load_line(m),
        "",
        "Generation (median call)",
        GENERATION_TABLE.header(),
        *(GENERATION_TABLE.row(row) for row in g["rows"]),
        "",
        f"Training (tinycnn w={tr['width']}, {tr['params']:,} params, batch {tr['batch_size']}, "
        f"{tr['steps']} steps after {tr['warmup_steps']} warm-up)",
        f"  {tr['img_s']:.1f} real img/s; {tr['step_s_mean'] * 1e3:.0f} ms/step = "
        f"{tr['augment_s_mean'] * 1e3:.0f} ms augment (CPU, per image) + {tr['compute_s_mean'] * 1e3:.0f} ms "
        f"forward/loss/backward/step ({100 * tr['augment_fraction']:.0f}% augment)",
        "",
        f"Step cost (batch {sc['batch_size']}, {sc['steps']} steps each after {sc['warmup_steps']} warm-up, in turns; "
        f"mean ms per step)",
        steps.header(),
        *(steps.row(kl) for kl in STEP_COST_LABELS),
        f"  MixDiff / SimCLR = {sc['mixdiff_over_simclr']:.3f}x",
        "",
        f"Ring ({rg['pairs']} pairs of {rg['pair_bytes']} B, write batch {rg['write_batch']}, "
        f"take batch {rg['take_batch']}, checksums {on_off(rg['verify_checksums'])})",
        rings.header(), rings.row("ring"), rings.row("numpy"),
        f"  numpy copy is {rg['numpy_over_ring']:.1f}x faster than the ring; the ring moves "
        f"{rg['ring_pairs_s'] / g['best_img_s']:.0f}x the best generation rate",
        "",
        *claims_lines(res.get("claims")),
        f"Training / generation = {tr['img_s']:.1f} / {g['best_img_s']:.2f} (wrapper, batch {g['best_batch_size']}) "
        f"= {sp['train_over_gen']:.2f} generator devices per trainer device for a fresh view of every image "
        f"on every step",
        *(f"  with each view serving up to max_reuse={r} times: {sp['gen_devices_per_train_device'][str(r)]:.2f}"
          for r in sp["max_reuse"] if r != 1),
        "",
        f"Split of a {sp['node_gpus']}-device node (model from the rates above, not measured; "
        f"img/s with a synthetic view on every image; * = best)",
        splits.header(),
        *(splits.row(row) for row in sp["rows"]),
    ]
    return "\n".join(lines + targets_block(res["targets"]))


def plot(res: dict, path: Path) -> None:
    """Images/s of generate() and of pipe() per batch size; the modelled throughput of every split."""
    plt = import_pyplot("bench/throughput.py")

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = res["generation"]["rows"]
    bs = [r["batch_size"] for r in rows]
    left.plot(bs, [r["wrapper_img_s"] for r in rows], "o-", label="generate() (wrapper)")
    left.plot(bs, [r["bare_img_s"] for r in rows], "s--", label="pipe() (bare)")
    left.set_xscale("log", base=2)
    left.set_xticks(bs, [str(b) for b in bs])
    left.set_xlabel("generator batch size")
    left.set_ylabel("images / s")
    left.set_title("Generation")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend()

    sp = res["split"]
    g = [r["gen"] for r in sp["rows"]]
    right.plot(g, [r["train_capacity_img_s"] for r in sp["rows"]], ":", color="grey", label="trainer capacity")
    for r in sp["max_reuse"]:
        y = [row["throughput_img_s"][str(r)] for row in sp["rows"]]
        (line,) = right.plot(g, y, "o-", label=f"max_reuse={r}")
        best = sp["best_gen"][str(r)]
        right.plot([best], [y[g.index(best)]], "*", ms=16, color=line.get_color())
    right.set_xlabel(f"generator devices (of {sp['node_gpus']}; the rest train)")
    right.set_ylabel("trainer images / s with a synthetic view")
    right.set_title("Gen/train split (model from per-device rates)")
    right.set_xticks(g)
    right.set_ylim(bottom=0)
    right.grid(alpha=0.3)
    right.legend()
    m = res["meta"]
    fig.suptitle(f"{m['device']}: {m['device_name']}, {m['threads']} thread(s), {res['config']['model']}", fontsize=10)
    save_figure(fig, path)
