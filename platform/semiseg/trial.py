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
ARTIFACTS = "artifacts"
"""The folder of a trial's out_dir that holds what its MLflow run gets as artifacts (besides run.log)."""
log = logging.getLogger(__name__)


def run_trial(
    params: dict[str, Any], grid: Grid, experiment_id: str, parent_run_id: str, force: bool = False
) -> None:
    """One Tune trial (driver side): open its MLflow child run, train through TorchTrainer, log artifacts
    (the trial's run.log among them, failed or not); RELIABILITY.md says what a store that is gone does.
    `force`: its checkpoint may hold an older config."""
    from semiseg import launch, tracking

    trial = grid.trial(params)
    with launch.capture_logs(Path(trial.config.out_dir) / launch.RUN_LOG, "trial"):
        try:
            _train_trial(grid, trial, experiment_id, parent_run_id, force)
        except tracking.StoreUnavailableError as exc:
            log.error("%s failed: %s", trial.key, exc)  # one line in run.log, where the grid's console points
            raise


def _train_trial(grid: Grid, trial: Trial, experiment_id: str, parent_run_id: str, force: bool) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from semiseg import launch, tracking

    run_id = open_run(grid, trial, experiment_id, parent_run_id)
    if run_id is None:
        return
    mlflow = tracking.client(grid.tracking_uri)
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
        record_trial(grid, trial, run_id, result)
    except tracking.StoreUnavailableError:
        raise  # the store is gone: nothing more can be written to it (run_trial logs the error)
    except Exception as exc:
        log.exception("%s failed", trial.key)
        # Both only warn when the store is gone too: the training error stays the one raised.
        tracking.attach(mlflow, run_id, Path(trial.config.out_dir) / launch.RUN_LOG)
        tracking.fail(mlflow, run_id, exc)
        raise


def open_run(grid: Grid, trial: Trial, experiment_id: str, parent_run_id: str) -> str | None:
    """The trial's child run, opened or reopened; None when the trial already FINISHED under this grid run.
    A store that stays unreachable fails the trial here, before it trains (tracking.with_store)."""
    from semiseg import tracking

    mlflow = tracking.client(grid.tracking_uri)
    uri, what = grid.tracking_uri, f"open the run of trial {trial.key}"
    then = f"nothing was trained; run `semiseg grid {grid.path} --resume` once the store is back"
    ids = (mlflow, experiment_id, parent_run_id, trial.key)
    if tracking.with_store(uri, what, then, finished_in_mlflow, *ids):
        return None
    tags, params = trial_tags(grid, trial), tracking.flatten(trial.config.to_dict())
    return tracking.with_store(uri, what, then, tracking.open_child, *ids, tags, params)


def record_trial(grid: Grid, trial: Trial, run_id: str, result: Any) -> None:
    """After training: log the epochs the store missed, attach the artifacts and run.log, close the run
    FINISHED. The epochs and the close retry while the store is unreachable, then fail the trial
    (`--resume` trains nothing again and does them); the attachments only warn (their files stay)."""
    from semiseg import launch, tracking

    mlflow = tracking.client(grid.tracking_uri)
    out_dir = Path(trial.config.out_dir)
    reports = launch.read_reports(out_dir)
    then = (
        f"its training is complete (checkpoints in {out_dir}, epochs in {launch.REPORTS}): run "
        f"`semiseg grid {grid.path} --resume` once the store is back; it trains nothing again, logs the "
        "epochs and closes the run"
    )
    uri, where = grid.tracking_uri, f"run {run_id} (trial {trial.key})"
    # Epochs the store missed (unreachable, or the driver killed between checkpoint and log).
    tracking.with_store(uri, f"take the epochs of {where}", then, tracking.backfill, mlflow, run_id, reports)
    tracking.attach(mlflow, run_id, write_trial_artifacts(trial, result, reports))
    tracking.attach(mlflow, run_id, out_dir / launch.RUN_LOG)
    tracking.with_store(uri, f"mark {where} FINISHED", then, tracking.finish, mlflow, run_id)


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


def write_trial_artifacts(trial: Trial, result: Any, reports: list[dict[str, Any]]) -> Path:
    """<out_dir>/artifacts: the resolved config, training curves (from rank 0's reports, so without the
    store) and prediction overlays of the best checkpoint. Kept beside the checkpoints, so a store that
    cannot take them loses nothing."""
    import yaml

    from semiseg import plots, tracking
    from trainers import checkpoint as ckpt
    from trainers.datasets import dataset_spec, voc_palette

    out = Path(trial.config.out_dir) / ARTIFACTS
    out.mkdir(exist_ok=True)
    histories = {k: v for k, v in tracking.report_histories(reports).items() if not k.startswith("iou_")}
    best = result.get_best_checkpoint(metric="miou", mode="max")
    with best.as_directory() as folder:
        (out / "config.yaml").write_text(yaml.safe_dump(trial.config.to_dict(), sort_keys=False))
        plots.curves(histories, out / "curves.png", trial.key)
        samples = plots.predict_samples(trial.config, Path(folder) / ckpt.LATEST, OVERLAY_IMAGES)
        ignore = dataset_spec(trial.config.data).ignore_index
        plots.overlays(samples, voc_palette(), out / "overlays.png", ignore)
    return out
