"""Loss functions pinned to values computed by hand on 2×2 images with 2 classes."""

import math

import pytest
import torch

from trainers import losses

IGNORE = 255
# Pixel logits (class 0, class 1): (0,0)=(2,0), (0,1)=(0,1), (1,0)=(1,1), (1,1)=(3,-1).
PRED = torch.tensor([[[[2.0, 0.0], [1.0, 3.0]], [[0.0, 1.0], [1.0, -1.0]]]])
PIXELS = {(0, 0): (2.0, 0.0), (0, 1): (0.0, 1.0), (1, 0): (1.0, 1.0), (1, 1): (3.0, -1.0)}


def nll(pixel: tuple[int, int], target: int) -> float:
    logits = PIXELS[pixel]
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


def prob(pixel: tuple[int, int], target: int) -> float:
    return math.exp(-nll(pixel, target))


# Targets with one ignored pixel; target-class probabilities 0.881, 0.731, 0.018.
TARGET = torch.tensor([[[0, 1], [IGNORE, 1]]])
VALID = [((0, 0), 0), ((0, 1), 1), ((1, 1), 1)]


def test_probabilities_of_the_fixture_are_as_commented():
    assert [round(prob(p, t), 3) for p, t in VALID] == [0.881, 0.731, 0.018]


def test_ce_is_the_mean_over_non_ignored_pixels():
    expected = sum(nll(p, t) for p, t in VALID) / 3
    assert losses.ce(PRED, TARGET, IGNORE).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("min_kept", [4, 10])
def test_ohem_keeps_every_valid_pixel_when_fewer_than_min_kept(min_kept):
    expected = sum(nll(p, t) for p, t in VALID) / 3
    got = losses.ohem_ce(PRED, TARGET, IGNORE, thresh=0.0, min_kept=min_kept)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_ohem_uses_thresh_when_the_kth_probability_is_below_it():
    # k=1: the smallest probability 0.018 < 0.7, so the threshold is 0.7 and only that pixel stays.
    got = losses.ohem_ce(PRED, TARGET, IGNORE, thresh=0.7, min_kept=1)
    assert got.item() == pytest.approx(nll((1, 1), 1), rel=1e-6)


def test_ohem_raises_the_threshold_to_the_kth_smallest_probability():
    # k=2: the second smallest 0.731 > 0.5 becomes the threshold, keeping 0.018 and 0.731 (<=).
    got = losses.ohem_ce(PRED, TARGET, IGNORE, thresh=0.5, min_kept=2)
    assert got.item() == pytest.approx((nll((1, 1), 1) + nll((0, 1), 1)) / 2, rel=1e-6)


def test_ohem_never_keeps_ignored_pixels():
    # k=3 = all valid pixels: the threshold is the largest valid probability; the ignored one stays out.
    got = losses.ohem_ce(PRED, TARGET, IGNORE, thresh=0.0, min_kept=3)
    assert got.item() == pytest.approx(sum(nll(p, t) for p, t in VALID) / 3, rel=1e-6)


PSEUDO = torch.tensor([[[0, 1], [1, 0]]])
CONF_THRESH = 0.95


def conf(below: float) -> torch.Tensor:
    # (0,0) exactly at the threshold: kept; (0,1) just below: dropped; (1,0) confident but padding.
    return torch.tensor([[[CONF_THRESH, below], [0.99, 1.0]]])


PADDING = torch.tensor([[[0, 0], [IGNORE, 0]]])


def test_masked_ce_keeps_conf_at_threshold_and_divides_by_non_padding_count():
    got = losses.masked_ce(PRED, PSEUDO, conf(0.9499), PADDING, CONF_THRESH, IGNORE)
    assert got.item() == pytest.approx((nll((0, 0), 0) + nll((1, 1), 0)) / 3, rel=1e-6)


def test_masked_ce_of_all_padding_is_zero_not_nan():
    padding = torch.full((1, 2, 2), IGNORE)
    assert losses.masked_ce(PRED, PSEUDO, conf(0.9499), padding, CONF_THRESH, IGNORE).item() == 0.0


def test_mask_ratio_is_the_confident_share_of_non_padding_pixels():
    got = losses.mask_ratio(conf(0.9499), PADDING, CONF_THRESH, IGNORE)
    assert got.item() == pytest.approx(2 / 3)


def test_l1_consistency_is_the_mean_absolute_difference():
    a = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    b = torch.tensor([[0.0, 1.0], [0.5, 2.0]])
    assert losses.l1_consistency(a, b).item() == pytest.approx((1 + 3 + 0 + 2) / 4)


def test_l1_consistency_rejects_different_shapes():
    with pytest.raises(ValueError, match="equal shapes"):
        losses.l1_consistency(torch.zeros(2, 3), torch.zeros(3, 3))


def test_pseudo_labels_are_detached_softmax_max_and_argmax():
    logits = PRED.clone().requires_grad_()
    c, label = losses.pseudo_labels(logits)
    assert not c.requires_grad
    assert label.tolist() == [[[0, 1], [0, 0]]]
    expected = [prob((0, 0), 0), prob((0, 1), 1), 0.5, prob((1, 1), 0)]
    assert c.flatten().tolist() == pytest.approx(expected, rel=1e-6)


def test_cutmix_targets_take_label_conf_and_ignore_from_mix_inside_the_box_only():
    box = torch.tensor([[[1, 0], [1, 0]]])
    pseudo, c, ignore = (
        torch.tensor([[[1, 1], [1, 1]]]),
        torch.full((1, 2, 2), 0.5),
        torch.zeros(1, 2, 2).long(),
    )
    mix_pseudo = torch.tensor([[[2, 2], [3, 3]]])
    mix_conf = torch.tensor([[[0.9, 0.9], [0.8, 0.8]]])
    mix_ignore = torch.tensor([[[0, 0], [IGNORE, IGNORE]]])
    originals = [t.clone() for t in (pseudo, c, ignore)]

    new_pseudo, new_conf, new_ignore = losses.cutmix_targets(
        pseudo, c, ignore, box, mix_pseudo, mix_conf, mix_ignore
    )
    assert new_pseudo.tolist() == [[[2, 1], [3, 1]]]
    assert new_conf.flatten().tolist() == pytest.approx([0.9, 0.5, 0.8, 0.5])
    assert new_ignore.tolist() == [[[0, 0], [IGNORE, 0]]]
    assert all(torch.equal(a, b) for a, b in zip(originals, (pseudo, c, ignore), strict=True))


def test_paste_copies_every_channel_inside_the_box_and_leaves_inputs_alone():
    images, mix_images = torch.zeros(2, 3, 2, 2), torch.ones(2, 3, 2, 2)
    box = torch.tensor([[[0, 1], [0, 0]], [[0, 0], [0, 0]]])
    pasted = losses.paste(images, mix_images, box)
    expected = torch.zeros(2, 3, 2, 2)
    expected[0, :, 0, 1] = 1
    assert torch.equal(pasted, expected)
    assert images.sum() == 0 and mix_images.sum() == 24
