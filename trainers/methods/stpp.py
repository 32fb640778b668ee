"""ST++ (Yang et al., CVPR 2022): self-training with selective re-training, as three runs of the one loop.

Stage 1 trains a supervised teacher and keeps checkpoints at 1/3, 2/3 and the end of training;
the unlabeled images whose predictions are most stable across them (the top half) are "reliable".
Stage 2 re-trains from scratch on labeled + reliable images pseudo-labeled by stage 1's best model,
stage 3 on labeled + all unlabeled images pseudo-labeled by stage 2's best model. Pseudo-labeled
images are seen as a strong view (jitter, grayscale, blur, cutout).

One trial runs the three stages (`train_stages`): each stage is a plain `fit` in its own folder
(<out_dir>/stage1..3) that resumes on its own, so the trial as a whole resumes too. Stage 1 is the
`supervised` method; stages 2 and 3 are `STPP` with `method.teacher` naming the frozen teacher.
Source read: LiheYoung/ST-PlusPlus, main.py and dataset/semi.py.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainers import augment, dist
from trainers import checkpoint as ckpt
from trainers.batch import LabeledBatch, UnlabeledBatch, ViewSpec
from trainers.config import MethodConfig, TrainConfig
from trainers.datasets import Pair, PairDataset, resolve_split, write_list
from trainers.evaluate import intersection_union, miou
from trainers.forward import plain
from trainers.methods import StepOutput
from trainers.methods.common import Criterion, build_criterion, detached

if TYPE_CHECKING:
    from trainers.loop import FitResult, Reporter

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


@dataclass
class STPP:
    criterion_l: Criterion
    ignore_index: int
    teacher_path: str | None = None
    """Checkpoint whose model pseudo-labels the unlabeled views. None: `step` is supervised (stage 1,
    which `train_stages` runs as the `supervised` method) and `setup` refuses to train."""
    teacher: nn.Module | None = field(default=None, repr=False)

    @property
    def views(self) -> ViewSpec:
        return ViewSpec() if self.teacher_path is None else ViewSpec(strong_views=1, cutout=True)

    @classmethod
    def from_config(cls, cfg: MethodConfig, ignore_index: int) -> STPP:
        return cls(build_criterion(cfg, ignore_index), ignore_index, cfg.teacher)

    def setup(self, net: nn.Module) -> None:
        """Load the frozen teacher (same architecture as `net`) from `teacher_path`."""
        if self.teacher_path is None:
            # A plain `fit` of stpp without a teacher would silently be a supervised run.
            raise ValueError(
                "stpp: method.teacher is null; run the three stages with "
                "trainers.methods.stpp.train_stages, which sets each stage's teacher"
            )
        state = ckpt.load(Path(self.teacher_path))
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
        if self.teacher_path is None:
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


def stage_config(
    cfg: TrainConfig, out_dir: Path, split_dir: Path | None, teacher: Path | None, epochs: int
) -> TrainConfig:
    """`cfg` for one stage: its own folder, split, teacher and epoch count."""
    data = cfg.data if split_dir is None else dataclasses.replace(cfg.data, split_dir=str(split_dir))
    method = dataclasses.replace(cfg.method, teacher=None if teacher is None else str(teacher))
    optim = dataclasses.replace(cfg.optim, epochs=epochs)
    return dataclasses.replace(cfg, out_dir=str(out_dir), data=data, method=method, optim=optim)


def snapshot_epochs(epochs: int) -> list[int]:
    """1-based epochs after which ST++ keeps a checkpoint (the last one is latest.pth itself)."""
    return sorted({e for e in (epochs // 3, epochs * 2 // 3) if 0 < e < epochs})


def supervised_epochs(epochs: int, num_labeled: int) -> int:
    """ST++ doubles a labeled list shorter than 200 images; twice the epochs give the same iterations."""
    return 2 * epochs if num_labeled < SMALL_LABELED_SET else epochs


def train_stages(
    cfg: TrainConfig, report: Reporter | None = None, progress: bool = True, force_resume: bool = False
) -> FitResult:
    """Run ST++'s three stages through `fit`, each resuming from its own folder; returns stage 3's result."""
    from trainers import resume
    from trainers.loop import build_network, fit, num_classes  # here: trainers.loop imports this module

    root, split = Path(cfg.out_dir), resolve_split(cfg.data)
    first_epochs = supervised_epochs(cfg.optim.epochs, len(split.labeled))
    keep = snapshot_epochs(first_epochs)
    splits = root / "splits"

    def run(stage: int, split_dir: Path | None, teacher: Path | None, epochs: int, offset: int) -> FitResult:
        stage_cfg = stage_config(cfg, root / f"stage{stage}", split_dir, teacher, epochs)
        if teacher is None:
            stage_cfg = dataclasses.replace(
                stage_cfg, method=dataclasses.replace(cfg.method, name="supervised")
            )
        out = Path(stage_cfg.out_dir)

        def stage_report(metrics: dict[str, float], path: Path | None) -> None:
            done = int(metrics["epoch"]) + 1
            if stage == 1 and path is not None and done in keep:
                shutil.copyfile(path, out / f"epoch{done}.pth")
            if report is not None:
                report({**metrics, "stage": float(stage), "epoch": metrics["epoch"] + offset}, path)

        return fit(stage_cfg, stage_report, resume.resumable(stage_cfg, force_resume), progress=progress)

    if dist.context().is_main:
        write_split(splits / "supervised", split.labeled, [])
    dist.barrier()
    run(1, splits / "supervised", None, first_epochs, 0)
    stage1 = root / "stage1"
    if dist.context().is_main and not (splits / "reliable" / "unlabeled.txt").is_file():
        # The checkpoints hold whole networks: no backbone weights file is needed.
        bare = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretrained=None))
        template = build_network(bare)
        paths = [stage1 / f"epoch{e}.pth" for e in keep] + [stage1 / ckpt.LATEST]
        nets = [load_weights(template, p).to(dist.context().device) for p in paths]
        scores = score_images(nets, cfg.data.root, split.unlabeled, num_classes(cfg))
        reliable, unreliable = split_reliable(split.unlabeled, scores)
        write_split(splits / "unreliable", split.labeled, unreliable)
        write_split(splits / "reliable", split.labeled, reliable)
    dist.barrier()
    epochs = cfg.optim.epochs
    run(2, splits / "reliable", stage1 / ckpt.BEST, epochs, first_epochs)
    return run(3, None, root / "stage2" / ckpt.BEST, epochs, first_epochs + epochs)


def write_split(folder: Path, labeled: Sequence[Pair], unlabeled: Sequence[Pair]) -> None:
    """A split folder (labeled.txt, unlabeled.txt) that `data.split_dir` can name."""
    write_list(folder / "labeled.txt", labeled)
    write_list(folder / "unlabeled.txt", unlabeled)


def load_weights(template: nn.Module, path: Path) -> nn.Module:
    """A copy of `template` holding the model weights of checkpoint `path`."""
    net = copy.deepcopy(template)
    net.load_state_dict(ckpt.load(path)["model"])
    return net


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
