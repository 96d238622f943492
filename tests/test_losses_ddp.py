"""DDP: two gloo processes, each putting its half of a fixed global batch through a linear model
wrapped in DistributedDataParallel, must end with the parameter gradients of one process on the
whole batch. One spawn computes every case; the tests compare its results here."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from onlinemix.core.distributed import all_reduce_sum_with_grad
from onlinemix.methods.dino import DINOCenter
from onlinemix.methods.losses import barlow_twins_loss, nt_xent

WORLD = 2
LOCAL_BATCH = 4
IN_DIM, OUT_DIM = 6, 3
TEMPERATURE, LAMBD = 0.5, 0.5
TIMEOUT_S = 120


def naive_barlow_twins(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """The authors' reduction: C summed with an in-place dist.all_reduce that autograd does not
    see. Everything else (global batch statistics) is as in barlow_twins_loss."""
    n = z_a.shape[0] * dist.get_world_size()

    def standardise(z: torch.Tensor) -> torch.Tensor:
        centred = z - all_reduce_sum_with_grad(z.sum(dim=0)) / n
        return centred / torch.sqrt(all_reduce_sum_with_grad(centred.square().sum(dim=0)) / n + 1e-5)

    c = standardise(z_a).T @ standardise(z_b) / n
    dist.all_reduce(c)
    off_diag = c.square().sum() - c.diagonal().square().sum()
    return (1 - c.diagonal()).square().sum() + LAMBD * off_diag


CASES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "simclr": lambda z_a, z_b: nt_xent(z_a, z_b, TEMPERATURE),
    "simclr_local_negatives": lambda z_a, z_b: nt_xent(z_a, z_b, TEMPERATURE, gather=False),
    "barlow_twins": lambda z_a, z_b: barlow_twins_loss(z_a, z_b, LAMBD),
    "naive_barlow_twins": naive_barlow_twins,
}


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Real views and correlated 'synthetic' views of WORLD * LOCAL_BATCH images."""
    gen = torch.Generator().manual_seed(0)
    x_a = torch.randn(WORLD * LOCAL_BATCH, IN_DIM, generator=gen, dtype=torch.float64)
    return x_a, x_a + 0.5 * torch.randn(x_a.shape, generator=gen, dtype=torch.float64)


def make_model() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(IN_DIM, OUT_DIM, dtype=torch.float64)


def loss_and_gradients(model: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor,
                       loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, object]:
    # One forward over both views, as a trainer does: DDP expects one forward per backward.
    z_a, z_b = model(torch.cat([x_a, x_b])).chunk(2)
    loss = loss_fn(z_a, z_b)
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in model.parameters()]}


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        x_a, x_b = global_batch()
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results: dict[str, object] = {}
        for name, loss_fn in CASES.items():
            model = DistributedDataParallel(make_model())
            results[name] = loss_and_gradients(model, x_a[rows], x_b[rows], loss_fn)
        center = DINOCenter(IN_DIM)
        center.update([x_a[rows], x_b[rows]])
        results["center"] = center.center
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Each rank's results from one spawn of WORLD gloo processes."""
    tmp = tmp_path_factory.mktemp("ddp")
    context = mp.start_processes(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def single_process(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, object]:
    return loss_and_gradients(make_model(), *global_batch(), loss_fn)


def assert_gradients(ranks: list[dict], case: str, expected: list[torch.Tensor]) -> None:
    for r, result in enumerate(ranks):
        for got, want in zip(result[case]["grads"], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=lambda m, r=r: f"rank {r}: {m}")


def test_simclr_ddp_gradients_equal_single_process_on_the_global_batch(ranks: list[dict]) -> None:
    reference = single_process(CASES["simclr"])
    assert_gradients(ranks, "simclr", reference["grads"])
    # Each rank's loss is the mean over its own anchors, so the ranks' mean is the global loss.
    torch.testing.assert_close(sum(r["simclr"]["loss"] for r in ranks) / WORLD, reference["loss"])


def test_simclr_without_gathered_negatives_differs(ranks: list[dict]) -> None:
    # The check above can fail: contrasting only within each rank's half changes the gradients.
    reference = single_process(CASES["simclr"])
    with pytest.raises(AssertionError):
        assert_gradients(ranks, "simclr_local_negatives", reference["grads"])


def test_barlow_twins_ddp_gradients_equal_single_process_on_the_global_batch(ranks: list[dict]) -> None:
    reference = single_process(CASES["barlow_twins"])
    assert_gradients(ranks, "barlow_twins", reference["grads"])
    for result in ranks:
        torch.testing.assert_close(result["barlow_twins"]["loss"], reference["loss"])


def test_naive_all_reduce_of_the_correlation_scales_gradients_by_one_over_world(ranks: list[dict]) -> None:
    # Same forward value, but autograd never sees the sum over ranks: every rank back-propagates
    # only its own share, and DDP's averaging leaves 1/W of the single-process gradient.
    reference = single_process(CASES["barlow_twins"])
    for result in ranks:
        torch.testing.assert_close(result["naive_barlow_twins"]["loss"], reference["loss"])
    with pytest.raises(AssertionError):
        assert_gradients(ranks, "naive_barlow_twins", reference["grads"])
    assert_gradients(ranks, "naive_barlow_twins", [g / WORLD for g in reference["grads"]])


def test_dino_center_averages_teacher_outputs_over_all_ranks(ranks: list[dict]) -> None:
    x_a, x_b = global_batch()
    expected = 0.1 * torch.cat([x_a, x_b]).float().mean(dim=0, keepdim=True)
    for result in ranks:
        torch.testing.assert_close(result["center"], expected)
