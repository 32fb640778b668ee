"""SGD (or AdamW) with backbone/head learning rates, the poly schedule, and the batch/LR scaling rule."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainers.config import ConfigError, OptimConfig


@dataclass(frozen=True)
class Scaling:
    """The effective batch and learning rate for a given worker count."""

    per_worker_batch: int
    global_batch: int
    lr: float


def scale(cfg: OptimConfig, world_size: int) -> Scaling:
    """Apply the batch/LR rule: lr is tuned for `reference_global_batch` (the seed: 4 x 2).

    `linear` keeps the per-worker batch and scales lr by global / reference (UniMatch's author's
    rule); `keep_global_batch` keeps lr and divides the reference global batch over the workers.
    """
    if cfg.lr_scaling == "keep_global_batch":
        if cfg.reference_global_batch % world_size:
            raise ConfigError(
                f"optim.lr_scaling=keep_global_batch: reference_global_batch "
                f"{cfg.reference_global_batch} is not divisible by {world_size} workers"
            )
        per_worker = cfg.reference_global_batch // world_size
        return Scaling(per_worker, cfg.reference_global_batch, cfg.lr)
    global_batch = cfg.batch_size * world_size
    return Scaling(cfg.batch_size, global_batch, cfg.lr * global_batch / cfg.reference_global_batch)


def build_optimizer(
    net: nn.Module, cfg: OptimConfig, lr: float, foreach: bool | None = None, extra: nn.Module | None = None
) -> torch.optim.Optimizer:
    """`cfg.optimizer` (SGD, the papers'; or AdamW): backbone parameters at `lr`; everything else, and a
    method's `extra` modules (a projection head), at `lr * lr_multi`. Groups alternate backbone, head;
    without `decay_norm_and_bias` a second pair holds their 1-D parameters at weight decay 0."""
    backbone = [p for n, p in net.named_parameters() if n.startswith("backbone.")]
    head = [p for n, p in net.named_parameters() if not n.startswith("backbone.")]
    head += [] if extra is None else list(extra.parameters())
    groups = [{"params": backbone, "lr": lr}, {"params": head, "lr": lr * cfg.lr_multi}]
    if not cfg.decay_norm_and_bias:
        # PS-MT's group_weight: BatchNorm weights and every bias are 1-D; conv and linear weights are not.
        groups += [
            {**g, "params": [p for p in g["params"] if p.ndim <= 1], "weight_decay": 0.0} for g in groups
        ]
        for group in groups[:2]:
            group["params"] = [p for p in group["params"] if p.ndim > 1]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, foreach=foreach)
    return torch.optim.SGD(
        groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=foreach
    )


def poly_lr(base_lr: float, iteration: int, total: int, power: float) -> float:
    """lr * (1 - iter/total)^power, as the seed applies after each step."""
    return base_lr * (1 - iteration / total) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float, lr_multi: float) -> None:
    """Set the backbone groups (even) to `lr` and the head groups (odd) to `lr * lr_multi`."""
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = lr if index % 2 == 0 else lr * lr_multi
