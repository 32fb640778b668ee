"""Every `semiseg ...` command of README.md and docs/*.md, as written, in a fresh checkout: each one is run
(cheaply: in-process, against a tiny run made here) or excluded with its reason, and every one parses."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from semiseg import cli, tracking, ui
from semiseg.grid import load_grid, locate, state_file

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
COMMAND = re.compile(r"(?<![\w.-])semiseg\s+[^\"'`#\n]*")
"""`semiseg` (or .venv/bin/semiseg) then its arguments, up to a quote, a comment or the line's end."""

EXCLUDED = {
    "semiseg grid experiments/demo.yaml": "the full demo grid (12 trials, ~13 min on 2 cores); "
    "test_grid.py runs tiny grids through the same command",
    "semiseg grid experiments/demo.yaml [--resume] [--verbose]": "the full demo grid, see above",
    "semiseg grid experiments/demo.yaml --resume": "needs an interrupted demo grid; "
    "test_grid.py::test_interrupted_grid_resumes_without_rerunning_finished_trials does it on a tiny one",
    "semiseg demo": "trains 8 epochs on 320 images (3-5 min); its two steps, data synth and train on "
    "configs/synthetic.yaml, run here",
    "semiseg train --config configs/synthetic.yaml --workers 2": "starts Ray and 2 DDP workers (minutes); "
    "test_ray_train.py trains through the same launcher",
    "semiseg cluster address": "runs on a cluster head, reading the config `ray up` copied there",
    "semiseg cluster mlflow --port 5000 --store ~/semiseg-mlflow": "the head's MLflow server, until stopped; "
    "test_cluster.py starts it on a real `ray up` head",
    "semiseg cluster mlflow --stop": "stops the head's server (run through `ray exec`); test_cluster.py does",
}
"""Documented commands too expensive or too cluster-bound to run here, with why."""

CHEAPER = ["--set", "optim.epochs=1", "--set", "optim.max_iters_per_epoch=1"]
"""Appended to a documented `semiseg train` (later options win): the same command, one iteration long."""
SMALLER = ["--train", "128", "--val", "8", "--size", "64"]
"""Appended to the documented `semiseg data synth`: the same command, 136 smaller images instead of 384
(128, so that configs/synthetic.yaml's 1_16 split still fills its batch of 8)."""
PUBLISHED_LIST = str(REPO / "trainers" / "published_splits" / "pascal" / "1464" / "labeled.txt")
"""What the LIST placeholder stands for: a train list with more than 92 names."""


def documented() -> set[str]:
    """Every `semiseg ...` command of the docs, in fenced blocks and inline code, whitespace collapsed."""
    found = set()
    for doc in DOCS:
        text = doc.read_text()
        spans = [line for block in FENCE.findall(text) for line in block.splitlines()]
        spans += INLINE.findall(FENCE.sub("", text))
        for span in spans:
            found.update(" ".join(m.split()) for m in COMMAND.findall(span.replace("\n", " ")))
    return found


def variants(command: str) -> list[str]:
    """The command with each `[--option]` left out and put in."""
    out = [command]
    for optional in re.findall(r"\s\[([^\]]+)\]", command):
        out = [v.replace(f" [{optional}]", extra) for v in out for extra in ("", f" {optional}")]
    return out


def semiseg(*argv: str) -> int:
    """`semiseg ARGV` in this process, as the console script runs it; its exit code."""
    try:
        cli.main(list(argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh checkout: the repository's tracked top-level entries, linked into an empty folder."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in sorted({line.split("/")[0] for line in tracked.stdout.splitlines()}):
        (tmp_path / name).symlink_to(REPO / name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def tiny_demo_store() -> None:
    """What `semiseg grid experiments/demo.yaml` leaves in MLflow, for one finished trial: runs/demo/."""
    grid = load_grid("experiments/demo.yaml")
    mlflow = tracking.client(grid.tracking_uri)
    experiment = tracking.ensure_experiment(
        mlflow, grid.name, tracking.artifact_root(grid.tracking_uri, grid.storage)
    )
    parent = tracking.start_parent(mlflow, experiment, grid.name, {})
    trial = grid.trials[0]
    tags = {axis: str(trial.axes[axis]) for axis in tracking.AXIS_TAGS}
    tags |= {"num_labeled": "20", "workers": "1", "device": "CPU"}
    child = tracking.open_child(mlflow, experiment, parent, trial.key, tags, {})
    tracking.log_epoch(mlflow, child, {"epoch": 0, "miou": 41.5, "epoch_time": 2.0})
    tracking.finish(mlflow, child)
    state_file(grid).write_text(json.dumps({"experiment_id": experiment, "parent_run_id": parent}))


def run_ui(command: str) -> None:
    """`semiseg ui ...` as a user starts it (on a free port): its printed URL lists the demo's runs."""
    argv = [sys.executable, "-m", "semiseg.cli", *shlex.split(command)[1:], "--port", str(ui.free_port())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "platform")])}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = next((line.split(": ", 1)[1].strip() for line in process.stdout if "MLflow UI: " in line), None)
        assert url is not None, f"`{command}` printed no URL (exit code {process.wait()})"
        experiment = tracking.client(load_grid("experiments/demo.yaml").tracking_uri).get_experiment_by_name(
            "demo"
        )
        assert url.endswith(f"#/experiments/{experiment.experiment_id}/runs")
        with urllib.request.urlopen(url.split("#")[0], timeout=30) as reply:
            assert reply.status == 200
    finally:
        process.send_signal(signal.SIGTERM)  # `semiseg ui` stops its MLflow server on the way out
        process.wait(timeout=30)


def run_table(command: str, capsys: pytest.CaptureFixture) -> None:
    assert semiseg(*shlex.split(command)[1:]) == 0
    assert "| best epoch |" in capsys.readouterr().out


def run_dry(command: str, capsys: pytest.CaptureFixture) -> None:
    """A dry run in a fresh checkout (no dataset, no Ray): one config per trial, nothing written."""
    assert semiseg(*shlex.split(command)[1:]) == 0
    grid = load_grid(shlex.split(command)[2])
    assert capsys.readouterr().out.count("\n--- # trial ") == len(grid.trials) > 1
    assert not grid.storage.exists()


def expect_exit(*codes: int) -> Callable[[str, pytest.CaptureFixture], None]:
    """Run the command as written; it must end with one of `codes` (a check that reports problems exits 1)."""

    def check(command: str, capsys: pytest.CaptureFixture) -> None:
        assert semiseg(*shlex.split(command)[1:]) in codes

    return check


def with_args(*extra: str) -> Callable[[str, pytest.CaptureFixture], None]:
    """Run the command with `extra` appended (its later options win) and LIST standing for a real list."""

    def check(command: str, capsys: pytest.CaptureFixture) -> None:
        argv = [PUBLISHED_LIST if arg == "LIST" else arg for arg in shlex.split(command)[1:]]
        assert semiseg(*argv, *extra) == 0

    return check


def help_of(command: str, capsys: pytest.CaptureFixture) -> None:
    """A subcommand named in prose (`semiseg train`, `semiseg grid ...`): its --help."""
    assert semiseg(*command.replace("...", "").split()[1:], "--help") == 0


RUN = {
    # In this order: the dataset first, then what trains on it and evaluates what was trained.
    "semiseg data synth --out data/synthetic --train 320 --val 64 --size 96 --classes 6": with_args(*SMALLER),
    "semiseg data split --train-list LIST --labeled 92 --seed 0 --out splits/mine/92": with_args(),
    "semiseg train --config configs/synthetic.yaml --set method.name=unimatch": with_args(*CHEAPER),
    "semiseg eval --checkpoint runs/synthetic/best.pth --out runs/synthetic/predictions": with_args(),
    "semiseg data check pascal --root /data/VOC2012": expect_exit(0, 1),
    "semiseg data check pascal --root data/VOC2012": expect_exit(0, 1),
    "semiseg data check cityscapes --root data/cityscapes --split 1_16": expect_exit(0, 1),
    "semiseg data check coco --root data/coco --decode": expect_exit(0, 1),
    "semiseg weights check": expect_exit(0),
    "semiseg cluster check cluster.yaml": expect_exit(0, 1),
    "semiseg grid experiments/pascal.yaml --dry-run": run_dry,
    "semiseg table experiments/demo.yaml": run_table,
    "semiseg ui experiments/demo.yaml": lambda command, capsys: run_ui(command),
    "semiseg train": help_of,
    "semiseg grid ...": help_of,
}
"""How each documented command runs here."""


def test_every_documented_command_is_run_or_excluded():
    commands = documented()
    assert len(commands) > 10, commands  # the extraction finds the README's command table
    assert commands - RUN.keys() - EXCLUDED.keys() == set(), "documented but neither run nor excluded"
    assert RUN.keys() | EXCLUDED.keys() <= commands, "run or excluded but no longer documented"


@pytest.mark.parametrize("command", sorted(set(RUN) - {"semiseg train", "semiseg grid ..."} | set(EXCLUDED)))
def test_documented_command_parses(command):
    for variant in variants(command):
        argv = shlex.split(variant)[1:]
        cli.build_parser().parse_args(argv)  # exits 2 on an unknown option or a missing argument


def test_documented_commands_run_in_a_fresh_checkout(checkout, capsys):
    tiny_demo_store()
    for command, run in RUN.items():
        run(command, capsys)
    assert (checkout / "runs" / "synthetic" / "predictions").is_dir()


def test_the_table_and_ui_take_the_grid_file_its_storage_folder_or_its_name(checkout):
    tiny_demo_store()
    forms = [locate(target) for target in ("experiments/demo.yaml", "runs/demo", "demo")]
    assert forms == [(f"sqlite:///{checkout}/runs/demo/mlflow.db", "demo", checkout / "runs" / "demo")] * 3
