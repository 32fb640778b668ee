"""FixMatch with CutMix: one strong view learns the weak view's confident pseudo-labels."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from trainers import losses
from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec
from trainers.config import MethodConfig, at_least
from trainers.forward import plain
from trainers.methods.base import Method, StepOutput
from trainers.methods.common import Criterion, Targets, build_criterion, detached, mix_targets, require


@dataclass(frozen=True)
class FixMatchSettings:
    """FixMatch's own `method:` keys: loss = (weight_x·loss_x + weight_s·loss_s) / 2, as published."""

    weight_x: float = 1.0
    weight_s: float = 1.0
    independent_mix_batch: bool = False
    """Corrects the quirk: draw the CutMix source batch u′ from an independent permutation."""

    def __post_init__(self) -> None:
        at_least(self, "method", 0.0, "weight_x", "weight_s")


@dataclass
class FixMatch(Method):
    criterion_l: Criterion
    conf_thresh: float
    ignore_index: int
    settings: FixMatchSettings = field(default_factory=FixMatchSettings)
    settings_type: ClassVar[type] = FixMatchSettings

    @property
    def views(self) -> ViewSpec:
        return ViewSpec(strong_views=1, mix_batch=True, independent_mix=self.settings.independent_mix_batch)

    @classmethod
    def from_config(cls, cfg: MethodConfig, ignore_index: int) -> FixMatch:
        return cls(build_criterion(cfg, ignore_index), cfg.conf_thresh, ignore_index, cfg.settings)

    def step(
        self,
        model: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch | None,
        mix: UnlabeledBatch | None,
    ) -> StepOutput:
        """The published FixMatch iteration (UniMatch's fixmatch.py)."""
        require("fixmatch", unlabeled, mix, strong_views=1)
        patch = mix_targets(model, mix)
        box = unlabeled.boxes[0]
        strong = losses.paste(unlabeled.strong[0], mix.strong[0], box)

        pred_x, pred_w = model(plain, torch.cat([labeled.image, unlabeled.weak])).split(
            [labeled.image.shape[0], unlabeled.weak.shape[0]]
        )
        pred_s = model(plain, strong)

        targets = Targets.from_logits(pred_w, unlabeled.ignore)
        loss_x = self.criterion_l(pred_x, labeled.mask)
        loss_s = targets.mixed(box, patch).loss(pred_s, self.conf_thresh, self.ignore_index)
        loss = (self.settings.weight_x * loss_x + self.settings.weight_s * loss_s) / 2
        terms = {
            "loss": loss,
            "loss_x": loss_x,
            "loss_s": loss_s,
            "mask_ratio": losses.mask_ratio(
                targets.conf, targets.ignore, self.conf_thresh, self.ignore_index
            ),
        }
        return StepOutput(loss, detached(terms))
