"""ST++ (Yang et al., CVPR 2022): self-training with selective re-training, as three runs of the one loop.

Stage 1 trains a supervised teacher and keeps checkpoints at 1/3, 2/3 and the end of training;
the unlabeled images whose predictions are most stable across them (the top half) are "reliable".
Stage 2 re-trains from scratch on labeled + reliable images pseudo-labeled by stage 1's best model,
stage 3 on labeled + all unlabeled images pseudo-labeled by stage 2's best model. Pseudo-labeled
images are seen as a strong view (jitter, grayscale, blur, cutout).

One trial runs the three stages (`STPP.stages`, run by trainers.stages): each stage is a plain `fit` in
its own folder (<out_dir>/stage1..3) that resumes on its own, so the trial as a whole resumes too.
Stage 1 is the `supervised` method; stages 2 and 3 are `STPP` with `method.teacher` naming the frozen teacher.
Source read: LiheYoung/ST-PlusPlus, main.py and dataset/semi.py.
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
from trainers.config import MethodConfig, TrainConfig
from trainers.datasets import Pair, PairDataset, resolve_split
from trainers.evaluate import intersection_union, miou
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


@dataclass(frozen=True)
class STPPSettings:
    """ST++'s own `method:` key; `STPP.stages` sets it for each stage."""

    teacher: str | None = None
    """Checkpoint whose model pseudo-labels the unlabeled views. None: `step` is supervised (stage 1,
    which `STPP.stages` runs as the `supervised` method) and `setup` refuses to train."""


@dataclass
class STPP(Method):
    criterion_l: Criterion
    ignore_index: int
    settings: STPPSettings = field(default_factory=STPPSettings)
    settings_type: ClassVar[type] = STPPSettings
    teacher: nn.Module | None = field(default=None, repr=False)

    @property
    def views(self) -> ViewSpec:
        return ViewSpec() if self.settings.teacher is None else ViewSpec(strong_views=1, cutout=True)

    @classmethod
    def from_config(cls, cfg: MethodConfig, ignore_index: int) -> STPP:
        return cls(build_criterion(cfg, ignore_index), ignore_index, cfg.settings)

    def setup(self, net: nn.Module) -> None:
        """Load the frozen teacher (same architecture as `net`) from `method.teacher`."""
        if self.settings.teacher is None:
            # A plain `fit` of stpp without a teacher would silently be a supervised run.
            raise ValueError(
                "stpp: method.teacher is null; run the three stages with trainers.entry.train "
                "(STPP.stages sets each stage's teacher)"
            )
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
        if unlabeled is None or not unlabeled.strong:
            raise ValueError("stpp: a re-training stage needs the unlabeled batch with one strong view")
        if self.teacher is None:
            raise ValueError("stpp: call setup(net) before step to load the teacher")
        with torch.no_grad():
            pseudo = self.teacher.eval()(unlabeled.weak).argmax(dim=1)
        pseudo = torch.where(unlabeled.ignore == self.ignore_index, unlabeled.ignore, pseudo)
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

    @classmethod
    def stages(cls, cfg: TrainConfig) -> list[Stage]:
        """Supervised stage 1 (snapshots at 1/3 and 2/3), then re-training on the reliable images
        pseudo-labeled by stage 1's best model, then on all of them labeled by stage 2's best."""
        root, split = Path(cfg.out_dir), resolve_split(cfg.data)
        first_epochs = supervised_epochs(cfg.optim.epochs, len(split.labeled))
        splits, stage1 = root / "splits", root / "stage1"
        keep = snapshot_epochs(first_epochs)
        supervised = stage_config(cfg, stage1, splits / "supervised", None, first_epochs)
        supervised = dataclasses.replace(
            supervised, method=dataclasses.replace(cfg.method, name="supervised", settings=None)
        )

        def select_reliable() -> None:
            paths = [stage1 / f"epoch{e}.pth" for e in keep] + [stage1 / ckpt.LATEST]
            device = dist.context().device
            nets = [load_network(path, cfg)[0].to(device) for path in paths]
            scores = score_images(nets, cfg.data.root, split.unlabeled, num_classes(cfg))
            reliable, unreliable = split_reliable(split.unlabeled, scores)
            write_split(splits / "unreliable", split.labeled, unreliable)
            write_split(splits / "reliable", split.labeled, reliable)

        epochs = cfg.optim.epochs
        return [
            Stage(
                supervised,
                tuple(keep),
                partial(write_split, splits / "supervised", split.labeled, []),
                images=(len(split.labeled), 0),
            ),
            Stage(
                stage_config(cfg, root / "stage2", splits / "reliable", stage1 / ckpt.BEST, epochs),
                prepare=select_reliable,
                prepared=splits / "reliable" / "unlabeled.txt",
                images=(len(split.labeled), len(split.unlabeled) // 2),  # the more stable half
            ),
            Stage(stage_config(cfg, root / "stage3", None, root / "stage2" / ckpt.BEST, epochs)),
        ]


def stage_config(
    cfg: TrainConfig, out_dir: Path, split_dir: Path | None, teacher: Path | None, epochs: int
) -> TrainConfig:
    """`cfg` for one stage: its own folder, split, teacher and epoch count."""
    data = cfg.data if split_dir is None else dataclasses.replace(cfg.data, split_dir=str(split_dir))
    settings = STPPSettings(teacher=None if teacher is None else str(teacher))
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
