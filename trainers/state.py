"""What a checkpoint holds: one plain record, written by the loop and read back when a run resumes."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class TrainState:
    """The state after `epoch` finished epochs: enough to continue as if training had never stopped."""

    model: dict[str, Any]
    """The network's state dict (unwrapped: no DDP or Forwarder prefix)."""
    optimizer: dict[str, Any]
    epoch: int
    """Epochs completed: the next epoch to train."""
    iteration: int
    """Optimizer steps completed."""
    best_miou: float
    miou: float
    """mIoU after the last completed epoch."""
    config: dict[str, Any]
    """The TrainConfig it was trained with (`TrainConfig.to_dict`): what a resume is checked against."""
    rng: dict[str, Any]
    """Rank 0's Python, NumPy and torch RNG states (`checkpoint.rng_state`)."""
    method: dict[str, Any] = field(default_factory=dict)
    """`Method.state_dict()`: teachers, clocks; empty for methods without state."""

    def to_dict(self) -> dict[str, Any]:
        """The dict `checkpoint.save` writes (plain types and tensors: loads with weights_only)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> TrainState:
        """Read back what `to_dict` wrote (a checkpoint without method state loads with an empty one)."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})
