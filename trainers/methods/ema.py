"""A mean teacher: a frozen copy of the student network whose weights follow it by moving average.

The teacher never goes through DDP and never receives gradients; every rank computes the same
average because the student's weights are the same on every rank after each optimizer step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, buffers: bool = False) -> None:
    """teacher ← decay·teacher + (1 − decay)·student for every parameter (and float buffer if `buffers`).

    Integer buffers (BatchNorm's batch counter) are copied when `buffers` is set.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema_update: decay must be in [0, 1], got {decay}")
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - decay)
    if not buffers:
        return
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.is_floating_point():
            t.lerp_(s, 1.0 - decay)
        else:
            t.copy_(s)


def warmup_decay(steps: int, limit: float) -> float:
    """Mean Teacher's decay schedule min(1 − 1/(steps + 1), limit): a plain average at first."""
    return min(1.0 - 1.0 / (steps + 1), limit)


@dataclass
class Clock:
    """Where training stands, as the loop's `after_step` last reported it (epoch 0 before the first step)."""

    done: int = 0
    """Optimizer steps completed."""
    per_epoch: int = 0
    total: int = 0

    @property
    def epoch(self) -> int:
        return self.done // self.per_epoch if self.per_epoch else 0

    @property
    def epochs(self) -> int:
        return self.total // self.per_epoch if self.per_epoch else 1


class EMATeacher:
    """A frozen copy of `student`: `copy_from` resets it, `update` moves it towards the student."""

    def __init__(self, student: nn.Module) -> None:
        self.net = copy.deepcopy(student).requires_grad_(False)

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        """Take the student's weights and buffers."""
        self.net.load_state_dict(student.state_dict())

    def update(self, student: nn.Module, decay: float, buffers: bool = False) -> None:
        """One EMA step towards `student` (see `ema_update`)."""
        ema_update(self.net, student, decay, buffers)

    def state_dict(self) -> dict[str, Any]:
        return self.net.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state)


def student_network(model: nn.Module) -> nn.Module:
    """The plain network behind a `Forwarder`, DDP-wrapped or not."""
    return getattr(model, "module", model).net
