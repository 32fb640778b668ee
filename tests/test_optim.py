"""The batch/LR rule, the poly schedule and the backbone/head learning rates."""

import pytest
import torch
from torch import nn

from trainers.config import ConfigError, OptimConfig
from trainers.model import DeepLabV3Plus
from trainers.optim import build_optimizer, poly_lr, scale, set_lr


def test_linear_rule_scales_lr_with_global_batch():
    cfg = OptimConfig(batch_size=2, lr=0.001, reference_global_batch=8, lr_scaling="linear")
    assert scale(cfg, 4) == scale(cfg, 4)
    s4, s1 = scale(cfg, 4), scale(cfg, 1)
    assert (s4.per_worker_batch, s4.global_batch, s4.lr) == (2, 8, 0.001)
    assert (s1.per_worker_batch, s1.global_batch) == (2, 2)
    assert s1.lr == pytest.approx(0.00025)


def test_keep_global_batch_rule():
    cfg = OptimConfig(batch_size=2, lr=0.001, reference_global_batch=8, lr_scaling="keep_global_batch")
    s = scale(cfg, 2)
    assert (s.per_worker_batch, s.global_batch, s.lr) == (4, 8, 0.001)
    with pytest.raises(ConfigError, match="not divisible by 3 workers"):
        scale(cfg, 3)


def test_poly_schedule_hand_values():
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.classifier = nn.Linear(2, 2)


def test_backbone_and_head_groups():
    net = Net()
    opt = build_optimizer(net, OptimConfig(lr=0.01, lr_multi=10.0), lr=0.01)
    assert [g["lr"] for g in opt.param_groups] == [0.01, pytest.approx(0.1)]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in net.backbone.parameters()}
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 1e-4
    set_lr(opt, 0.002, 10.0)
    assert [g["lr"] for g in opt.param_groups] == [0.002, pytest.approx(0.02)]
    assert isinstance(opt, torch.optim.SGD)


def published_group_weight(module: nn.Module) -> tuple[list, list]:
    """PS-MT's group_weight (VocCode/Utils/helpers.py:38-68), by module type: (decay, no decay)."""
    decay, no_decay = [], []
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            decay.append(m.weight)
            no_decay += [m.bias] if m.bias is not None else []
        elif isinstance(m, nn.BatchNorm2d):
            no_decay += [m.weight, m.bias]
    return decay, no_decay


def test_without_norm_and_bias_decay_the_groups_are_psmts():
    net = DeepLabV3Plus("tiny", 3)
    opt = build_optimizer(net, OptimConfig(decay_norm_and_bias=False), lr=0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 1e-4, 0.0, 0.0]
    decay, no_decay = published_group_weight(net.backbone)
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in decay}
    assert {id(p) for p in opt.param_groups[2]["params"]} == {id(p) for p in no_decay}
    decay, no_decay = published_group_weight(net)
    assert {id(p) for g in opt.param_groups[:2] for p in g["params"]} == {id(p) for p in decay}
    assert {id(p) for g in opt.param_groups[2:] for p in g["params"]} == {id(p) for p in no_decay}
    set_lr(opt, 0.002, 10.0)
    assert [g["lr"] for g in opt.param_groups] == [0.002, pytest.approx(0.02), 0.002, pytest.approx(0.02)]


def test_adamw_keeps_the_groups_and_steps_like_torch_adamw():
    """optim.optimizer: adamw gives the same two groups, and one step equals torch's AdamW on them."""
    torch.manual_seed(0)
    net, twin = Net(), Net()
    twin.load_state_dict(net.state_dict())
    cfg = OptimConfig(optimizer="adamw", lr=0.003, lr_multi=10.0, weight_decay=0.01)
    opt = build_optimizer(net, cfg, lr=0.003)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [0.003, pytest.approx(0.03)]
    backbone = list(twin.backbone.parameters())
    head = [p for n, p in twin.named_parameters() if not n.startswith("backbone.")]
    reference = torch.optim.AdamW(
        [{"params": backbone, "lr": 0.003}, {"params": head, "lr": 0.03}], weight_decay=0.01
    )
    x = torch.randn(4, 2)
    for model, optimizer in ((net, opt), (twin, reference)):
        model.classifier(model.backbone(x)).square().mean().backward()
        optimizer.step()
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
