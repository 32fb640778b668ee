"""The runner of multi-stage methods (ST++): each `Stage` a plain `fit` in its own folder, in order.

It owns what lies between stages, so a method file holds only the method: the rank-0 work that prepares
a stage (then a barrier), each stage's resume from its own folder (so the whole run resumes, stage by
stage), the epoch snapshots a later stage reads, and one epoch count across stages in the reports.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from trainers import dist, resume
from trainers.loop import FitResult, Reporter, fit
from trainers.methods.base import Stage


def run_stages(
    stages: Sequence[Stage], report: Reporter | None = None, progress: bool = True, force_resume: bool = False
) -> FitResult:
    """Run `stages` in order, each resuming from its own folder; returns the last stage's result."""
    if not stages:
        raise ValueError("run_stages: no stage to run")
    offset, result = 0, None
    for number, stage in enumerate(stages, 1):
        prepare(stage)
        stage_report = reporter(stage, number, offset, report)
        result = fit(stage.config, stage_report, resume.resumable(stage.config, force_resume), progress)
        offset += stage.config.optim.epochs
    return result


def prepare(stage: Stage) -> None:
    """Rank 0 writes the stage's inputs unless a resumed run already has them; every rank waits for it."""
    done = stage.prepared is not None and stage.prepared.is_file()
    if dist.context().is_main and stage.prepare is not None and not done:
        stage.prepare()
    dist.barrier()


def reporter(stage: Stage, number: int, offset: int, report: Reporter | None) -> Reporter:
    """The stage's `fit` callback: keeps its snapshots, then reports with `stage` and the run-wide epoch."""
    out_dir = Path(stage.config.out_dir)

    def stage_report(metrics: dict[str, float], path: Path | None) -> None:
        done = int(metrics["epoch"]) + 1
        if path is not None and done in stage.snapshots:
            shutil.copyfile(path, out_dir / f"epoch{done}.pth")
        if report is not None:
            report({**metrics, "stage": float(number), "epoch": metrics["epoch"] + offset}, path)

    return stage_report
