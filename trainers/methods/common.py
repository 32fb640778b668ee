"""Pieces the methods share: the labeled criterion, eval-mode predictions, CutMix of the targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from trainers import losses
from trainers.batch import UnlabeledBatch
from trainers.config import MethodConfig
from trainers.forward import plain

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_criterion(cfg: MethodConfig, ignore_index: int) -> Criterion:
    """`criterion_l`: CE, or OHEM with the configured threshold and minimum kept pixels."""
    if cfg.criterion == "ohem":
        return partial(
            losses.ohem_ce, ignore_index=ignore_index, thresh=cfg.ohem_thresh, min_kept=cfg.ohem_min_kept
        )
    return partial(losses.ce, ignore_index=ignore_index)


def eval_predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits of `x` in eval mode without gradient; the model is left in train mode."""
    model.eval()
    try:
        with torch.no_grad():
            return model(plain, x)
    finally:
        model.train()


@dataclass
class Targets:
    """Pseudo-labels of one unlabeled view with their confidence and padding mask."""

    label: torch.Tensor
    conf: torch.Tensor
    ignore: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, ignore: torch.Tensor) -> Targets:
        conf, label = losses.pseudo_labels(logits)
        return cls(label, conf, ignore)

    def mixed(self, box: torch.Tensor, mix: Targets) -> Targets:
        """These targets with `mix`'s inside the CutMix box."""
        return Targets(
            *losses.cutmix_targets(self.label, self.conf, self.ignore, box, mix.label, mix.conf, mix.ignore)
        )

    def loss(self, pred: torch.Tensor, conf_thresh: float, ignore_index: int) -> torch.Tensor:
        """Masked CE of `pred` against these targets."""
        return losses.masked_ce(pred, self.label, self.conf, self.ignore, conf_thresh, ignore_index)


def mix_targets(model: nn.Module, mix: UnlabeledBatch) -> Targets:
    """Pseudo-labels of u′'s weak view (eval mode, no gradient); they replace w's inside the boxes."""
    return Targets.from_logits(eval_predict(model, mix.weak), mix.ignore)


def require(
    name: str, unlabeled: UnlabeledBatch | None, mix: UnlabeledBatch | None, strong_views: int
) -> None:
    """Fail clearly when a method is given fewer unlabeled batches or strong views than it declared."""
    for label, batch in (("unlabeled", unlabeled), ("mix", mix)):
        if batch is None:
            raise ValueError(f"{name}: needs the {label} batch, got None")
        if len(batch.strong) < strong_views or len(batch.boxes) < strong_views:
            raise ValueError(
                f"{name}: {label} batch needs {strong_views} strong views and boxes, "
                f"got {len(batch.strong)} and {len(batch.boxes)}"
            )


def detached(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loggable copy of a method's terms."""
    return {k: v.detach() for k, v in terms.items()}
