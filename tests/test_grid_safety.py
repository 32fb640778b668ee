"""A grid's storage folder and records, checked before anything starts: `--resume` with a changed grid file
(refused naming the keys; `--force` only where finished trials keep their configs), one driver per storage
folder (a lock naming its holder; a dead holder's lock taken over), grid.json written atomically,
credentials redacted before MLflow sees the grid file, `synth:` never writing into a folder of other
files, and a warning when others may write the state `--resume` unpickles. None of these starts Ray."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml
from semiseg import cli, grid_changes, redact, storage, tracking
from semiseg import grid as grids
from test_grid import tiny_grid, write

from trainers.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _started(tmp_path: Path, **changes) -> tuple[Path, grids.Grid, dict]:
    """A grid whose first run got as far as its MLflow parent run, grid.json and Tune's folder (as an
    interrupted one does), without training anything."""
    path = write(tmp_path, tiny_grid(tmp_path, **changes))
    grid = grids.load_grid(path)
    state = grids._new_state(grid)
    grid.tune_dir.mkdir()
    return path, grid, state


def _child(grid: grids.Grid, state: dict, key: str, finished: bool) -> str:
    mlflow = tracking.client(grid.tracking_uri)
    run_id = tracking.open_child(mlflow, state["experiment_id"], state["parent_run_id"], key, {}, {})
    if finished:
        tracking.finish(mlflow, run_id)
    return run_id


def _edit(path: Path, change) -> None:
    raw = yaml.safe_load(path.read_text())
    change(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_resume_with_a_changed_grid_file_is_refused_naming_keys_before_anything_starts(tmp_path, capsys):
    path, grid, _ = _started(tmp_path)
    saved = grids.state_file(grid).read_text()
    _edit(path, lambda raw: raw["base"]["optim"].update(lr=0.02, epochs=3))
    capsys.readouterr()  # MLflow's own lines while the store was created
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["grid", str(path), "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path}: --resume with a changed grid file: ")
    assert "base.optim.epochs: was 1, now 3; base.optim.lr: was 0.01, now 0.02; the grid in " in err
    assert "pass --force" in err
    # Nothing started or written: no data generated, no Ray, grid.json as it was.
    assert not (tmp_path / "data").exists() and not ray.is_initialized()
    assert grids.state_file(grid).read_text() == saved


def test_removed_or_added_axis_values_are_refused_even_with_force(tmp_path):
    path, _, state = _started(tmp_path)
    _edit(path, lambda raw: raw["axes"].update(split=["1_4"], seed=[0, 1]))
    changed = grids.load_grid(path)
    with pytest.raises(ConfigError, match=r"axes.seed: was '<absent>', now \[0, 1\]; axes.split: was"):
        grid_changes.check(changed, grids.read_state(changed))
    with pytest.raises(ConfigError, match="--force cannot resume this change: trials removed: ") as info:
        grid_changes.check(changed, grids.read_state(changed), force=True)
    assert "'synthetic_1_2_supervised_seed0'" in str(info.value) and "added: ['synthetic_1_4_fix" in str(
        info.value
    )


def test_force_refuses_changing_a_finished_trial_and_accepts_changing_unfinished_ones(tmp_path, caplog):
    path, grid, state = _started(tmp_path)
    for trial in grid.trials:
        _child(grid, state, trial.key, finished=trial.axes["method"] == "supervised")
    _edit(path, lambda raw: raw["base"]["optim"].update(lr=0.02))
    changed = grids.load_grid(path)
    with pytest.raises(ConfigError, match="--force cannot change finished trials") as info:
        grid_changes.check(changed, grids.read_state(changed), force=True)
    assert "synthetic_1_4_supervised_seed0: optim.lr: was 0.01, now 0.02" in str(info.value)

    # Only the unfinished fixmatch trials change: accepted, and their runs and the grid's say what changed.
    _edit(path, lambda raw: raw["base"]["optim"].update(lr=0.01))
    _edit(path, lambda raw: raw.update(method_settings={"fixmatch": {"conf_thresh": 0.5}}))
    changed = grids.load_grid(path)
    with caplog.at_level(logging.WARNING):
        new = grid_changes.check(changed, grids.read_state(changed), force=True)
    assert new == grid_changes.snapshot(changed)
    assert "resuming with a changed grid file (--force): method_settings.fixmatch.conf_thresh" in caplog.text
    mlflow = tracking.client(grid.tracking_uri)
    runs = {c.data.tags[tracking.TRIAL_TAG]: c for c in tracking.child_runs(mlflow, *state.values())}
    tags = {k: r.data.tags.get(grid_changes.FORCED_TAG) for k, r in runs.items()}
    assert tags["synthetic_1_4_fixmatch_seed0"] == "method.conf_thresh: was 0.95, now 0.5"
    assert tags["synthetic_1_4_supervised_seed0"] is None
    assert grid_changes.FORCED_TAG in mlflow.get_run(state["parent_run_id"]).data.tags


def test_grid_json_without_a_snapshot_is_checked_against_the_logged_grid_file(tmp_path):
    path, grid, state = _started(tmp_path)
    grids.state_file(grid).write_text(json.dumps(state))  # as written before snapshots
    _edit(path, lambda raw: raw.update(workers=2))
    changed = grids.load_grid(path)
    with pytest.raises(ConfigError, match="--resume with a changed grid file: workers: was 1, now 2;"):
        grid_changes.check(changed, grids.read_state(changed))


def test_force_needs_resume(tmp_path, capsys):
    path = write(tmp_path, tiny_grid(tmp_path))
    with pytest.raises(SystemExit):
        cli.main(["grid", str(path), "--force"])
    assert (
        capsys.readouterr().err
        == "error: --force: only with --resume (it accepts a changed grid file when resuming)\n"
    )


HOLDER = """
import sys, time
from pathlib import Path
from semiseg import storage
with storage.hold(Path(sys.argv[1])):
    print("holding", flush=True)
    time.sleep(600)
"""


def _hold_in_another_process(folder: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "platform")])}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "holding\n"
    return holder


def test_a_second_grid_on_the_same_storage_fails_at_once_naming_the_lock_and_its_holder(tmp_path, capsys):
    path = write(tmp_path, tiny_grid(tmp_path))
    storage_dir = grids.load_grid(path).storage
    holder = _hold_in_another_process(storage_dir)
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["grid", str(path)])
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    lock = storage_dir / storage.LOCK_FILE
    assert err.startswith(f"error: {lock}: this storage folder is in use by pid {holder.pid} on host ")
    assert not (tmp_path / "data").exists() and not (storage_dir / grids.STATE_FILE).exists()


def test_the_lock_of_a_killed_holder_is_taken_over_and_named(tmp_path, caplog):
    holder = _hold_in_another_process(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with caplog.at_level(logging.WARNING), storage.hold(tmp_path) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {holder.pid} (no longer running)" in caplog.text


def test_state_writes_are_atomic(tmp_path):
    path = tmp_path / "grid.json"
    storage.write_json(path, {"parent_run_id": "a"})
    with pytest.raises(TypeError):
        storage.write_json(path, {"parent_run_id": object()})  # fails halfway through the write
    assert json.loads(path.read_text()) == {"parent_run_id": "a"}
    assert [p.name for p in tmp_path.iterdir()] == ["grid.json"]


SECRET = "s3cr3t-token"


def test_credentials_are_redacted_from_what_mlflow_and_grid_json_get(tmp_path, monkeypatch):
    # The file's tracking URI holds a password; the environment's (which wins) is the local store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    path, grid, state = _started(tmp_path, tracking_uri=f"https://alice:{SECRET}@mlflow.example.com")
    mlflow = tracking.client(grid.tracking_uri)
    logged = Path(mlflow.download_artifacts(state["parent_run_id"], f"grid/{path.name}", str(tmp_path)))
    assert yaml.safe_load(logged.read_text())["tracking_uri"] == "https://***@mlflow.example.com"
    params = mlflow.get_run(state["parent_run_id"]).data.params
    assert SECRET not in json.dumps(params) and SECRET not in grids.state_file(grid).read_text()


@pytest.mark.parametrize(
    ("raw", "redacted"),
    [
        ("https://user:tok@host/x", "https://***@host/x"),
        ("postgresql://u:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("s3://b/k?X-Amz-Signature=abc&X-Amz-Date=1", "s3://b/k?X-Amz-Signature=***&X-Amz-Date=1"),
        ("https://h/p?sig=zz&sv=1&key=KK&monkey=ok", "https://h/p?sig=***&sv=1&key=***&monkey=ok"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_uri_credentials_are_masked(raw, redacted):
    assert redact.text(raw) == redacted


def test_secret_named_keys_are_masked_at_any_depth():
    data = {"password": "x", "a": [{"aws_secret_access_key": "q"}], "tokenizer": "t", "token": None}
    assert redact.data(data) == {
        "password": "***",
        "a": [{"aws_secret_access_key": "***"}],
        "tokenizer": "t",
        "token": None,
    }


def test_an_unreachable_stores_warning_names_no_credential(caplog, monkeypatch):
    """The epoch logger's warning names the store it cannot reach, with its password masked (port 9 on
    loopback refuses at once; MLflow's own retries, minutes of backoff, are turned off)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = tracking.EpochLogger("http://alice:s3cr3t@127.0.0.1:9/mlflow", "run")
    with caplog.at_level(logging.WARNING, logger="semiseg.tracking"):
        logger.after_report(None, [{"epoch": 0.0, "miou": 1.0}], None)
    warned = [r.getMessage() for r in caplog.records if r.name == "semiseg.tracking"]
    assert warned and "127.0.0.1:9" in warned[0]
    assert not any("s3cr3t" in message for message in warned)


def test_synth_does_not_write_into_a_folder_of_other_files(tmp_path, capsys):
    real = tmp_path / "VOC2012"
    (real / "JPEGImages").mkdir(parents=True)
    raw = tiny_grid(tmp_path)
    raw["base"]["data"]["root"] = str(real)
    path = write(tmp_path, raw)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["grid", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {path}: base.data.root: '{real}' holds files but no synth.json")
    assert [p.name for p in real.iterdir()] == ["JPEGImages"]


def test_a_storage_folder_others_may_write_is_warned_about(tmp_path, caplog):
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    with caplog.at_level(logging.WARNING):
        storage.warn_if_shared(folder)
        assert not caplog.text
        folder.chmod(0o777)
        storage.warn_if_shared(folder)
    assert caplog.text.count("\n") == 1 and "is writable by group or others (mode drwxrwxrwx)" in caplog.text
