"""trainers.dist's gather and reduction on 2 real gloo processes, and as identities in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from gloo import gloo_group

from trainers import dist

WORLD = 2
# Rows each rank contributes, per case: unequal, one rank empty, every rank empty.
ROWS = {"unequal": (3, 1), "one_empty": (2, 0), "all_empty": (0, 0)}


def rows_of(rank: int, count: int) -> torch.Tensor:
    """`count` rows of 2 values, distinct across ranks: rank r's start at 100·r."""
    return (100 * rank + torch.arange(2 * count)).view(count, 2).float()


def worker(rank: int, world: int, folder: str) -> None:
    with gloo_group(rank, world, folder):
        gathered = {case: dist.all_gather_cat(rows_of(rank, rows[rank])) for case, rows in ROWS.items()}
        own = torch.tensor(float(rank + 1), requires_grad=True)
        reduced = dist.all_reduce_mean_own_grad(3.0 * own)
        reduced.backward()
    torch.save(
        {"gathered": gathered, "reduced": reduced.detach(), "grad": own.grad}, Path(folder) / f"{rank}.pt"
    )


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of the 2 gloo ranks computed, by rank."""
    folder = tmp_path_factory.mktemp("gloo")
    mp.spawn(worker, args=(WORLD, str(folder)), nprocs=WORLD)
    return [torch.load(folder / f"{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("case", ROWS)
def test_gather_concatenates_every_ranks_rows_in_rank_order(results, case):
    expected = torch.cat([rows_of(rank, count) for rank, count in enumerate(ROWS[case])])
    for rank in range(WORLD):
        assert torch.equal(results[rank]["gathered"][case], expected), f"rank {rank}"


def test_reduced_value_is_the_mean_and_its_gradient_the_own_over_world(results):
    # Rank r reduces 3·(r + 1): the mean is 3·1.5; d/d own of 3·own / 2 is 1.5.
    for rank in range(WORLD):
        assert results[rank]["reduced"].item() == 4.5
        assert results[rank]["grad"].item() == 1.5


def test_one_process_gather_and_reduction_are_identities():
    keys = rows_of(1, 3)
    assert dist.all_gather_cat(keys) is keys
    loss = torch.tensor(2.0, requires_grad=True)
    assert dist.all_reduce_mean_own_grad(loss) is loss
