"""Ray Train on 2 CPU workers (gloo) over loopback: a run end to end, a killed worker, a stopped run
resumed by re-running the same command, and the errors raised before any worker starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from ray.train import Result
from semiseg import cli
from semiseg.launch import RUN_LOG, LaunchError, read_reports, train_distributed

from trainers import checkpoint as ckpt
from trainers.config import TrainConfig
from trainers.entry import evaluate_checkpoint

# Each takes under 90 s here, idle or beside a CPU hog: a hang fails in 5 minutes, not the default 10.
pytestmark = pytest.mark.timeout(300)


def wait_for_report(cfg: TrainConfig, epoch: int, timeout: float = 120.0) -> list[dict]:
    """Poll rank 0's report log until `epoch` has been reported; returns the log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reports = read_reports(cfg.out_dir)
        if any(r["epoch"] == epoch for r in reports):
            return reports
        time.sleep(0.05)
    raise TimeoutError(f"epoch {epoch} was not reported within {timeout} s")


def split_at_fault(reports: list[dict], pid: int) -> tuple[list[int], list[int]]:
    """Epochs reported by the process that was stopped, and by the processes after it."""
    before = [int(r["epoch"]) for r in reports if r["pid"] == pid]
    after = [int(r["epoch"]) for r in reports if r["pid"] != pid]
    return before, after


def resumed_at(cfg: TrainConfig) -> int:
    """The epoch that the first resumed rank-0 process of the run started from, as its log line says."""
    for line in (Path(cfg.out_dir) / RUN_LOG).read_text().splitlines():
        found = re.search(r" rank 0 INFO trainers\.loop: resumed at epoch (\d+) ", line)
        if found:
            return int(found.group(1))
    raise AssertionError(f"no rank-0 'resumed at epoch' line in {RUN_LOG}")


def worker_pid(cfg: TrainConfig, rank: int) -> int:
    """The pid of the latest process to start as `rank`, from its log line."""
    lines = (Path(cfg.out_dir) / RUN_LOG).read_text().splitlines()
    pids = [
        int(m.group(1)) for line in lines if (m := re.search(rf" rank {rank} of \d+ is pid (\d+) ", line))
    ]
    assert pids, f"no 'rank {rank} of N is pid P' line in {RUN_LOG}"
    return pids[-1]


def assert_resumed(before: list[int], after: list[int], epochs: int, start: int) -> None:
    """The rerun resumed from a checkpoint (not from scratch) no later than right after the last epoch rank
    0 logged, and trained every epoch from there to the end. It may redo logged epochs: rank 0 logs an
    epoch before reporting its checkpoint, and the stop can come before Ray's controller has registered
    the last reports (it polls the workers)."""
    assert before == list(range(len(before))) and before
    assert 1 <= start <= before[-1] + 1
    assert after == list(range(start, epochs))


def latest_ray_checkpoint(path: str) -> dict:
    return ckpt.load(Path(path) / ckpt.LATEST)


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, make_tiny_config, tmp_path_factory) -> tuple[TrainConfig, Result]:
    """One 2-epoch run on 2 CPU workers, shared by the tests that inspect it."""
    cfg = make_tiny_config(tmp_path_factory.mktemp("two-workers") / "run")
    return cfg, train_distributed(cfg, workers=2)


def test_two_cpu_workers_train_end_to_end(two_worker_run):
    cfg, result = two_worker_run
    metrics = result.metrics
    assert metrics["epoch"] == 1.0
    assert 0.0 <= metrics["miou"] <= 100.0 and metrics["miou"] <= metrics["best_miou"]
    state = latest_ray_checkpoint(result.checkpoint.path)
    assert state["epoch"] == 2 and state["iteration"] == 4
    assert state["miou"] == pytest.approx(metrics["miou"])
    assert result.return_value["epochs_run"] == [0, 1]

    reports = read_reports(cfg.out_dir)
    assert [r["epoch"] for r in reports] == [0.0, 1.0]
    where = {(r["world_size"], r["node_ip"], r["master_addr"]) for r in reports}
    assert where == {(2, "127.0.0.1", "127.0.0.1")}
    # Linear rule: 2 workers x 2 images = global batch 4, lr 0.01 * 4 / 8; the poly schedule has
    # run 2 of 4 iterations when epoch 0 reports.
    first = reports[0]
    assert (first["per_worker_batch"], first["global_batch"]) == (2.0, 4.0)
    assert first["lr"] == pytest.approx(0.01 * 4 / 8 * (1 - 2 / 4) ** 0.9)
    # Best + latest are kept: at most two checkpoint folders in the run's storage.
    assert 1 <= len(list(Path(result.path).glob("checkpoint_*"))) <= 2


def test_reported_miou_is_the_checkpoints_miou(two_worker_run):
    # Each worker scored half of val; their summed intersections/unions must give the mIoU that
    # one process measures on the checkpointed model.
    _, result = two_worker_run
    alone = evaluate_checkpoint(Path(result.checkpoint.path) / ckpt.LATEST)
    assert alone.result.miou == pytest.approx(result.metrics["miou"])


def test_killed_worker_restarts_from_latest_checkpoint(ray_cluster, tiny_config):
    cfg = tiny_config(optim={"epochs": 6, "max_iters_per_epoch": 3})
    run = {}

    def kill_after_epoch_2() -> None:
        # Epoch 2 logged: the checkpoints of epochs 0 and 1 were reported an epoch or more ago, time
        # for Ray's controller (polling every 0.25 s) to register at least one of them.
        reports = wait_for_report(cfg, epoch=2)
        run["pid"] = reports[-1]["pid"]
        os.kill(run["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_after_epoch_2)
    killer.start()
    result = train_distributed(cfg, workers=2, max_failures=1)
    killer.join()

    before, after = split_at_fault(read_reports(cfg.out_dir), run["pid"])
    assert_resumed(before, after, epochs=6, start=resumed_at(cfg))
    assert result.metrics["epoch"] == 5.0
    assert latest_ray_checkpoint(result.checkpoint.path)["epoch"] == 6
    assert result.return_value["epochs_run"] == after


def test_a_non_zero_rank_killed_mid_epoch_restarts_the_group_from_the_latest_checkpoint(
    ray_cluster, tiny_config
):
    # The documented max_failures (2), rank 1 instead of rank 0, half-way through an epoch.
    cfg = tiny_config(optim={"epochs": 6, "max_iters_per_epoch": 3})
    run = {}

    def kill_rank_1_mid_epoch() -> None:
        reports = wait_for_report(cfg, epoch=2)
        run["rank0"], run["rank1"] = reports[-1]["pid"], worker_pid(cfg, rank=1)
        time.sleep(reports[-1]["epoch_time"] / 2)
        os.kill(run["rank1"], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_1_mid_epoch)
    killer.start()
    result = train_distributed(cfg, workers=2)
    killer.join()

    assert worker_pid(cfg, rank=1) != run["rank1"]  # a new worker group ran the rest
    before, after = split_at_fault(read_reports(cfg.out_dir), run["rank0"])
    assert_resumed(before, after, epochs=6, start=resumed_at(cfg))
    assert latest_ray_checkpoint(result.checkpoint.path)["epoch"] == 6
    assert result.return_value["epochs_run"] == after


def test_stopped_run_resumes_when_the_same_command_runs_again(ray_cluster, tiny_config, tmp_path):
    # Ctrl-C aborts within seconds, by when the first run may have reported several short epochs.
    cfg = tiny_config(optim={"epochs": 12})
    assert Path(cfg.out_dir) == tmp_path / "run"
    # A relative out_dir: workers must still write where the command was run, not in their own cwd.
    (tmp_path / "train.yaml").write_text(yaml.safe_dump({**cfg.to_dict(), "out_dir": "run"}))
    command = [sys.executable, "-m", "semiseg.cli", "train", "--config", "train.yaml", "--workers", "2"]
    run = {"cwd": tmp_path, "env": {**os.environ, "RAY_ADDRESS": ray_cluster}, "text": True}

    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **run)
    pid = wait_for_report(cfg, epoch=2)[-1]["pid"]  # as in the kill test: a checkpoint had time to register
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=120)
    # Ray Train's own SIGINT handler used to end the command with exit 1 and no word of what happened.
    assert first.returncode == 130, output[-3000:]
    assert "interrupted: run the same command again to resume" in output
    assert int(max(r["epoch"] for r in read_reports(cfg.out_dir))) < 11, "stopped too late to test resuming"

    second = subprocess.run(command, capture_output=True, timeout=300, **run)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "mIoU" in second.stdout

    before, after = split_at_fault(read_reports(cfg.out_dir), pid)
    assert_resumed(before, after, epochs=12, start=resumed_at(cfg))
    assert ckpt.load(Path(cfg.out_dir) / ckpt.LATEST)["epoch"] == 12


def test_an_unreadable_ray_checkpoint_falls_back_to_the_run_folder(ray_cluster, tiny_config):
    cfg = tiny_config()
    first = train_distributed(cfg, workers=2)
    ray_copy = Path(first.checkpoint.path) / ckpt.LATEST
    ray_copy.unlink()  # a new file, not a write through a hard link that out_dir's latest.pth may share
    ray_copy.write_bytes(b"truncated")
    longer = replace(cfg, optim=replace(cfg.optim, epochs=3))
    result = train_distributed(longer, workers=2)
    assert result.return_value["epochs_run"] == [2]  # out_dir's latest.pth (epoch 2), not a fresh start
    log = (Path(cfg.out_dir) / RUN_LOG).read_text()
    assert "cannot be read" in log and "resuming from the newest good checkpoint of" in log


def test_too_many_workers_fail_before_starting(ray_cluster, tiny_config):
    cfg = tiny_config()
    with pytest.raises(LaunchError, match="3 workers of 0.99 CPU each do not fit.*room for 2"):
        train_distributed(cfg, workers=3)
    assert not Path(cfg.out_dir).exists()


def test_gpu_on_a_cluster_without_one_fails_before_starting(ray_cluster, tiny_config):
    cfg = tiny_config()
    with pytest.raises(LaunchError, match="--gpu: the Ray cluster has no GPU"):
        train_distributed(cfg, workers=1, use_gpu=True)
    assert not Path(cfg.out_dir).exists()


def test_unwritable_storage_fails_before_starting(ray_cluster, tiny_config, tmp_path):
    cfg = tiny_config()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(LaunchError, match="storage_path: .*a-file/ray' is not a writable folder"):
        train_distributed(cfg, workers=2, storage_path=str(blocker / "ray"))
    assert not Path(cfg.out_dir).exists()


def test_cli_prints_launch_errors(ray_cluster, tiny_config, tmp_path, capsys):
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(tiny_config().to_dict()))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(tmp_path / "train.yaml"), "--workers", "3"])
    assert exit_info.value.code == 2
    assert "error: workers: 3 workers of 0.99 CPU each do not fit" in capsys.readouterr().err
