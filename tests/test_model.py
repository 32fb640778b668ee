import functools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from trainers.backbones import BACKBONES
from trainers.config import ConfigError, TrainConfig, from_dict
from trainers.forward import feature_perturbed
from trainers.model import DeepLabV3Plus

# Counted once from this implementation, which reproduces UniMatch's DeepLabV3+ bit for bit
# (checked against its code, same weights, same outputs); UniMatch reports 59.5 M for R101.
PARAM_COUNTS = {
    "resnet101": 59_468_085,
    "resnet50": 40_475_957,
    "resnet101_tv": 59_344_309,
    "resnet50_tv": 40_352_181,
    "xception65": 54_711_461,
    "tiny": 121_909,
    "small": 1_029_741,
}
OUTPUT_STRIDES = {"small": 8}
"""Every other backbone has UniMatch's output stride 16."""


@functools.cache
def built(name: str) -> DeepLabV3Plus:
    """One eval-mode model per backbone for the read-only tests (building R101 takes seconds)."""
    return DeepLabV3Plus(name, 21).eval()


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_model(num_classes: int = 5, seed: int = 0) -> DeepLabV3Plus:
    torch.manual_seed(seed)
    return DeepLabV3Plus("tiny", num_classes)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_has_its_pinned_size_stride_4_and_output_stride_features_and_full_size_logits(name):
    net = built(name)
    assert count(net) == PARAM_COUNTS[name]
    stride = OUTPUT_STRIDES.get(name, 16)
    assert net.backbone.output_stride == stride
    x = torch.randn(1, 3, 33, 49)
    with torch.no_grad():
        c1, c4 = net.encode(x)
        out = net.decode(c1, c4, x.shape[-2:])
    assert c1.shape == (1, net.backbone.low_channels, math.ceil(33 / 4), math.ceil(49 / 4))
    assert c4.shape == (1, net.backbone.high_channels, math.ceil(33 / stride), math.ceil(49 / stride))
    assert out.shape == (1, 21, 33, 49)


def test_resnet101_matches_unimatchs_59_5_million_parameters():
    assert abs(PARAM_COUNTS["resnet101"] - 59.5e6) <= 0.05e6


def test_parameter_names_and_shapes_match_unimatch_checkpoints():
    state = built("resnet101").state_dict()
    expected = {
        "backbone.conv1.0.weight": (64, 3, 3, 3),
        "backbone.conv1.6.weight": (128, 64, 3, 3),
        "backbone.bn1.running_var": (128,),
        "backbone.layer1.0.conv1.weight": (64, 128, 1, 1),
        "backbone.layer1.0.downsample.0.weight": (256, 128, 1, 1),
        "backbone.layer3.22.conv3.weight": (1024, 256, 1, 1),
        "backbone.layer4.0.downsample.1.bias": (2048,),
        "head.b1.0.weight": (256, 2048, 3, 3),
        "head.b4.gap.1.weight": (256, 2048, 1, 1),
        "head.b4.gap.2.running_mean": (256,),
        "head.project.0.weight": (256, 1280, 1, 1),
        "reduce.0.weight": (48, 256, 1, 1),
        "fuse.0.weight": (256, 304, 3, 3),
        "fuse.3.weight": (256, 256, 3, 3),
        "classifier.weight": (21, 256, 1, 1),
        "classifier.bias": (21,),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert not any(k.startswith("fc.") or ".fc." in k for k in state)


def test_xception_names_match_unimatchs_xception():
    state = built("xception65").backbone.state_dict()
    expected = {
        "conv1.weight": (32, 3, 3, 3),
        "block2.sepconv1.depthwise.weight": (128, 1, 3, 3),
        "block2.sepconv1.pointwise.weight": (256, 128, 1, 1),
        "block19.sepconv3.bn2.running_var": (728,),
        "block20.skip.weight": (1024, 728, 1, 1),
        "block20.skipbn.weight": (1024,),
        "conv5.pointwise.weight": (2048, 1536, 1, 1),
    }
    assert {k: tuple(state[k].shape) for k in expected} == expected
    assert "block4.skip.weight" not in state


def test_resnet_dilates_only_the_last_stage():
    layer4 = built("resnet50").backbone.layer4
    assert layer4[0].conv2.stride == (1, 1) and layer4[0].conv2.dilation == (1, 1)
    assert all(block.conv2.dilation == (2, 2) for block in layer4[1:])


@pytest.mark.parametrize(("output_stride", "dilate"), [(16, [False, False, True]), (8, [False, True, True])])
def test_resnet_strides_and_dilations_are_torchvisions(output_stride, dilate):
    # Block by block the 3x3 convs of torchvision's replace_stride_with_dilation, and the same weights.
    ours = DeepLabV3Plus("resnet50_tv", 21, output_stride=output_stride).backbone
    theirs = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilate)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        pairs = zip(getattr(ours, stage), getattr(theirs, stage), strict=True)
        assert all(
            (a.conv2.stride, a.conv2.dilation, a.conv2.padding)
            == (b.conv2.stride, b.conv2.dilation, b.conv2.padding)
            for a, b in pairs
        ), stage
    shapes = {k: v.shape for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    with torch.no_grad():
        assert ours(torch.randn(1, 3, 64, 64))[1].shape[-1] == 64 // output_stride


def test_an_output_stride_a_backbone_lacks_is_one_config_error():
    with pytest.raises(
        ConfigError, match="model.output_stride: backbone tiny has output stride 16 only, got 8"
    ):
        DeepLabV3Plus("tiny", 21, output_stride=8)
    assert DeepLabV3Plus("small", 21, output_stride=8).backbone.output_stride == 8
    with pytest.raises(ConfigError, match="model.output_stride: expected 8, 16 or null, got 4"):
        from_dict(TrainConfig, {"model": {"output_stride": 4}})


def test_odd_input_sizes_give_logits_at_input_size():
    net = tiny_model(num_classes=7)
    for h, w in [(65, 97), (33, 33), (64, 48)]:
        assert net(torch.randn(2, 3, h, w)).shape == (2, 7, h, w)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_encode_then_decode_equals_forward(mode):
    net = getattr(tiny_model(), mode)()
    x = torch.randn(2, 3, 65, 97)
    c1, c4 = net.encode(x)
    assert torch.equal(net.decode(c1, c4, x.shape[-2:]), net(x))


def test_feature_perturbation_gives_a_clean_and_a_different_perturbed_output():
    net = tiny_model().train()
    x = torch.randn(2, 3, 65, 65)
    torch.manual_seed(1)
    clean, perturbed = feature_perturbed(net, x)
    assert clean.shape == perturbed.shape == (2, 5, 65, 65)
    assert not torch.allclose(clean, perturbed)
    (clean.sum() + perturbed.sum()).backward()
    assert net.classifier.weight.grad is not None


def test_feature_perturbation_clean_output_is_the_plain_forward_in_eval_mode():
    net = tiny_model().eval()
    x = torch.randn(2, 3, 33, 33)
    clean, _ = feature_perturbed(net, x)
    assert torch.allclose(clean, net(x), atol=1e-6)


def test_batch_of_one_trains_using_running_statistics_in_the_pooling_branch():
    net = tiny_model().train()
    bn = net.head.b4.gap[2]
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1, bn.num_features, 1, 1))
    before = bn.running_mean.clone()
    net(torch.randn(1, 3, 33, 33)).mean().backward()
    assert torch.equal(bn.running_mean, before)
    assert bn.weight.grad is not None
    net.head.b4(torch.randn(2, 64, 3, 3))
    assert not torch.equal(bn.running_mean, before)


def test_batch_of_one_pooling_branch_equals_its_eval_mode_output():
    pooling = tiny_model().head.b4
    pooling.gap[2].running_mean.uniform_(-1, 1)
    x = torch.randn(1, 64, 5, 7)
    assert torch.allclose(pooling.train()(x), pooling.eval()(x))


def test_backbone_and_head_parameters_partition_the_model():
    net = tiny_model()
    backbone, head = net.backbone_parameters(), net.head_parameters()
    assert len(backbone) + len(head) == len(list(net.parameters()))
    assert {id(p) for p in backbone}.isdisjoint(id(p) for p in head)
    assert any(p is net.classifier.weight for p in head)
    assert any(p is net.reduce[0].weight for p in head)


def test_tiny_model_is_small_and_cheap():
    # Work counted, not timed: a step on a 4 x 65 px batch is a quarter GFLOP (the small backbone's is
    # ten times that), so the CPU tests stay seconds long. Measured speed is benchmarks/train_step.py's.
    net = tiny_model(num_classes=21).train()
    assert count(net) < 0.5e6
    x, y = torch.randn(4, 3, 65, 65), torch.randint(0, 21, (4, 65, 65))
    with FlopCounterMode(display=False) as flops:
        F.cross_entropy(net(x), y).backward()
    assert 0 < flops.get_total_flops() < 0.3e9


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="resnet101"):
        DeepLabV3Plus("resnet152", 21)


def test_aspp_needs_three_rates():
    with pytest.raises(ValueError, match="3 rates"):
        DeepLabV3Plus("tiny", 21, dilations=(6, 12))
