"""bench/data.py's targets, report and plot."""

from __future__ import annotations

from pathlib import Path

from common import target
from plots import import_pyplot, save_figure
from report import Column, Table, load_line, machine_line, targets_block

TARGETS = {"read_over_memcpy": 0.5, "raw_over_imagefolder": 10.0, "open_spread": 0.10, "open_s": 1.0,
           "memory_over_store": 1.1}
CLASSES = 10  # of the photo JPEGs


def evaluate_targets(res: dict) -> list[dict]:
    """Store reads against memcpy and against ImageFolder, start-up against the image count, and memory."""
    m, lo, op, mem = res["memcpy"], res["loaders"], res["open"], res["memory"]
    worst_memory = max(mem["rows"], key=lambda r: r["growth_over_store"])
    slowest_open = max(op["large"]["startup_s"], op["small"]["startup_s"])
    return [
        target(f"RAW store read >= {TARGETS['read_over_memcpy']}x a memcpy of the same bytes", m["read_over_memcpy"],
               TARGETS["read_over_memcpy"],
               detail=f"{m['store_read_gb_s']:.2f} vs {m['memcpy_gb_s']:.2f} GB/s, batches of {m['batch']}"),
        target(f"RAW store >= {TARGETS['raw_over_imagefolder']:.0f}x ImageFolder + DataLoader per core",
               lo["raw_over_imagefolder"], TARGETS["raw_over_imagefolder"],
               detail=f"{lo['in_process_img_s']['raw_store']:,.0f} vs {lo['dataloader_img_s_per_core']['imagefolder']:,.0f} "
                      f"img/s per core; JPEG store {lo['jpeg_over_imagefolder']:.2f}x "
                      f"({lo['in_process_img_s']['jpeg_store']:,.0f} img/s per core, no target); through a DataLoader "
                      f"RAW {lo['dataloader_raw_over_imagefolder']:.2f}x, JPEG {lo['dataloader_jpeg_over_imagefolder']:.2f}x"),
        target(f"start-up of {op['large']['images']:,} vs {op['small']['images']:,} images within "
               f"{TARGETS['open_spread']:.0%} (|ratio - 1|)", abs(op["large_over_small"] - 1), TARGETS["open_spread"],
               "<=", f"ratio {op['large_over_small']:.3f}; {1e6 * op['large']['startup_s']:.0f} vs "
                     f"{1e6 * op['small']['startup_s']:.0f} us; opening read {op['large']['bytes_read']} vs "
                     f"{op['small']['bytes_read']} bytes from {op['large']['files_opened']} vs "
                     f"{op['small']['files_opened']} file(s)"),
        target("start-up of the slower store, seconds", slowest_open, TARGETS["open_s"], "<="),
        target(f"memory of {', '.join(str(r['readers']) for r in mem['rows'])} reading processes <= "
               f"{TARGETS['memory_over_store']}x the store", worst_memory["growth_over_store"],
               TARGETS["memory_over_store"], "<=",
               ", ".join(f"{r['readers']}: {r['growth_over_store']:.3f}x" for r in mem["rows"])
               + f" (private copies: {worst_memory['readers']}x)"),
    ]


READS_TABLE = Table(Column("path", 34, lambda r: r[0], "<", gap=""),
                    Column("img/s", 12, lambda r: f"{r[1]:,.0f}", gap=""),
                    Column("GB/s", 8, lambda r: f"{r[2]:.2f}", gap=""))
LOADERS_TABLE = Table(Column("", 38, lambda r: r[0], "<", gap=""),
                      Column("", 10, lambda r: "" if r[1] is None else f"{r[1]:,.0f}", gap=""),
                      Column("", 10, lambda r: f"{r[2]:,.0f}", gap=""))
MEMORY_TABLE = Table(Column("readers", 8, lambda r: str(r["readers"]), gap=""),
                     Column("Pss sum MiB", 13, lambda r: f"{r['pss_sum'] / 2**20:.1f}", gap=""),
                     Column("anon MiB", 10, lambda r: f"{sum(r['anonymous_growth']) / 2**20:.1f}", gap=""),
                     Column("growth / store", 16, lambda r: f"{r['growth_over_store']:.3f}x", gap=""),
                     Column("private copies", 16, lambda r: f"{r['private_copies_over_store']:.0f}x", gap=""))


def format_report(res: dict) -> str:
    m, c = res["meta"], res["config"]
    mc, lo, op, mem, pr = res["memcpy"], res["loaders"], res["open"], res["memory"], res["prepare"]
    reads = [("memcpy of the same bytes", mc["memcpy_img_s"], mc["memcpy_gb_s"]),
             ("in-RAM uint8 tensor, index_select", mc["ram_tensor_gather_img_s"],
              mc["batch_bytes"] * mc["ram_tensor_gather_img_s"] / mc["batch"] / 1e9),
             ("RAW store read(ids, out=)", mc["store_read_img_s"], mc["store_read_gb_s"])]
    in_process, per_core = lo["in_process_img_s"], lo["dataloader_img_s_per_core"]
    loaders = [("RAW store read", in_process["raw_store"], per_core["raw_store"]),
               ("JPEG store read (decode, square)", in_process["jpeg_store"], per_core["jpeg_store"]),
               ("ImageFolder, PIL + RandomResizedCrop", None, per_core["imagefolder"])]
    lines = [machine_line(m, f", torch threads {m['threads']}"),
             f"disk        {m['filesystem']}", f"date        {m['date']}", load_line(m), "",
             f"Source: {c['images']} photo JPEGs (333-500 x 250-375 px, q90), {CLASSES} classes; S = {c['size']}",
             "", "Prepare (images/s)",
             f"  raw,  1 worker   {pr['raw_one_worker']['img_s']:>9,.1f}",
             f"  raw,  {pr['raw_all_workers']['workers']} workers  {pr['raw_all_workers']['img_s']:>9,.1f}  "
             f"({pr['raw_all_workers']['img_s_per_worker']:,.1f} per worker, pool start included)",
             f"  jpeg, {pr['jpeg_all_workers']['workers']} workers  {pr['jpeg_all_workers']['img_s']:>9,.1f}",
             f"  bytes per image: raw {pr['raw_bytes_per_image']:,.0f}, jpeg {pr['jpeg_bytes_per_image']:,.0f}; "
             f"same bytes for 1 and {pr['raw_all_workers']['workers']} workers: {pr['same_bytes_any_worker_count']}",
             "", f"Random batches of {mc['batch']} by id, one thread, pages warm",
             READS_TABLE.header(), *map(READS_TABLE.row, reads),
             "", f"Random batches of {lo['batch']}, images/s per core: in the reading process | through a DataLoader "
                 f"with {lo['workers']} worker(s)",
             *map(LOADERS_TABLE.row, loaders),
             "", "Start-up: open + len + classes + first image (median)",
             *(f"  {op[k]['images']:>9,} images at {op[k]['size']} px: {1e6 * op[k]['startup_s']:>7.0f} us; opening "
               f"reads {op[k]['bytes_read']} bytes from {op[k]['files_opened']} file(s)" for k in ("small", "large")),
             "", f"Memory: processes each reading all {mem['store_bytes'] / 2**20:,.1f} MiB of the RAW store",
             MEMORY_TABLE.header(), *map(MEMORY_TABLE.row, mem["rows"]),
             *targets_block(res["targets"]),
             f"  {'no target':<17} prepare rate: raw {pr['raw_one_worker']['img_s']:,.0f} img/s on 1 worker, "
             f"{pr['raw_all_workers']['img_s']:,.0f} on {pr['raw_all_workers']['workers']} "
             f"({pr['raw_all_workers']['img_s_per_worker']:,.0f} per worker); jpeg {pr['jpeg_all_workers']['img_s']:,.0f} "
             f"on {pr['jpeg_all_workers']['workers']}; same bytes for any worker count: "
             f"{pr['same_bytes_any_worker_count']}"]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    """Images/s per reading path, start-up per store, memory growth per reading process count, prepare rates."""
    plt = import_pyplot("bench/data.py")
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.4), gridspec_kw={"width_ratios": [2.2, 1, 1.2, 1.2]})
    mc, lo, op, mem, pr = res["memcpy"], res["loaders"], res["open"], res["memory"], res["prepare"]
    labels = ["memcpy", "RAM tensor", "RAW store", "JPEG store", "RAW store\nDataLoader", "JPEG store\nDataLoader",
              "ImageFolder\nDataLoader"]
    per_core = lo["dataloader_img_s_per_core"]
    values = [mc["memcpy_img_s"], mc["ram_tensor_gather_img_s"], lo["in_process_img_s"]["raw_store"],
              lo["in_process_img_s"]["jpeg_store"], per_core["raw_store"], per_core["jpeg_store"], per_core["imagefolder"]]
    axes[0].bar(range(len(values)), values, color=["grey", "grey", "C0", "C1", "C0", "C1", "C3"])
    axes[0].set_xticks(range(len(values)), labels, fontsize=7, rotation=25, ha="right")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("images / s per core")
    axes[0].set_title(f"random batches, S = {res['config']['size']}: one thread | DataLoader per worker", fontsize=9)
    axes[1].bar([0, 1], [1e6 * op["small"]["startup_s"], 1e6 * op["large"]["startup_s"]], color="C0")
    axes[1].set_xticks([0, 1], [f"{op['small']['images']:,} images", f"{op['large']['images']:,} images"], fontsize=8)
    axes[1].set_ylabel("start-up, us")
    axes[1].set_title("open + first image", fontsize=9)
    readers = [r["readers"] for r in mem["rows"]]
    axes[2].plot(readers, [r["growth_over_store"] for r in mem["rows"]], "o-", label="store (shared pages)")
    axes[2].plot(readers, readers, "k--", label="a private copy each")
    axes[2].axhline(TARGETS["memory_over_store"], color="C3", lw=0.8, label="target")
    axes[2].set_xlabel("reading processes")
    axes[2].set_ylabel("memory growth / store size")
    axes[2].legend(fontsize=8)
    axes[3].bar([0, 1, 2], [pr["raw_one_worker"]["img_s"], pr["raw_all_workers"]["img_s"], pr["jpeg_all_workers"]["img_s"]],
                color=["C0", "C0", "C1"])
    axes[3].set_xticks([0, 1, 2], ["raw, 1 worker", f"raw, {pr['raw_all_workers']['workers']}",
                                   f"jpeg, {pr['jpeg_all_workers']['workers']}"], fontsize=8)
    axes[3].set_ylabel("images / s")
    axes[3].set_title("prepare", fontsize=9)
    fig.suptitle(f"image store, {res['meta']['cpu']}, {res['meta']['date']}", fontsize=9)
    save_figure(fig, path)
