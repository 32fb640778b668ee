"""ST++ (Yang et al., CVPR 2022): self-training with selective re-training, as three runs of the one loop.

Stage 1 trains a supervised teacher and keeps checkpoints at 1/3, 2/3 and the end of training;
the unlabeled images whose predictions are most stable across them (the top half) are "reliable".
Stage 2 re-trains from scratch on labeled + reliable images pseudo-labeled by stage 1's best model,
stage 3 on labeled + all unlabeled images, the unreliable ones pseudo-labeled by stage 2's best model
(the reliable ones keep stage 1's labels). As ST++ does, the labels are made offline by default: once per
image, before the stage (rank 0), on the whole image at five scales and mirrored, saved as PNGs in
<stage>/pseudo that the stage's unlabeled list names as masks; `pseudo_labels: online` labels each weak
crop during training instead. Pseudo-labeled images are seen as a strong view (jitter, grayscale, blur,
cutout), the cutout box ignored in their target.

One trial runs the three stages (`STPP.stages`, run by trainers.stages): each stage is a plain `fit` in
its own folder (<out_dir>/stage1..3) that resumes on its own, so the trial as a whole resumes too.
Stage 1 is the `supervised` method; stages 2 and 3 are `STPP` with `method.teacher` naming the frozen teacher.
Source read: LiheYoung/ST-PlusPlus, main.py, dataset/semi.py, dataset/transform.py, model/semseg/base.py.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from trainers import augment, dist
from trainers import checkpoint as ckpt
from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec
from trainers.batch_augment import box_masks
from trainers.config import ConfigError, MethodConfig, TrainConfig, choice
from trainers.datasets import Pair, PairDataset, read_list, resolve_split, voc_palette
from trainers.errors import DataError
from trainers.evaluate import intersection_union, miou, predict_multiscale, save_prediction
from trainers.forward import plain
from trainers.methods.base import Method, Stage, StepOutput
from trainers.methods.common import Criterion, build_criterion, detached
from trainers.network import load_network, num_classes
from trainers.splits import write_split

SMALL_LABELED_SET = 200
"""ST++ doubles a labeled list shorter than this in the supervised stage (here: doubles its epochs)."""


def stability_score(preds: Sequence[torch.Tensor], num_classes: int) -> float:
    """Mean over the earlier checkpoints of mIoU(pred_k, pred_final), classes absent from both skipped.

    `preds`: one (H, W) class map per checkpoint, the final one last; the result is in [0, 1].
    """
    if len(preds) < 2:
        raise ValueError(f"stability_score: needs at least 2 predictions, got {len(preds)}")
    final = preds[-1]
    scores = [miou(*intersection_union(p, final, num_classes, -1), ignore_absent=True)[0] for p in preds[:-1]]
    return sum(scores) / len(scores) / 100


def split_reliable(pairs: Sequence[Pair], scores: Sequence[float]) -> tuple[list[Pair], list[Pair]]:
    """(reliable, unreliable): the more stable half (ties keep list order), and the rest."""
    if len(pairs) != len(scores):
        raise ValueError(f"split_reliable: {len(pairs)} images but {len(scores)} scores")
    ranked = [p for p, _ in sorted(zip(pairs, scores, strict=True), key=lambda ps: ps[1], reverse=True)]
    half = len(ranked) // 2
    return ranked[:half], ranked[half:]


@torch.no_grad()
def predict_classes(nets: Sequence[nn.Module], image: torch.Tensor) -> list[torch.Tensor]:
    """Each network's (H, W) class map of one normalized (1, 3, H, W) image, in eval mode."""
    return [net.eval()(image).argmax(dim=1)[0] for net in nets]


PSEUDO_LABELS = ("offline", "online")
LABEL_SCALES = (0.5, 0.75, 1.0, 1.5, 2.0)
"""ST++'s test-time scales for its pseudo-labels (model/semseg/base.py:28)."""
PSEUDO_FOLDER = "pseudo"
"""The folder in a stage's out_dir that holds the pseudo-label PNGs written before it."""


@dataclass(frozen=True)
class STPPSettings:
    """ST++'s own `method:` key; `STPP.stages` sets `teacher` for each stage."""

    teacher: str | None = None
    """Checkpoint whose model pseudo-labels the unlabeled images. None: `step` is supervised (stage 1,
    which `STPP.stages` runs as the `supervised` method) and `setup` refuses to train."""
    pseudo_labels: str = "offline"
    """offline (published, main.py:297-318): before the stage, rank 0 labels each unlabeled image once,
    whole, at `label_scales` (and flipped), and saves the PNGs the stage trains on; online: the teacher
    labels each weak crop at one scale during training."""
    label_scales: tuple[float, float, float, float, float] = LABEL_SCALES
    """Offline: the scales whose softmax is summed (model/semseg/base.py:28)."""
    label_flip: bool = True
    """Offline: also sum each scale's mirror image (model/semseg/base.py:40-42)."""
    cutout_keeps_label: bool = False
    """False (published, dataset/transform.py:97): the strong view's cutout box is ignored in its target;
    True: the box keeps its pseudo-label."""
    relabel_reliable: bool = False
    """Offline: False (published, main.py:145-164): stage 3 labels only the unreliable images, by stage 2's
    best model, the reliable ones keeping stage 1's labels; True: stage 3 relabels all (online: always)."""

    def __post_init__(self) -> None:
        choice("method.pseudo_labels", self.pseudo_labels, dict.fromkeys(PSEUDO_LABELS))
        if not all(s > 0 for s in self.label_scales):
            raise ConfigError(f"method.label_scales: expected scales > 0, got {list(self.label_scales)}")

    @property
    def offline(self) -> bool:
        """Whether the stage trains on labels saved before it."""
        return self.pseudo_labels == "offline"


@dataclass
class STPP(Method):
    criterion_l: Criterion
    ignore_index: int
    settings: STPPSettings = field(default_factory=STPPSettings)
    settings_type: ClassVar[type] = STPPSettings
    teacher: nn.Module | None = field(default=None, repr=False)

    @property
    def views(self) -> ViewSpec:
        if self.settings.teacher is None:
            return ViewSpec()
        return ViewSpec(strong_views=1, cutout=True, masks=self.settings.offline)

    @classmethod
    def from_config(cls, cfg: MethodConfig, ignore_index: int) -> STPP:
        return cls(build_criterion(cfg, ignore_index), ignore_index, cfg.settings)

    def setup(self, net: nn.Module) -> None:
        """Online, load the frozen teacher (same architecture as `net`) from `method.teacher`."""
        if self.settings.teacher is None:
            # A plain `fit` of stpp without a teacher would silently be a supervised run.
            raise ValueError(
                "stpp: method.teacher is null; run the three stages with trainers.entry.train "
                "(STPP.stages sets each stage's teacher)"
            )
        if self.settings.offline:
            return  # the teacher's labels were saved before the stage (STPP.stages)
        state = ckpt.load(Path(self.settings.teacher))
        self.teacher = copy.deepcopy(net).requires_grad_(False).eval()
        self.teacher.load_state_dict(state["model"])

    def step(
        self,
        model: nn.Module,
        labeled: LabeledBatch,
        unlabeled: UnlabeledBatch | None,
        mix: UnlabeledBatch | None,
    ) -> StepOutput:
        """Supervised CE; with a teacher, one CE over the labeled and the pseudo-labeled strong images."""
        if self.settings.teacher is None:
            loss = self.criterion_l(model(plain, labeled.image), labeled.mask)
            return StepOutput(loss, detached({"loss": loss, "loss_x": loss}))
        if unlabeled is None or not unlabeled.strong or not unlabeled.cutouts:
            raise ValueError("stpp: a re-training stage needs the unlabeled batch with one strong view")
        pseudo = self.targets(unlabeled)
        # ST++ draws labeled and pseudo-labeled images into one batch: one CE over both.
        pred = model(plain, torch.cat([labeled.image, unlabeled.strong[0]]))
        loss = self.criterion_l(pred, torch.cat([labeled.mask, pseudo]))
        num_x = labeled.image.shape[0]
        terms = {
            "loss": loss,
            "loss_x": self.criterion_l(pred[:num_x].detach(), labeled.mask),
            "loss_s": self.criterion_l(pred[num_x:].detach(), pseudo),
        }
        return StepOutput(loss, detached(terms))

    def targets(self, unlabeled: UnlabeledBatch) -> torch.Tensor:
        """The strong view's (B, H, W) target: the saved labels (offline) or the teacher's on the weak
        view (online); the ignore index where padded and, unless `cutout_keeps_label`, in the cutout box."""
        if self.settings.offline:
            if unlabeled.mask is None:
                raise ValueError("stpp: offline pseudo-labels need the unlabeled masks (ViewSpec.masks)")
            pseudo = unlabeled.mask
        else:
            if self.teacher is None:
                raise ValueError("stpp: call setup(net) before step to load the teacher")
            with torch.no_grad():
                pseudo = self.teacher.eval()(unlabeled.weak).argmax(dim=1)
            pseudo = torch.where(unlabeled.ignore == self.ignore_index, unlabeled.ignore, pseudo)
        if self.settings.cutout_keeps_label:
            return pseudo
        # ST++ sets the label to 255 inside the box it cuts out (dataset/transform.py:96-97).
        cut = box_masks(unlabeled.cutouts[0], pseudo.shape[-1], pseudo.device)
        return pseudo.masked_fill(cut.bool(), self.ignore_index)

    @classmethod
    def stages(cls, cfg: TrainConfig) -> list[Stage]:
        """Supervised stage 1 (snapshots at 1/3 and 2/3), then re-training on the reliable images
        pseudo-labeled by stage 1's best model, then on all of them (the rest labeled by stage 2's best)."""
        root, split, settings = Path(cfg.out_dir), resolve_split(cfg.data), cfg.method.settings
        first_epochs = supervised_epochs(cfg.optim.epochs, len(split.labeled))
        splits, stage1, stage2 = root / "splits", root / "stage1", root / "stage2"
        keep = snapshot_epochs(first_epochs)
        supervised = stage_config(cfg, stage1, splits / "supervised", None, first_epochs)
        supervised = dataclasses.replace(
            supervised, method=dataclasses.replace(cfg.method, name="supervised", settings=None)
        )
        checkpoints = [stage1 / f"epoch{e}.pth" for e in keep] + [stage1 / ckpt.LATEST]
        first = Labelling(stage1 / ckpt.BEST, stage2 / PSEUDO_FOLDER) if settings.offline else None
        second = Labelling(stage2 / ckpt.BEST, root / "stage3" / PSEUDO_FOLDER)
        epochs, images = cfg.optim.epochs, (len(split.labeled), len(split.unlabeled))
        # Offline, the stages train on lists of their own (masks: the saved labels), so a selection list
        # naming the dataset's masks is never read as pseudo-labels.
        lists = [splits / "stage2", splits / "stage3"] if settings.offline else [splits / "reliable", None]
        stage2 = stage_config(cfg, stage2, lists[0], stage1 / ckpt.BEST, epochs)
        stage3 = stage_config(cfg, root / "stage3", lists[1], second.teacher, epochs)
        return [
            Stage(
                supervised,
                tuple(keep),
                partial(write_split, splits / "supervised", split.labeled, []),
                images=(len(split.labeled), 0),
            ),
            Stage(
                stage2,
                prepare=partial(select_reliable, cfg, checkpoints, splits, first),
                prepared=lists[0] / "unlabeled.txt",
                images=(images[0], images[1] // 2),  # the more stable half
            ),
            Stage(
                stage3,
                prepare=partial(label_rest, cfg, splits, second) if settings.offline else None,
                prepared=lists[1] / "unlabeled.txt" if settings.offline else None,
                images=images,
            ),
        ]


@dataclass(frozen=True)
class Labelling:
    """Offline pseudo-labels written before a stage: the predictions of checkpoint `teacher`, in `folder`."""

    teacher: Path
    folder: Path

    def write(self, cfg: TrainConfig, pairs: Sequence[Pair]) -> list[Pair]:
        """`pairs` labeled by the teacher (`write_pseudo_labels`), their masks now the saved PNGs."""
        net = load_network(self.teacher, cfg)[0].to(dist.context().device)
        return write_pseudo_labels(net, cfg, pairs, self.folder)


def select_reliable(
    cfg: TrainConfig, checkpoints: Sequence[Path], splits: Path, labelling: Labelling | None
) -> None:
    """Before stage 2 (rank 0): the reliable and unreliable lists by the stability under stage 1's
    `checkpoints` (final last); offline (`labelling`), stage 2's list: the reliable images' saved labels."""
    split = resolve_split(cfg.data)
    device = dist.context().device
    nets = [load_network(path, cfg)[0].to(device) for path in checkpoints]
    scores = score_images(nets, cfg.data.root, split.unlabeled, num_classes(cfg))
    reliable, unreliable = split_reliable(split.unlabeled, scores)
    write_split(splits / "unreliable", split.labeled, unreliable)
    write_split(splits / "reliable", split.labeled, reliable)  # online: the stage's `prepared` marker
    if labelling is not None:
        write_split(splits / "stage2", split.labeled, labelling.write(cfg, reliable))  # offline: the marker


def label_rest(cfg: TrainConfig, splits: Path, labelling: Labelling) -> None:
    """Before stage 3 (rank 0, offline): stage 3's list, the unreliable images (all with `relabel_reliable`)
    labeled by stage 2's best model, the reliable ones keeping stage 1's labels (stage 2's list)."""
    split, relabel = resolve_split(cfg.data), cfg.method.settings.relabel_reliable
    kept = [] if relabel else read_list(splits / "stage2" / "unlabeled.txt")
    todo = split.unlabeled if relabel else read_list(splits / "unreliable" / "unlabeled.txt")
    labeled = {p.image: p for p in kept + labelling.write(cfg, todo)}
    # In the unlabeled list's order: ST++ re-reads that list for stage 3 (main.py:157-158).
    write_split(splits / "stage3", split.labeled, [labeled[p.image] for p in split.unlabeled])


@torch.no_grad()
def write_pseudo_labels(net: nn.Module, cfg: TrainConfig, pairs: Sequence[Pair], folder: Path) -> list[Pair]:
    """Each image of `pairs` labeled whole by `net` (`predict_multiscale`) and saved as a palette PNG in
    `folder`, named like the image (ST++ names it like the mask, main.py:316); the pairs pointing there."""
    settings = cfg.method.settings
    targets = [folder.absolute() / f"{Path(p.image).stem}.png" for p in pairs]
    if len(set(targets)) < len(targets):
        raise DataError(f"stpp: two unlabeled images share a file name: their labels in {folder} would clash")
    images = PairDataset(cfg.data.root, pairs, augment.eval_transform(), with_masks=False)
    device, classes = next(net.parameters()).device, num_classes(cfg)
    for item, target in zip(images, targets, strict=True):
        image = item["image"].unsqueeze(0).to(device)
        scores = predict_multiscale(net.eval(), image, settings.label_scales, settings.label_flip, classes)
        save_prediction(scores.argmax(dim=1)[0], target, voc_palette())
    return [Pair(p.image, str(t)) for p, t in zip(pairs, targets, strict=True)]


def stage_config(
    cfg: TrainConfig, out_dir: Path, split_dir: Path | None, teacher: Path | None, epochs: int
) -> TrainConfig:
    """`cfg` for one stage: its own folder, split, teacher and epoch count."""
    data = cfg.data if split_dir is None else dataclasses.replace(cfg.data, split_dir=str(split_dir))
    settings = dataclasses.replace(cfg.method.settings, teacher=None if teacher is None else str(teacher))
    method = dataclasses.replace(cfg.method, settings=settings)
    optim = dataclasses.replace(cfg.optim, epochs=epochs)
    return dataclasses.replace(cfg, out_dir=str(out_dir), data=data, method=method, optim=optim)


def snapshot_epochs(epochs: int) -> list[int]:
    """1-based epochs after which ST++ keeps a checkpoint (the last one is latest.pth itself)."""
    return sorted({e for e in (epochs // 3, epochs * 2 // 3) if 0 < e < epochs})


def supervised_epochs(epochs: int, num_labeled: int) -> int:
    """ST++ doubles a labeled list shorter than 200 images; twice the epochs give the same iterations."""
    return 2 * epochs if num_labeled < SMALL_LABELED_SET else epochs


def score_images(
    nets: Sequence[nn.Module], root: str, pairs: Sequence[Pair], num_classes: int
) -> list[float]:
    """The stability score of every image in `pairs` under the checkpoints `nets` (final last)."""
    device = next(nets[0].parameters()).device
    images = PairDataset(root, pairs, augment.eval_transform(), with_masks=False)
    return [
        stability_score(predict_classes(nets, item["image"].unsqueeze(0).to(device)), num_classes)
        for item in images
    ]
