"""A corrupted latest.pth met by a real training run: detected, the previous good checkpoint used, a warning
logged. The writes themselves (temp + fsync + rename, SHA-256 sidecar) are unit-tested in
tests/test_checkpoint.py; a write that fails half-way is in test_fault_disk.py.
"""

from __future__ import annotations

import logging

from trainers import checkpoint as ckpt
from trainers.entry import train_local


def test_corrupted_latest_resumes_from_previous_with_a_warning(tiny_config, caplog):
    first = train_local(tiny_config(), progress=False)
    assert first.epochs_run == [0, 1]
    latest = first.out_dir / ckpt.LATEST
    # One flipped byte in the middle: the zip still opens, only the checksum can tell (truncation: the
    # unit test tests/test_checkpoint.py::test_truncated_latest_falls_back_to_previous).
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(data)

    with caplog.at_level(logging.WARNING, logger="trainers.checkpoint"):
        again = train_local(tiny_config(optim={"epochs": 3}), progress=False)

    # previous.pth holds epoch 0 (state epoch 1): epoch 1 runs again, then epoch 2.
    assert again.epochs_run == [1, 2]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "trainers.checkpoint"]
    assert warning.startswith(f"skipping bad checkpoint: {latest}: SHA-256 does not match latest.pth.sha256")
    assert ckpt.load(latest)["epoch"] == 3 and ckpt.load(first.out_dir / ckpt.PREVIOUS)["epoch"] == 2
