"""The segmentation network a config describes: built fresh, or the one a checkpoint's validation scored."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from pretrained.load import WeightsError, load_backbone_weights
from trainers import checkpoint as ckpt
from trainers.config import ConfigError, MethodConfig, TrainConfig, from_dict
from trainers.datasets import dataset_spec
from trainers.model import DeepLabV3Plus
from trainers.state import TrainState


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


def load_network(path: Path, cfg: TrainConfig | None = None) -> tuple[nn.Module, TrainConfig]:
    """The network the validation of checkpoint `path` scored (see `evaluated_network`), holding its weights,
    on the CPU in eval mode, and its config (`cfg`, else the checkpoint's own). No backbone weights file
    is needed: the checkpoint holds it all."""
    state = TrainState.from_dict(ckpt.load(path))
    cfg = cfg or from_dict(TrainConfig, state.config)
    net = build_network(replace(cfg, model=replace(cfg.model, pretrained=None)))
    net.load_state_dict(state.model)
    return evaluated_network(net, state, dataset_spec(cfg.data).ignore_index).eval(), cfg


def evaluated_network(net: DeepLabV3Plus, state: TrainState, ignore_index: int) -> nn.Module:
    """`Method.eval_network(net)` of the method that wrote `state` (its own `method:` config), with its
    state restored: `net` itself, or U2PL's teacher, PS-MT's two teachers."""
    from trainers.methods import build_method  # not at the top: ST++ imports this module

    method = build_method(from_dict(MethodConfig, state.config["method"]), ignore_index)
    if state.method:
        # Setup builds what the state fills; without state there is nothing to build (ST++'s setup
        # would read its teacher's file, which evaluating does not need).
        method.setup(net)
        method.load_state_dict(state.method)
    return method.eval_network(net)
