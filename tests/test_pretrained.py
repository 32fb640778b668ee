import pathlib

import pytest
import torch
import torchvision

from pretrained import WeightsError, load_backbone_weights
from pretrained.load import detect_format
from trainers.backbones import BACKBONES
from trainers.model import DeepLabV3Plus


def randomized(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fresh values for every float tensor, so a successful load is visible in every tensor."""
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in state.items()}


@pytest.fixture(scope="module")
def r50_state():
    torch.manual_seed(0)
    return randomized(BACKBONES["resnet50"]().state_dict())


@pytest.fixture(scope="module")
def tv_state():
    torch.manual_seed(0)
    return randomized(torchvision.models.resnet50().state_dict())


@pytest.fixture
def save(tmp_path):
    """torch.save into tmp_path; the (large) files are deleted after the test."""
    paths = []

    def _save(obj, name="weights.pth"):
        path = tmp_path / name
        torch.save(obj, path)
        paths.append(path)
        return path

    yield _save
    for path in paths:
        path.unlink(missing_ok=True)


def assert_loaded(backbone, state):
    for key, value in backbone.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key


def test_unimatch_file_with_ddp_prefix_and_classifier_round_trips(r50_state, save):
    extra = {"fc.weight": torch.randn(1000, 2048), "fc.bias": torch.randn(1000)}
    path = save({f"module.{k}": v for k, v in {**r50_state, **extra}.items()})
    backbone = BACKBONES["resnet50"]()
    report = load_backbone_weights(backbone, path)
    assert_loaded(backbone, r50_state)
    assert report.fmt == "unimatch"
    assert report.loaded == sum(1 for k in r50_state if not k.endswith("num_batches_tracked"))
    assert {"fc.weight", "fc.bias"} <= set(report.ignored)


def test_torchvision_file_round_trips_into_the_tv_variant(tv_state, save):
    backbone = BACKBONES["resnet50_tv"]()
    report = load_backbone_weights(backbone, save(tv_state), fmt="torchvision")
    assert_loaded(backbone, tv_state)
    assert report.fmt == "torchvision"
    assert "fc.weight" in report.ignored


def test_backbone_of_a_whole_segmentation_checkpoint_loads(r50_state, save):
    model = {f"module.backbone.{k}": v for k, v in r50_state.items()}
    model["module.classifier.weight"] = torch.randn(21, 256, 1, 1)
    path = save({"model": model, "epoch": 3, "previous_best": 70.5})
    backbone = BACKBONES["resnet50"]()
    load_backbone_weights(backbone, path)
    assert_loaded(backbone, r50_state)


def test_misshaped_tensor_is_named_with_both_shapes(r50_state, save):
    path = save({**r50_state, "layer1.0.conv1.weight": torch.zeros(32, 128, 1, 1)})
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(BACKBONES["resnet50"](), path)
    message = str(err.value)
    assert str(path) in message
    assert "1 mis-shaped: ['layer1.0.conv1.weight: file (32, 128, 1, 1) vs model (64, 128, 1, 1)']" in message


def test_resnet50_weights_into_resnet101_name_the_missing_blocks(r50_state, save):
    path = save(r50_state)
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(BACKBONES["resnet101"](), path)
    message = str(err.value)
    assert str(path) in message
    assert "missing" in message and "layer3.6.conv1.weight" in message
    assert "file (3, 4, 6, 3), model (3, 4, 23, 3)" in message


def test_missing_and_unexpected_keys_are_named(r50_state, save):
    state = {k: v for k, v in r50_state.items() if k != "layer4.2.bn3.running_var"}
    state["layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        load_backbone_weights(BACKBONES["resnet50"](), save(state))
    assert "1 missing: ['layer4.2.bn3.running_var']" in str(err.value)
    assert "1 unexpected: ['layer5.0.conv1.weight']" in str(err.value)


def test_torchvision_file_into_the_deep_stem_model_suggests_the_tv_variant(tv_state, save):
    path = save(tv_state)
    with pytest.raises(WeightsError, match="resnet50_tv"):
        load_backbone_weights(BACKBONES["resnet50"](), path)


def test_unimatch_file_into_the_tv_model_suggests_the_deep_stem_variant(r50_state, save):
    with pytest.raises(WeightsError, match="resnet50, resnet101 or xception65"):
        load_backbone_weights(BACKBONES["resnet50_tv"](), save(r50_state))


def test_explicit_format_must_match_the_file(r50_state, save):
    with pytest.raises(WeightsError, match="asked for torchvision format, but the keys are in unimatch"):
        load_backbone_weights(BACKBONES["resnet50"](), save(r50_state), fmt="torchvision")


class Payload:
    """Unpickling this creates a file: stands for any code a malicious weights file would run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_pickle_payload_is_refused_without_running_it(save, tmp_path):
    marker = tmp_path / "payload-ran"
    path = save({"conv1.0.weight": torch.zeros(1), "extra": Payload(marker)})
    with pytest.raises(WeightsError, match="not a plain tensor state dict") as err:
        load_backbone_weights(BACKBONES["tiny"](), path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: unrestricted unpickling runs it
    assert marker.exists()


def test_unreadable_missing_and_non_tensor_files_are_refused(tmp_path, save):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="garbage.pth"):
        load_backbone_weights(BACKBONES["tiny"](), garbage)
    with pytest.raises(WeightsError, match="absent.pth: weights file not found"):
        load_backbone_weights(BACKBONES["tiny"](), tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match="expected a dict of tensors, got list"):
        load_backbone_weights(BACKBONES["tiny"](), save([torch.zeros(1)]))
    with pytest.raises(WeightsError, match="unknown weights format"):
        load_backbone_weights(BACKBONES["tiny"](), save(BACKBONES["small"]().state_dict()))
    with pytest.raises(WeightsError, match="format 'timm'"):
        load_backbone_weights(BACKBONES["tiny"](), garbage, fmt="timm")


def test_format_detection_by_stem():
    assert detect_format({"conv1.0.weight": torch.zeros(64, 3, 3, 3)}, "f") == "unimatch"
    xception = {"conv1.weight": torch.zeros(32, 3, 3, 3), "block1.skip.weight": torch.zeros(1)}
    assert detect_format(xception, "f") == "unimatch"
    assert detect_format({"conv1.weight": torch.zeros(64, 3, 7, 7)}, "f") == "torchvision"


def test_a_backbone_trained_here_loads_from_a_whole_checkpoint(tmp_path, save):
    """The platform's own backbones (no published format) load from a segmentation checkpoint's
    `backbone.*` tensors, under DDP's `module.` prefix too; the head is not read."""
    trained = DeepLabV3Plus("small", 4, (1, 2, 3))
    for p in trained.parameters():
        torch.nn.init.normal_(p)
    state = {f"module.{k}": v for k, v in trained.state_dict().items()}
    fresh = BACKBONES["small"]()
    report = load_backbone_weights(fresh, save({"model": state}))
    assert report.fmt == "semiseg"
    for key, value in trained.backbone.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(WeightsError, match="asked for unimatch format, but the keys are in semiseg"):
        load_backbone_weights(BACKBONES["small"](), save({"model": state}), fmt="unimatch")
