"""docs/adding-a-method.md, checked against the code: its method file, registered with its one line,
trains through the real loop, checkpoints its teacher, and resumes with it."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from trainers import checkpoint as ckpt
from trainers.entry import train_local
from trainers.methods import METHODS

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def meanteacher(tmp_path, monkeypatch):
    """The page's code block as the module trainers/methods/meanteacher.py would be, in METHODS."""
    code = re.search(r"^```python\n(.*?)^```", DOC.read_text(), re.M | re.S).group(1)
    path = tmp_path / "meanteacher.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("meanteacher", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "meanteacher", module)  # dataclasses resolve annotations there
    spec.loader.exec_module(module)
    monkeypatch.setitem(METHODS, "meanteacher", module.MeanTeacher)
    return module.MeanTeacher


class Stop(Exception):
    """Raised by the report callback: the run stops as if killed right after a checkpoint."""


def test_the_documented_method_trains_checkpoints_and_resumes(meanteacher, make_tiny_config, tmp_path):
    reports = []

    def stop_after_epoch_1(metrics: dict[str, float], _path: Path | None) -> None:
        reports.append(metrics)
        if metrics["epoch"] == 1:
            raise Stop

    stopped = make_tiny_config(tmp_path / "stopped", method={"name": "meanteacher"}, optim={"epochs": 3})
    with pytest.raises(Stop):
        train_local(stopped, report=stop_after_epoch_1, progress=False)
    assert {"loss", "loss_x", "loss_u"} <= set(reports[-1]) and reports[-1]["loss_u"] > 0
    saved = ckpt.load(Path(stopped.out_dir) / ckpt.LATEST)
    teacher, net = saved["method"]["teacher"], saved["model"]
    assert any(teacher[k].is_floating_point() and not torch.equal(teacher[k], net[k]) for k in teacher)

    # Stopped after 2 of 3 epochs and resumed, or trained without a stop: the same teacher, bit for bit.
    assert train_local(stopped, progress=False).epochs_run == [2]
    straight = make_tiny_config(tmp_path / "straight", method={"name": "meanteacher"}, optim={"epochs": 3})
    assert train_local(straight, progress=False).epochs_run == [0, 1, 2]
    a = ckpt.load(Path(stopped.out_dir) / ckpt.LATEST)["method"]["teacher"]
    b = ckpt.load(Path(straight.out_dir) / ckpt.LATEST)["method"]["teacher"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
