"""Real grids (`semiseg grid`: Ray Tune + Ray Train + MLflow) meeting faults: the grid driver killed with
SIGKILL then resumed, and a trial whose loss turns NaN while the rest of the grid goes on.

Both join the module's private loopback cluster (`ray_cluster`) instead of starting one each, as a driver
on a cluster's head does. The SIGINT interruption:
tests/test_grid.py::test_interrupted_grid_resumes_without_rerunning_finished_trials.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from semiseg import grid as grids
from semiseg import launch, tracking

from trainers.datasets import Pair, read_list, write_list

EPOCHS = 6


def write_grid(tmp: Path, root: Path, axes: dict, epochs: int, **changes) -> Path:
    """A grid over the session's synthetic set: 33 px crops, 2 steps per epoch, 1 CPU worker per trial."""
    raw = {
        "name": "faults",
        "base": {
            "data": {"dataset": "synthetic", "root": str(root), "crop_size": 33, "num_workers": 0},
            "model": {"backbone": "tiny"},
            "method": {"name": "supervised"},
            "optim": {
                "epochs": epochs,
                "batch_size": 2,
                "lr": 0.01,
                "reference_global_batch": 2,
                "max_iters_per_epoch": 2,
            },
            "log_interval": 1,
        },
        "axes": axes,
        "workers": 1,
        "storage": str(tmp / "runs"),
        **changes,
    }
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def store(grid: grids.Grid) -> tuple:
    """(client, parent run, {trial key: child run}) of the grid's single parent run."""
    mlflow = tracking.client(grid.tracking_uri)
    state = grids.read_state(grid)
    parent = mlflow.get_run(state["parent_run_id"])
    children = tracking.child_runs(mlflow, state["experiment_id"], parent.info.run_id)
    by_key = {c.data.tags[tracking.TRIAL_TAG]: c for c in children}
    assert len(by_key) == len(children), "a trial has more than one run"
    return mlflow, parent, by_key


def epochs_logged(mlflow, run) -> list[int]:
    return [step for step, _ in tracking.history(mlflow, run.info.run_id, "miou")]


def descendants(pid: int) -> list:
    """The processes below `pid` (psutil comes with Ray, on sys.path once ray is imported)."""
    import psutil

    return psutil.Process(pid).children(recursive=True)


def end_leftovers(processes: list) -> None:
    """SIGKILL what is still alive of `processes` (this test started them), by pid."""
    for process in processes:
        if process.is_running():
            process.kill()


def wait_until_gone(pid: int, timeout: float = 120) -> None:
    import psutil

    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass


def wait_for_kill_point(driver: subprocess.Popen, grid: grids.Grid, deadline_s: float = 600) -> None:
    """Until the first trial is FINISHED in MLflow and the second has logged an epoch (so Ray Train has
    committed a checkpoint of it) but is far from done."""
    deadline = time.monotonic() + deadline_s
    first, second = (t.key for t in grid.trials)
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the grid ended before it could be killed"
        if grids.read_state(grid) is not None:
            mlflow, _, children = store(grid)
            done = first in children and children[first].info.status == "FINISHED"
            if done and second in children and 1 <= len(epochs_logged(mlflow, children[second])) < EPOCHS - 2:
                return
        time.sleep(0.2)
    pytest.fail("the first trial did not finish within the deadline")


def test_sigkilled_grid_driver_resumes_without_rerunning_finished_trials(
    ray_cluster, synthetic_root, tmp_path
):
    path = write_grid(tmp_path, synthetic_root, {"split": ["1_4", "1_2"]}, EPOCHS, max_concurrent_trials=1)
    grid = grids.load_grid(path)
    first, second = grid.trials
    command = [sys.executable, "-m", "semiseg.cli", "grid", str(path), "--address", ray_cluster]
    leftovers = []
    with open(tmp_path / "killed.log", "w") as log:
        driver = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=log)
        try:
            wait_for_kill_point(driver, grid)
            leftovers = descendants(driver.pid)
            driver.kill()
            driver.wait(timeout=60)
        finally:
            if driver.poll() is None:
                driver.kill()
            end_leftovers(leftovers)

    # The killed driver's workers die with its job, but not at once: one may still finish an epoch.
    wait_until_gone(launch.read_reports(second.config.out_dir)[-1]["pid"])
    mlflow, parent, before = store(grid)
    assert parent.info.status == "RUNNING" and before[first.key].info.status == "FINISHED"
    first_reports = launch.read_reports(first.config.out_dir)
    first_history = tracking.history(mlflow, before[first.key].info.run_id, "miou")
    second_reports = launch.read_reports(second.config.out_dir)
    second_logged = epochs_logged(mlflow, before[second.key])

    done = subprocess.run([*command, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    mlflow, parent, after = store(grid)
    assert parent.info.status == "FINISHED"
    # Every trial once, in the run it started in, finished.
    assert {k: c.info.run_id for k, c in after.items()} == {k: c.info.run_id for k, c in before.items()}
    assert sorted(after) == sorted(t.key for t in grid.trials)
    assert all(c.info.status == "FINISHED" for c in after.values())
    # The finished trial did not train again, nor log again.
    assert launch.read_reports(first.config.out_dir) == first_reports
    assert tracking.history(mlflow, after[first.key].info.run_id, "miou") == first_history
    # The killed trial went on from its last committed checkpoint: not before an epoch MLflow had (that
    # one was committed), and MLflow ends with every epoch once, even one committed but not yet logged.
    reports = launch.read_reports(second.config.out_dir)
    assert reports[: len(second_reports)] == second_reports
    resumed = [int(r["epoch"]) for r in reports[len(second_reports) :]]
    assert second_logged[-1] < resumed[0] <= int(second_reports[-1]["epoch"]) + 1
    assert resumed == list(range(resumed[0], EPOCHS))
    assert epochs_logged(mlflow, after[second.key]) == list(range(EPOCHS))


def all_ignored_split(root: Path) -> None:
    """Split `all_ignored`: the labeled images of 1_4 with masks that ignore every pixel, so the supervised
    loss is a mean over zero pixels: NaN at the first step, as a diverged run's would be."""
    labeled = []
    for pair in read_list(root / "splits/1_4/labeled.txt"):
        mask = f"SegmentationClass/ignored_{Path(pair.mask).name}"
        Image.fromarray(np.full((40, 40), 255, np.uint8)).save(root / mask)
        labeled.append(Pair(pair.image, mask))
    write_list(root / "splits/all_ignored/labeled.txt", labeled)
    shutil.copy(root / "splits/1_4/unlabeled.txt", root / "splits/all_ignored/unlabeled.txt")


SECRET = "s3cr3t-value-from-the-environment"


def test_nan_loss_fails_its_trial_with_the_reason_and_the_grid_goes_on(
    ray_cluster, synthetic_root, tmp_path, monkeypatch
):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    all_ignored_split(root)
    monkeypatch.setenv("SEMISEG_TEST_TOKEN", SECRET)
    grid = grids.load_grid(write_grid(tmp_path, root, {"split": ["all_ignored", "1_4"]}, epochs=1))
    bad, good = grid.trials

    with pytest.raises(grids.GridError, match=r"1 of 2 trials failed"):
        grids.run(grid, address=ray_cluster)

    mlflow, parent, children = store(grid)
    assert parent.info.status == "FAILED"
    failed, finished = children[bad.key], children[good.key]
    assert failed.info.status == "FAILED"
    assert failed.data.tags[tracking.ERROR_TAG] == "NonFiniteLossError: epoch 0 iteration 0: loss is nan"
    assert (
        launch.read_reports(bad.config.out_dir) == []
        and not (Path(bad.config.out_dir) / "latest.pth").exists()
    )
    assert finished.info.status == "FINISHED" and epochs_logged(mlflow, finished) == [0]
    # No secrets in what was logged: the params are the config and the grid's own settings, nothing else.
    assert finished.data.params == tracking.flatten(good.config.to_dict())
    assert set(parent.data.params) == {
        "grid.file",
        "grid.trials",
        "grid.workers",
        "grid.use_gpu",
        "grid.axes.split",
    }
    for run in (parent, failed, finished):
        logged = json.dumps([run.data.params, run.data.tags])
        assert SECRET not in logged and "SEMISEG_TEST_TOKEN" not in logged
