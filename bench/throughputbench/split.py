"""How to split a node between generator and trainer devices: a model from the per-device rates measured on
one device, not a multi-device measurement."""

from __future__ import annotations


def split_model(train_img_s: float, gen_img_s: float, node_gpus: int, max_reuse: list[int]) -> dict:
    """How to split a node of ``node_gpus`` devices into g generators and t = node_gpus - g trainers.

    This is a MODEL computed from the per-device rates measured above on this one device, not a
    multi-device measurement: it assumes every device runs as fast as the one measured, that
    trainers scale linearly (no all-reduce or data-loading cost) and that generators run at the
    best measured batch size with no producer-side overhead beyond the wrapper (the ring costs are
    measured separately and are orders of magnitude smaller). With each synthetic view serving up
    to ``r`` times (staleness.max_reuse), g generators feed at most g * gen_rate * r trainer images/s,
    so the trainers' throughput with a synthetic view for every image is

        min(t * train_rate, g * gen_rate * r).

    Beyond that point trainers would wait (staleness.policy=wait) or fall back to real views.
    """
    rows = []
    for g in range(1, node_gpus):
        t = node_gpus - g
        rows.append({"gen": g, "train": t, "train_capacity_img_s": t * train_img_s,
                     "gen_capacity_img_s": g * gen_img_s,
                     "throughput_img_s": {str(r): min(t * train_img_s, g * gen_img_s * r) for r in max_reuse}})
    best = {}
    for r in max_reuse:
        top = max(row["throughput_img_s"][str(r)] for row in rows)
        # Among equal throughputs prefer fewer generators (more trainer devices free for other work).
        best[str(r)] = min(row["gen"] for row in rows if row["throughput_img_s"][str(r)] >= top * (1 - 1e-12))
    ratio = train_img_s / gen_img_s
    return {"node_gpus": node_gpus, "max_reuse": max_reuse, "train_img_s": train_img_s, "gen_img_s": gen_img_s,
            "train_over_gen": ratio,
            "gen_devices_per_train_device": {str(r): ratio / r for r in max_reuse}, "rows": rows, "best_gen": best}
