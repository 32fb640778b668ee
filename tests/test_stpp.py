"""ST++: stability score, reliable split, snapshots, both kinds of stage step, three stages end to end."""

from pathlib import Path

import pytest
import torch

from trainers import checkpoint as ckpt
from trainers.batch import LabeledBatch, UnlabeledBatch
from trainers.config import MethodConfig, load_config
from trainers.datasets import Pair, read_list, resolve_split
from trainers.entry import plan, train
from trainers.forward import Forwarder
from trainers.methods import build_method
from trainers.methods.common import build_criterion
from trainers.methods.stpp import (
    STPP,
    STPPSettings,
    snapshot_epochs,
    split_reliable,
    stability_score,
    supervised_epochs,
)
from trainers.model import DeepLabV3Plus

IGNORE, SIZE = 255, 33
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_stability_score_on_a_hand_case():
    final = torch.tensor([[0, 0], [1, 1]])
    same = final.clone()
    moved = torch.tensor([[0, 1], [1, 1]])
    # moved vs final: class 0 IoU 1/2, class 1 IoU 2/3; class 2 is absent from both and skipped.
    assert stability_score([moved, final], 3) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert stability_score([same, moved, final], 3) == pytest.approx((1 + (1 / 2 + 2 / 3) / 2) / 2)
    with pytest.raises(ValueError, match="at least 2"):
        stability_score([final], 3)


def test_split_reliable_keeps_the_stable_half_in_list_order_on_ties():
    pairs = [Pair(f"i{k}.jpg", f"m{k}.png") for k in range(5)]
    reliable, unreliable = split_reliable(pairs, [0.2, 0.9, 0.5, 0.9, 0.1])
    assert [p.image for p in reliable] == ["i1.jpg", "i3.jpg"]
    assert [p.image for p in unreliable] == ["i2.jpg", "i0.jpg", "i4.jpg"]


def test_snapshot_epochs_are_a_third_and_two_thirds():
    assert snapshot_epochs(80) == [26, 53]
    assert snapshot_epochs(3) == [1, 2]
    assert snapshot_epochs(2) == [1]


def test_without_a_teacher_the_stage_is_supervised():
    method = build_method(MethodConfig(name="stpp"), IGNORE)
    assert method.views.strong_views == 0
    torch.manual_seed(0)
    net = DeepLabV3Plus("tiny", 3)
    with pytest.raises(ValueError, match="STPP.stages"):
        method.setup(net)  # a plain fit of stpp without a teacher would be a silent supervised run
    image, mask = torch.randn(2, 3, SIZE, SIZE), torch.randint(0, 3, (2, SIZE, SIZE))
    out = method.step(Forwarder(net).train(), LabeledBatch(image, mask), None, None)
    assert torch.isfinite(out.loss) and set(out.terms) == {"loss", "loss_x"}


def test_a_retraining_step_learns_the_teachers_labels_on_the_strong_view(tmp_path):
    torch.manual_seed(0)
    teacher = DeepLabV3Plus("tiny", 3).eval()
    ckpt.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    settings = STPPSettings(teacher=str(tmp_path / "teacher.pth"))
    method = STPP(build_criterion(MethodConfig(criterion="ce"), IGNORE), IGNORE, settings)
    assert method.views.strong_views == 1 and method.views.cutout
    net = DeepLabV3Plus("tiny", 3)
    method.setup(net)
    g = torch.Generator().manual_seed(1)
    weak = torch.randn(2, 3, SIZE, SIZE, generator=g)
    ignore = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    ignore[:, -4:] = IGNORE
    unlabeled = UnlabeledBatch(weak, [torch.randn(2, 3, SIZE, SIZE, generator=g)], [ignore * 0], ignore)
    labeled = LabeledBatch(torch.randn(2, 3, SIZE, SIZE, generator=g), torch.randint(0, 3, (2, SIZE, SIZE)))
    model = Forwarder(net).train()
    out = method.step(model, labeled, unlabeled, None)
    out.loss.backward()
    assert next(net.backbone.parameters()).grad.abs().sum() > 0 and net.classifier.weight.grad.abs().sum() > 0
    with torch.no_grad():
        pseudo = teacher(weak).argmax(dim=1)
        pseudo[:, -4:] = IGNORE
        pred = net.train()(torch.cat([labeled.image, unlabeled.strong[0]]))
    expected = torch.nn.functional.cross_entropy(pred, torch.cat([labeled.mask, pseudo]), ignore_index=IGNORE)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert all(p.grad is None for p in method.teacher.parameters())


def test_supervised_stage_doubles_epochs_of_small_labeled_sets():
    assert supervised_epochs(80, 92) == 160 and supervised_epochs(80, 1464) == 80


def test_three_stages_run_select_and_resume(tiny_config):
    # 4 labeled images: the supervised stage runs 2 x 2 epochs and keeps snapshots after epochs 1 and 2.
    # No cap on the steps: each stage runs whole epochs over its lists, as `plan` counts them.
    cfg = tiny_config(
        method={"name": "stpp"}, optim={"epochs": 2, "batch_size": 2, "max_iters_per_epoch": None}
    )
    planned = plan(cfg, world_size=1)  # before training: stage 2's lists do not exist yet
    reports = []
    result = train(cfg, report=lambda metrics, path: reports.append(metrics), progress=False)
    root = result.out_dir.parent
    assert result.out_dir == root / "stage3" and result.epochs_run == [0, 1]
    stages = [(1, e) for e in range(4)] + [(2, 4), (2, 5), (3, 6), (3, 7)]
    assert [(m["stage"], m["epoch"]) for m in reports] == stages
    assert (root / "stage1" / "epoch1.pth").is_file() and (root / "stage1" / "epoch2.pth").is_file()

    unlabeled = resolve_split(cfg.data).unlabeled
    reliable = read_list(root / "splits" / "reliable" / "unlabeled.txt")
    unreliable = read_list(root / "splits" / "unreliable" / "unlabeled.txt")
    assert len(reliable) == len(unlabeled) // 2
    assert sorted(reliable + unreliable, key=str) == sorted(unlabeled, key=str)
    assert read_list(root / "splits" / "supervised" / "unlabeled.txt") == []
    assert ckpt.load(root / "stage1" / ckpt.LATEST)["config"]["method"]["name"] == "supervised"
    stage2 = ckpt.load(root / "stage2" / ckpt.LATEST)["config"]
    assert stage2["method"]["teacher"] == str(root / "stage1" / ckpt.BEST)
    assert stage2["data"]["split_dir"] == str(root / "splits" / "reliable")

    # 4 labeled images, 12 unlabeled (6 reliable), batch 2: 2 steps per epoch, then 3, then 6.
    assert [(p.epochs, p.steps_per_epoch) for p in planned] == [(4, 2), (2, 3), (2, 6)]
    steps = [ckpt.load(Path(p.out_dir) / ckpt.LATEST)["iteration"] for p in planned]
    assert steps == [p.epochs * p.steps_per_epoch for p in planned]
    selected = (root / "splits" / "reliable" / "unlabeled.txt").stat().st_mtime_ns
    again = train(cfg, progress=False)
    assert again.epochs_run == []  # every stage finished: nothing re-runs
    assert (root / "splits" / "reliable" / "unlabeled.txt").stat().st_mtime_ns == selected  # nor selection


def test_pascal_config_has_the_published_settings():
    cfg = load_config(REPO / "configs" / "pascal_stpp.yaml")
    method = build_method(cfg.method, IGNORE)
    assert (cfg.data.crop_size, cfg.optim.epochs, cfg.optim.lr, cfg.optim.batch_size) == (321, 80, 0.001, 8)
    assert method.settings.teacher is None and method.views.strong_views == 0
