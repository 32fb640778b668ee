"""`semiseg ui`: the MLflow UI over a grid's tracking store, on 127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
READY_TIMEOUT_S = 60.0
SERVER_ENV = {
    # Job execution starts extra worker processes (~2.5 GB more here); the UI does not need it.
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}


def server_command(uri: str, port: int, artifacts: Path | None = None) -> list[str]:
    """The `mlflow server` command line: one worker, loopback only, over the store at `uri`."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if artifacts is not None:
        # Only for experiments the UI itself would create; grid experiments name their own location.
        command += ["--artifacts-destination", artifacts.as_uri()]
    return command


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start(uri: str, port: int, artifacts: Path | None = None) -> subprocess.Popen:
    """Start the server in its own process group (so `stop` ends its workers too); returns at once."""
    env = {**os.environ, **SERVER_ENV}
    return subprocess.Popen(server_command(uri, port, artifacts), env=env, start_new_session=True)


def healthy(process: subprocess.Popen, url: str, timeout: float) -> bool:
    """Poll the MLflow server at `url` until its /health answers (True), or until it exits or `timeout`
    seconds pass (False: the caller tells which, as `process.poll()` does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def wait_ready(process: subprocess.Popen, port: int, timeout: float = READY_TIMEOUT_S) -> None:
    """Block until the server answers its health check; fail if it exits or takes longer than `timeout`."""
    if healthy(process, f"http://{HOST}:{port}", timeout):
        return
    if process.poll() is not None:
        raise RuntimeError(f"mlflow server exited with code {process.returncode} before it was ready")
    raise TimeoutError(f"mlflow server on port {port} not ready after {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """Stop the server and its worker processes (its process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def runs_url(port: int, experiment_id: str | None) -> str:
    """The UI page that lists an experiment's runs (the bare experiment page shows none)."""
    base = f"http://{HOST}:{port}/"
    return f"{base}#/experiments/{experiment_id}/runs" if experiment_id is not None else base


def serve(uri: str, experiment: str | None, port: int, artifacts: Path | None = None) -> None:
    """Run the UI until interrupted, printing the URL of the experiment's runs."""
    from semiseg import tracking

    found = tracking.client(uri).get_experiment_by_name(experiment) if experiment else None
    # SIGTERM ends this process through `finally`, so the server (in its own session) goes with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    process = start(uri, port, artifacts)
    try:
        wait_ready(process, port)
        print(f"MLflow UI: {runs_url(port, found.experiment_id if found else None)}", flush=True)
        print("(Ctrl+C stops it)", flush=True)
        process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(process)
