"""Real gloo process groups on loopback for the DDP tests: what each `mp.spawn` worker opens first."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed


@contextmanager
def gloo_group(rank: int, world: int, folder: str | Path) -> Iterator[None]:
    """This process as `rank` of a `world`-process gloo group on 127.0.0.1 (rendezvous file in `folder`)."""
    # Two OpenMP threads per process on a loaded 2-core machine spin-wait: 100x slower here.
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
