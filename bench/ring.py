"""Pairs through the shared-memory ring vs the plain alternatives, measured side by side in one run.

    python bench/ring.py                  # 224 and 512 px, P = 1..4 producers, C = 1..2 consumers
    python bench/ring.py --quick          # seconds; what tests/test_bench_ring.py runs
    python bench/ring.py --resolutions 512 --producers 2 --consumers 1 --checksums off

For each resolution R and each (P producers, C consumers):

* ring: P producer processes each write K pairs of (2, 3, R, R) uint8 into one ``PairRing``
  (``reserve`` / ``write`` / ``publish_many`` in chunks of ``--write-batch``, waiting while the ring is
  full) and C consumer processes ``borrow`` them by id (disjoint subsets of the ids, ``--take-batch``
  ids per call, ``max_reuse=1`` so every slot is freed again, retrying ids not written yet), read
  each pair where it lies in shared memory, as the trainer's augmentation does, and give the loan
  back; once with ``verify=True`` (CRC32 checked on every borrow) and once with ``verify=False``.
  ``--consumer-read copy`` makes them ``take`` pairs into a batch buffer instead.
  Rate = pairs / (wall time from the start barrier to the last pair consumed).
* Queue: the same P producers ``put((id, tensor (2, 3, R, R) uint8))`` into one
  ``torch.multiprocessing`` Queue (spawn context, as many items in flight as the ring has slots)
  and the same C consumers ``get`` them and read each tensor where it lies (or copy it into a batch
  buffer with ``--consumer-read copy``); same clock.
* memcpy: one process copies the same bytes with ``np.copyto`` in the same chunking, as often as
  the ring copies them: once (producer side, into a ring-sized array), and with
  ``--consumer-read copy`` once more (consumer side, out of it into a batch buffer).

Every consumer checks every pair it receives against the pair its producer wrote (an id stamp
and a checksum of the whole pair), and the script checks that each pair arrived exactly once;
``all_pairs_intact`` in the JSON records the outcome per row. See docs/benchmarks.md.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # before the imports: the reported wall time includes them

import argparse
import os
import platform
import shutil
import signal
import sys

import numpy as np
from common import BenchParser, int_list, output_path, save_results
from machine import LoadWatch, cpu_meta
from ringbench.pairs import expected_sums, make_pool, pair_bytes
from report import on_off
from ringbench.report import TARGET_MEMCPY, TARGET_QUEUE, derive, format_report, plot, summarize
from ringbench.runs import measured, own_segments, run_memcpy, run_queue, run_ring
from tqdm.auto import tqdm

from onlinemix.exchange.ring import SHM_DIR

# Values used when a flag is not given: (default run, --quick run).
DEFAULTS = {
    "resolutions": ("224,512", "64"),
    "producers": ("1,2,3,4", "1,2"),
    "consumers": ("1,2", "1"),
    "mib_per_config": (1024.0, 12.0),
    "slots": (128, 64),
    "memcpy_repeats": (3, 2),
}

CONTENTION_NOTE = ("{cores} CPU core(s) here, and a configuration runs up to {procs} busy processes "
                   "(P producers + C consumers): rates with P + C > {cores} are bound by CPU contention, "
                   "not by the ring, and would be higher with a core per process.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = BenchParser(
        "bench/ring.py",
        description="Move (real, synthetic) uint8 image pairs from P producer processes to C consumer\n"
                    "processes through the shared-memory PairRing, through a torch.multiprocessing Queue,\n"
                    "and measure a plain numpy copy of the same bytes; report pairs/s, GB/s and the\n"
                    "ring's ratios to both alternatives.",
        epilog="Flags left out take the default run's value, or the --quick value when --quick is\n"
               "given (shown as 'default / quick'). Results: one table per resolution on stdout, JSON at\n"
               "--out and a PNG plot next to it. Progress bars go to stderr.",
        defaults=DEFAULTS,
        quick_help="resolution 64 only, P in {1,2}, C = 1, a few MiB per producer: well under 30 s on 2 CPU "
                   "cores (smoke test); the numbers are then noisy")
    q = p.default_note
    p.add_argument("--resolutions", default=None,
                   help=f"comma-separated image sides R in pixels; a pair is 2*3*R*R bytes; R must be even "
                        f"{q('resolutions')}")
    p.add_argument("--producers", default=None,
                   help=f"comma-separated producer process counts P to measure {q('producers')}")
    p.add_argument("--consumers", default=None,
                   help=f"comma-separated consumer process counts C to measure {q('consumers')}")
    p.add_argument("--pairs", type=int, default=None,
                   help="pairs K each producer writes, in every configuration (default: set by --mib-per-config)")
    p.add_argument("--mib-per-config", type=float, default=None,
                   help=f"sets K when --pairs is not given: every configuration moves this many MiB in all, so "
                        f"K = MiB / P / pair size (at least --write-batch), and the memcpy baseline copies the "
                        f"same amount {q('mib_per_config')}")
    p.add_argument("--slots", type=int, default=None,
                   help=f"ring slots; the Queue gets the same number of items in flight (maxsize) "
                        f"{q('slots')}")
    p.add_argument("--write-batch", type=int, default=16,
                   help="slots a producer reserves per reserve() call, then writes and publishes one by one "
                        "(default 16, the package's generator.batch_size); also the memcpy write chunk")
    p.add_argument("--take-batch", type=int, default=32,
                   help="ids a consumer asks for per take() call (default 32); also the memcpy read chunk")
    p.add_argument("--consumer-read", choices=("in-place", "copy"), default="in-place",
                   help="how a consumer reads its pairs (default in-place). in-place: ring consumers borrow() "
                        "pairs and check them where they lie in shared memory, as the trainer's augmentation "
                        "reads them; Queue consumers check the received shared tensor itself; the memcpy "
                        "baseline makes one copy. copy: ring consumers take() pairs into a (take_batch, ...) "
                        "buffer, Queue consumers copy each tensor into one; the memcpy baseline copies twice")
    p.add_argument("--checksums", choices=("both", "on", "off"), default="both",
                   help="ring runs with verify=True (CRC32 of every pair checked when it is borrowed), with "
                        "verify=False, or both (default both). The producer side always computes the CRC32: "
                        "PairRing.write returns it")
    p.add_argument("--intact-check", choices=("sum64", "crc32"), default="sum64",
                   help="how consumers check each received pair against what its producer wrote, in the ring "
                        "and the Queue runs alike: sum64 = id stamp + sum of the pair's 64-bit words (~20 GB/s, "
                        "the default, so the check barely shows in the rates) or crc32 = id stamp + CRC32 of the "
                        "pair (~2.5-5 GB/s, a second CRC pass on the consumer side)")
    p.add_argument("--sharing-strategy", choices=("default", "file_descriptor", "file_system"), default="default",
                   help="torch.multiprocessing.set_sharing_strategy for the Queue runs (default: leave torch's "
                        "default, file_descriptor on Linux)")
    p.add_argument("--no-queue", action="store_true", help="skip the torch.multiprocessing Queue baseline")
    p.add_argument("--memcpy-repeats", type=int, default=None,
                   help=f"memcpy rounds per resolution; the median is reported {q('memcpy_repeats')}")
    p.add_argument("--poll-ms", type=float, default=0.2,
                   help="sleep of a producer that has to wait (ring full or too far ahead of the consumers) and "
                        "of a consumer whose take() found none of its ids (default 0.2)")
    p.add_argument("--retries", type=int, default=1,
                   help="repeat a measurement during which other processes used more than 0.2 cores on average "
                        "(it is skewed) up to this many times and keep the least skewed attempt (default 1; 0 "
                        "measures everything once, as fast as possible)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds one configuration may take before the run is aborted (default 300)")
    p.add_argument("--profile", action="store_true",
                   help="also count, in every ring worker, the time spent in flock (the ring's lock, waiting "
                        "included) and in zlib.crc32 inside PairRing's calls, and print a cost breakdown per ring "
                        "row (microseconds per pair). Adds a little overhead per lock and CRC call")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pair contents (default 0)")
    args = p.parse(argv)
    args.resolutions = sorted(set(int_list(p, "--resolutions", args.resolutions)))
    args.producers = sorted(set(int_list(p, "--producers", args.producers)))
    args.consumers = sorted(set(int_list(p, "--consumers", args.consumers)))
    if any(r % 2 or r < 4 for r in args.resolutions):
        p.error("--resolutions must be even and >= 4 (pairs are checked as 64-bit words)")
    p.require_at_least(args, 1, "slots", "write_batch", "take_batch", "memcpy_repeats", "pairs")
    if args.mib_per_config <= 0 or args.poll_ms < 0 or args.timeout <= 0:
        p.error("--mib-per-config and --timeout must be > 0, --poll-ms >= 0")
    p.require_at_least(args, 0, "retries")
    if args.slots < max(args.producers):
        p.error("--slots must be at least the largest --producers value (each producer needs room ahead)")
    args.verify = {"both": [True, False], "on": [True], "off": [False]}[args.checksums]
    return args


def pairs_per_producer(args: argparse.Namespace, r: int, n_producers: int) -> int:
    """K, the pairs each of ``n_producers`` producers writes at resolution ``r``: --pairs, or --mib-per-config
    shared between them."""
    if args.pairs is not None:
        return args.pairs
    return max(args.write_batch, round(args.mib_per_config * 2**20 / n_producers / pair_bytes(r)))


def measure_resolution(args: argparse.Namespace, r: int, bar: tqdm) -> dict:
    """memcpy, then every (P, C) configuration at resolution ``r``: the Queue and the ring runs in turns, so
    that drift of the machine hits the ring and the Queue alike."""
    if args.slots * pair_bytes(r) > shutil.disk_usage(SHM_DIR).free * 0.8:
        sys.exit(f"bench/ring.py: {args.slots} slots of {pair_bytes(r)} B do not fit in {SHM_DIR}; lower --slots")
    expected = [expected_sums(make_pool(args.seed, r, p, args.write_batch)) for p in range(max(args.producers))]
    bar.set_description(f"R={r} memcpy")
    memcpy = measured(args.retries, run_memcpy, args, r, pairs_per_producer(args, r, 1))
    bar.update()
    ring_rows, queue_rows = [], []
    for p in args.producers:
        for c in args.consumers:
            k = pairs_per_producer(args, r, p)
            if not args.no_queue:
                bar.set_description(f"R={r} P={p} C={c} Queue")
                queue_rows.append(measured(args.retries, run_queue, args, r, p, c, k, expected))
                bar.update()
            for verify in args.verify:
                bar.set_description(f"R={r} P={p} C={c} ring crc {on_off(verify)}")
                ring_rows.append(measured(args.retries, run_ring, args, r, p, c, k, verify, expected))
                bar.update()
    return {"resolution": r, "pair_bytes": pair_bytes(r),
            "pairs_per_producer": {str(p): pairs_per_producer(args, r, p) for p in args.producers},
            "memcpy": memcpy, "ring": ring_rows, "queue": queue_rows}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: unlink the ring
    out = output_path(args.out, "bench/ring.py")
    import torch  # after parsing, so --help stays fast; the workers of the ring runs never import it

    configs = len(args.producers) * len(args.consumers)
    n_runs = len(args.resolutions) * (1 + configs * (len(args.verify) + (0 if args.no_queue else 1)))
    load = LoadWatch()
    try:
        with tqdm(total=n_runs, unit="run", dynamic_ncols=True) as bar:
            blocks = [measure_resolution(args, r, bar) for r in args.resolutions]
    except KeyboardInterrupt:
        print("\nbench/ring.py: interrupted; every ring segment has been unlinked", file=sys.stderr)
        sys.exit(130)
    load.stop()

    max_procs = max(args.producers) + max(args.consumers)
    res = {
        "meta": {
            **cpu_meta(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "platform": platform.platform(),
            "shm_free_gib": shutil.disk_usage(SHM_DIR).free / 2**30,
            **load.meta(args.quick, "bench/ring.py", argv),
            "contention_note": CONTENTION_NOTE.format(cores=os.cpu_count(), procs=max_procs),
        },
        "config": {"resolutions": args.resolutions, "producers": args.producers, "consumers": args.consumers,
                   "slots": args.slots, "write_batch": args.write_batch, "take_batch": args.take_batch,
                   "verify": args.verify, "intact_check": args.intact_check, "poll_ms": args.poll_ms,
                   "mib_per_config": args.mib_per_config, "pairs": args.pairs, "seed": args.seed,
                   "queue": not args.no_queue, "sharing_strategy_flag": args.sharing_strategy,
                   "profile": args.profile, "retries": args.retries, "consumer_read": args.consumer_read,
                   "targets": {"x_memcpy": TARGET_MEMCPY, "x_queue": TARGET_QUEUE}},
        "resolutions": blocks,
    }
    strategies = {q["sharing_strategy"] for b in blocks for q in b["queue"]}
    res["queue_sharing_strategy"] = ",".join(sorted(strategies)) or None
    derive(res)
    summarize(res, os.cpu_count() or 1)
    res["meta"]["segments_left"] = own_segments()
    save_results(res, out, plot, format_report, _T0, gap=True)
    return res


if __name__ == "__main__":
    main()
