"""bench/ring.py's results: each ring row's ratios to memcpy and to the Queue, the summary, the targets, the
report and the plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from common import target
from machine import SKEW_CORES
from plots import import_pyplot, save_figure
from report import Column, Table, load_line, machine_line, on_off, targets_block

from onlinemix.exchange.ring import SHM_DIR

from .pairs import pair_bytes
from .runs import skewed

TARGET_MEMCPY = 0.5   # ring GB/s >= this x memcpy GB/s
TARGET_QUEUE = 5.0    # ring pairs/s >= this x Queue pairs/s at the same P, C


def verdict(ratio: float | None, goal: float) -> str:
    """PASS or MISS of one row's ratio against its goal; n/a without the ratio (no Queue run)."""
    if ratio is None:
        return "n/a"
    return "PASS" if ratio >= goal else "MISS"


def derive(res: dict) -> None:
    """Ratios and PASS/MISS per ring row, in place."""
    for block in res["resolutions"]:
        mem = block["memcpy"]["gb_s"]
        queues = {(q["producers"], q["consumers"]): q for q in block["queue"]}
        for row in block["ring"]:
            q = queues.get((row["producers"], row["consumers"]))
            row["x_memcpy"] = row["gb_s"] / mem
            row["x_queue"] = row["pairs_s"] / q["pairs_s"] if q else None
            row["queue_pairs_s"] = q["pairs_s"] if q else None
            row["memcpy_target"] = verdict(row["x_memcpy"], TARGET_MEMCPY)
            row["queue_target"] = verdict(row["x_queue"], TARGET_QUEUE)


def summarize(res: dict, cores: int) -> None:
    """The "summary" and "targets" of ``res``, in place: PASS counts over every ring row and over the rows
    where every process has a core of its own (P + C <= ``cores``); the targets compare designs, not CPU
    schedulers, so only those rows are judged."""
    blocks = res["resolutions"]
    rows = [row for b in blocks for row in b["ring"]]
    own_core = [row for row in rows if row["producers"] + row["consumers"] <= cores]
    res["summary"] = {
        "memcpy_pass": sum(row["memcpy_target"] == "PASS" for row in rows),
        "queue_pass": sum(row["queue_target"] == "PASS" for row in rows),
        "queue_rows": sum(row["x_queue"] is not None for row in rows), "ring_rows": len(rows),
        "own_core_rows": len(own_core),
        "own_core_memcpy_pass": sum(row["memcpy_target"] == "PASS" for row in own_core),
        "own_core_queue_pass": sum(row["queue_target"] == "PASS" for row in own_core),
        "own_core_queue_rows": sum(row["x_queue"] is not None for row in own_core),
        "all_pairs_intact": all(row["all_pairs_intact"] for row in rows)
        and all(q["all_pairs_intact"] for b in blocks for q in b["queue"]),
    }
    res["targets"] = evaluate_targets(own_core, cores)


def evaluate_targets(own_core: list[dict], cores: int) -> list[dict]:
    """Both targets over the rows where every process has a core of its own, judged by the worst such row;
    not measured here when there is none."""
    detail = f"worst of {len(own_core)} row(s) with P + C <= {cores}"
    queue = [row["x_queue"] for row in own_core if row["x_queue"] is not None]
    return [target("ring GB/s vs memcpy GB/s, a core per process", min((row["x_memcpy"] for row in own_core),
                                                                       default=None), TARGET_MEMCPY, detail=detail),
            target("ring pairs/s vs Queue pairs/s at the same P, C, a core per process", min(queue, default=None),
                   TARGET_QUEUE, detail=detail)]


def n_a(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted with ``spec``, then ``suffix``; "n/a" without a Queue run to compare with."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


CONFIG_COLUMNS = (Column("P", 2, lambda row: str(row["producers"]), gap=" "),
                  Column("C", 2, lambda row: str(row["consumers"]), gap=" "),
                  Column("crc", 4, lambda row: on_off(row["checksums"]), gap=" "))
RING_TABLE = Table(
    *CONFIG_COLUMNS,
    Column("ring pairs/s", 12, lambda row: f"{row['pairs_s']:,.0f}"),
    Column("GB/s", 6, lambda row: f"{row['gb_s']:.2f}", gap=" "),
    Column("Queue pairs/s", 13, lambda row: n_a(row["queue_pairs_s"], ",.0f")),
    Column("x memcpy", 8, lambda row: f"{row['x_memcpy']:.2f}x"),
    Column(f">={TARGET_MEMCPY}", 5, lambda row: row["memcpy_target"], gap=" "),
    Column("x Queue", 8, lambda row: n_a(row["x_queue"], ".2f", "x")),
    Column(f">={TARGET_QUEUE:g}", 5, lambda row: row["queue_target"], gap=" "),
    Column("intact", 6, lambda row: "yes" if row["all_pairs_intact"] else "NO"))


def us(role: str, key: str, title: str) -> Column:
    """A --profile column: microseconds per pair a ``role`` spent in ``key``."""
    return Column(title, 7, lambda row: f"{row['us_per_pair'][role].get(key, 0.0):.1f}", gap=" ")


PROFILE_TABLE = Table(
    Column("R", 4, lambda row: str(row["resolution"]), gap=" "), *CONFIG_COLUMNS,
    Column("producer", 8, lambda row: "", align="<", gap=" | "),
    us("producer", "reserve", "reserve"), us("producer", "write", "write"), us("producer", "crc32", "crc32"),
    us("producer", "publish", "publish"), us("producer", "flock", "flock"), us("producer", "wait", "wait"),
    Column("consumer", 8, lambda row: "", align="<", gap=" | "),
    us("consumer", "take", "take"), us("consumer", "crc32", "crc32"), us("consumer", "flock", "flock"),
    Column("rest", 7, lambda row: f"{consumer_rest(row['us_per_pair']['consumer']):.1f}", gap=" "),
    us("consumer", "check", "check"), us("consumer", "wait", "wait"))


def consumer_rest(co: dict) -> float:
    """A consumer's time in take() that is neither CRC32 nor the lock: metadata scan, copy out, bookkeeping."""
    return co["take"] - co.get("crc32", 0.0) - co.get("flock", 0.0)


def format_report(res: dict) -> str:
    m, cfg = res["meta"], res["config"]
    lines = [
        machine_line(m, f", {m['shm_free_gib']:.1f} GiB free in {SHM_DIR}"),
        f"versions    python {m['python']}, numpy {m['numpy']}, torch {m['torch']}",
        f"date        {m['date']}",
        load_line(m),
        f"setup       {cfg['slots']} slots, write batch {cfg['write_batch']}, take batch {cfg['take_batch']}, max_reuse=1; "
        f"consumers read {cfg['consumer_read']}, check {cfg['intact_check']}; Queue: torch.multiprocessing spawn, maxsize {cfg['slots']}, "
        f"sharing strategy {res.get('queue_sharing_strategy') or 'n/a'}",
        f"targets     ring GB/s >= {TARGET_MEMCPY}x memcpy GB/s; ring pairs/s >= {TARGET_QUEUE:g}x Queue pairs/s "
        f"at the same P, C",
        "NOTE        " + m["contention_note"],
    ]
    for block in res["resolutions"]:
        r, mem = block["resolution"], block["memcpy"]
        lines += [
            "",
            f"R = {r}: pair {pair_bytes(r):,} B, K = "
            + "/".join(str(v) for v in block["pairs_per_producer"].values())
            + f" pairs per producer for P = {'/'.join(block['pairs_per_producer'])}; memcpy "
            f"(1 process, {mem['copies']} cop{'ies' if mem['copies'] > 1 else 'y'}) {mem['gb_s']:.2f} GB/s = "
            f"{mem['pairs_s']:,.0f} pairs/s"
            + (f" (write side {mem['write_gb_s']:.2f}, read side {mem['read_gb_s']:.2f} GB/s)" if mem["read_gb_s"] else "")
            + ("  !" if skewed(mem) else ""),
            RING_TABLE.header(),
        ]
        queues = {(q["producers"], q["consumers"]): q for q in block["queue"]}
        lines += [RING_TABLE.row(row) + ("  !" if skewed(row) or skewed(queues.get((row["producers"], row["consumers"])))
                                         else "") for row in block["ring"]]
        bad_q = [q for q in block["queue"] if not q["all_pairs_intact"]]
        if bad_q:
            lines.append(f"  WARNING: the Queue lost, duplicated or corrupted pairs in {len(bad_q)} configuration(s)")
    if cfg.get("profile"):
        lines += ["", "Cost breakdown (--profile): microseconds per pair inside each call, summed over the processes of a "
                      "role; wall time, so it includes time a process sat descheduled inside the call",
                  PROFILE_TABLE.header(),
                  *(PROFILE_TABLE.row({**row, "resolution": block["resolution"]})
                    for block in res["resolutions"] for row in block["ring"]),
                  "  producer: write = copy in + crc32 (PairRing.write always computes it); flock counted inside "
                  "reserve + publish. consumer: rest = take - crc32 - flock = metadata scan, copy out, bookkeeping"]
    rows = [row for block in res["resolutions"] for row in block["ring"]]
    if any(skewed(x) for block in res["resolutions"] for x in [block["memcpy"], *block["ring"], *block["queue"]]):
        lines += ["", f"! = other processes used more than {SKEW_CORES} cores on average during this row's ring or "
                      f"Queue run, even after {cfg['retries']} repeat(s) (other_processes_cores and attempts in the JSON): "
                      f"that row is skewed"]
    s = res["summary"]
    lines += ["", f"summary     rows with a core per process (P + C <= {m['cpu_count']}): memcpy target "
                  f"{s['own_core_memcpy_pass']}/{s['own_core_rows']} PASS, Queue target {s['own_core_queue_pass']}/"
                  f"{s['own_core_queue_rows']} PASS",
              f"            all rows: memcpy target {s['memcpy_pass']}/{len(rows)} PASS, Queue target "
              f"{s['queue_pass']}/{s['queue_rows']} PASS; every pair intact in every run: "
              f"{'yes' if s['all_pairs_intact'] else 'NO'}", *targets_block(res["targets"])]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """A bar chart per resolution: GB/s of the ring (per checksum setting) and of the Queue for each P, C,
    with memcpy and the memcpy target as lines."""
    plt = import_pyplot("bench/ring.py")

    blocks = res["resolutions"]
    n_configs = max(len({(row["producers"], row["consumers"]) for row in b["ring"]}) for b in blocks)
    fig, axes = plt.subplots(len(blocks), 1, figsize=(max(7.0, 0.9 * n_configs + 3), 4.2 * len(blocks)),
                             squeeze=False)
    for ax, block in zip(axes[:, 0], blocks):
        configs = sorted({(row["producers"], row["consumers"]) for row in block["ring"]})
        x = np.arange(len(configs))
        series = [(f"ring, checksums {on_off(v)}", lambda pc, v=v: next(
            (row["gb_s"] for row in block["ring"] if (row["producers"], row["consumers"]) == pc
             and row["checksums"] == v), np.nan)) for v in res["config"]["verify"]]
        series.append(("torch.multiprocessing Queue", lambda pc: next(
            (q["gb_s"] for q in block["queue"] if (q["producers"], q["consumers"]) == pc), np.nan)))
        width = 0.8 / len(series)
        for i, (label, value) in enumerate(series):
            ax.bar(x + (i - (len(series) - 1) / 2) * width, [value(pc) for pc in configs], width, label=label)
        mem = block["memcpy"]["gb_s"]
        ax.axhline(mem, color="black", lw=1.2, label=f"memcpy x2, 1 process ({mem:.2f})")
        ax.axhline(TARGET_MEMCPY * mem, color="black", lw=1, ls="--", label=f"{TARGET_MEMCPY}x memcpy target")
        ax.set_xticks(x, [f"P{p} C{c}" for p, c in configs])
        ax.set_xlabel("producers P, consumers C")
        ax.set_ylabel("GB/s (pairs x 2*3*R*R bytes / wall s)")
        ax.set_title(f"R = {block['resolution']} ({pair_bytes(block['resolution']) / 2**20:.2f} MiB per pair)")
        ax.set_ylim(0, 1.45 * max([mem] + [row["gb_s"] for row in block["ring"]] + [q["gb_s"] for q in block["queue"]]))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, ncol=2, loc="upper left")
    m = res["meta"]
    fig.suptitle(f"{m['cpu']}, {m['cpu_count']} cores: with P + C > cores the rates are contention-bound", fontsize=10)
    save_figure(fig, path)
