"""The Ray cluster launcher side: check a cluster.yaml before `ray up`, and what the head runs at start.

`check_cluster` lists every value still to set and every schema problem of a cluster.yaml, one line each.
On the head, `head_address` is its private address and `start_mlflow` runs the MLflow tracking server
that every trial of a grid logs to; `running_tracking_uri` is how `submit_entry.py` finds it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from semiseg.ui import healthy

PLACEHOLDER = "REPLACE_ME"
HINTS = {
    "provider.head_ip": "the head server's private address, reachable from every worker (e.g. 10.0.0.10)",
    "provider.worker_ips": "the GPU servers' addresses (e.g. [10.0.0.11, 10.0.0.12]; [] for a head alone)",
    "auth.ssh_user": "the account that runs Ray, the same on every node",
    "auth.ssh_private_key": "a key authorized for ssh_user on every node",
}
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")
"""The cluster config `ray up` copies to the head."""
MLFLOW_STATE = Path("~/.semiseg/mlflow.json")
"""Where `start_mlflow` records the server it started (pid, uri) for `submit_entry.py` and `stop_mlflow`."""
MLFLOW_READY_S = 120.0


class ClusterError(RuntimeError):
    """The head's address or its MLflow server cannot be found or started."""


@dataclass(frozen=True)
class Finding:
    key: str
    """Dotted path in the yaml (provider.head_ip), or `schema` for Ray's own validation."""
    message: str
    blocking: bool = True
    """False for a note that `ray up` can live with."""

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def check_cluster(path: str | Path) -> list[Finding]:
    """Values still to set (REPLACE_ME, empty addresses), missing local files, and Ray's schema errors."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        return [Finding("file", f"{path} not found")]
    except yaml.YAMLError as exc:
        return [Finding("file", f"{path} is not valid YAML: {exc}")]
    if not isinstance(config, dict):
        return [Finding("file", f"{path}: expected a mapping of settings, got {type(config).__name__}")]
    findings = placeholders(config)
    if _section(config, "provider").get("type") == "local":
        findings += local_provider(config)
    findings += local_files(config)
    return findings + schema_problems(config)


def placeholders(value: Any, key: str = "") -> list[Finding]:
    """Every string holding REPLACE_ME, by its dotted key (list items as key[i])."""
    if isinstance(value, dict):
        return [f for k, v in value.items() for f in placeholders(v, f"{key}.{k}" if key else str(k))]
    if isinstance(value, list):
        return [f for i, v in enumerate(value) for f in placeholders(v, f"{key}[{i}]")]
    if isinstance(value, str) and PLACEHOLDER in value:
        hint = HINTS.get(key.split("[")[0], "replace it")
        return [Finding(key, f"{PLACEHOLDER}: set {hint}")]
    return []


def local_provider(config: dict[str, Any]) -> list[Finding]:
    """The local provider's addresses and SSH user: present and non-empty."""
    provider, auth = _section(config, "provider"), _section(config, "auth")
    findings = []
    if not provider.get("head_ip"):
        findings.append(Finding("provider.head_ip", f"empty: set {HINTS['provider.head_ip']}"))
    ips = provider.get("worker_ips")
    if not isinstance(ips, list):
        hint = HINTS["provider.worker_ips"]
        findings.append(Finding("provider.worker_ips", f"expected a list: set {hint}"))
    elif not ips:
        findings.append(Finding("provider.worker_ips", "empty: the head is the only node", blocking=False))
    if not auth.get("ssh_user"):
        findings.append(Finding("auth.ssh_user", f"empty: set {HINTS['auth.ssh_user']}"))
    return findings


def local_files(config: dict[str, Any]) -> list[Finding]:
    """The SSH key and every file_mounts source must exist here (relative paths: from this directory)."""
    findings = []
    key = _section(config, "auth").get("ssh_private_key")
    if isinstance(key, str) and PLACEHOLDER not in key and not Path(key).expanduser().is_file():
        hint = HINTS["auth.ssh_private_key"]
        findings.append(Finding("auth.ssh_private_key", f"{key} not found: set {hint}"))
    for remote, local in _section(config, "file_mounts").items():
        if not isinstance(local, str) or Path(local).expanduser().exists():
            continue
        if local.endswith(".ray/auth_token"):
            fix = "make Ray's token once with `ray get-auth-token --generate`"
        else:
            fix = f"run `ray up` from the checkout root (looked in {Path.cwd()})"
        findings.append(Finding(f"file_mounts.{remote}", f"{local} not found: {fix}"))
    return findings


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    # A section of the wrong type is left to the schema check to report.
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def schema_problems(config: dict[str, Any]) -> list[Finding]:
    """What Ray's own checks (its JSON schema, then `ray up`'s prepare and validation) say of the config."""
    import click
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    try:
        # The raw config first: Ray's prepare step assumes the sections have the right types.
        jsonschema.validate(config, schema)
        # Ray's console messages here (a Docker-only warning on single-file mounts, the abort text that
        # the exception repeats) would interleave with the findings.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "top level"
        return [Finding("schema", f"{where}: {exc.message}")]
    except (ValueError, KeyError, TypeError, RuntimeError, click.ClickException) as exc:
        # prepare_config aborts with a ClickException on fields the local provider does not support.
        return [Finding("schema", str(exc) or type(exc).__name__)]
    return []


def head_address(bootstrap: Path = BOOTSTRAP_CONFIG) -> str:
    """This head's private IP: the local provider's head_ip from the config `ray up` copied here, else
    the address Ray would advertise (a cloud head)."""
    path = bootstrap.expanduser()
    if path.is_file():
        head = (yaml.safe_load(path.read_text()).get("provider") or {}).get("head_ip")
        if head:
            try:
                return socket.gethostbyname(head)
            except OSError as exc:
                raise ClusterError(f"{path}: provider.head_ip {head!r} does not resolve ({exc})") from None
    from ray.util import get_node_ip_address

    return get_node_ip_address()


def start_mlflow(
    store: str | Path, host: str | None = None, port: int = 5000, workers: int = 1, state: Path = MLFLOW_STATE
) -> str:
    """Run an MLflow tracking server (SQLite + artifacts under `store`) on host:port, detached, and wait
    until it answers; a server this started earlier with the same URI is kept. Returns its URI."""
    host = host or head_address()
    uri = f"http://{host}:{port}"
    running = running_tracking_uri(state)
    if running == uri:
        return uri
    if running is not None:
        stop_mlflow(state)
    store = Path(store).expanduser().resolve()
    store.mkdir(parents=True, exist_ok=True)
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server",
        "--host", host, "--port", str(port), "--workers", str(workers),
        "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination", str(store / "artifacts"),
    ]  # fmt: skip
    log = store / "mlflow-server.log"
    with open(log, "ab") as out:
        # Its own session: it outlives the `ray up` SSH command that started it.
        server = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    _wait_ready(server, uri, log)
    path = state.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": server.pid, "uri": uri, "store": str(store)}) + "\n")
    return uri


def _wait_ready(server: subprocess.Popen, uri: str, log: Path) -> None:
    if healthy(server, uri, MLFLOW_READY_S):
        return
    if server.poll() is not None:
        tail = log.read_text(errors="replace")[-2000:]
        code = server.returncode
        raise ClusterError(f"mlflow server for {uri} exited with code {code}; {log}:\n{tail}")
    os.killpg(server.pid, signal.SIGTERM)
    raise ClusterError(f"mlflow server for {uri} did not answer within {MLFLOW_READY_S:.0f} s; see {log}")


def running_tracking_uri(state: Path = MLFLOW_STATE) -> str | None:
    """The URI of the MLflow server `start_mlflow` started on this machine, if it is still running."""
    recorded = _read_state(state)
    return recorded["uri"] if recorded and _alive(recorded["pid"]) else None


def stop_mlflow(state: Path = MLFLOW_STATE) -> bool:
    """Stop the server `start_mlflow` started (its whole process group); False when none runs."""
    recorded = _read_state(state)
    state.expanduser().unlink(missing_ok=True)
    if not recorded or not _alive(recorded["pid"]):
        return False
    os.killpg(recorded["pid"], signal.SIGTERM)
    deadline = time.monotonic() + 10
    while _alive(recorded["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(recorded["pid"]):
        os.killpg(recorded["pid"], signal.SIGKILL)
    return True


def _read_state(state: Path) -> dict[str, Any] | None:
    path = state.expanduser()
    return json.loads(path.read_text()) if path.is_file() else None


def _alive(pid: int) -> bool:
    # The pid must still be the mlflow server, not a process that reused its number.
    try:
        return b"mlflow" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
