"""Evaluation: counts and mIoU against hand-computed confusion matrices, the three prediction modes."""

import pytest
import torch
from PIL import Image
from torch import nn

from trainers.batch import LabeledBatch
from trainers.evaluate import (
    EvalResult,
    center_crop,
    evaluate,
    intersection_union,
    miou,
    predict,
    save_prediction,
)


class PixelNet(nn.Module):
    """A per-pixel network (1x1 conv) that records every forward call."""

    def __init__(self, num_classes: int = 4, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1, bias=weight is None)
        if weight is not None:
            self.conv.weight.data.copy_(weight.view(num_classes, 3, 1, 1))
        self.calls: list[dict] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(
            {"shape": tuple(x.shape), "training": self.training, "grad": torch.is_grad_enabled()}
        )
        return self.conv(x)


@pytest.fixture
def net() -> PixelNet:
    torch.manual_seed(0)
    return PixelNet()


# ---- counts and mIoU ----

PRED = torch.tensor([[0, 1, 1], [1, 2, 0]])
TARGET = torch.tensor([[0, 0, 1], [255, 2, 2]])
# Hand-computed over the 5 non-ignored pixels; class 3 is absent from both.
INTER = [1, 1, 1, 0]
UNION = [3, 2, 2, 0]


def test_intersection_union_hand_computed():
    inter, union = intersection_union(PRED, TARGET, 4, 255)
    assert inter.tolist() == INTER and union.tolist() == UNION
    assert inter.dtype == union.dtype == torch.int64


def test_intersection_union_sums_over_images():
    batched = intersection_union(PRED[None].repeat(2, 1, 1), TARGET[None].repeat(2, 1, 1), 4, 255)
    first = intersection_union(PRED[:1], TARGET[:1], 4, 255)
    second = intersection_union(PRED[1:], TARGET[1:], 4, 255)
    assert batched[0].tolist() == [2 * v for v in INTER] and batched[1].tolist() == [2 * v for v in UNION]
    assert (first[0] + second[0]).tolist() == INTER and (first[1] + second[1]).tolist() == UNION


def test_intersection_union_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="pred shape"):
        intersection_union(PRED, TARGET[:1], 4, 255)


def test_miou_averages_all_classes_like_unimatch():
    value, per_class = miou(torch.tensor(INTER), torch.tensor(UNION))
    assert per_class == pytest.approx([1 / 3, 1 / 2, 1 / 2, 0.0])
    assert value == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 2 + 0) / 4)


def test_miou_can_skip_absent_classes():
    value, _ = miou(torch.tensor(INTER), torch.tensor(UNION), ignore_absent=True)
    assert value == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert miou(torch.zeros(3), torch.zeros(3), ignore_absent=True)[0] == 0.0


# ---- prediction modes ----


def coverage(height: int, width: int) -> torch.Tensor:
    """Windows covering each pixel of a 50 x 70 image, crop 32, stride 21 (rows 0, 18; cols 0, 21, 38)."""
    rows = torch.ones(height)
    rows[18:32] = 2
    cols = torch.ones(width)
    cols[21:32] = 2
    cols[38:53] = 2
    return rows[:, None] * cols[None, :]


def test_sliding_window_equals_whole_image_for_a_per_pixel_net(net):
    image = torch.randn(1, 3, 50, 70)
    whole = predict(net, image, "original", 32, 4)
    summed = predict(net, image, "sliding_window", 32, 4)
    assert summed.shape == (1, 4, 50, 70)
    assert torch.allclose(summed.sum(1)[0], coverage(50, 70), atol=1e-5)
    assert torch.allclose(summed / coverage(50, 70), whole.softmax(1), atol=1e-5)
    assert torch.equal(summed.argmax(1), whole.argmax(1))


def test_sliding_window_batches_its_windows(net):
    image = torch.randn(1, 3, 50, 70)
    predict(net, image, "sliding_window", 32, 4, window_batch=8)
    assert [c["shape"] for c in net.calls] == [(6, 3, 32, 32)]
    net.calls.clear()
    predict(net, image, "sliding_window", 32, 4, window_batch=4)
    assert [c["shape"] for c in net.calls] == [(4, 3, 32, 32), (2, 3, 32, 32)]


@pytest.mark.parametrize("size", [(20, 25), (20, 70), (50, 31)], ids=["smaller", "short", "narrow"])
def test_sliding_window_on_images_smaller_than_the_crop(net, size):
    image = torch.randn(2, 3, *size)
    summed = predict(net, image, "sliding_window", 32, 4)
    assert all(c["shape"][-2:] == (min(32, size[0]), min(32, size[1])) for c in net.calls)
    whole = predict(net, image, "original", 32, 4)
    assert summed.shape == (2, 4, *size)
    assert torch.equal(summed.argmax(1), whole.argmax(1))


def test_center_crop_mode(net):
    image = torch.randn(1, 3, 50, 70)
    whole = predict(net, image, "original", 32, 4)
    cropped = predict(net, image, "center_crop", 32, 4)
    assert torch.allclose(cropped, whole[:, :, 9:41, 19:51], atol=1e-6)
    small = torch.randn(1, 3, 20, 25)
    assert torch.allclose(predict(net, small, "center_crop", 32, 4), predict(net, small, "original", 32, 4))


def test_center_crop_takes_image_and_mask_identically():
    image = torch.arange(50 * 70).view(1, 1, 50, 70).expand(1, 3, 50, 70)
    mask = torch.arange(50 * 70).view(1, 50, 70)
    crop_image, crop_mask = center_crop(image, mask, 32)
    assert crop_image.shape == (1, 3, 32, 32) and crop_mask.shape == (1, 32, 32)
    assert torch.equal(crop_image[:, 0], crop_mask) and crop_mask[0, 0, 0] == 9 * 70 + 19
    assert center_crop(image[..., :20, :25], mask[..., :20, :25], 32)[1].shape == (1, 20, 25)


def test_predict_checks_mode_and_class_count(net):
    image = torch.randn(1, 3, 20, 20)
    with pytest.raises(ValueError, match="mode"):
        predict(net, image, "tiled", 32, 4)
    with pytest.raises(ValueError, match="num_classes"):
        predict(net, image, "sliding_window", 32, 19)


# ---- evaluate ----


def one_hot_image(classes: torch.Tensor) -> torch.Tensor:
    """An image whose channel c is 1 where the pixel should be predicted as class c (identity net)."""
    return nn.functional.one_hot(classes, 3).permute(2, 0, 1)[None].float()


def pinned_loader() -> list[LabeledBatch]:
    # Image 1 predicts [[0,1,1],[1,2,0]] against [[0,0,1],[1,2,255]]; image 2 gets four class-0 pixels right.
    first = LabeledBatch(
        one_hot_image(torch.tensor([[0, 1, 1], [1, 2, 0]])), torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    )
    second = LabeledBatch(
        one_hot_image(torch.zeros(2, 2, dtype=torch.int64)), torch.zeros(1, 2, 2, dtype=torch.int64)
    )
    return [first, second]


def identity_net() -> PixelNet:
    return PixelNet(num_classes=3, weight=torch.eye(3))


def test_evaluate_pinned_counts():
    result = evaluate(identity_net(), pinned_loader(), "original", 32, 3, 255)
    assert isinstance(result, EvalResult)
    # class 0: inter 1 + 4, union 2 + 4; class 1: inter 2, union 3; class 2: inter 1, union 1.
    assert result.inter.tolist() == [5, 2, 1] and result.union.tolist() == [6, 3, 1]
    assert result.per_class == pytest.approx([5 / 6, 2 / 3, 1.0])
    assert result.miou == pytest.approx(100 * (5 / 6 + 2 / 3 + 1) / 3)


def test_evaluate_applies_the_reduce_hook():
    seen = []

    def reduce(counts: torch.Tensor) -> torch.Tensor:
        seen.append(counts.clone())
        # As if a second rank had seen one more image with its class-2 pixel wrong (predicted 0).
        return counts + torch.tensor([[0, 0, 0], [1, 0, 1]])

    result = evaluate(identity_net(), pinned_loader(), "original", 32, 3, 255, reduce=reduce)
    assert len(seen) == 1 and seen[0].tolist() == [[5, 2, 1], [6, 3, 1]]
    assert result.union.tolist() == [7, 3, 2]
    assert result.miou == pytest.approx(100 * (5 / 7 + 2 / 3 + 1 / 2) / 3)


def test_evaluate_runs_in_eval_mode_without_grad_and_restores_mode():
    net = identity_net().train()
    evaluate(net, pinned_loader(), "sliding_window", 32, 3, 255)
    assert net.training
    assert net.calls and all(not c["training"] and not c["grad"] for c in net.calls)
    net.eval()
    evaluate(net, pinned_loader(), "original", 32, 3, 255)
    assert not net.training


def test_evaluate_modes_agree_for_a_per_pixel_net(net):
    torch.manual_seed(1)
    mask = torch.randint(0, 4, (1, 50, 70))
    mask[:, :5] = 255
    loader = [
        LabeledBatch(torch.randn(1, 3, 50, 70), mask),
        LabeledBatch(torch.randn(1, 3, 20, 25), mask[:, :20, :25]),
    ]
    original = evaluate(net, loader, "original", 32, 4, 255)
    sliding = evaluate(net, loader, "sliding_window", 32, 4, 255)
    assert torch.equal(original.inter, sliding.inter) and torch.equal(original.union, sliding.union)
    centred = evaluate(net, loader, "center_crop", 32, 4, 255)
    expected = [torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64)]
    for batch in loader:
        image, target = center_crop(batch.image, batch.mask, 32)
        inter, union = intersection_union(net(image).argmax(1), target, 4, 255)
        expected[0] += inter
        expected[1] += union
    assert centred.inter.tolist() == expected[0].tolist() and centred.union.tolist() == expected[1].tolist()


def test_evaluate_rejects_unknown_mode(net):
    with pytest.raises(ValueError, match="expected one of"):
        evaluate(net, [], "tiled", 32, 4, 255)


# ---- saving ----


def test_save_prediction_palette_round_trip(tmp_path):
    pred = torch.arange(35).view(5, 7) % 21
    palette = [v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)]
    path = tmp_path / "sub" / "pred.png"
    save_prediction(pred, path, palette)
    loaded = Image.open(path)
    assert loaded.mode == "P"
    assert torch.equal(torch.tensor(list(loaded.tobytes()), dtype=torch.int64).view(5, 7), pred)
    assert loaded.getpalette()[: 3 * 21] == palette[: 3 * 21]


def test_save_prediction_rejects_ids_outside_a_palette(tmp_path):
    with pytest.raises(ValueError, match="class ids"):
        save_prediction(torch.full((2, 2), 300), tmp_path / "x.png", [0] * 768)
