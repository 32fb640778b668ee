"""The one training loop: every method plugs in through `Method.step`; runs alone or under DDP."""

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

from pretrained.load import WeightsError, load_backbone_weights
from trainers import checkpoint as ckpt
from trainers import dist, fast
from trainers.backbones import BACKBONES
from trainers.config import ConfigError, TrainConfig, choice
from trainers.data import Loaders, build_loaders
from trainers.datasets import check_split_for_training, dataset_spec, resolve_split
from trainers.errors import NonFiniteLossError
from trainers.evaluate import EvalResult, evaluate
from trainers.forward import Forwarder
from trainers.methods import Method, build_method
from trainers.model import DeepLabV3Plus
from trainers.optim import Scaling, build_optimizer, poly_lr, scale, set_lr

log = logging.getLogger(__name__)

Reporter = Callable[[dict[str, float], Path | None], None]
"""Called on every rank after each epoch with the metrics and, on rank 0, the checkpoint file."""


@dataclass
class FitResult:
    best_miou: float
    last_miou: float
    epochs_run: list[int]
    out_dir: Path


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def num_classes(cfg: TrainConfig) -> int:
    """The class count of this config's dataset (overrides and synth.json applied)."""
    return dataset_spec(cfg.data).num_classes


def build_network(cfg: TrainConfig) -> DeepLabV3Plus:
    """DeepLabV3+ for this config, with backbone weights loaded when a file is configured."""
    net = DeepLabV3Plus(cfg.model.backbone, num_classes(cfg), tuple(cfg.model.dilations))
    if cfg.model.pretrained:
        try:
            load_backbone_weights(net.backbone, cfg.model.pretrained)
        except WeightsError as exc:
            raise ConfigError(f"model.pretrained: {exc}") from None
    return net


def fit(
    cfg: TrainConfig,
    report: Reporter | None = None,
    resume_state: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train `cfg` from `resume_state` (or from scratch), evaluating and checkpointing every epoch."""
    ctx = dist.context()
    spec = dataset_spec(cfg.data)
    classes = spec.num_classes
    # Names first: a typo is one line before the data checks decode every labeled and val image.
    method: Method = build_method(cfg.method, classes, spec.ignore_index)
    choice("model.backbone", cfg.model.backbone, BACKBONES)
    split = resolve_split(cfg.data)
    check_split_for_training(cfg.data.root, split, classes, spec.ignore_index)

    seed_everything(cfg.seed + ctx.rank)
    switches = fast.settings(cfg.fast, ctx.device)
    net = fast.prepare_network(build_network(cfg).to(ctx.device), switches)
    forwarder = Forwarder(net)
    # Method hook (optional): teachers and trainable extras, such as a projection head, built from the
    # placed network. Extras join the wrapped module, so DDP averages their gradients too.
    extra = method.setup(net) if hasattr(method, "setup") else None
    if extra is not None:
        forwarder.extra = extra
    model = dist.wrap(forwarder, ctx)
    scaling = scale(cfg.optim, ctx.world_size)
    optimizer = build_optimizer(net, cfg.optim, scaling.lr, foreach=switches.foreach)
    if extra is not None:
        optimizer.param_groups[1]["params"].extend(extra.parameters())
    loaders = build_loaders(cfg, split, method.views, ctx, scaling.per_worker_batch)
    iters = loaders.iterations(cfg.optim.max_iters_per_epoch)
    total_iters = iters * cfg.optim.epochs

    start_epoch, best, last = 0, 0.0, 0.0
    if resume_state is not None:
        net.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        # A finished run run again trains no epoch: its result is the checkpoint's, not 0.
        start_epoch, best, last = resume_state["epoch"], resume_state["best_miou"], resume_state["miou"]
        if "method" in resume_state:
            method.load_state_dict(resume_state["method"])
        ckpt.set_rng_state(resume_state["rng"])
        if ctx.rank:
            # The checkpoint holds rank 0's RNG; other ranks need their own augmentation streams.
            seed_everything(cfg.seed + ctx.rank + 1009 * start_epoch)
        log.info("resumed at epoch %d (best mIoU %.2f)", start_epoch, best)

    out_dir = Path(cfg.out_dir)
    if ctx.is_main:
        # Fail now, not after the first epoch, when checkpoints cannot be written (disk full, read-only).
        ckpt.check_writable(out_dir)
        log.info(
            "per-worker batch %d, global batch %d, lr %.6g (%s)",
            scaling.per_worker_batch,
            scaling.global_batch,
            scaling.lr,
            cfg.optim.lr_scaling,
        )
        if ctx.world_size > 1:
            log.info(
                "%d ranks; a collective fails after %s without them all",
                ctx.world_size,
                dist.collective_timeout(),
            )
    epochs_run = []
    for epoch in range(start_epoch, cfg.optim.epochs):
        started = time.perf_counter()
        loaders.set_epoch(epoch)
        terms = train_epoch(
            model, method, optimizer, loaders, cfg, switches, scaling, epoch, iters, total_iters, progress
        )
        train_time = time.perf_counter() - started
        dist.broadcast_buffers(net)
        with fast.autocast(switches, ctx.device):
            result = evaluate(
                net,
                loaders.val,
                spec.eval_mode,
                cfg.data.crop_size,
                classes,
                spec.ignore_index,
                reduce=dist.all_reduce_sum,
                device=ctx.device,
                progress=progress and ctx.is_main,
            )
        last, best = result.miou, max(best, result.miou)
        epochs_run.append(epoch)
        images = iters * scaling.global_batch * (2 if loaders.unlabeled is not None else 1)
        metrics = epoch_metrics(epoch, result, terms, best, scaling, optimizer, images / train_time)
        metrics["epoch_time"] = time.perf_counter() - started
        path = None
        if ctx.is_main:
            state = {
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "iteration": (epoch + 1) * iters,
                "best_miou": best,
                "miou": result.miou,
                "config": cfg.to_dict(),
                "rng": ckpt.rng_state(),
                **({"method": method.state_dict()} if hasattr(method, "state_dict") else {}),
                **(extra_state or {}),
            }
            path = ckpt.save_latest(state, out_dir)
            if result.miou >= best:
                ckpt.save(state, out_dir / ckpt.BEST)
            log.info("epoch %d: mIoU %.2f (best %.2f), loss %.4f", epoch, result.miou, best, metrics["loss"])
        if report is not None:
            report(metrics, path)
        dist.barrier()
    return FitResult(best, last, epochs_run, out_dir)


def epoch_metrics(
    epoch: int,
    result: EvalResult,
    terms: dict[str, float],
    best: float,
    scaling: Scaling,
    optimizer: torch.optim.Optimizer,
    images_per_s: float,
) -> dict[str, float]:
    """The flat metric dict reported after each epoch."""
    metrics = {"epoch": float(epoch), "miou": result.miou, "best_miou": best, **terms}
    metrics.update({f"iou_{i}": 100.0 * v for i, v in enumerate(result.per_class)})
    metrics.update(
        lr=optimizer.param_groups[0]["lr"],
        images_per_s=images_per_s,
        per_worker_batch=float(scaling.per_worker_batch),
        global_batch=float(scaling.global_batch),
    )
    return metrics


def train_epoch(
    model: torch.nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    loaders: Loaders,
    cfg: TrainConfig,
    switches: fast.FastSettings,
    scaling: Scaling,
    epoch: int,
    iters: int,
    total_iters: int,
    progress: bool,
) -> dict[str, float]:
    """One epoch; returns each logged term averaged over the epoch (and across ranks)."""
    ctx = dist.context()
    model.train()
    sums: dict[str, torch.Tensor] = {}
    bar = tqdm(total=iters, desc=f"epoch {epoch}", disable=not (progress and ctx.is_main), leave=False)
    for i, (labeled, unlabeled, mix) in enumerate(loaders.epoch()):
        if i == iters:
            break
        # Raw batches (fast.device_augment) get their strong views built on the device here.
        batches = [fast.to_device(b, ctx.device) for b in (labeled, unlabeled, mix)]
        with fast.autocast(switches, ctx.device):
            out = method.step(model, *batches)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        iteration = epoch * iters + i
        if hasattr(method, "after_step"):
            # Method hook (optional): EMA teachers, memory queues and schedules follow the step count.
            method.after_step(iteration + 1, iters, total_iters)
        set_lr(
            optimizer,
            poly_lr(scaling.lr, iteration + 1, total_iters, cfg.optim.poly_power),
            cfg.optim.lr_multi,
        )
        for name, value in out.terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach()
        # Losses are read back only at the log interval: no host sync on every step.
        if (i + 1) % cfg.log_interval == 0 or i + 1 == iters:
            loss = float(sums["loss"]) / (i + 1)
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"epoch {epoch} iteration {i}: loss is {loss}")
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.update(1)
    bar.close()
    names = sorted(sums)
    stacked = dist.all_reduce_mean(
        torch.stack([torch.as_tensor(sums[n], dtype=torch.float64) for n in names])
    )
    return {n: float(v) / iters for n, v in zip(names, stacked, strict=True)}
