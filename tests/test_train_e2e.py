"""In-process training on generated images: every method's real step, learning, resume, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainers import checkpoint as ckpt
from trainers.batch import ViewSpec
from trainers.config import ConfigError
from trainers.data import build_loaders, steps_per_epoch
from trainers.datasets import DataError, resolve_split
from trainers.dist import DistContext, context
from trainers.entry import evaluate_checkpoint, train_local
from trainers.forward import Forwarder
from trainers.methods import METHODS, build_method
from trainers.network import build_network


@pytest.mark.parametrize("name", sorted(METHODS))
def test_one_real_iteration_of_each_method(name, tiny_config):
    torch.manual_seed(0)
    cfg = tiny_config(method={"name": name, "conf_thresh": 0.0})
    method = build_method(cfg.method, 255)
    net = build_network(cfg)
    loaders = build_loaders(cfg, resolve_split(cfg.data), method.views, context(False), batch_size=2)
    labeled, unlabeled, mix = next(loaders.epoch())
    if method.views.strong_views:
        assert len(unlabeled.strong) == method.views.strong_views and unlabeled.weak.shape[-1] == 32
        assert (unlabeled.cutout_view is not None) == method.views.cutout_view
    out = method.step(Forwarder(net).train(), labeled, unlabeled, mix)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.terms.values())
    out.loss.backward()
    first = next(net.backbone.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    assert net.classifier.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["supervised", "unimatch"])
@pytest.mark.parametrize(("world_size", "batch_size"), [(1, 2), (1, 5), (2, 2), (3, 1)])
def test_steps_per_epoch_is_what_the_real_loaders_yield(name, world_size, batch_size, tiny_config):
    # The count the loop, the benchmarks and `semiseg grid --dry-run` use, against every rank's loaders
    # (samplers take rank and world size without a process group). 4 labeled, 12 unlabeled images.
    cfg = tiny_config(method={"name": name})
    split, views = resolve_split(cfg.data), build_method(cfg.method, 255).views
    steps = steps_per_epoch(len(split.labeled), len(split.unlabeled), world_size, batch_size)
    for rank in range(world_size):
        ctx = DistContext(rank, world_size, rank, torch.device("cpu"))
        loaders = build_loaders(cfg, split, views, ctx, batch_size)
        assert (
            sum(1 for _ in loaders.epoch()) == steps == len(loaders.labeled) == 12 // world_size // batch_size
        )
    assert steps_per_epoch(4, 0, 1, 2) == 2 and steps_per_epoch(4, 12, 1, 2, cap=3) == 3


@pytest.mark.parametrize(("world_size", "batch_size"), [(1, 2), (1, 3), (3, 1), (3, 2)])
def test_a_labeled_epoch_is_one_padded_pass_over_the_labeled_list(world_size, batch_size, tiny_config):
    # UniMatch's supervised.py: a padded DistributedSampler over the labeled list, whole batches;
    # every labeled image is seen once per epoch (4 labeled images; 3 ranks pad to 6).
    cfg = tiny_config(method={"name": "supervised"}, data={"epoch_over": "labeled"})
    split = resolve_split(cfg.data)
    steps = steps_per_epoch(
        len(split.labeled), len(split.unlabeled), world_size, batch_size, labeled_epoch=True
    )
    assert steps == -(-4 // world_size) // batch_size
    seen = set()
    for rank in range(world_size):
        ctx = DistContext(rank, world_size, rank, torch.device("cpu"))
        loaders = build_loaders(cfg, split, ViewSpec(), ctx, batch_size)
        assert sum(1 for _ in loaders.epoch()) == steps == len(loaders.labeled)
        seen.update(loaders.labeled.sampler)
    assert seen == set(range(4)), "the ranks' shards cover the labeled list"


def test_a_labeled_epoch_is_refused_for_a_method_with_unlabeled_images(tiny_config):
    cfg = tiny_config(method={"name": "fixmatch"}, data={"epoch_over": "labeled"})
    with pytest.raises(ConfigError, match="data.epoch_over: 'labeled' is for methods without unlabeled"):
        train_local(cfg, progress=False)


def test_one_batch_is_memorised_by_the_real_step(tiny_config):
    """The training step learns: 40 steps on one fixed batch (same seed, so the same numbers every run)
    bring its loss below a fifth of the first. Learning across seeds and data is the benchmarks' job."""
    torch.manual_seed(0)
    cfg = tiny_config(method={"name": "supervised"})
    method = build_method(cfg.method, 255)
    net = build_network(cfg)
    loaders = build_loaders(cfg, resolve_split(cfg.data), method.views, context(False), batch_size=4)
    labeled, unlabeled, mix = next(loaders.epoch())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(40):
        out = method.step(Forwarder(net).train(), labeled, unlabeled, mix)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss))
    assert losses[-1] < losses[0] / 5, losses


def test_supervised_training_reports_evaluates_and_resumes(tiny_config, learn_root, tmp_path):
    def cfg(epochs):
        return tiny_config(
            data={"root": str(learn_root), "split": "full", "crop_size": 48},
            optim={
                "epochs": epochs,
                "batch_size": 4,
                "lr": 0.02,
                "lr_multi": 1.0,
                "max_iters_per_epoch": None,
            },
        )

    seen = []
    result = train_local(cfg(5), report=lambda metrics, path: seen.append(metrics), progress=False)
    assert result.epochs_run == [0, 1, 2, 3, 4]
    assert [m["epoch"] for m in seen] == [0, 1, 2, 3, 4]
    assert 0 < result.best_miou <= 100
    for key in ("loss", "loss_x", "lr", "images_per_s", "epoch_time", "iou_0", "global_batch"):
        assert key in seen[-1]
    evaluated = evaluate_checkpoint(result.out_dir / "latest.pth", out_dir=tmp_path / "pred")
    assert evaluated.result.miou == pytest.approx(result.last_miou)
    assert len(list((tmp_path / "pred").glob("*.png"))) == 16

    again = train_local(cfg(6), progress=False)
    assert again.epochs_run == [5]


def test_best_pth_of_a_method_without_teacher_scores_what_validation_scored(learn_config, val_miou):
    cfg = learn_config(name="fixmatch")
    seen: list[float] = []
    train_local(cfg, report=lambda metrics, path: seen.append(metrics["miou"]), progress=False)
    assert evaluate_checkpoint(Path(cfg.out_dir) / ckpt.BEST).result.miou == max(seen)
    net = build_network(cfg)
    net.load_state_dict(torch.load(Path(cfg.out_dir) / ckpt.LATEST, weights_only=True)["model"])
    assert val_miou(cfg, net) == seen[-1]  # the trained network itself


def test_corrupt_image_fails_before_training(tiny_config, synthetic_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    victim = next((root / "JPEGImages").glob("*.jpg"))
    victim.write_bytes(victim.read_bytes()[:100])
    cfg = tiny_config(data={"root": str(root), "split": "full"})
    with pytest.raises(DataError, match=victim.name):
        train_local(cfg, progress=False)
    assert not (tmp_path / "run" / "latest.pth").exists()
