"""Self-supervised losses for SimCLR and BarlowTwins, correct under DDP.

Each loss returns, on every rank, a value whose mean over ranks is the loss of one process on
the global batch; with the autograd-aware collectives of ``onlinemix.core.distributed`` and DDP's
gradient averaging, the parameter gradients then equal the single-process ones (see that
module's docstring). Arithmetic runs in at least fp32 so that autocast's fp16/bf16 embeddings
do not overflow the logits or lose the small off-diagonal correlations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onlinemix.core.distributed import (
    all_reduce_mean_no_grad,
    all_reduce_sum_with_grad,
    gather_with_grad,
    is_distributed,
    rank,
    world_size,
)


def _check_pair(z_a: torch.Tensor, z_b: torch.Tensor) -> None:
    if z_a.shape != z_b.shape or z_a.ndim != 2:
        raise ValueError(f"expected two (N, D) embeddings of the same shape, got {tuple(z_a.shape)} and {tuple(z_b.shape)}")


def _at_least_fp32(z: torch.Tensor) -> torch.Tensor:
    return z.to(torch.promote_types(z.dtype, torch.float32))


def _without_autocast(z: torch.Tensor) -> torch.autocast:
    """Autocast would run the matmuls below in fp16/bf16 whatever their inputs' dtype."""
    return torch.autocast(device_type=z.device.type, enabled=False)


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, gather: bool = True,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N embeddings: the positive of z_a[i] is z_b[i] and vice versa;
    the other 2N - 2 embeddings are negatives. Cosine similarity, temperature tau.

    With MixDiff, ``z_a`` embeds the real views and ``z_b`` their synthetic variations.

    Under DDP with ``gather`` (the default), every rank's embeddings are negatives too, as in
    one process on the global batch of 2NW embeddings, while this rank's 2N rows are the only
    anchors and the loss is their mean: the mean over ranks is then the global loss. All ranks
    must pass the same N (all_gather needs equal shapes: use drop_last). With ``gather=False``
    each rank contrasts only within its local batch. ``weights`` (N,), mean 1: each pair's two anchors
    count this much in the mean (``train.pair_weighting``).
    """
    _check_pair(z_a, z_b)
    with _without_autocast(z_a):
        return _nt_xent(z_a, z_b, temperature, gather, weights)


def _nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, gather: bool,
             weights: torch.Tensor | None) -> torch.Tensor:
    n = z_a.shape[0]
    a = F.normalize(_at_least_fp32(z_a), dim=1)
    b = F.normalize(_at_least_fp32(z_b), dim=1)
    if gather and is_distributed():
        all_a, all_b, offset = gather_with_grad(a), gather_with_grad(b), rank() * n
    else:
        all_a, all_b, offset = a, b, 0
    total = all_a.shape[0]  # N times the number of ranks contrasted
    anchors = torch.cat([a, b])
    logits = anchors @ torch.cat([all_a, all_b]).T / temperature
    # Anchor a_i is candidate offset + i and b_i is candidate total + offset + i; each is
    # masked out as its own negative and has the other branch's row as its positive.
    rows = torch.arange(2 * n, device=logits.device)
    local = rows % n + offset
    own = torch.where(rows < n, local, local + total)
    positive = torch.where(rows < n, local + total, local)
    logits = logits.index_put((rows, own), logits.new_tensor(float("-inf")))
    if weights is None:
        return F.cross_entropy(logits, positive)
    return (F.cross_entropy(logits, positive, reduction="none") * weights.repeat(2)).mean()


def _batch_norm_global(z: torch.Tensor, global_batch: torch.Tensor, eps: float) -> torch.Tensor:
    """Standardise each dimension with the mean and biased variance of the global batch
    (BatchNorm1d without affine, as SyncBatchNorm in training mode), differentiably."""
    mean = all_reduce_sum_with_grad(z.sum(dim=0)) / global_batch
    centred = z - mean
    var = all_reduce_sum_with_grad(centred.square().sum(dim=0)) / global_batch
    return centred / torch.sqrt(var + eps)


def barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float, eps: float = 1e-5,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
    """BarlowTwins: sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2, with C the cross-correlation
    of the two branches' embeddings batch-normalised over the global batch.

    With MixDiff, ``z_a`` embeds the real views and ``z_b`` their synthetic variations.

    Under DDP every rank returns the same global loss. Each rank contributes its rows to the
    statistics and to C through an autograd-aware all-reduce, whose backward sums the W equal
    upstream gradients into every rank's rows; DDP's division by W then leaves exactly the
    single-process gradient, so no extra scaling is needed.

    The authors' code sums C with an in-place ``dist.all_reduce``, which autograd does not see:
    each rank back-propagates dL/dC into its own term of C only, so every rank's gradient is the
    global gradient's share from its rows, and DDP's averaging divides their sum by W: the
    update is 1/W of the right one, silently shrinking the step as GPUs are added (and shifting
    the balance against weight decay).

    ``weights`` (N,), mean 1: each pair's share of the cross-correlation (``train.pair_weighting``); the
    batch-normalisation statistics stay unweighted.
    """
    _check_pair(z_a, z_b)
    with _without_autocast(z_a):
        return _barlow_twins_loss(z_a, z_b, lambd, eps, weights)


def _barlow_twins_loss(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float, eps: float,
                       weights: torch.Tensor | None) -> torch.Tensor:
    # The global batch size as a tensor: ranks may hold different N, and no host sync is needed.
    local_batch = torch.tensor(float(z_a.shape[0]), device=z_a.device)
    global_batch = all_reduce_mean_no_grad(local_batch) * world_size()
    a = _batch_norm_global(_at_least_fp32(z_a), global_batch, eps)
    b = _batch_norm_global(_at_least_fp32(z_b), global_batch, eps)
    # Autograd-aware, unlike a plain in-place dist.all_reduce: its backward hands every rank
    # the gradient of all W (equal) losses, which DDP's averaging turns back into one.
    if weights is not None:
        a = a * weights[:, None]
    c = all_reduce_sum_with_grad(a.T @ b / global_batch)
    on_diag = (1 - c.diagonal()).square().sum()
    off_diag = c.square().sum() - c.diagonal().square().sum()
    return on_diag + lambd * off_diag
