"""bench/generate.py's targets, report and plot."""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
from common import target
from plots import import_pyplot, save_figure
from report import Column, Table, load_line, on_off, targets_block, torch_lines

from .matrix import row_name
from .peak import H100_CLASS

TARGET_OVERHEAD = 1.10  # generate() / bare pipe() on the stub, every row
TARGET_PLAIN = 3.0      # x the plain diffusers call, H100-class GPU, batch >= 16
TARGET_BOUND = 0.60     # fraction of the FLOP bound, H100-class GPU, batch >= 16
TARGET_MIN_BATCH = 16


def evaluate_targets(res: dict) -> list[dict]:
    """The wrapper's overhead on the stub (every row), and, on an H100-class GPU at batch >= 16, the ratio to
    the plain call and the fraction of the FLOP bound (the best row)."""
    m, rows = res["meta"], [r for r in res["rows"] if r["status"] == "ok"]
    stub = res["config"]["model"] == "stub"
    # 1. wrapper overhead on the stub, every measured row
    name = f"wrapper overhead generate()/pipe() <= {TARGET_OVERHEAD:.2f}x on the stub (every row)"
    if rows:
        worst = max(rows, key=lambda r: r["overhead"])
        base = next((r for r in rows if r["factor"] == "baseline"), None)
        detail = (f"worst {worst['overhead']:.3f}x ({row_name(worst)})"
                  + (f", baseline {base['overhead']:.3f}x" if base else "")
                  + f", median {statistics.median(r['overhead'] for r in rows):.3f}x"
                  + ("" if stub else f" (model {res['config']['model']}, the target is for the stub)"))
        targets = [target(name, worst["overhead"], TARGET_OVERHEAD, "<=", detail, measured=stub)]
    else:
        targets = [target(name, None, TARGET_OVERHEAD, "<=", "no row ran")]
    # 2./3. H100-class GPU, batch >= 16: x plain and fraction of the FLOP bound
    big = [r for r in rows if r["batch"] >= TARGET_MIN_BATCH and r.get("x_plain")]
    h100 = m["device"].startswith("cuda") and any(k in m["device_name"] for k in H100_CLASS)
    for key, threshold, name, fmt in (
            ("x_plain", TARGET_PLAIN, f">= {TARGET_PLAIN:g}x the plain diffusers call at batch >= "
                                      f"{TARGET_MIN_BATCH} (H100-class GPU)", "{:.2f}x"),
            ("achieved_fraction", TARGET_BOUND, f">= {TARGET_BOUND:.0%} of the FLOP bound at batch >= "
                                                f"{TARGET_MIN_BATCH} (H100-class GPU)", "{:.1%}")):
        best = max(big, key=lambda r: r[key]) if big else None
        detail = f"best here {fmt.format(best[key])} ({row_name(best)})" if best else f"no row at batch >= {TARGET_MIN_BATCH}"
        if not h100:
            detail = f"{m['device']} is {m['device_name']}, not an H100-class GPU; {detail}"
        elif stub:
            detail += "; model stub: run --full-size for the real test"
        targets.append(target(name, best[key] if best else None, threshold, ">=", detail, measured=h100))
    return targets


def mib(b: int | None) -> str:
    """Bytes in MiB, two decimals below 10 MiB; "-" when not measured."""
    return "-" if b is None else f"{b / 2**20:,.1f}" if b >= 10 * 2**20 else f"{b / 2**20:.2f}"


BOUND_COLUMNS = (Column("bound img/s", 11, lambda r: f"{r['bound_img_s']:,.4g}"),
                 Column("% bound", 8, lambda r: f"{100 * r['achieved_fraction']:.3g}%"),
                 Column("peak MiB", 9, lambda r: mib(r["peak_mem_bytes"])))
PLAIN_TABLE = Table(Column("batch", 5, lambda p: str(p["batch"])),
                    Column("img/s", 9, lambda p: f"{p['img_s']:.3f}"),
                    Column("GFLOP/img", 10, lambda p: f"{p['flops_per_image'] / 1e9:,.4g}"), *BOUND_COLUMNS)
SPEC_TABLE = Table(Column("#", 2, lambda r: str(r["#"])), Column("row", 13, lambda r: r["factor"], "<"),
                   Column("dtype", 5, lambda r: r["dtype"], "<"), Column("attn", 8, lambda r: r["attention"], "<"),
                   Column("steps", 5, lambda r: str(r["steps"])), Column("batch", 5, lambda r: str(r["batch"])),
                   Column("comp", 4, lambda r: on_off(r["compile"]), "<"),
                   Column("c_last", 6, lambda r: on_off(r["channels_last"]), "<"),
                   Column("tvae", 4, lambda r: on_off(r["tiny_vae"]), "<"))
# RATE_TABLE's lines continue SPEC_TABLE's: its indent separates them.
RATE_TABLE = Table(Column("img/s", 9, lambda r: f"{r['img_s']:.2f}"),
                   Column("bare img/s", 10, lambda r: f"{r['bare_img_s']:.2f}"),
                   Column("wrap/bare", 9, lambda r: f"{r['overhead']:.3f}x"),
                   Column("x plain", 8, lambda r: f"{r['x_plain']:.2f}x"), *BOUND_COLUMNS)


def row_line(i: int, r: dict) -> str:
    """Row ``i`` of the generator table: its settings, then its rates, or why it has none."""
    spec = SPEC_TABLE.row({"#": i, **r})
    return spec + (RATE_TABLE.row(r) if r["status"] == "ok" else f"  {r['status']}: {r['reason'][:110]}")


def format_report(res: dict) -> str:
    m, c, fl, pk = res["meta"], res["config"], res["flops"], res["peak"]
    mem_kind = next((r["peak_mem_kind"] for r in res["rows"] if r.get("peak_mem_kind")), "")
    lines = [
        *torch_lines(m),
        f"generator   {c['model']}, {c['resolution']}px in -> {c['gen_size']}px generated, guidance {c['guidance']:g}, "
        f"{c['scheduler']}; design: {c['design']}",
        f"date        {m['date']}",
        load_line(m),
        f"FLOPs       per image: UNet {fl['unet_call'] / 1e9:,.4g} GFLOP per denoising call (batch "
        f"{fl['unet_batch']} for guidance), VAE decode {fl['vae_decode'] / 1e9:,.4g}"
        + (f", tiny VAE decode {fl['tiny_vae_decode'] / 1e9:,.4g}" if "tiny_vae_decode" in fl else "")
        + f", CLIP encode {fl['clip_encode'] / 1e9:,.4g} GFLOP ({fl['method']})",
        "peak        " + "; ".join(f"{d} {pk['flop_s'][d] / 1e12:,.3g} TFLOP/s ({pk['source'][d]})" for d in pk["flop_s"]),
        f"memory      {mem_kind}",
        "",
        f"Plain diffusers call: fp32, PIL in and out, {c['plain_scheduler']}, {c['plain_steps']} steps "
        f"({c['plain_unet_calls']} UNet calls), {res['plain']['call']}",
        PLAIN_TABLE.header(),
        *(PLAIN_TABLE.row(p) for p in res["plain"]["rows"]),
        "",
        "Generator rows: generate() rate, bare pipe() rate, wrapper/bare, x plain at the same batch, FLOP bound "
        "(median call)",
        SPEC_TABLE.header() + RATE_TABLE.header(),
        *(row_line(i, r) for i, r in enumerate(res["rows"])),
    ]
    for i, r in enumerate(res["rows"]):
        if r.get("retries"):
            lines.append(f"  row {i}: generate() regenerated {r['retries']} non-finite or blank image(s) over the "
                         f"row's calls; its rate includes that work, the bare pipe() call's does not")
    base = next((r for r in res["rows"] if r["factor"] == "baseline" and r["status"] == "ok"), None)
    if base:
        lines.append(f"  x plain splits into less work and faster work: baseline {base['x_plain']:.2f}x = "
                     f"{base['x_plain_work']:.2f}x fewer FLOPs per image ({base['unet_calls']} vs "
                     f"{c['plain_unet_calls']} UNet calls) x {base['x_plain_flop_s']:.2f}x the plain call's FLOP/s")
    cb = c.get("combined")
    if cb and cb["measured_as"] != "combined":
        lines.append(f"  combined (the fastest value of dtype, attention, compile, channels_last at the largest batch) "
                     f"= row {cb['row']}, already measured: no extra row")
    return "\n".join(lines + targets_block(res["targets"]))


def plot(res: dict, path: Path) -> None:
    """Images/s of every row and of the plain call (log scale), and each one's fraction of the FLOP bound."""
    plt = import_pyplot("bench/generate.py")
    import matplotlib.ticker

    rows = res["rows"]
    plain = {p["batch"]: p for p in res["plain"]["rows"]}
    labels = [f"{row_name(r)}  [{r['factor']}]" for r in rows] + [f"plain diffusers call b={b}" for b in plain]
    y = np.arange(len(labels))[::-1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.32 * len(labels)), sharey=True)
    ok = [i for i, r in enumerate(rows) if r["status"] == "ok"]
    left.barh(y[ok], [rows[i]["img_s"] for i in ok], color="tab:blue", label="generate()")
    tick_y = [y[i] for i in ok if rows[i]["batch"] in plain]
    tick_x = [plain[rows[i]["batch"]]["img_s"] for i in ok if rows[i]["batch"] in plain]
    left.plot(tick_x, tick_y, "|", color="black", ms=14, mew=2, label="plain call, same batch")
    for i in ok:
        if rows[i].get("x_plain"):
            left.text(rows[i]["img_s"], y[i], f" {rows[i]['x_plain']:.2f}x plain", va="center", fontsize=7)
    n = len(rows)
    left.barh(y[n:], [p["img_s"] for p in plain.values()], color="grey", label="plain diffusers call")
    for i, r in enumerate(rows):
        if r["status"] != "ok":
            left.text(0.01, y[i], r["status"], transform=left.get_yaxis_transform(), va="center", fontsize=8,
                      color="tab:red")
    left.set_xscale("log")
    top = max([rows[i]["img_s"] for i in ok] + [p["img_s"] for p in plain.values()], default=1.0)
    left.set_xlim(right=top * 2.5)  # room for the 'x plain' labels
    left.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("images / s (log scale)")
    left.set_title("Generation speed")
    left.set_yticks(y, labels, fontsize=8)
    left.grid(alpha=0.3, axis="x")
    left.legend(fontsize=8, loc="lower right")

    right.barh(y[ok], [100 * rows[i]["achieved_fraction"] for i in ok], color="tab:orange", label="generate()")
    right.barh(y[n:], [100 * p["achieved_fraction"] for p in plain.values()], color="grey")
    right.set_xlabel("% of the FLOP bound (peak FLOP/s / FLOPs per image)")
    right.set_title("Achieved fraction of the FLOP bound")
    right.grid(alpha=0.3, axis="x")
    m, c = res["meta"], res["config"]
    fig.suptitle(f"{m['device']}: {m['device_name']}, {m['threads']} thread(s), {c['model']} at {c['gen_size']}px, "
                 f"guidance {c['guidance']:g}", fontsize=10)
    save_figure(fig, path)
