"""Where generation runs: the devices of a node's generator processes."""

from __future__ import annotations

import torch


def generator_devices(count: int, trainers_on_node: int) -> list[str]:
    """Generator i takes the first GPU after the trainers' GPUs; without GPUs all run on the CPU."""
    if not torch.cuda.is_available():
        return ["cpu"] * count
    available = torch.cuda.device_count()
    needed = trainers_on_node + count
    if needed > available:
        raise RuntimeError(f"{trainers_on_node} trainer(s) + gen_gpus={count} producer(s) need {needed} GPUs "
                           f"but {available} are visible; lower gen_gpus or the number of trainer processes")
    return [f"cuda:{trainers_on_node + i}" for i in range(count)]
