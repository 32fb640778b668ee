"""What a method is to the loop: the views it needs, one iteration's losses, and optional hooks.

Every method subclasses `Method` and overrides `step` (and `views` when it reads unlabeled images).
The loop calls each hook below at one fixed place (see trainers.loop); the defaults do nothing, so a
method overrides only the hooks it needs and the loop never asks what a method has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec
from trainers.config import TrainConfig


@dataclass
class StepOutput:
    loss: torch.Tensor
    """The total loss to back-propagate."""
    terms: dict[str, torch.Tensor]
    """Detached scalars to log: each loss term, `mask_ratio` where pseudo-labels are used."""


@dataclass(frozen=True)
class Stage:
    """One training of a multi-stage method, run by `trainers.stages.run_stages` as a plain `fit`."""

    config: TrainConfig
    """The stage's whole config: its own out_dir (where it checkpoints and resumes), split, method, epochs."""
    snapshots: tuple[int, ...] = ()
    """1-based epochs after which rank 0 keeps the checkpoint as `<out_dir>/epoch<N>.pth`."""
    prepare: Callable[[], object] | None = None
    """Rank-0 work that writes the stage's inputs (split lists) from the stages before it."""
    prepared: Path | None = None
    """The file `prepare` writes last: when it exists, a resumed run skips `prepare`; None: always run it."""
    images: tuple[int, int] | None = None
    """(labeled, unlabeled) list lengths when known before `prepare` writes the lists (for
    `trainers.entry.plan`); None: read from the stage's lists."""


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that has none beyond the common keys of `method:`."""


class Method:
    """Base of every method. `views` and `step` are what a method is; the rest are no-op hooks."""

    views: ViewSpec = ViewSpec()
    """The unlabeled views the loader builds; the default (none) means labeled images only."""
    settings_type: ClassVar[type] = NoSettings
    """The frozen dataclass of the method's own `method:` keys (trainers.config.MethodConfig.settings)."""

    @classmethod
    def stages(cls, cfg: TrainConfig) -> list[Stage] | None:
        """Several trainings in a row (see trainers.stages), or None: one `fit` of `cfg`."""
        return None

    def setup(self, net: nn.Module) -> nn.Module | None:
        """Called once with the placed network, before DDP wraps it: build teachers, queues, heads.
        Returns the extra trainable modules (optimised at the head learning rate), or None."""
        return None

    def step(
        self,
        model: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch | None,
        mix: UnlabeledBatch | None,
    ) -> StepOutput:
        """One iteration's losses; `model(fn, *x)` runs `fn(net, *x)` (see trainers.forward)."""
        raise NotImplementedError(f"{type(self).__name__}.step")

    def after_step(self, done: int, per_epoch: int, total: int) -> None:
        """After each optimizer step: `done` of `total` steps, `per_epoch` per epoch (EMA, schedules)."""

    def state_dict(self) -> dict[str, Any]:
        """The method's own state a checkpoint keeps (teachers, clocks); empty when it has none."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned; called after `setup` when a run resumes."""

    def eval_network(self, net: nn.Module) -> nn.Module:
        """The network validation scores and best.pth is chosen by: `net`, or modules built from `net`
        and `state_dict()` alone (trainers.network.load_network rebuilds it from a checkpoint)."""
        return net
