"""Checkpoints: atomic writes, checksum verification, fallback to the previous good one."""

import random

import torch

from trainers import checkpoint as ckpt


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
    assert ckpt.load_resumable(tmp_path)["epoch"] == 2
    latest = tmp_path / ckpt.LATEST
    latest.write_bytes(latest.read_bytes()[:20])
    assert ckpt.load_resumable(tmp_path)["epoch"] == 1
    assert "SHA-256 does not match" in caplog.text


def test_nothing_to_resume(tmp_path):
    assert ckpt.load_resumable(tmp_path) is None


def test_unreadable_file_without_sidecar(tmp_path):
    (tmp_path / ckpt.LATEST).write_bytes(b"not a checkpoint")
    assert ckpt.load_resumable(tmp_path) is None
