"""The supervised baseline: the labeled loss alone, no unlabeled data."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec
from trainers.config import MethodConfig
from trainers.forward import plain
from trainers.methods.base import Method, StepOutput
from trainers.methods.common import Criterion, build_criterion, detached


@dataclass
class Supervised(Method):
    criterion_l: Criterion
    views: ViewSpec = field(default_factory=ViewSpec)

    @classmethod
    def from_config(cls, cfg: MethodConfig, ignore_index: int) -> Supervised:
        return cls(build_criterion(cfg, ignore_index))

    def step(
        self,
        model: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch | None = None,
        mix: UnlabeledBatch | None = None,
    ) -> StepOutput:
        """loss = criterion_l(pred_x, y)."""
        loss = self.criterion_l(model(plain, labeled.image), labeled.mask)
        return StepOutput(loss, detached({"loss": loss, "loss_x": loss}))
