"""A full disk and an unwritable out_dir, met by a real `semiseg train` process: one clear error before
training when it is so at the start; the last good checkpoint kept, and nothing half-written, when the disk
fills up during a checkpoint write. RLIMIT_FSIZE stands in for the full disk: writes past it fail with EFBIG
as they would with ENOSPC, and it needs no root and no mount.

Ray Train's storage path is checked by the launcher:
tests/test_ray_train.py::test_unwritable_storage_fails_before_starting.
"""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from semiseg import cli

from trainers import checkpoint as ckpt
from trainers.entry import train_local


def file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG, as on a full disk, and do not kill."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def write_config(config: dict, folder: Path) -> Path:
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train_on_a_full_disk(config: Path, room: int) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "semiseg.cli", "train", "--config", str(config)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, preexec_fn=file_size_limit(room)
    )


def test_out_dir_below_a_file_is_one_error_before_training(tiny_config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = write_config({**tiny_config().to_dict(), "out_dir": str(blocker / "run")}, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", str(config)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"error: out_dir: '{blocker / 'run'}' is not a writable folder "
        f"([Errno 20] Not a directory: '{blocker / 'run'}')\n"
    )


def test_full_disk_at_start_is_one_error_before_training(tiny_config, tmp_path):
    out_dir = tmp_path / "run"
    done = train_on_a_full_disk(write_config(tiny_config().to_dict(), tmp_path), room=16 << 10)
    assert done.returncode == 2, done.stderr
    assert done.stderr.endswith(
        f"error: out_dir: '{out_dir}' is not a writable folder ([Errno 27] File too large)\n"
    )
    assert "epoch 0" not in done.stderr
    assert list(out_dir.iterdir()) == []


def test_disk_full_during_a_checkpoint_write_keeps_the_last_good_one(tiny_config, tmp_path):
    first = train_local(tiny_config(optim={"epochs": 1}), progress=False)
    out_dir = first.out_dir
    before = sorted(p.name for p in out_dir.iterdir())
    room = (out_dir / ckpt.LATEST).stat().st_size // 2  # the start-up check fits (64 KiB), a checkpoint not

    done = train_on_a_full_disk(write_config(tiny_config(optim={"epochs": 2}).to_dict(), tmp_path), room)

    assert done.returncode == 2, done.stderr
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {out_dir / ckpt.LATEST}: cannot write the checkpoint (")
    assert last_line.endswith("MiB free there); the previous one is kept")
    # Nothing half-written, nothing rotated: the folder is exactly as the good run left it.
    assert sorted(p.name for p in out_dir.iterdir()) == before
    assert ckpt.load(out_dir / ckpt.LATEST)["epoch"] == 1
    assert train_local(tiny_config(optim={"epochs": 2}), progress=False).epochs_run == [1]
