"""DataLoaders for one training process: labeled, unlabeled, the CutMix source u', and val."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from trainers import augment, speed
from trainers.batch import ViewSpec
from trainers.batch_augment import collate_raw_labeled, collate_raw_unlabeled, finished
from trainers.config import ConfigError, TrainConfig
from trainers.datasets import PairDataset, SplitFiles, dataset_spec, empty_lists, repeat_to
from trainers.dist import DistContext
from trainers.errors import DataError


@dataclass
class Loaders:
    labeled: DataLoader
    unlabeled: DataLoader | None
    mix: DataLoader | None
    """u': the second unlabeled loader that supplies CutMix patches."""
    val: DataLoader
    device_augment: bool
    """True: training batches arrive raw and `place` builds their views on the device."""

    def place(self, batch: Any, device: torch.device) -> Any:
        """A training batch (or None) on `device`, its views built there if they arrived raw."""
        if batch is None:
            return None
        batch = batch.to(device, non_blocking=True)
        return batch.finish() if self.device_augment else batch

    def set_epoch(self, epoch: int) -> None:
        """Reseed every distributed sampler so each epoch has its own shuffle."""
        for loader in (self.labeled, self.unlabeled, self.mix):
            if loader is not None:
                loader.sampler.set_epoch(epoch)

    def epoch(self) -> Iterator[tuple]:
        """(labeled, unlabeled, mix) batches; None where the method needs no such batch."""
        streams = [self.labeled, self.unlabeled, self.mix]
        iterators = [iter(s) if s is not None else _nones() for s in streams]
        return zip(*iterators, strict=False)


def steps_per_epoch(
    num_labeled: int,
    num_unlabeled: int,
    world_size: int,
    batch_size: int,
    cap: int | None = None,
    labeled_epoch: bool = False,
) -> int:
    """Optimizer steps in one epoch of `build_loaders`' loaders: one pass over the unlabeled list (the
    labeled one repeated to its length: UniMatch's protocol), or over the labeled list when a split has
    no unlabeled one, sharded over the ranks and in whole batches, both dropping the rest; with
    `labeled_epoch` (data.epoch_over: labeled) one pass over the labeled list, sharded with padding as
    UniMatch's supervised.py does; at most `cap` (optim.max_iters_per_epoch)."""
    if labeled_epoch:
        steps = math.ceil(num_labeled / world_size) // batch_size
    else:
        steps = (num_unlabeled or num_labeled) // world_size // batch_size
    return steps if cap is None else min(steps, cap)


def _nones() -> Iterator[None]:
    while True:
        yield None


def collates(device_augment: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The labeled and unlabeled collates: views built in the loader, or left raw for the device."""
    if device_augment:
        return collate_raw_labeled, collate_raw_unlabeled
    return finished(collate_raw_labeled), finished(collate_raw_unlabeled)


def build_loaders(
    cfg: TrainConfig, split: SplitFiles, views: ViewSpec, ctx: DistContext, batch_size: int
) -> Loaders:
    """Build the loaders of one process (`check_epoch` first: see trainers.loop.preflight); samplers
    shard by rank and reshuffle per epoch."""
    root, crop = cfg.data.root, cfg.data.crop_size
    switches = speed.settings(cfg.fast, ctx.device)
    collate_labeled, collate_unlabeled = collates(switches.device_augment)
    ignore_index = dataset_spec(cfg.data).ignore_index
    common = dict(
        batch_size=batch_size,
        num_workers=cfg.data.num_workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=True,
        persistent_workers=cfg.data.num_workers > 0,
        timeout=loader_timeout(cfg),
    )

    def loader(dataset: PairDataset, seed: int, collate: Callable[..., Any], pad: bool = False) -> DataLoader:
        sampler = DistributedSampler(
            dataset, ctx.world_size, ctx.rank, shuffle=True, seed=seed, drop_last=not pad
        )
        return DataLoader(dataset, sampler=sampler, collate_fn=collate, **common)

    labeled_epoch = cfg.data.epoch_over == "labeled"
    n = len(split.unlabeled) if split.unlabeled and not labeled_epoch else len(split.labeled)
    labeled = PairDataset(
        root,
        repeat_to(split.labeled, n),
        augment.labeled_transform(crop, ignore_index, cfg.data.scale_range, strong=views.labeled_strong),
        decode=switches.decode,
    )
    unlabeled_loader = mix_loader = None
    if views.strong_views:
        # Unlabeled masks are read only for ST++'s saved pseudo-labels (UniMatch never reads them).
        transform = augment.unlabeled_transform(crop, views, ignore_index, cfg.data.scale_range)
        unlabeled = PairDataset(
            root, split.unlabeled, transform, with_masks=views.masks, decode=switches.decode
        )
        unlabeled_loader = loader(unlabeled, cfg.seed, collate_unlabeled)
        if views.mix_batch:
            # The published loop zips the same loader twice: same sampler seed, so u' holds the
            # same images as u in the same order (only augmented anew). The switch draws u'
            # from an independent permutation instead.
            mix_seed = cfg.seed + 1 if views.independent_mix else cfg.seed
            mix_loader = loader(unlabeled, mix_seed, collate_unlabeled)
    labeled_loader = loader(labeled, cfg.seed, collate_labeled, pad=labeled_epoch)
    val = val_loader(cfg, split, ctx, switches.decode)
    return Loaders(labeled_loader, unlabeled_loader, mix_loader, val, switches.device_augment)


def val_loader(cfg: TrainConfig, split: SplitFiles, ctx: DistContext, decode: str) -> DataLoader:
    """This rank's share of val, whole images one at a time. Sharded without padding, so no image is
    counted twice in the summed IoU."""
    val = PairDataset(cfg.data.root, split.val, augment.eval_transform(), decode=decode)
    return DataLoader(
        Subset(val, list(range(ctx.rank, len(val), ctx.world_size))),
        batch_size=1,
        num_workers=min(cfg.data.num_workers, 1),
        collate_fn=augment.collate_labeled,
        timeout=loader_timeout(cfg),
    )


def loader_timeout(cfg: TrainConfig) -> float:
    """`data.loader_timeout_s` for loaders with worker processes; 0 without (torch ignores it there)."""
    return cfg.data.loader_timeout_s if cfg.data.num_workers > 0 else 0.0


def check_epoch(
    split: SplitFiles,
    views: ViewSpec,
    method: str,
    world_size: int,
    batch_size: int,
    epoch_over: str = "unlabeled",
) -> None:
    """One error naming the key or list when an epoch would have no step (loaders drop the last partial
    batch): a labeled epoch for a method with unlabeled images, an empty unlabeled list for a method that
    needs one, or too few images."""
    if views.strong_views and epoch_over == "labeled":
        raise ConfigError(
            f"data.epoch_over: 'labeled' is for methods without unlabeled images; {method} trains on "
            "unlabeled ones (an epoch passes over the unlabeled list)"
        )
    if views.strong_views:
        problems = empty_lists(split, ("unlabeled",), f"method {method} trains on unlabeled images")
        if problems:
            raise DataError(str(problems[0]))
    # The epoch is one pass over the unlabeled list (the labeled one repeated to match) when there is one.
    what = "unlabeled" if split.unlabeled and epoch_over == "unlabeled" else "labeled"
    pairs, file = split.lists()[what]
    padded = epoch_over == "labeled"
    if steps_per_epoch(len(pairs), 0, world_size, batch_size, labeled_epoch=padded) == 0:
        raise DataError(
            f"{what}: {file}: {len(pairs)} images, fewer than one batch of {batch_size} per worker x "
            f"{world_size} worker(s): an epoch would have no step (lower optim.batch_size)"
        )
