"""Training methods: small objects that turn model outputs into named losses; one loop runs them all.

A method declares the unlabeled views it needs (`views`) and computes one iteration's losses
(`step`). Adding a method is adding a file and a line in METHODS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec


@dataclass
class StepOutput:
    loss: torch.Tensor
    """The total loss to back-propagate."""
    terms: dict[str, torch.Tensor]
    """Detached scalars to log: each loss term, `mask_ratio` where pseudo-labels are used."""


class Method(Protocol):
    views: ViewSpec

    def step(
        self,
        model: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch | None,
        mix: UnlabeledBatch | None,
    ) -> StepOutput:
        """One iteration's losses; `model(fn, *x)` runs `fn(net, *x)` (see trainers.forward)."""
        ...


# Imported after StepOutput and Method are defined: the method modules import them from here.
from trainers.config import MethodConfig, choice  # noqa: E402
from trainers.methods.fixmatch import FixMatch  # noqa: E402
from trainers.methods.mspl import MSPL  # noqa: E402
from trainers.methods.psmt import PSMT  # noqa: E402
from trainers.methods.stpp import STPP  # noqa: E402
from trainers.methods.supervised import Supervised  # noqa: E402
from trainers.methods.u2pl import U2PL  # noqa: E402
from trainers.methods.unimatch import UniMatch  # noqa: E402

METHODS = {
    "supervised": Supervised,
    "fixmatch": FixMatch,
    "unimatch": UniMatch,
    "mspl": MSPL,
    "u2pl": U2PL,
    "stpp": STPP,
    "psmt": PSMT,
}


def build_method(cfg: MethodConfig, num_classes: int, ignore_index: int) -> Method:
    """The method named by `cfg.name`, configured; `num_classes` is accepted for methods that need it."""
    return choice("method.name", cfg.name, METHODS).from_config(cfg, ignore_index)
