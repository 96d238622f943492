"""Where generation runs: the devices of a node's generator processes, checked against the launch.

A node's trainer ranks take ``cuda:0 .. cuda:T-1`` of the GPUs it can see (accelerate and torchrun
give local rank i ``cuda:i``); producers take the next ``gen_gpus`` (``cuda:T .. cuda:T+K-1``), or
the devices listed in ``gen_devices``, which may share a trainer's GPU. Everything a user can get
wrong is decided by :func:`producer_devices`, a pure function of :class:`NodeLaunch` (what the
launcher and the environment give the node), so it is checked without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from onlinemix.core.config import ConfigError


class DeviceError(ConfigError):
    """The node's GPUs cannot hold the trainers and producers asked for."""


@dataclass(frozen=True)
class NodeLaunch:
    """What one node was given: GPUs visible to its processes, trainer ranks, and who started them."""
    visible_gpus: int                   # torch.cuda.device_count() (0: no CUDA)
    cuda_visible_devices: str | None    # the environment's CUDA_VISIBLE_DEVICES (accelerate's gpu_ids become it)
    trainers: int                       # trainer ranks on this node (LOCAL_WORLD_SIZE)
    launcher: str                       # "accelerate", "torchrun" or "python"

    @classmethod
    def detect(cls, trainers: int) -> NodeLaunch:
        """This process's node, as the environment describes it."""
        if "ACCELERATE_MIXED_PRECISION" in os.environ:  # set by accelerate launch for its processes
            launcher = "accelerate"
        elif "TORCHELASTIC_RUN_ID" in os.environ:
            launcher = "torchrun"
        else:
            launcher = "python"
        return cls(torch.cuda.device_count() if torch.cuda.is_available() else 0,
                   os.environ.get("CUDA_VISIBLE_DEVICES"), trainers, launcher)

    def trainer_processes_flag(self) -> str:
        """How the user sets the number of trainer ranks per node with this launcher."""
        return {"accelerate": "accelerate launch --num_processes (or num_processes in the accelerate config; "
                              "per node: num_processes / num_machines)",
                "torchrun": "torchrun --nproc-per-node"}.get(self.launcher, "the launcher")

    def visible_clause(self) -> str:
        """Which GPUs this node sees, and where that comes from."""
        if self.cuda_visible_devices is None:
            return f"{self.visible_gpus} GPU(s) are visible"
        source = " (accelerate sets it from gpu_ids)" if self.launcher == "accelerate" else ""
        return f"{self.visible_gpus} GPU(s) are visible: CUDA_VISIBLE_DEVICES={self.cuda_visible_devices}{source}"


def producer_devices(node: NodeLaunch, gen_gpus: int, gen_devices: list[str], count_name: str = "gen_gpus") -> list[str]:
    """The device of each of this node's producers, or :class:`DeviceError` saying what to change.

    Default placement: ``gen_gpus`` producers on the GPUs after the trainers' (all on the CPU when
    there is no GPU). ``gen_devices`` overrides it: one producer per entry, wherever it says,
    including a trainer's GPU (time-sliced with it). ``count_name``: what the user set ``gen_gpus`` with."""
    if gen_devices:
        return _check_explicit(node, gen_devices)
    if node.visible_gpus == 0:
        return ["cpu"] * gen_gpus
    t, k, v = node.trainers, gen_gpus, node.visible_gpus
    if t + k <= v:
        return [f"cuda:{t + i}" for i in range(k)]
    fixes = []
    if node.cuda_visible_devices is not None:
        where = "gpu_ids in the accelerate config" if node.launcher == "accelerate" else "CUDA_VISIBLE_DEVICES"
        fixes.append(f"list {t + k} GPUs in {where} (trainers take the first {t}, producers the next {k})")
    if t >= v > k:
        fixes.append(f"start {v - k} trainer process(es) per node with {node.trainer_processes_flag()}")
    if v > t:
        fixes.append(f"lower {count_name} to {v - t}")
    fixes.append(f"place the producers yourself with --gen-devices (e.g. --gen-devices cuda:{v - 1}, sharing a "
                 "trainer's GPU)")
    taken = "cuda:0" if t == 1 else f"cuda:0..cuda:{t - 1}"
    trainers = f"{t} trainer rank(s) on this node take {taken} and " if t else ""
    raise DeviceError(f"{trainers}{count_name}={k} producer(s) {'the next' if t else 'take'} {k} GPU(s), so the "
                      f"node needs {t + k} GPUs, but {node.visible_clause()}; " + "; or ".join(fixes))


def _check_explicit(node: NodeLaunch, devices: list[str]) -> list[str]:
    for device in devices:
        if device == "cpu":
            continue
        index = int(device.split(":")[1])
        if node.visible_gpus == 0:
            where = ("CUDA_VISIBLE_DEVICES is not set" if node.cuda_visible_devices is None
                     else f"CUDA_VISIBLE_DEVICES={node.cuda_visible_devices!r}")
            raise DeviceError(f"gen_devices names {device}, but no CUDA device is visible to this process ({where}); "
                              "use cpu, or fix the GPU setup")
        if index >= node.visible_gpus:
            raise DeviceError(f"gen_devices names {device}, but {node.visible_clause()}, so the indices are "
                              f"cuda:0..cuda:{node.visible_gpus - 1} (counted within CUDA_VISIBLE_DEVICES when it "
                              "is set)")
    return devices


def shared_with_trainers(node: NodeLaunch, devices: list[str]) -> list[str]:
    """The producers' devices that a trainer rank of this node also uses (they take turns on it)."""
    trainer_gpus = {f"cuda:{i}" for i in range(node.trainers)} if node.visible_gpus else set()
    return sorted(set(devices) & trainer_gpus)


def make_current(device: torch.device | str) -> None:
    """Make ``device`` the calling thread's current CUDA device (nothing to do off CUDA), before anything
    touches CUDA on that thread. The current device is per thread and starts at cuda:0, and libraries
    allocate on it: diffusers' xformers probe, leaving a ``torch.cuda.stream`` block, a Triton launch.
    Left at cuda:0, each would open a context (about 0.5 GB) on another process's GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
