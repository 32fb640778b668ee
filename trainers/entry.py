"""What one process runs: train with automatic resume, or evaluate a checkpoint; and what a training
will run (`plan`), known before it starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from trainers import augment, resume
from trainers.config import TrainConfig
from trainers.data import steps_per_epoch
from trainers.datasets import PairDataset, check_split_for_training, dataset_spec, resolve_split, voc_palette
from trainers.errors import DataError
from trainers.evaluate import EvalResult, evaluate, save_prediction
from trainers.loop import FitResult, Reporter, fit
from trainers.methods import method_class
from trainers.network import load_network
from trainers.optim import scale
from trainers.stages import run_stages

log = logging.getLogger(__name__)


def train(
    cfg: TrainConfig,
    report: Reporter | None = None,
    resume_state: dict[str, Any] | None = None,
    progress: bool = True,
    force_resume: bool = False,
) -> FitResult:
    """Run the configured method: one `fit` from `resume_state`, or the method's stages. Each stage resumes
    from its own folder, checked like `resume.resumable` (`force_resume` accepts a changed config there):
    `resume_state` is then a copy of the running stage's latest.pth, and is not needed."""
    stages = method_class(cfg.method).stages(cfg)
    if stages is not None:
        return run_stages(stages, report=report, progress=progress, force_resume=force_resume)
    return fit(cfg, report=report, resume_state=resume_state, progress=progress)


def train_local(
    cfg: TrainConfig,
    report: Reporter | None = None,
    progress: bool = True,
    restart: bool = False,
    force_resume: bool = False,
) -> FitResult:
    """Train in this process, resuming from `<out_dir>/latest.pth` when it exists (see `resume.prepare`)."""
    state = resume.prepare(cfg, restart, force_resume)
    return train(cfg, report, state, progress, force_resume)


@dataclass(frozen=True)
class StagePlan:
    """What one training (a stage of a multi-stage method) will run, known before it starts."""

    out_dir: str
    epochs: int
    steps_per_epoch: int | None
    """None when the lists are not known yet: written by an earlier stage, or derived from the images."""
    global_batch: int

    @property
    def steps(self) -> int | None:
        """Optimizer steps of the whole training, when known."""
        return None if self.steps_per_epoch is None else self.epochs * self.steps_per_epoch


def plan(cfg: TrainConfig, world_size: int) -> list[StagePlan]:
    """The trainings `train(cfg)` will run on `world_size` workers, with their step counts, read from the
    split lists alone (the shipped ones for published datasets: no image is needed)."""
    try:
        stages = method_class(cfg.method).stages(cfg)
    except DataError:  # a multi-stage method reads its lists to lay out the stages
        stages = None
    if stages is None:
        return [_stage_plan(cfg, None, world_size)]
    return [_stage_plan(stage.config, stage.images, world_size) for stage in stages]


def _stage_plan(cfg: TrainConfig, images: tuple[int, int] | None, world_size: int) -> StagePlan:
    scaling = scale(cfg.optim, world_size)
    if images is None:
        try:
            split = resolve_split(cfg.data)
            images = len(split.labeled), len(split.unlabeled)
        except DataError:
            return StagePlan(cfg.out_dir, cfg.optim.epochs, None, scaling.global_batch)
    cap = cfg.optim.max_iters_per_epoch
    labeled_epoch = cfg.data.epoch_over == "labeled"
    steps = steps_per_epoch(*images, world_size, scaling.per_worker_batch, cap, labeled_epoch)
    return StagePlan(cfg.out_dir, cfg.optim.epochs, steps, scaling.global_batch)


@dataclass
class CheckpointEval:
    result: EvalResult
    predictions: Path | None


def evaluate_checkpoint(
    path: Path, cfg: TrainConfig | None = None, out_dir: Path | None = None, mode: str | None = None
) -> CheckpointEval:
    """mIoU of a checkpoint on its val list; optionally writes palette prediction PNGs."""
    net, cfg = load_network(path, cfg)
    spec = dataset_spec(cfg.data)
    split = resolve_split(cfg.data)
    check_split_for_training(cfg.data.root, split, spec.num_classes, spec.ignore_index, val_only=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = DataLoader(
        PairDataset(cfg.data.root, split.val, augment.eval_transform()),
        batch_size=1,
        collate_fn=augment.collate_labeled,
    )

    def save(i: int, pred: torch.Tensor) -> None:
        save_prediction(pred[0].cpu(), out_dir / (Path(split.val[i].image).stem + ".png"), voc_palette())

    result = evaluate(
        net.to(device),
        loader,
        mode or spec.eval_mode,
        cfg.data.crop_size,
        spec.num_classes,
        spec.ignore_index,
        device=device,
        progress=True,
        on_prediction=save if out_dir else None,
    )
    return CheckpointEval(result, out_dir)
