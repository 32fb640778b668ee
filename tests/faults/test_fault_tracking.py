"""The MLflow store unreachable during a trial: training goes on, the epochs the store missed are buffered and
logged when it is back, and a warning says so. The store is a real SQLite file whose folder is moved away
and back, as when the shared mount that holds it drops out: away for a few reports of a callback (buffered,
then logged when it is back), and away for a whole Ray Train run (replayed from rank 0's ray_reports.jsonl
by `tracking.backfill`, as the grid's trial driver does).

The calls a trial cannot go on without (opening its run, the epochs it logs and closing it when training
ends) retry, then fail the trial with one error naming the store and `--resume`; attachments and the
FAILED mark only warn. There the store is gone for good: an http URI on a 127.0.0.1 port nobody listens on,
or a SQLite folder replaced by a file (so MLflow cannot make itself a new store there).

A locked store (another writer holding SQLite's lock) takes the same path after MLflow's own 20 s busy
timeout; that wait is not worth CI time.
"""

from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml
from mlflow.exceptions import MlflowException
from semiseg import grid as grids
from semiseg import launch, tracking, trial

RETRY_S = 1
"""The retry window the trial-path tests give `tracking.with_store` (its default is minutes)."""


@pytest.fixture
def quick_retries(monkeypatch) -> None:
    """A second of retries, and none inside MLflow's HTTP client, so a store that is gone fails at once."""
    monkeypatch.setenv(tracking.RETRY_ENV, str(RETRY_S))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def dead_uri(credentials: str = "") -> str:
    """An http store on a 127.0.0.1 port nobody listens on (the port was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://{credentials}127.0.0.1:{port}"


def one_trial_grid(tmp_path: Path, root: Path, tracking_uri: str) -> grids.Grid:
    """A one-trial grid over the session's synthetic set, 2 epochs of 2 steps, logging to `tracking_uri`."""
    raw = {
        "name": "store-faults",
        "base": {
            "data": {
                "dataset": "synthetic",
                "root": str(root),
                "split": "1_4",
                "crop_size": 32,
                "num_workers": 0,
            },
            "model": {"backbone": "tiny"},
            "method": {"name": "supervised"},
            "optim": {
                "epochs": 2,
                "batch_size": 2,
                "lr": 0.01,
                "reference_global_batch": 2,
                "max_iters_per_epoch": 2,
            },
            "log_interval": 1,
        },
        "axes": {"seed": [0]},
        "workers": 1,
        "storage": str(tmp_path / "runs"),
        "tracking_uri": tracking_uri,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return grids.load_grid(path)


def gone(folder: Path) -> Path:
    """The folder moved away and a file left at its path: the store is unreachable and MLflow cannot make
    itself a new one there. Returns where the folder went."""
    away = folder.rename(folder.with_name(f"{folder.name}-away"))
    folder.write_text("")
    return away


def back(folder: Path, away: Path) -> None:
    folder.unlink()
    away.rename(folder)


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


def test_a_trial_whose_store_is_gone_fails_before_training_with_one_error_naming_it(
    quick_retries, synthetic_root, tmp_path
):
    uri = dead_uri("alice:s3cret@")
    grid = one_trial_grid(tmp_path, synthetic_root, uri)
    out_dir = Path(grid.trials[0].config.out_dir)

    started = time.monotonic()
    with pytest.raises(tracking.StoreUnavailableError) as raised:
        trial.run_trial({"seed": 0}, grid, "1", "parent-run")
    message = str(raised.value)
    assert time.monotonic() - started < RETRY_S + 10
    assert message.startswith(
        f"MLflow store {uri.replace('alice:s3cret', '***')} cannot open the run of trial "
    )
    assert "attempt(s) within 1 s" in message and "s3cret" not in message
    assert message.endswith(
        f"nothing was trained; run `semiseg grid {grid.path} --resume` once the store is back"
    )
    # One line in the trial's run.log (where the grid's console points), and nothing trained.
    assert f"failed: {message}" in (out_dir / launch.RUN_LOG).read_text()
    assert sorted(p.name for p in out_dir.iterdir()) == [launch.RUN_LOG]


def test_a_store_gone_when_training_ends_fails_the_trial_and_resume_loses_no_epoch(
    ray_cluster, quick_retries, synthetic_root, tmp_path
):
    folder = tmp_path / "store"
    folder.mkdir()
    grid = one_trial_grid(tmp_path, synthetic_root, f"sqlite:///{folder}/mlflow.db")
    mlflow = tracking.client(grid.tracking_uri)
    experiment = tracking.ensure_experiment(
        mlflow, grid.name, tracking.artifact_root(grid.tracking_uri, grid.storage)
    )
    parent = tracking.start_parent(mlflow, experiment, grid.name, {})
    only = grid.trials[0]
    run_id = trial.open_run(grid, only, experiment, parent)
    # Training without the EpochLogger: every epoch is left for the end of the trial to log.
    result = launch.train_distributed(
        only.config, 1, max_failures=0, storage_path=str(grid.storage / "train")
    )

    away = gone(folder)
    with pytest.raises(tracking.StoreUnavailableError) as raised:
        trial.record_trial(grid, only, run_id, result)
    assert str(raised.value).startswith(
        f"MLflow store {grid.tracking_uri} cannot take the epochs of run {run_id} (trial {only.key}) after "
    )
    assert f"its training is complete (checkpoints in {only.config.out_dir}" in str(raised.value)
    assert f"run `semiseg grid {grid.path} --resume` once the store is back" in str(raised.value)

    back(folder, away)
    assert mlflow.get_run(run_id).info.status == "RUNNING" and logged(grid.tracking_uri, run_id) == []
    trial.record_trial(
        grid, only, run_id, result
    )  # what the resumed trial does once its training is complete
    reports = launch.read_reports(only.config.out_dir)
    assert logged(grid.tracking_uri, run_id) == [(int(r["epoch"]), r["miou"]) for r in reports]
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    attached = {a.path for a in mlflow.list_artifacts(run_id)}
    assert {"config.yaml", "curves.png", "overlays.png", launch.RUN_LOG} <= attached


def test_attachments_the_store_cannot_take_are_a_warning_and_stay_on_disk(quick_retries, tmp_path, caplog):
    uri = dead_uri("alice:s3cret@")
    folder = tmp_path / trial.ARTIFACTS
    folder.mkdir()
    (folder / "curves.png").write_bytes(b"png")

    with caplog.at_level(logging.WARNING, logger="semiseg.tracking"):
        tracking.attach(tracking.client(uri), "run-1", folder)
    (warning,) = (r.getMessage() for r in caplog.records if r.name == "semiseg.tracking")
    assert warning.startswith(f"MLflow store {uri.replace('alice:s3cret', '***')} cannot take {folder} as ")
    assert warning.endswith("; the files stay there") and "s3cret" not in warning
    assert (folder / "curves.png").read_bytes() == b"png"


def test_a_store_gone_when_a_trial_fails_leaves_the_training_error_the_one_raised(quick_retries, caplog):
    uri = dead_uri()
    training_error = ValueError("epoch 3: the real reason")

    with caplog.at_level(logging.ERROR, logger="semiseg.tracking"):
        tracking.fail(tracking.client(uri), "run-1", training_error)  # does not raise
    (error,) = (r.getMessage() for r in caplog.records if r.name == "semiseg.tracking")
    assert error.startswith(f"MLflow store {uri} cannot mark run run-1 FAILED (")
    assert error.endswith("; it failed with ValueError: epoch 3: the real reason")


def test_closing_a_run_retries_within_its_window_then_names_the_store(quick_retries):
    uri = dead_uri()

    started = time.monotonic()
    with pytest.raises(
        tracking.StoreUnavailableError, match=r"after [2-9] attempt\(s\) within 1 s"
    ) as raised:
        tracking.with_store(
            uri, "mark run r FINISHED", "resume later", tracking.finish, tracking.client(uri), "r"
        )
    assert time.monotonic() - started < RETRY_S + 5
    assert str(raised.value).startswith(f"MLflow store {uri} cannot mark run r FINISHED after ")
    assert str(raised.value).endswith("; resume later") and isinstance(
        raised.value.__cause__, MlflowException
    )


def test_a_refusal_the_store_means_is_not_retried(quick_retries, trial_run):
    uri, run_id, _ = trial_run
    mlflow = tracking.client(uri)
    mlflow.log_param(run_id, "lr", "0.01")

    started = time.monotonic()
    with pytest.raises(MlflowException) as raised:  # MLflow params cannot change
        tracking.with_store(uri, "log lr", "", mlflow.log_param, run_id, "lr", "0.02")
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE" and time.monotonic() - started < RETRY_S


@pytest.mark.parametrize(
    "uri",
    ["sqlite:////shared/runs/mlflow.db", "file:///shared/mlruns", "/shared/mlruns", "runs/demo/mlruns"],
)
def test_a_path_store_is_refused_on_a_cluster_of_several_nodes(uri):
    refusal = tracking.local_store_refusal(uri, 3)
    assert refusal is not None and refusal.startswith(f"tracking URI {uri} is a path on this node, but the ")
    assert "Ray cluster has 3 alive nodes" in refusal
    assert "`semiseg cluster mlflow` (cluster.yaml)" in refusal and "http://<head_ip>:5000" in refusal
    assert tracking.local_store_refusal(uri, 1) is None


@pytest.mark.parametrize(
    "uri", ["http://10.0.0.1:5000", "https://u:p@mlflow.example.org", "postgresql://db/mlflow"]
)
def test_a_server_store_is_accepted_on_any_cluster(uri):
    assert tracking.local_store_refusal(uri, 8) is None
