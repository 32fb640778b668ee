"""DDP equivalence: SGD steps on 2 gloo workers x batch b give the parameters of 1 worker x batch 2b.

The model is in eval mode: BatchNorm then normalizes with its running statistics (and dropout is
off), so each image's gradient does not depend on its batch-mates and averaging the two workers'
gradients equals the gradient of the whole batch. In train mode each gloo worker normalizes with its
own batch's statistics (plain BatchNorm; SyncBatchNorm runs only on GPUs), which is the one
intended difference between the two settings. Masks have no ignored pixels, so every worker's
mean loss is over the same pixel count and the mean of the means is the mean over the whole batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp
from gloo import gloo_group

from trainers import dist
from trainers.batch import LabeledBatch
from trainers.config import MethodConfig, OptimConfig
from trainers.forward import Forwarder
from trainers.methods import build_method
from trainers.model import DeepLabV3Plus
from trainers.optim import build_optimizer, scale

CLASSES, GLOBAL_BATCH, SIZE, STEPS = 3, 4, 33, 2


def batch() -> LabeledBatch:
    g = torch.Generator().manual_seed(0)
    image = torch.randn(GLOBAL_BATCH, 3, SIZE, SIZE, generator=g)
    mask = torch.randint(0, CLASSES, (GLOBAL_BATCH, SIZE, SIZE), generator=g)
    return LabeledBatch(image, mask)


def train(rank: int, world: int) -> dict[str, torch.Tensor]:
    """STEPS steps of the supervised method on this rank's shard, with the scaled LR; the parameters."""
    torch.manual_seed(0)
    net = DeepLabV3Plus("tiny", CLASSES).eval()
    model = dist.wrap(Forwarder(net), dist.context(use_gpu=False))
    optim_cfg = OptimConfig(batch_size=GLOBAL_BATCH // world, lr=0.01, reference_global_batch=GLOBAL_BATCH)
    optimizer = build_optimizer(net, optim_cfg, scale(optim_cfg, world).lr)
    method = build_method(MethodConfig(name="supervised"), 255)
    full, per = batch(), GLOBAL_BATCH // world
    shard = LabeledBatch(full.image[rank * per : (rank + 1) * per], full.mask[rank * per : (rank + 1) * per])
    for _ in range(STEPS):
        out = method.step(model, shard)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def ddp_worker(rank: int, world: int, folder: str) -> None:
    with gloo_group(rank, world, folder):
        params = train(rank, world)
    if rank == 0:
        torch.save(params, Path(folder) / "params.pt")


def test_two_workers_match_one_worker_with_the_whole_batch(tmp_path):
    mp.spawn(ddp_worker, args=(2, str(tmp_path)), nprocs=2)
    two = torch.load(tmp_path / "params.pt")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train(rank=0, world=1)
    finally:
        torch.set_num_threads(threads)

    torch.manual_seed(0)
    start = dict(DeepLabV3Plus("tiny", CLASSES).named_parameters())
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-3  # the steps changed the weights, so agreeing is not trivial
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
