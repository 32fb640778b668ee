"""Checkpoints: atomic writes, checksum verification, fallback to the previous good one."""

import random

import pytest
import torch

from trainers import checkpoint as ckpt
from trainers.errors import CheckpointError


def test_round_trip_and_rng_restore(tmp_path):
    torch.manual_seed(3)
    random.seed(3)
    state = {"model": {"w": torch.arange(4.0)}, "epoch": 2, "rng": ckpt.rng_state()}
    ckpt.save(state, tmp_path / "a.pth")
    expected = (torch.rand(2), random.random())
    loaded = ckpt.load(tmp_path / "a.pth")
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["epoch"] == 2
    ckpt.set_rng_state(loaded["rng"])
    again = (torch.rand(2), random.random())
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_latest_falls_back_to_previous(tmp_path, caplog):
    ckpt.save_latest({"epoch": 1}, tmp_path)
    ckpt.save_latest({"epoch": 2}, tmp_path)
    assert ckpt.load_resumable(tmp_path) == (tmp_path / ckpt.LATEST, {"epoch": 2})
    latest = tmp_path / ckpt.LATEST
    latest.write_bytes(latest.read_bytes()[:20])
    assert ckpt.load_resumable(tmp_path) == (tmp_path / ckpt.PREVIOUS, {"epoch": 1})
    assert "SHA-256 does not match" in caplog.text


def test_nothing_to_resume(tmp_path):
    assert ckpt.load_resumable(tmp_path) is None


def test_unreadable_file_without_sidecar(tmp_path):
    (tmp_path / ckpt.LATEST).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"latest\.pth: cannot be read as a checkpoint"):
        ckpt.load_resumable(tmp_path)


def test_no_good_checkpoint_left_is_one_error_instead_of_a_fresh_run_over_best(tmp_path, caplog):
    # A fresh run would write best.pth at its first epoch: refused, naming what is there and why.
    ckpt.save_latest({"epoch": 1}, tmp_path)
    ckpt.save_latest({"epoch": 2}, tmp_path)
    ckpt.save({"epoch": 2}, tmp_path / ckpt.BEST)
    for name in (ckpt.LATEST, ckpt.PREVIOUS):
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:20])
    with pytest.raises(CheckpointError) as err:
        ckpt.load_resumable(tmp_path)
    assert str(err.value).startswith(
        f"{tmp_path}: no checkpoint to resume from ({tmp_path / ckpt.LATEST}: SHA-256 does not match"
    )
    assert f"; {tmp_path / ckpt.PREVIOUS}: SHA-256 does not match" in str(err.value)
    assert str(err.value).endswith(
        "a fresh run would overwrite latest.pth, previous.pth, best.pth: "
        "pass `--restart` to move them aside and train afresh, or move them away"
    )
    assert "skipping bad checkpoint" not in caplog.text  # the error says it all, once


def test_best_alone_is_not_overwritten_by_a_fresh_run(tmp_path):
    ckpt.save({"epoch": 2}, tmp_path / ckpt.BEST)
    with pytest.raises(CheckpointError, match=r"\(no latest\.pth or previous\.pth beside best\.pth\)"):
        ckpt.load_resumable(tmp_path)
