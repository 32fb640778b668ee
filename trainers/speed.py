"""The speed switches of `FastConfig` resolved for one device: autocast, channels_last, compile.

They change how fast a step runs, not what it computes (bf16 aside, which benchmarks/ measures);
where the strong views are built (`device_augment`) is read by `trainers.data`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from trainers.config import FastConfig


@dataclass(frozen=True)
class FastSettings:
    """`FastConfig` with every null resolved for one device."""

    channels_last: bool
    autocast_bf16: bool
    device_augment: bool
    decode: str
    foreach: bool
    compile: bool


def settings(cfg: FastConfig, device: torch.device) -> FastSettings:
    """Resolve the nulls of `cfg` for `device` (FastConfig documents each default)."""
    gpu = device.type == "cuda"

    def pick(value: bool | None, default: bool) -> bool:
        return default if value is None else value

    return FastSettings(
        channels_last=pick(cfg.channels_last, True),
        autocast_bf16=pick(cfg.autocast_bf16, gpu),
        device_augment=pick(cfg.device_augment, gpu),
        decode=cfg.decode,
        foreach=cfg.foreach,
        compile=cfg.compile,
    )


def autocast(switches: FastSettings, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when switched on; a no-op context otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=switches.autocast_bf16)


def prepare_network(net: nn.Module, switches: FastSettings) -> nn.Module:
    """`net` in channels_last and with its parts compiled, as switched; parameters keep their identity."""
    if switches.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if switches.compile:
        # Parts, not the whole: methods call encode/decode directly (feature perturbation).
        for part in (net.backbone, net.head, net.reduce, net.fuse):
            part.compile()
    return net
