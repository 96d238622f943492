"""Memory of processes sharing a store: 1, 2, 4 (--readers) processes, the store pickled to them, each read every
image of the RAW store into a reused buffer; from ``/proc/<pid>/smaps``: the Pss of their mappings of the
store's files (shared pages count once, split between the processes) plus their anonymous growth."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from common import REPO, repo_env

from onlinemix.data.store import ImageStore

# A reading process: it reads every image of the store it is given into one batch buffer, prints its anonymous
# memory growth in KiB, then waits for a line on stdin while the parent reads its mappings.
READER = """
import pickle, sys
import torch
from pathlib import Path
def anonymous_kib():
    return int(next(l for l in Path("/proc/self/smaps_rollup").read_text().splitlines()
                    if l.startswith("Anonymous:")).split()[1])
store = pickle.loads(bytes.fromhex(sys.argv[1]))
batch = torch.zeros((64, 3, store.size, store.size), dtype=torch.uint8)  # the batch buffer, touched already
store.read(range(1), out=batch[:1])
before = anonymous_kib()
for start in range(0, len(store), 64):
    store.read(range(start, min(start + 64, len(store))), out=batch[:min(64, len(store) - start)])
print(anonymous_kib() - before, flush=True)
sys.stdin.readline()
"""


def mapped_bytes(pid: int, root: Path) -> dict[str, int]:
    """Rss and Pss of a process's mappings of files under ``root``, from /proc/<pid>/smaps."""
    totals, inside = {"Rss": 0, "Pss": 0}, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:
            inside = len(fields) >= 6 and fields[5].startswith(str(root))
        elif inside and fields[0].rstrip(":") in totals:
            totals[fields[0].rstrip(":")] += int(fields[1]) * 1024
    return totals


def bench_memory(reader_counts: list[int], store: ImageStore) -> dict:
    """Memory growth of each count of reading processes, against the store's size."""
    data = store.header["data_bytes"]
    rows = []
    for k in reader_counts:
        readers = [subprocess.Popen([sys.executable, "-c", READER, pickle.dumps(store).hex()], cwd=REPO, env=repo_env(),
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(k)]
        try:
            anonymous = [int(r.stdout.readline()) * 1024 for r in readers]
            maps = [mapped_bytes(r.pid, store.root) for r in readers]
        finally:
            for r in readers:
                r.communicate("\n", timeout=120)
        growth = sum(m["Pss"] for m in maps) + sum(max(0, a) for a in anonymous)
        rows.append({"readers": k, "rss_per_reader": [m["Rss"] for m in maps], "pss_sum": sum(m["Pss"] for m in maps),
                     "anonymous_growth": anonymous, "total_growth": growth, "growth_over_store": growth / data,
                     "private_copies_over_store": float(k)})
    return {"store_bytes": data, "rows": rows}
