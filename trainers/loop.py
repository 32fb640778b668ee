"""The one training loop: every method plugs in through the hooks of `trainers.methods.base.Method`;
runs alone or under DDP. `fit` reads as UniMatch's training: assemble, resume, then per epoch train,
evaluate, checkpoint, report."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from trainers import checkpoint as ckpt
from trainers import dist, speed
from trainers.backbones import BACKBONES
from trainers.config import TrainConfig, choice
from trainers.data import Loaders, build_loaders, check_epoch, steps_per_epoch
from trainers.datasets import DatasetSpec, SplitFiles, check_split_for_training, dataset_spec, resolve_split
from trainers.dist import DistContext
from trainers.errors import NonFiniteLossError
from trainers.evaluate import EvalResult, evaluate
from trainers.forward import Forwarder
from trainers.methods import Method, build_method
from trainers.model import DeepLabV3Plus
from trainers.network import build_network
from trainers.optim import Scaling, build_optimizer, poly_lr, scale, set_lr
from trainers.state import TrainState

log = logging.getLogger(__name__)

Reporter = Callable[[dict[str, float], Path | None], None]
"""Called on every rank after each epoch with the metrics and, on rank 0, the checkpoint file."""

RESUME_SEED_STRIDE = 1009
"""A resumed rank > 0 reseeds with seed + rank + stride * epoch: a prime above any world size, so no two
(rank, epoch) pairs share a stream."""


@dataclass
class FitResult:
    best_miou: float
    last_miou: float
    epochs_run: list[int]
    out_dir: Path


@dataclass
class Run:
    """The pieces of one training process, assembled once by `assemble`."""

    cfg: TrainConfig
    ctx: DistContext
    spec: DatasetSpec
    method: Method
    net: DeepLabV3Plus
    """The plain network: trained, checkpointed as `model` (`Method.eval_network` picks what is scored)."""
    model: torch.nn.Module
    """`net` and the method's trainable extras as the step calls them (a Forwarder; DDP when distributed)."""
    optimizer: torch.optim.Optimizer
    loaders: Loaders
    scaling: Scaling
    switches: speed.FastSettings
    iters: int
    """Optimizer steps per epoch."""

    @property
    def total_iters(self) -> int:
        return self.iters * self.cfg.optim.epochs


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def fit(
    cfg: TrainConfig,
    report: Reporter | None = None,
    resume_state: dict[str, Any] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train `cfg` from `resume_state` (or from scratch), evaluating and checkpointing every epoch."""
    run = assemble(cfg)
    start = restore(run, resume_state)
    announce(run)
    best, last, epochs_run = start.best_miou, start.miou, []
    for epoch in range(start.epoch, cfg.optim.epochs):
        started = time.perf_counter()
        run.loaders.set_epoch(epoch)
        terms = train_epoch(run, epoch, progress)
        train_time = time.perf_counter() - started
        result = validate(run, progress)
        last, best = result.miou, max(best, result.miou)
        epochs_run.append(epoch)
        metrics = epoch_metrics(run, epoch, result, terms, best, train_time)
        metrics["epoch_time"] = time.perf_counter() - started
        path = None
        if run.ctx.is_main:
            path = save_checkpoint(run, epoch, result.miou, best)
            log.info("epoch %d: mIoU %.2f (best %.2f), loss %.4f", epoch, result.miou, best, metrics["loss"])
        if report is not None:
            report(metrics, path)
        dist.barrier()
    return FitResult(best, last, epochs_run, Path(cfg.out_dir))


@dataclass(frozen=True)
class Checked:
    """What `preflight` read while checking a config."""

    spec: DatasetSpec
    split: SplitFiles
    method: Method


def preflight(cfg: TrainConfig, world_size: int) -> Checked:
    """Every check of `cfg` short of building the network: the method and backbone names first (a typo
    is one line before the data checks decode every labeled and val image), then the split lists and
    their files, then that an epoch has a step. The launcher runs it before any worker starts."""
    spec = dataset_spec(cfg.data)
    method = build_method(cfg.method, spec.ignore_index)
    choice("model.backbone", cfg.model.backbone, BACKBONES)
    split = resolve_split(cfg.data)
    check_split_for_training(cfg.data.root, split, spec.num_classes, spec.ignore_index)
    batch = scale(cfg.optim, world_size).per_worker_batch
    check_epoch(split, method.views, cfg.method.name, world_size, batch, cfg.data.epoch_over)
    return Checked(spec, split, method)


def assemble(cfg: TrainConfig) -> Run:
    """Check names and data, then build the method, network, optimizer and loaders of this process."""
    ctx = dist.context()
    seed_everything(cfg.seed + ctx.rank)
    checked = preflight(cfg, ctx.world_size)
    spec, split, method = checked.spec, checked.split, checked.method
    net = build_network(cfg)
    switches = speed.settings(cfg.fast, ctx.device)
    net = speed.prepare_network(net.to(ctx.device), switches)
    forwarder = Forwarder(net)
    extra = method.setup(net)
    if extra is not None:
        # Extras join the wrapped module, so DDP averages their gradients too.
        forwarder.extra = extra
    scaling = scale(cfg.optim, ctx.world_size)
    loaders = build_loaders(cfg, split, method.views, ctx, scaling.per_worker_batch)
    return Run(
        cfg=cfg,
        ctx=ctx,
        spec=spec,
        method=method,
        net=net,
        model=dist.wrap(forwarder, ctx),
        optimizer=build_optimizer(net, cfg.optim, scaling.lr, foreach=switches.foreach, extra=extra),
        loaders=loaders,
        scaling=scaling,
        switches=switches,
        iters=steps_per_epoch(
            len(split.labeled),
            len(split.unlabeled),
            ctx.world_size,
            scaling.per_worker_batch,
            cfg.optim.max_iters_per_epoch,
            labeled_epoch=cfg.data.epoch_over == "labeled",
        ),
    )


def restore(run: Run, resume_state: dict[str, Any] | None) -> TrainState:
    """Load a checkpoint's state into `run`; returns where training stands (epoch 0 when fresh).

    A finished run run again trains no epoch: its result is the checkpoint's, not 0.
    """
    if resume_state is None:
        return TrainState({}, {}, epoch=0, iteration=0, best_miou=0.0, miou=0.0, config={}, rng={})
    state = TrainState.from_dict(resume_state)
    run.net.load_state_dict(state.model)
    run.optimizer.load_state_dict(state.optimizer)
    if state.method:
        run.method.load_state_dict(state.method)
    ckpt.set_rng_state(state.rng)
    if run.ctx.rank:
        # The checkpoint holds rank 0's RNG; other ranks need their own augmentation streams.
        seed_everything(run.cfg.seed + run.ctx.rank + RESUME_SEED_STRIDE * state.epoch)
    log.info("resumed at epoch %d (best mIoU %.2f)", state.epoch, state.best_miou)
    return state


def announce(run: Run) -> None:
    """On rank 0: fail now if checkpoints cannot be written, and log the batch, lr and ranks."""
    if not run.ctx.is_main:
        return
    # Now, not after the first epoch, when checkpoints cannot be written (disk full, read-only).
    ckpt.check_writable(Path(run.cfg.out_dir))
    scaling = run.scaling
    log.info(
        "per-worker batch %d, global batch %d, lr %.6g (%s)",
        scaling.per_worker_batch,
        scaling.global_batch,
        scaling.lr,
        run.cfg.optim.lr_scaling,
    )
    if run.ctx.world_size > 1:
        log.info(
            "%d ranks; a collective fails after %s without them all",
            run.ctx.world_size,
            dist.collective_timeout(),
        )


def train_epoch(run: Run, epoch: int, progress: bool) -> dict[str, float]:
    """One epoch; returns each logged term averaged over the epoch (and across ranks)."""
    run.model.train()
    sums: dict[str, torch.Tensor] = {}
    show = progress and run.ctx.is_main
    bar = tqdm(total=run.iters, desc=f"epoch {epoch}", disable=not show, leave=False)
    for i, batches in enumerate(run.loaders.epoch()):
        if i == run.iters:
            break
        terms = train_step(run, batches, epoch * run.iters + i)
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
        # Losses are read back only at the log interval: no host sync on every step.
        if (i + 1) % run.cfg.log_interval == 0 or i + 1 == run.iters:
            loss = float(sums["loss"]) / (i + 1)
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"epoch {epoch} iteration {i}: loss is {loss}")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{run.optimizer.param_groups[0]['lr']:.2e}")
        bar.update(1)
    bar.close()
    names = sorted(sums)
    stacked = dist.all_reduce_mean(
        torch.stack([torch.as_tensor(sums[n], dtype=torch.float64) for n in names])
    )
    return {n: float(v) / run.iters for n, v in zip(names, stacked, strict=True)}


def train_step(run: Run, batches: tuple, iteration: int) -> dict[str, torch.Tensor]:
    """One optimizer step at `iteration` (0-based, over the whole run); returns the detached terms."""
    labeled, unlabeled, mix = (run.loaders.place(b, run.ctx.device) for b in batches)
    with speed.autocast(run.switches, run.ctx.device):
        out = run.method.step(run.model, labeled, unlabeled, mix)
    run.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    run.optimizer.step()
    # EMA teachers, memory queues and schedules follow the step count.
    run.method.after_step(iteration + 1, run.iters, run.total_iters)
    optim = run.cfg.optim
    set_lr(
        run.optimizer,
        poly_lr(run.scaling.lr, iteration + 1, run.total_iters, optim.poly_power),
        optim.lr_multi,
    )
    return {name: value.detach() for name, value in out.terms.items()}


def validate(run: Run, progress: bool) -> EvalResult:
    """mIoU of the method's evaluated network (`Method.eval_network`) on val, each rank scoring its share
    (BatchNorm buffers of rank 0 first)."""
    net = run.method.eval_network(run.net)
    dist.broadcast_buffers(run.net)
    if net is not run.net:
        # Teachers run in train mode on each rank's own batches: their statistics differ across ranks.
        dist.broadcast_buffers(net)
    with speed.autocast(run.switches, run.ctx.device):
        return evaluate(
            net,
            run.loaders.val,
            run.spec.eval_mode,
            run.cfg.data.crop_size,
            run.spec.num_classes,
            run.spec.ignore_index,
            reduce=dist.all_reduce_sum,
            device=run.ctx.device,
            progress=progress and run.ctx.is_main,
        )


def save_checkpoint(run: Run, epoch: int, miou: float, best: float) -> Path:
    """Write `latest.pth` (and `best.pth` when this epoch is the best) after `epoch`; returns latest.pth."""
    state = TrainState(
        model=run.net.state_dict(),
        optimizer=run.optimizer.state_dict(),
        epoch=epoch + 1,
        iteration=(epoch + 1) * run.iters,
        best_miou=best,
        miou=miou,
        config=run.cfg.to_dict(),
        rng=ckpt.rng_state(),
        method=run.method.state_dict(),
    ).to_dict()
    out_dir = Path(run.cfg.out_dir)
    path = ckpt.save_latest(state, out_dir)
    if miou >= best:
        ckpt.save(state, out_dir / ckpt.BEST)
    return path


def epoch_metrics(
    run: Run, epoch: int, result: EvalResult, terms: dict[str, float], best: float, train_time: float
) -> dict[str, float]:
    """The flat metric dict reported after each epoch."""
    metrics = {"epoch": float(epoch), "miou": result.miou, "best_miou": best, **terms}
    metrics.update({f"iou_{i}": 100.0 * v for i, v in enumerate(result.per_class)})
    images = run.iters * run.scaling.global_batch * (2 if run.loaders.unlabeled is not None else 1)
    metrics.update(
        lr=run.optimizer.param_groups[0]["lr"],
        images_per_s=images / train_time,
        per_worker_batch=float(run.scaling.per_worker_batch),
        global_batch=float(run.scaling.global_batch),
    )
    return metrics
