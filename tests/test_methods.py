"""The four methods on a tiny real network and random batches: losses, gradients, modes, weights, quirks."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainers import losses
from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec
from trainers.config import MethodConfig, from_dict
from trainers.forward import Forwarder
from trainers.methods import METHODS, build_method
from trainers.methods.common import build_criterion, eval_predict

CLASSES, IGNORE, B, SIZE = 3, 255, 2, 17


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    """A small encoder/decoder with BatchNorm; records (training, batch size) of every encode."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.deep = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fuse = nn.Conv2d(16, 8, 3, padding=1)
        self.classifier = nn.Conv2d(8, CLASSES, 1)
        self.calls: list[tuple[bool, int]] = []

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append((self.training, x.shape[0]))
        c1 = F.relu(self.bn(self.stem(x)))
        return c1, F.relu(self.deep(c1))

    def decode(self, c1: torch.Tensor, c4: torch.Tensor, size) -> torch.Tensor:
        c4 = F.interpolate(c4, size=c1.shape[-2:], mode="bilinear", align_corners=True)
        out = self.classifier(F.relu(self.fuse(torch.cat([c1, c4], dim=1))))
        return F.interpolate(out, size=size, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(*self.encode(x), x.shape[-2:])


def make_model(seed: int = 0) -> Forwarder:
    torch.manual_seed(seed)
    return Forwarder(TinyNet()).train()


def box(g: torch.Generator, batch: int) -> torch.Tensor:
    out = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
    for i in range(batch):
        top, left = torch.randint(0, SIZE - 6, (2,), generator=g).tolist()
        out[i, top : top + 6, left : left + 8] = 1
    return out


def unlabeled_batch(g: torch.Generator, batch: int = B) -> UnlabeledBatch:
    ignore = torch.zeros(batch, SIZE, SIZE, dtype=torch.long)
    ignore[:, -3:, :] = IGNORE
    return UnlabeledBatch(
        weak=torch.randn(batch, 3, SIZE, SIZE, generator=g),
        strong=[torch.randn(batch, 3, SIZE, SIZE, generator=g) for _ in range(2)],
        boxes=[box(g, batch), box(g, batch)],
        ignore=ignore,
        cutout_view=torch.rand(batch, 3, SIZE, SIZE, generator=g),
    )


def batches(seed: int = 1, labeled_size: int = B):
    g = torch.Generator().manual_seed(seed)
    mask = torch.randint(0, CLASSES, (labeled_size, SIZE, SIZE), generator=g)
    mask[:, :2, :] = IGNORE
    labeled = LabeledBatch(torch.randn(labeled_size, 3, SIZE, SIZE, generator=g), mask)
    return labeled, unlabeled_batch(g), unlabeled_batch(g)


def run(name: str, model: Forwarder | None = None, seed: int = 0, **cfg):
    method = build_method(from_dict(MethodConfig, {"name": name, **cfg}), IGNORE)
    model = model or make_model()
    labeled, unlabeled, mix = batches()
    torch.manual_seed(seed)
    return method, model, method.step(model, labeled, unlabeled, mix)


TERMS = {
    "supervised": {"loss", "loss_x"},
    "fixmatch": {"loss", "loss_x", "loss_s", "mask_ratio"},
    "unimatch": {"loss", "loss_x", "loss_s", "loss_s1", "loss_s2", "loss_fp", "mask_ratio"},
    "mspl": {
        *("loss", "loss_x", "loss_s", "loss_s1", "loss_s2", "loss_fp", "mask_ratio"),
        *("self_training", "loss_xfp", "loss_cut", "aug"),
    },
}


def test_methods_lookup_names_every_method():
    assert set(TERMS) <= set(METHODS)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_losses_are_finite_and_gradients_reach_first_and_last_layers(name):
    _, model, out = run(name, conf_thresh=0.0)
    assert set(out.terms) == TERMS[name]
    for key, value in out.terms.items():
        assert value.dim() == 0 and not value.requires_grad, key
        assert torch.isfinite(value), key
    out.loss.backward()
    for layer in (model.net.stem, model.net.classifier):
        grad = layer.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["fixmatch", "unimatch", "mspl"])
def test_mask_ratio_and_masked_losses_follow_the_confidence_threshold(name):
    method, _, out = run(name, conf_thresh=0.0)
    assert out.terms["mask_ratio"].item() == 1.0
    # No softmax confidence exceeds 1: no pixel is kept, and the masked losses vanish.
    out = dataclasses.replace(method, conf_thresh=1.01).step(make_model(), *batches())
    assert out.terms["mask_ratio"].item() == 0.0
    masked = TERMS[name] & {"loss_s", "loss_s1", "loss_s2", "loss_fp"}
    assert {k: out.terms[k].item() for k in masked} == dict.fromkeys(masked, 0.0)


EXPECTED_WEIGHTS = {
    "supervised": {},
    "fixmatch": {"weight_x": 1.0, "weight_s": 1.0},
    "unimatch": {"weight_x": 1.0, "weight_s1": 0.25, "weight_s2": 0.25, "weight_fp": 0.5},
    "mspl": {"weight_x": 1.0, "weight_s1": 0.2, "weight_s2": 0.2, "weight_fp": 0.5, "weight_aug": 0.1},
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_default_loss_weights_are_the_published_ones(name):
    method = build_method(MethodConfig(name=name), IGNORE)
    assert {k: getattr(method.settings, k) for k in EXPECTED_WEIGHTS[name]} == EXPECTED_WEIGHTS[name]


def published_total(name: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if name == "supervised":
        return t["loss_x"]
    if name == "fixmatch":
        return (t["loss_x"] + t["loss_s"]) / 2
    if name == "unimatch":
        return (t["loss_x"] + 0.25 * t["loss_s1"] + 0.25 * t["loss_s2"] + 0.5 * t["loss_fp"]) / 2
    aug = (t["self_training"] + t["loss_xfp"] + t["loss_cut"]) / 3
    assert torch.allclose(t["aug"], aug)
    return (t["loss_x"] + 0.2 * t["loss_s1"] + 0.2 * t["loss_s2"] + 0.5 * t["loss_fp"] + 0.1 * aug) / 2


@pytest.mark.parametrize("name", sorted(TERMS))
def test_total_is_the_published_weighted_combination_of_the_terms(name):
    _, _, out = run(name, conf_thresh=0.0)
    assert torch.allclose(out.loss.detach(), published_total(name, out.terms))
    assert torch.equal(out.terms["loss"], out.loss.detach())
    if "loss_s1" in out.terms:
        assert torch.allclose(out.terms["loss_s"], (out.terms["loss_s1"] + out.terms["loss_s2"]) / 2)


EXPECTED_CALLS = {
    "supervised": [(True, B)],
    "fixmatch": [(False, B), (True, 2 * B), (True, B)],
    "unimatch": [(False, B), (True, 2 * B), (True, 2 * B)],
    "mspl": [(False, B), (False, B), (True, 2 * B), (True, 2 * B)],
}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_pseudo_label_predictions_run_in_eval_mode_and_training_resumes(name):
    _, model, _ = run(name)
    assert model.net.calls == EXPECTED_CALLS[name]
    assert model.training and model.net.training


def test_eval_predict_leaves_batchnorm_stats_alone_and_tracks_no_gradient():
    model = make_model()
    stats = (model.net.bn.running_mean.clone(), model.net.bn.running_var.clone())
    logits = eval_predict(model, torch.randn(B, 3, SIZE, SIZE))
    assert not logits.requires_grad
    assert torch.equal(model.net.bn.running_mean, stats[0]) and torch.equal(
        model.net.bn.running_var, stats[1]
    )
    assert model.training and model.net.calls == [(False, B)]


@pytest.mark.parametrize("name", ["fixmatch", "unimatch", "mspl"])
def test_step_does_not_modify_its_batches(name):
    labeled, unlabeled, mix = batches()
    before = copy.deepcopy((labeled, unlabeled, mix))
    build_method(MethodConfig(name=name), IGNORE).step(make_model(), labeled, unlabeled, mix)
    for new, old in zip((unlabeled, mix), before[1:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(new.strong, old.strong, strict=True))
        assert torch.equal(new.ignore, old.ignore)
    assert torch.equal(labeled.image, before[0].image)


def test_xfp_same_image_changes_only_loss_xfp_and_what_depends_on_it():
    # The same weights, batches and RNG seed (Dropout2d of the fp view) for both runs.
    model = make_model()
    _, _, quirk = run("mspl", copy.deepcopy(model), conf_thresh=0.0)
    _, _, fixed = run("mspl", copy.deepcopy(model), conf_thresh=0.0, xfp_same_image=True)
    changed = {k for k in quirk.terms if not torch.equal(quirk.terms[k], fixed.terms[k])}
    assert changed == {"loss_xfp", "aug", "loss"}


def test_published_xfp_needs_equal_labeled_and_unlabeled_shapes():
    method = build_method(MethodConfig(name="mspl"), IGNORE)
    with pytest.raises(ValueError, match="xfp_same_image"):
        method.step(make_model(), *batches(labeled_size=1))
    fixed = build_method(from_dict(MethodConfig, {"name": "mspl", "xfp_same_image": True}), IGNORE)
    assert torch.isfinite(fixed.step(make_model(), *batches(labeled_size=1)).loss)


@pytest.mark.parametrize("normalized", [False, True])
def test_mspl_views_carry_the_cutout_view_normalization_switch(normalized):
    method = build_method(
        from_dict(MethodConfig, {"name": "mspl", "cutout_view_normalized": normalized}), IGNORE
    )
    assert method.views == ViewSpec(
        strong_views=2, cutout=True, cutout_view=True, cutout_view_normalized=normalized, mix_batch=True
    )


def test_views_of_the_other_methods():
    views = {
        n: build_method(MethodConfig(name=n), IGNORE).views for n in ("supervised", "fixmatch", "unimatch")
    }
    assert views == {
        "supervised": ViewSpec(),
        "fixmatch": ViewSpec(strong_views=1, mix_batch=True),
        "unimatch": ViewSpec(strong_views=2, mix_batch=True),
    }


@pytest.mark.parametrize("name", ["fixmatch", "unimatch", "mspl"])
def test_the_independent_mix_switch_reaches_the_loader_through_the_views(name):
    published = build_method(MethodConfig(name=name), IGNORE).views
    switched = build_method(from_dict(MethodConfig, {"name": name, "independent_mix_batch": True}), IGNORE)
    assert not published.independent_mix
    assert switched.views == dataclasses.replace(published, independent_mix=True)


def test_mspl_without_cutout_view_or_mix_batch_fails_clearly():
    labeled, unlabeled, mix = batches()
    method = build_method(MethodConfig(name="mspl"), IGNORE)
    with pytest.raises(ValueError, match="mix batch"):
        method.step(make_model(), labeled, unlabeled, None)
    unlabeled.cutout_view = None
    with pytest.raises(ValueError, match="cutout_view"):
        method.step(make_model(), labeled, unlabeled, mix)


def test_criterion_follows_the_config():
    g = torch.Generator().manual_seed(0)
    pred, target = (
        torch.randn(2, CLASSES, 5, 5, generator=g),
        torch.randint(0, CLASSES, (2, 5, 5), generator=g),
    )
    ohem = build_criterion(MethodConfig(criterion="ohem", ohem_thresh=0.6, ohem_min_kept=7), IGNORE)
    assert ohem(pred, target) == losses.ohem_ce(pred, target, IGNORE, thresh=0.6, min_kept=7)
    assert ohem(pred, target) != losses.ce(pred, target, IGNORE)
    assert build_criterion(MethodConfig(criterion="ce"), IGNORE)(pred, target) == losses.ce(
        pred, target, IGNORE
    )


def test_unknown_method_name_is_rejected():
    with pytest.raises(ValueError, match="method.name"):
        build_method(MethodConfig(name="meanteacher"), IGNORE)
