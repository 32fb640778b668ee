"""MSPL (MSP_CCL): UniMatch plus self-training of the strong views and cutout/fp consistency terms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from trainers import losses
from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec
from trainers.config import MethodConfig, at_least
from trainers.methods.base import Method, StepOutput
from trainers.methods.common import Criterion, build_criterion, detached, eval_predict, mix_targets, require
from trainers.methods.unimatch import Predictions, UniMatchSettings, predict, unimatch_terms


@dataclass(frozen=True)
class MSPLSettings(UniMatchSettings):
    """MSPL's own `method:` keys (MSP_CCL's unimatch.py): loss = (weight_x·loss_x + weight_s1·loss_s1
    + weight_s2·loss_s2 + weight_fp·loss_fp + weight_aug·aug) / 2, aug = (self_training + loss_xfp
    + loss_cut) / 3."""

    weight_s1: float = 0.2
    weight_s2: float = 0.2
    weight_aug: float = 0.1
    cutout_view_normalized: bool = False
    """Corrects the quirk: the cutout view is ImageNet-normalized (applied by the augmentation)."""
    xfp_same_image: bool = False
    """Corrects the quirk: loss_xfp = mean|pred_w − pred_w_fp| instead of mean|pred_x − pred_w_fp|."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, "method", 0.0, "weight_aug")


@dataclass
class MSPL(Method):
    criterion_l: Criterion
    conf_thresh: float
    ignore_index: int
    settings: MSPLSettings = field(default_factory=MSPLSettings)
    settings_type: ClassVar[type] = MSPLSettings

    @property
    def views(self) -> ViewSpec:
        return ViewSpec(
            strong_views=2,
            cutout=True,
            cutout_view=True,
            cutout_view_normalized=self.settings.cutout_view_normalized,
            mix_batch=True,
            independent_mix=self.settings.independent_mix_batch,
        )

    @classmethod
    def from_config(cls, cfg: MethodConfig, ignore_index: int) -> MSPL:
        return cls(build_criterion(cfg, ignore_index), cfg.conf_thresh, ignore_index, cfg.settings)

    def step(
        self,
        model: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch | None,
        mix: UnlabeledBatch | None,
    ) -> StepOutput:
        """One MSPL iteration, steps 1–5 of the method spec."""
        require("mspl", unlabeled, mix, strong_views=2)
        if unlabeled.cutout_view is None:
            raise ValueError("mspl: the unlabeled batch has no cutout_view (needs ViewSpec.cutout_view=True)")
        self._check_xfp_shapes(labeled, unlabeled)
        patch = mix_targets(model, mix)
        pred_c = eval_predict(model, unlabeled.cutout_view)
        p = predict(model, labeled, unlabeled, mix, patch)

        t = unimatch_terms(p, labeled, self.criterion_l, self.conf_thresh, self.ignore_index)
        t.update(self._aug_terms(p, pred_c))
        loss = (self.settings.weighted(t) + self.settings.weight_aug * t["aug"]) / 2
        return StepOutput(loss, detached({"loss": loss, **t}))

    def _aug_terms(self, p: Predictions, pred_c: torch.Tensor) -> dict[str, torch.Tensor]:
        pred_s = torch.cat([p.pred_s1, p.pred_s2])
        self_training = self.criterion_l(pred_s, pred_s.argmax(dim=1))
        # Published quirk: the labeled prediction is compared with an unlabeled image's perturbed one.
        # Both sides keep their gradient in either setting, so the switch changes only the pairing.
        anchor = p.pred_w if self.settings.xfp_same_image else p.pred_x
        loss_xfp = losses.l1_consistency(anchor, p.pred_w_fp)
        loss_cut = losses.l1_consistency(p.pred_w_fp, pred_c)
        return {
            "self_training": self_training,
            "loss_xfp": loss_xfp,
            "loss_cut": loss_cut,
            "aug": (self_training + loss_xfp + loss_cut) / 3,
        }

    def _check_xfp_shapes(self, labeled: LabeledBatch, unlabeled: UnlabeledBatch) -> None:
        if self.settings.xfp_same_image or labeled.image.shape == unlabeled.weak.shape:
            return
        raise ValueError(
            f"mspl: the published loss_xfp compares pred_x with pred_w_fp, so labeled and unlabeled images "
            f"must have equal shapes; got {tuple(labeled.image.shape)} and {tuple(unlabeled.weak.shape)} "
            f"(method.xfp_same_image=true compares each unlabeled image with itself instead)"
        )
