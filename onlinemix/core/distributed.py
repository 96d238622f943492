"""Collectives for losses that span the global batch under DDP.

Every helper is the identity (or a no-op) when torch.distributed is not initialised or the
world has one process, so a loss written with them runs unchanged in a single process.

Gradient convention: the autograd-aware collectives sum, in backward, the gradients that every
rank's loss sends to this rank's tensor. The parameter gradient on each rank is therefore that
of the *sum* of the per-rank losses, and DDP's division by the world size turns it into the
gradient of their *mean*. A loss is DDP-correct when the mean over ranks of what it returns
equals the loss of one process on the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def is_distributed() -> bool:
    """True when a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group; 1 when not distributed."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group; 0 when not distributed."""
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' ``x`` concatenated along dim 0, in rank order; gradients flow back to each
    rank's own rows (summed over the ranks whose loss used them)."""
    if not is_distributed():
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks; its backward all-reduces the incoming gradient, so each rank's
    ``x`` receives the gradient of every rank's loss, not only its own."""
    if not is_distributed():
        return x
    return dist_nn.all_reduce(x, op=dist.ReduceOp.SUM)


@torch.no_grad()
def all_reduce_mean_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks as a new detached tensor, for statistics such as DINO's center."""
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out
