"""`semiseg ui` in a real headless Chromium: the grid's parent run and its nested trial runs are visible.

Needs /usr/bin/chromium (Debian's `chromium` package) and the `playwright` Python package, which drives
that browser (no browser download). The screenshots stay in tests/artifacts/ for a person to look at.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from semiseg import tracking, ui

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
REPO = Path(__file__).resolve().parents[1]
GRID = "ui-test"
TRIALS = {"synthetic_1_8_mspl_seed0": ("mspl", 41.5), "synthetic_1_8_supervised_seed0": ("supervised", 33.25)}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs chromium: apt-get install -y chromium")


@pytest.fixture
def store(tmp_path):
    """A grid run as the grid driver writes it: a parent run and two nested trial runs with an epoch each."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow = tracking.client(uri)
    experiment = tracking.ensure_experiment(mlflow, GRID, tracking.artifact_root(uri, tmp_path))
    parent = tracking.start_parent(mlflow, experiment, GRID, {"grid.trials": "2"})
    for key, (method, miou) in TRIALS.items():
        run_id = tracking.open_child(
            mlflow, experiment, parent, key, {"method": method}, {"method.name": method}
        )
        tracking.log_epoch(mlflow, run_id, {"epoch": 0.0, "miou": miou})
        tracking.finish(mlflow, run_id)
    return uri


@pytest.fixture
def server(store):
    """`semiseg ui` started as a user would; stopped (with its mlflow server) by this fixture."""
    port = ui.free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "platform")])}
    command = [sys.executable, "-m", "semiseg.cli", "ui", GRID, "--tracking-uri", store, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in process.stdout:
            if line.startswith("MLflow UI: "):
                yield line.split(": ", 1)[1].strip(), port
                break
        else:
            pytest.fail(f"`semiseg ui` printed no URL (exit code {process.wait()})")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    with pytest.raises(ConnectionRefusedError):  # the mlflow server went with it
        socket.create_connection((ui.HOST, port), timeout=5)


def test_ui_shows_the_grid_and_its_nested_trial_runs(server):
    from playwright.sync_api import sync_playwright

    url, port = server
    assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/#/experiments/\d+/runs", url)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            # The UI keeps polling, so the network never goes idle: wait for content instead.
            page.goto(url, wait_until="domcontentloaded")
            runs = page.locator("a[href*='/runs/']")
            runs.filter(has_text=GRID).wait_for(timeout=60_000)
            page.locator(
                "button[data-component-id*='runnamecellrenderer']"
            ).first.click()  # expand the parent
            for key in TRIALS:
                runs.filter(has_text=key).wait_for(timeout=30_000)
            page.screenshot(path=ARTIFACTS / "ui_runs.png", full_page=True)
            names = runs.all_inner_texts()
            assert names[0] == GRID and sorted(names[1:]) == sorted(TRIALS)

            first = next(iter(TRIALS))
            runs.filter(has_text=first).click()
            page.get_by_text(str(TRIALS[first][1]), exact=True).first.wait_for(timeout=30_000)
            runs.filter(has_text=GRID).wait_for(timeout=30_000)  # the parent-run link loads last
            page.screenshot(path=ARTIFACTS / "ui_trial.png", full_page=True)
            body = page.locator("body").inner_text()
            # The run page lists its metric, its method tag and the grid run it is nested under.
            assert f"miou\n{TRIALS[first][1]}" in body and "method\n: mspl" in body
            assert f"Parent run\n{GRID}" in body
        finally:
            browser.close()
