"""One Tune trial of a grid, on the driver side: its MLflow child run, its training through one
TorchTrainer (semiseg.launch), and what it leaves in MLflow (tags the table groups by, the resolved config,
curves, prediction overlays, its run.log).

`semiseg.grid.run` hands `run_trial` to Ray Tune; Tune calls it once per trial, again on a resume.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from semiseg.grid_config import Grid, Trial

OVERLAY_IMAGES = 3
"""Val images in a trial's overlays.png."""
log = logging.getLogger(__name__)


def run_trial(
    params: dict[str, Any], grid: Grid, experiment_id: str, parent_run_id: str, force: bool = False
) -> None:
    """One Tune trial (driver side): open its MLflow child run, train through TorchTrainer, log artifacts
    (the trial's run.log among them, failed or not). `force`: its checkpoint may hold an older config."""
    from semiseg import launch

    trial = grid.trial(params)
    with launch.capture_logs(Path(trial.config.out_dir) / launch.RUN_LOG, "trial"):
        _train_trial(grid, trial, experiment_id, parent_run_id, force)


def _train_trial(grid: Grid, trial: Trial, experiment_id: str, parent_run_id: str, force: bool) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from semiseg import launch, tracking

    mlflow = tracking.client(grid.tracking_uri)
    if finished_in_mlflow(mlflow, experiment_id, parent_run_id, trial.key):
        return
    run_id = tracking.open_child(
        mlflow,
        experiment_id,
        parent_run_id,
        trial.key,
        trial_tags(grid, trial),
        tracking.flatten(trial.config.to_dict()),
    )
    try:
        result = launch.train_distributed(
            trial.config,
            grid.workers,
            grid.use_gpu,
            storage_path=str(grid.storage / "train"),
            name=trial.key,
            callbacks=[TuneReportCallback(), tracking.EpochLogger(grid.tracking_uri, run_id)],
            force_resume=force,
        )
        # Epochs the store missed (unreachable, or the driver killed between checkpoint and log).
        tracking.backfill(mlflow, run_id, launch.read_reports(trial.config.out_dir))
        log_trial_artifacts(mlflow, run_id, trial, result)
    except Exception as exc:
        log.exception("%s failed", trial.key)
        tracking.log_file(mlflow, run_id, Path(trial.config.out_dir) / launch.RUN_LOG)
        tracking.fail(mlflow, run_id, exc)
        raise
    tracking.log_file(mlflow, run_id, Path(trial.config.out_dir) / launch.RUN_LOG)
    tracking.finish(mlflow, run_id)


def finished_in_mlflow(mlflow: Any, experiment_id: str, parent_run_id: str, key: str) -> bool:
    """Whether trial `key` already finished under this grid run. Tune saves its own state at most every
    10 s, so after a SIGKILL it may restore a finished trial as unfinished: MLflow has the last word."""
    from semiseg import tracking

    run_id = tracking.find_child(mlflow, experiment_id, parent_run_id, key)
    if run_id is None or mlflow.get_run(run_id).info.status != "FINISHED":
        return False
    log.info("%s: already finished in MLflow (run %s); not run again", key, run_id)
    return True


def trial_tags(grid: Grid, trial: Trial) -> dict[str, str]:
    """The tags the table groups by, and what the trial ran on."""
    from semiseg import tracking
    from trainers.datasets import resolve_split

    labeled = len(resolve_split(trial.config.data).labeled)
    return {
        **{axis: str(trial.axes[axis]) for axis in tracking.AXIS_TAGS},
        tracking.GRID_TAG: grid.name,
        "num_labeled": str(labeled),
        "workers": str(grid.workers),
        "device": "GPU" if grid.use_gpu else "CPU",
    }


def log_trial_artifacts(mlflow: Any, run_id: str, trial: Trial, result: Any) -> None:
    """The resolved config, training curves and prediction overlays of the best checkpoint."""
    import tempfile

    import yaml

    from semiseg import plots, tracking
    from trainers import checkpoint as ckpt
    from trainers.datasets import dataset_spec, voc_palette

    keys = [k for k in mlflow.get_run(run_id).data.metrics if not k.startswith("iou_")]
    histories = {k: tracking.history(mlflow, run_id, k) for k in keys}
    best = result.get_best_checkpoint(metric="miou", mode="max")
    with tempfile.TemporaryDirectory() as tmp, best.as_directory() as folder:
        out = Path(tmp)
        (out / "config.yaml").write_text(yaml.safe_dump(trial.config.to_dict(), sort_keys=False))
        plots.curves(histories, out / "curves.png", trial.key)
        samples = plots.predict_samples(trial.config, Path(folder) / ckpt.LATEST, OVERLAY_IMAGES)
        ignore = dataset_spec(trial.config.data).ignore_index
        plots.overlays(samples, voc_palette(), out / "overlays.png", ignore)
        mlflow.log_artifacts(run_id, tmp)
