"""The segmentation network a config describes: built fresh, or holding a checkpoint's weights."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pretrained.load import WeightsError, load_backbone_weights
from trainers import checkpoint as ckpt
from trainers.config import ConfigError, TrainConfig, from_dict
from trainers.datasets import dataset_spec
from trainers.model import DeepLabV3Plus


def num_classes(cfg: TrainConfig) -> int:
    """The class count of this config's dataset (overrides and synth.json applied)."""
    return dataset_spec(cfg.data).num_classes


def build_network(cfg: TrainConfig) -> DeepLabV3Plus:
    """DeepLabV3+ for this config, with backbone weights loaded when a file is configured."""
    model = cfg.model
    net = DeepLabV3Plus(model.backbone, num_classes(cfg), tuple(model.dilations), model.output_stride)
    if cfg.model.pretrained:
        try:
            load_backbone_weights(net.backbone, cfg.model.pretrained)
        except WeightsError as exc:
            raise ConfigError(f"model.pretrained: {exc}") from None
    return net


def load_network(path: Path, cfg: TrainConfig | None = None) -> tuple[DeepLabV3Plus, TrainConfig]:
    """The network of checkpoint `path` holding its weights, on the CPU in eval mode, and its config
    (`cfg`, else the checkpoint's own). No backbone weights file is needed: the checkpoint holds it all."""
    state = ckpt.load(path)
    cfg = cfg or from_dict(TrainConfig, state["config"])
    net = build_network(replace(cfg, model=replace(cfg.model, pretrained=None)))
    net.load_state_dict(state["model"])
    return net.eval(), cfg
