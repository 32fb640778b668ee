"""The MLflow store unreachable during a trial: training goes on, the epochs the store missed are buffered and
logged when it is back, and a warning says so. The store is a real SQLite file whose folder is moved away
and back, as when the shared mount that holds it drops out: away for a few reports of a callback (buffered,
then logged when it is back), and away for a whole Ray Train run (replayed from rank 0's ray_reports.jsonl
by `tracking.backfill`, as the grid's trial driver does).

A locked store (another writer holding SQLite's lock) takes the same path after MLflow's own 20 s busy
timeout; that wait is not worth CI time.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from semiseg import launch, tracking


@pytest.fixture
def trial_run(tmp_path) -> tuple[str, str, Path]:
    """(tracking URI, an open run id, the store's folder) of a fresh SQLite store."""
    folder = tmp_path / "store"
    folder.mkdir()
    uri = f"sqlite:///{folder}/mlflow.db"
    mlflow = tracking.client(uri)
    experiment = tracking.ensure_experiment(mlflow, "faults")
    return uri, mlflow.create_run(experiment).info.run_id, folder


def logged(uri: str, run_id: str) -> list[tuple[int, float]]:
    return tracking.history(tracking.client(uri), run_id, "miou")


def test_epochs_wait_while_the_store_is_gone_and_a_warning_says_so(trial_run, caplog):
    uri, run_id, folder = trial_run
    callback = tracking.EpochLogger(uri, run_id)
    away = folder.rename(folder.with_name("away"))

    with caplog.at_level(logging.WARNING, logger="semiseg.tracking"):
        callback.after_report(None, [{"epoch": 0.0, "miou": 10.0}], None)
        callback.after_report(None, [{"epoch": 1.0, "miou": 20.0}], None)
    assert len(callback.pending) == 2
    first, second = (r.getMessage() for r in caplog.records if r.name == "semiseg.tracking")
    assert first.startswith(f"MLflow store {uri} cannot take epoch 0 of run {run_id} (")
    assert "training goes on, 1 epoch(s) buffered" in first and "2 epoch(s) buffered" in second

    shutil.rmtree(folder, ignore_errors=True)  # in case MLflow made itself a new store at the vanished path
    away.rename(folder)
    callback.after_report(None, [{"epoch": 2.0, "miou": 30.0}], None)
    assert callback.pending == []
    assert logged(uri, run_id) == [(0, 10.0), (1, 20.0), (2, 30.0)]


def test_training_goes_on_while_the_store_is_gone_and_no_epoch_is_lost(ray_cluster, tiny_config, trial_run):
    uri, run_id, folder = trial_run
    cfg = tiny_config(optim={"epochs": 3})
    away = folder.rename(folder.with_name("away"))
    # No retries: had the callback raised, Ray Train would have failed the run.
    result = launch.train_distributed(cfg, 1, max_failures=0, callbacks=[tracking.EpochLogger(uri, run_id)])
    # MLflow made itself a new, empty store at the vanished path (which lacks the run): the mount returns.
    shutil.rmtree(folder, ignore_errors=True)
    away.rename(folder)

    reports = launch.read_reports(cfg.out_dir)
    assert result.return_value["epochs_run"] == [0, 1, 2] and len({r["pid"] for r in reports}) == 1
    assert logged(uri, run_id) == []
    # What the trial driver does once training returns (semiseg.trial.run_trial): replay what the store lacks.
    assert tracking.backfill(tracking.client(uri), run_id, reports) == [0, 1, 2]
    assert logged(uri, run_id) == [(int(r["epoch"]), r["miou"]) for r in reports]
    assert set(tracking.client(uri).get_run(run_id).data.metrics).isdisjoint(tracking.REPORT_CONTEXT)
