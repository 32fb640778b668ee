"""Forward passes that methods choose, routed through one module so DDP sees every one of them.

DDP synchronises gradients only for computations that go through the wrapped module's
`forward`; methods therefore call `model(fn, *tensors)` and `fn(net, *tensors)` runs inside.
The segmentation network itself stays plain: encode, decode, forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Forwarder(nn.Module):
    """Wraps the network; `forwarder(fn, *args)` returns `fn(net, *args)`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.net, *args)


def plain(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ordinary forward: logits at input resolution."""
    return net(x)


def feature_perturbed(net: nn.Module, x: torch.Tensor, p: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """UniMatch's fp forward: decode clean and Dropout2d(p)-perturbed stage-1/4 features together."""
    c1, c4 = net.encode(x)
    both_c1 = torch.cat([c1, F.dropout2d(c1, p, training=True)])
    both_c4 = torch.cat([c4, F.dropout2d(c4, p, training=True)])
    out = net.decode(both_c1, both_c4, x.shape[-2:])
    clean, perturbed = out.chunk(2)
    return clean, perturbed
