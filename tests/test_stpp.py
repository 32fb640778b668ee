"""ST++: stability score, reliable split, snapshots, both kinds of stage step, offline multi-scale
pseudo-labels written and trained on, cutout ignored, three stages end to end and resumed."""

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from trainers import augment
from trainers import checkpoint as ckpt
from trainers.augment import Box
from trainers.batch import LabeledBatch, UnlabeledBatch
from trainers.config import ConfigError, MethodConfig, load_config
from trainers.data import build_loaders
from trainers.datasets import Pair, PairDataset, load_mask_tensor, read_list, resolve_split
from trainers.dist import context
from trainers.entry import plan, train
from trainers.evaluate import predict_multiscale
from trainers.forward import Forwarder
from trainers.loop import fit
from trainers.methods import build_method
from trainers.methods.common import build_criterion
from trainers.methods.stpp import (
    LABEL_SCALES,
    STPP,
    STPPSettings,
    snapshot_epochs,
    split_reliable,
    stability_score,
    supervised_epochs,
    write_pseudo_labels,
)
from trainers.model import DeepLabV3Plus
from trainers.network import load_network
from trainers.splits import write_split

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


def test_an_online_step_learns_the_teachers_labels_on_the_strong_view(tmp_path):
    torch.manual_seed(0)
    teacher = DeepLabV3Plus("tiny", 3).eval()
    ckpt.save({"model": teacher.state_dict()}, tmp_path / "teacher.pth")
    settings = STPPSettings(teacher=str(tmp_path / "teacher.pth"), pseudo_labels="online")
    method = STPP(build_criterion(MethodConfig(criterion="ce"), IGNORE), IGNORE, settings)
    assert method.views.strong_views == 1 and method.views.cutout and not method.views.masks
    net = DeepLabV3Plus("tiny", 3)
    method.setup(net)
    g = torch.Generator().manual_seed(1)
    weak = torch.randn(2, 3, SIZE, SIZE, generator=g)
    ignore = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    ignore[:, -4:] = IGNORE
    strong = [torch.randn(2, 3, SIZE, SIZE, generator=g)]
    unlabeled = UnlabeledBatch(weak, strong, [ignore * 0], ignore, cutouts=[[None, None]])
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


def varied_net() -> DeepLabV3Plus:
    """A fixed tiny network whose labels vary over an image (a fresh one predicts one class nearly
    everywhere): its classifier sharpened, without bias."""
    torch.manual_seed(2)
    net = DeepLabV3Plus("tiny", 3).eval()
    with torch.no_grad():
        net.classifier.weight.mul_(100)
        net.classifier.bias.zero_()
    return net


def by_hand(net: torch.nn.Module, image: torch.Tensor, flip: bool = True) -> torch.Tensor:
    """ST++'s multi-scale test (model/semseg/base.py:22-44) written out: each scale's softmax (and its
    mirror image's, mirrored back) resized to the image, averaged."""
    h, w = image.shape[-2:]
    probs = []
    with torch.no_grad():
        for scale in LABEL_SCALES:
            x = F.interpolate(image, (int(h * scale), int(w * scale)), mode="bilinear", align_corners=True)
            for mirror in [False, True] if flip else [False]:
                out = net(x.flip(-1) if mirror else x).softmax(dim=1)
                out = out.flip(-1) if mirror else out
                probs.append(F.interpolate(out, (h, w), mode="bilinear", align_corners=True))
    return torch.stack(probs).mean(dim=0)


def labels_by_hand(net: torch.nn.Module, root: str, pairs: list[Pair]) -> list[torch.Tensor]:
    """The (H, W) offline label of each whole image of `pairs`, computed by `by_hand`."""
    images = PairDataset(root, pairs, augment.eval_transform(), with_masks=False)
    return [by_hand(net, item["image"].unsqueeze(0)).argmax(dim=1)[0] for item in images]


def saved(pairs: list[Pair]) -> list[torch.Tensor]:
    """The masks `pairs` name, read back as class ids."""
    return [load_mask_tensor(Path(p.mask)).long() for p in pairs]


@pytest.mark.parametrize("flip", [True, False])
def test_offline_labels_are_the_argmax_of_the_mean_softmax_over_scales_and_flips(flip):
    assert LABEL_SCALES == (0.5, 0.75, 1.0, 1.5, 2.0)  # model/semseg/base.py:28
    net = varied_net()
    image = F.interpolate(torch.randn(1, 3, 6, 7), (37, 45), mode="bilinear")
    with torch.no_grad():
        scores = predict_multiscale(net, image, LABEL_SCALES, flip, 3)
        single = net(image).argmax(dim=1)
    expected = by_hand(net, image, flip)
    views = len(LABEL_SCALES) * (2 if flip else 1)
    assert torch.allclose(scores / views, expected, atol=1e-6)
    labels = scores.argmax(dim=1)
    assert torch.equal(labels, expected.argmax(dim=1)) and len(labels.unique()) == 3
    assert not torch.equal(labels, single)  # for this net, the scales change labels


@pytest.mark.parametrize("device_augment", [False, True], ids=["in_collate", "after_copy"])
def test_written_labels_are_read_back_as_the_unlabeled_targets(tiny_config, tmp_path, device_augment):
    # Crop = the 40 px images at scale 1: each crop is a whole image, at most mirrored.
    data = {"crop_size": 40, "scale_range": [1.0, 1.0]}
    cfg = tiny_config(method={"name": "stpp"}, data=data, fast={"device_augment": device_augment})
    net = varied_net()
    split = resolve_split(cfg.data)
    pairs = write_pseudo_labels(net, cfg, split.unlabeled, tmp_path / "pseudo")
    assert all(Path(p.mask).parent == tmp_path / "pseudo" for p in pairs)
    labels = saved(pairs)
    by_net = labels_by_hand(net, cfg.data.root, split.unlabeled)
    assert all(torch.equal(a, b) for a, b in zip(labels, by_net, strict=True))
    assert len(torch.cat([y.flatten() for y in labels]).unique()) == 3

    write_split(tmp_path / "split", split.labeled, pairs)
    stage = dataclasses.replace(cfg.data, split_dir=str(tmp_path / "split"))
    method = STPP(build_criterion(cfg.method, IGNORE), IGNORE, STPPSettings(teacher="labels saved"))
    stage_cfg = dataclasses.replace(cfg, data=stage)
    loaders = build_loaders(stage_cfg, resolve_split(stage), method.views, context(use_gpu=False), 2)
    cut = 0
    for _, unlabeled, _ in loaders.epoch():
        unlabeled = loaders.place(unlabeled, torch.device("cpu"))
        for mask in unlabeled.mask:
            assert any(torch.equal(mask, y) or torch.equal(mask, y.flip(-1)) for y in labels)
        target = method.targets(unlabeled)
        for row, mask, box in zip(target, unlabeled.mask, unlabeled.cutouts[0], strict=True):
            inside = torch.zeros_like(mask, dtype=torch.bool) if box is None else box.mask(40, 40).bool()
            assert (row[inside] == IGNORE).all() and torch.equal(row[~inside], mask[~inside])
            cut += box is not None
    assert cut > 0


@pytest.mark.parametrize("keeps", [False, True])
def test_cutout_pixels_are_the_ignore_index_in_the_target(keeps):
    ignore = 250  # the dataset's ignore index, whatever its value
    settings = STPPSettings(teacher="labels saved", cutout_keeps_label=keeps)
    method = STPP(build_criterion(MethodConfig(criterion="ce"), ignore), ignore, settings)
    mask = torch.randint(0, 3, (2, SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    mask[:, -4:] = ignore
    images, box = torch.zeros(2, 3, SIZE, SIZE), Box(3, 5, 7, 9)
    batch = UnlabeledBatch(images, [images], [mask * 0], mask * 0, mask=mask, cutouts=[[box, None]])
    expected = mask.clone()
    if not keeps:
        expected[0][box.mask(SIZE, SIZE).bool()] = ignore  # dataset/transform.py:97
    assert torch.equal(method.targets(batch), expected)
    assert (method.targets(batch) == ignore).any(dim=(1, 2)).all()


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
    epochs = [(1, e) for e in range(4)] + [(2, 4), (2, 5), (3, 6), (3, 7)]
    assert [(m["stage"], m["epoch"]) for m in reports] == epochs
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
    assert stage2["data"]["split_dir"] == str(root / "splits" / "stage2")
    stage3 = ckpt.load(root / "stage3" / ckpt.LATEST)["config"]
    assert stage3["data"]["split_dir"] == str(root / "splits" / "stage3")

    # Stage 2 trains on stage 1's best labels of the reliable images, saved in its folder; stage 3 keeps
    # them and adds stage 2's best labels of the unreliable ones (main.py:122-164).
    first, _ = load_network(root / "stage1" / ckpt.BEST)
    labeled = read_list(root / "splits" / "stage2" / "unlabeled.txt")
    assert [p.image for p in labeled] == [p.image for p in reliable]
    assert {Path(p.mask).parent for p in labeled} == {root / "stage2" / "pseudo"}
    by_first = labels_by_hand(first, cfg.data.root, labeled)
    assert all(torch.equal(a, b) for a, b in zip(saved(labeled), by_first, strict=True))
    everything = read_list(root / "splits" / "stage3" / "unlabeled.txt")
    assert [p.image for p in everything] == [p.image for p in unlabeled]
    assert set(labeled) <= set(everything)
    rest = [p for p in everything if p not in labeled]
    assert sorted(p.image for p in rest) == sorted(p.image for p in unreliable)
    assert {Path(p.mask).parent for p in rest} == {root / "stage3" / "pseudo"}
    second, _ = load_network(root / "stage2" / ckpt.BEST)
    by_second = labels_by_hand(second, cfg.data.root, rest)
    assert all(torch.equal(a, b) for a, b in zip(saved(rest), by_second, strict=True))

    # 4 labeled images, 12 unlabeled (6 reliable), batch 2: 2 steps per epoch, then 3, then 6.
    assert [(p.epochs, p.steps_per_epoch) for p in planned] == [(4, 2), (2, 3), (2, 6)]
    steps = [ckpt.load(Path(p.out_dir) / ckpt.LATEST)["iteration"] for p in planned]
    assert steps == [p.epochs * p.steps_per_epoch for p in planned]
    prepared = [root / "splits" / name / "unlabeled.txt" for name in ("reliable", "stage2", "stage3")]
    written = [path.stat().st_mtime_ns for path in prepared]
    again = train(cfg, progress=False)
    assert again.epochs_run == []  # every stage finished: nothing re-runs
    assert [path.stat().st_mtime_ns for path in prepared] == written  # nor selection, nor labelling


def test_pascal_config_has_the_published_settings():
    cfg = load_config(REPO / "configs" / "pascal_stpp.yaml")
    method = build_method(cfg.method, IGNORE)
    assert (cfg.data.crop_size, cfg.optim.epochs, cfg.optim.lr, cfg.optim.batch_size) == (321, 80, 0.001, 8)
    assert method.settings.teacher is None and method.views.strong_views == 0
    assert method.settings == STPPSettings()  # offline labels at 5 scales + flip, cutout ignored
    assert (method.settings.pseudo_labels, method.settings.label_flip) == ("offline", True)
    assert not method.settings.cutout_keeps_label and not method.settings.relabel_reliable


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="method.pseudo_labels"):
        STPPSettings(pseudo_labels="cached")
    with pytest.raises(ConfigError, match="method.label_scales"):
        STPPSettings(label_scales=(0.5, 0.0, 1.0, 1.5, 2.0))


def test_a_run_stopped_after_labelling_resumes_without_relabelling(tiny_config, monkeypatch):
    cfg = tiny_config(method={"name": "stpp"}, optim={"epochs": 1})
    root = Path(cfg.out_dir)

    class Stopped(Exception):
        pass

    def stop_in_stage2(config, *args):
        if Path(config.out_dir).name == "stage2":
            raise Stopped  # after stage 2's prepare: reliable images selected and labeled
        return fit(config, *args)

    monkeypatch.setattr("trainers.stages.fit", stop_in_stage2)
    with pytest.raises(Stopped):
        train(cfg, progress=False)
    pngs = sorted((root / "stage2" / "pseudo").glob("*.png"))
    assert len(pngs) == 6 and (root / "splits" / "stage2" / "unlabeled.txt").is_file()
    written = [p.stat().st_mtime_ns for p in pngs]

    folders = []

    def record(net, config, pairs, folder):
        folders.append(folder)
        return write_pseudo_labels(net, config, pairs, folder)

    monkeypatch.setattr("trainers.stages.fit", fit)
    monkeypatch.setattr("trainers.methods.stpp.write_pseudo_labels", record)
    result = train(cfg, progress=False)
    assert result.out_dir == root / "stage3" and result.epochs_run == [0]
    assert folders == [root / "stage3" / "pseudo"]  # only stage 3's labelling ran
    assert [p.stat().st_mtime_ns for p in pngs] == written


@pytest.mark.parametrize(
    "settings", [{"relabel_reliable": True}, {"pseudo_labels": "online"}], ids=["relabel", "online"]
)
def test_stage3_switches(tiny_config, settings):
    cfg = tiny_config(method={"name": "stpp", **settings}, optim={"epochs": 1})
    root = Path(cfg.out_dir)
    train(cfg, progress=False)
    stage3 = ckpt.load(root / "stage3" / ckpt.LATEST)["config"]
    assert stage3["method"]["teacher"] == str(root / "stage2" / ckpt.BEST)
    if settings.get("pseudo_labels") == "online":  # the teacher labels crops: no list, no PNG
        assert stage3["data"]["split_dir"] is None and not (root / "stage2" / "pseudo").exists()
        stage2 = ckpt.load(root / "stage2" / ckpt.LATEST)["config"]
        assert stage2["data"]["split_dir"] == str(root / "splits" / "reliable")
        return
    everything = read_list(root / "splits" / "stage3" / "unlabeled.txt")
    assert {Path(p.mask).parent for p in everything} == {root / "stage3" / "pseudo"}
