"""UniMatch: two CutMix strong views and a feature-perturbed view learn the weak view's pseudo-labels."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
from torch import nn

from trainers import losses
from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec
from trainers.config import MethodConfig, at_least
from trainers.forward import feature_perturbed, plain
from trainers.methods.base import Method, StepOutput
from trainers.methods.common import Criterion, Targets, build_criterion, detached, mix_targets, require


@dataclass
class Predictions:
    """Train-mode outputs of one UniMatch iteration and the pseudo-labels derived from them."""

    pred_x: torch.Tensor
    pred_w: torch.Tensor
    pred_w_fp: torch.Tensor
    pred_s1: torch.Tensor
    pred_s2: torch.Tensor
    targets: Targets
    """Pseudo-labels of the weak view (for the fp view)."""
    targets1: Targets
    """Those with u′'s inside box 1 (for s1)."""
    targets2: Targets


def predict(
    model: nn.Module, labeled: LabeledBatch, unlabeled: UnlabeledBatch, mix: UnlabeledBatch, patch: Targets
) -> Predictions:
    """Paste u′ into s1/s2, forward [x; w] with fp and [s1; s2], and build the mixed pseudo-labels."""
    box1, box2 = unlabeled.boxes[:2]
    s1 = losses.paste(unlabeled.strong[0], mix.strong[0], box1)
    s2 = losses.paste(unlabeled.strong[1], mix.strong[1], box2)

    num_x = labeled.image.shape[0]
    clean, perturbed = model(feature_perturbed, torch.cat([labeled.image, unlabeled.weak]))
    pred_s1, pred_s2 = model(plain, torch.cat([s1, s2])).chunk(2)

    pred_w = clean[num_x:]
    targets = Targets.from_logits(pred_w, unlabeled.ignore)
    return Predictions(
        pred_x=clean[:num_x],
        pred_w=pred_w,
        pred_w_fp=perturbed[num_x:],
        pred_s1=pred_s1,
        pred_s2=pred_s2,
        targets=targets,
        targets1=targets.mixed(box1, patch),
        targets2=targets.mixed(box2, patch),
    )


def unimatch_terms(
    p: Predictions, labeled: LabeledBatch, criterion_l: Criterion, conf_thresh: float, ignore_index: int
) -> dict[str, torch.Tensor]:
    """loss_x, loss_s1, loss_s2, loss_fp, their strong mean loss_s, and the mask ratio of w."""
    loss_s1 = p.targets1.loss(p.pred_s1, conf_thresh, ignore_index)
    loss_s2 = p.targets2.loss(p.pred_s2, conf_thresh, ignore_index)
    return {
        "loss_x": criterion_l(p.pred_x, labeled.mask),
        "loss_s": (loss_s1 + loss_s2) / 2,
        "loss_s1": loss_s1,
        "loss_s2": loss_s2,
        "loss_fp": p.targets.loss(p.pred_w_fp, conf_thresh, ignore_index),
        "mask_ratio": losses.mask_ratio(p.targets.conf, p.targets.ignore, conf_thresh, ignore_index),
    }


@dataclass(frozen=True)
class UniMatchSettings:
    """UniMatch's own `method:` keys:
    loss = (weight_x·loss_x + weight_s1·loss_s1 + weight_s2·loss_s2 + weight_fp·loss_fp) / 2."""

    weight_x: float = 1.0
    weight_s1: float = 0.25
    weight_s2: float = 0.25
    weight_fp: float = 0.5
    independent_mix_batch: bool = False
    """Corrects the quirk: draw the CutMix source batch u′ from an independent permutation."""

    def __post_init__(self) -> None:
        at_least(self, "method", 0.0, *(f.name for f in fields(self) if f.name.startswith("weight_")))

    def weighted(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """The numerator's UniMatch part: weight_x·loss_x + Σ weight·loss over s1, s2 and fp."""
        strong = self.weight_s1 * t["loss_s1"] + self.weight_s2 * t["loss_s2"]
        return self.weight_x * t["loss_x"] + (strong + self.weight_fp * t["loss_fp"])


@dataclass
class UniMatch(Method):
    criterion_l: Criterion
    conf_thresh: float
    ignore_index: int
    settings: UniMatchSettings = field(default_factory=UniMatchSettings)
    settings_type: ClassVar[type] = UniMatchSettings

    @property
    def views(self) -> ViewSpec:
        return ViewSpec(strong_views=2, mix_batch=True, independent_mix=self.settings.independent_mix_batch)

    @classmethod
    def from_config(cls, cfg: MethodConfig, ignore_index: int) -> UniMatch:
        return cls(build_criterion(cfg, ignore_index), cfg.conf_thresh, ignore_index, cfg.settings)

    def step(
        self,
        model: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch | None,
        mix: UnlabeledBatch | None,
    ) -> StepOutput:
        """The published UniMatch iteration (UniMatch's unimatch.py)."""
        require("unimatch", unlabeled, mix, strong_views=2)
        patch = mix_targets(model, mix)
        p = predict(model, labeled, unlabeled, mix, patch)
        t = unimatch_terms(p, labeled, self.criterion_l, self.conf_thresh, self.ignore_index)
        loss = self.settings.weighted(t) / 2
        return StepOutput(loss, detached({"loss": loss, **t}))
