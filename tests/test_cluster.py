"""cluster.yaml and the Ray cluster launcher, for real: `ray up`, `ray submit ... grid`, `ray down` against a
private sshd on 127.0.0.1 that plays the head node.

The sshd runs in its own PID namespace (`unshare --pid`): `ray stop`, which the head start commands and
`ray down` run, kills every Ray process it can see, and must not reach other Ray clusters on this machine.
Killing the namespace at the end also ends whatever the head left running. Needs, from apt:
openssh-server, netcat-openbsd, rsync (and util-linux's unshare, with root).
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from ray._private.authentication.authentication_token_generator import generate_new_authentication_token
from semiseg import launch, ray_local, tracking
from semiseg.cluster import HINTS, Finding, check_cluster, head_address
from semiseg.grid import load_grid

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
"""The venv of this test: on the test's head node it plays the one setup_commands install."""
TOOLS = {
    "/usr/sbin/sshd": "openssh-server",
    "nc": "netcat-openbsd",
    "rsync": "rsync",
    "unshare": "util-linux",
}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_shipped_cluster_yaml_names_every_value_to_set():
    findings = {f.key: f for f in check_cluster(REPO / "cluster.yaml")}
    for key in ("provider.head_ip", "provider.worker_ips[0]", "auth.ssh_user"):
        assert findings[key].blocking and "REPLACE_ME: set" in findings[key].message
    assert not [f for f in findings.values() if f.key == "schema"]


def test_schema_and_empty_values_are_one_line_each(tmp_path):
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["provider"].update(head_ip="", worker_ips=[])
    config["auth"] = {"ssh_user": "me", "ssh_private_key": str(tmp_path / "absent_key"), "ssh_port": 2222}
    config["file_mounts"] = {}
    found = check_cluster(write_yaml(tmp_path / "c.yaml", config))
    assert Finding("provider.head_ip", f"empty: set {HINTS['provider.head_ip']}") in found
    assert Finding("provider.worker_ips", "empty: the head is the only node", blocking=False) in found
    (key,) = [f for f in found if f.key == "auth.ssh_private_key"]
    assert key.message.startswith(f"{tmp_path}/absent_key not found")
    unknown = "auth: Additional properties are not allowed ('ssh_port' was unexpected)"
    assert Finding("schema", unknown) in found
    assert all("\n" not in str(f) for f in found)


def test_node_types_are_a_schema_problem_for_the_local_provider(tmp_path):
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"] = {"gpu": {"node_config": {}, "resources": {"GPU": 8}}}
    found = check_cluster(write_yaml(tmp_path / "c.yaml", config))
    message = "The field available_node_types is not supported for on-premise clusters."
    assert Finding("schema", message) in found


def test_head_address_comes_from_the_config_ray_up_copied(tmp_path):
    config = {"provider": {"type": "local", "head_ip": "localhost"}}
    path = write_yaml(tmp_path / "ray_bootstrap_config.yaml", config)
    assert head_address(path) == "127.0.0.1"


@dataclass
class Node:
    port: int
    key: Path
    home: Path
    """The head's HOME (sshd sets it), so the test leaves the real home untouched."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def loopback_head(tmp_path: Path) -> Iterator[Node]:
    """A private sshd on 127.0.0.1 in its own PID namespace, with its own host key and authorized key."""
    missing = [f"{tool} (apt: {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the launcher test needs {', '.join(missing)}")
    ssh = tmp_path / "ssh"
    ssh.mkdir()
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", ssh / name], check=True)
    shutil.copy(ssh / "user_key.pub", ssh / "authorized_keys")
    node = Node(free_port(), ssh / "user_key", tmp_path / "home")
    node.home.mkdir()
    config = f"""ListenAddress 127.0.0.1
Port {node.port}
HostKey {ssh / "host_key"}
AuthorizedKeysFile {ssh / "authorized_keys"}
PidFile {ssh / "sshd.pid"}
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers {os.environ.get("USER", "root")}
StrictModes no
SetEnv HOME={node.home}
"""
    (ssh / "sshd_config").write_text(config)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    log = ssh / "sshd.log"
    command = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    command += ["/usr/sbin/sshd", "-D", "-e", "-f", str(ssh / "sshd_config")]
    with open(log, "w") as out:
        sshd = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not listening(node.port):
            if sshd.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the private sshd did not start on 127.0.0.1:{node.port}: {log.read_text()}")
            time.sleep(0.1)
        yield node
    finally:
        # --kill-child: the namespace's init dies with unshare, and every process of the head with it.
        sshd.kill()
        sshd.wait()


def test_cluster_launcher_up_submit_grid_down(loopback_head: Node, tmp_path: Path):
    ports = {name: free_port() for name in ("gcs", "client", "agent", "mlflow")}
    cluster = write_yaml(tmp_path / "cluster.yaml", cluster_config_for_test(loopback_head, tmp_path, ports))
    assert all(not f.blocking for f in check_cluster(cluster))
    grid_file = write_yaml(tmp_path / "grid.yaml", tiny_grid(tmp_path))
    ray = str(BIN / "ray")
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}

    def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
        start = time.monotonic()
        done = subprocess.run([ray, *args], env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"ray {' '.join(args)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        print(f"ray {args[0]}: {time.monotonic() - start:.1f} s")
        return done

    down = ("down", "-y", str(cluster))
    try:
        run("up", "-y", "--no-config-cache", str(cluster), timeout=300)
        uri = f"http://127.0.0.1:{ports['mlflow']}"
        assert listening(ports["gcs"]) and listening(ports["mlflow"])

        entry = str(REPO / "platform" / "semiseg" / "submit_entry.py")
        done = run("submit", "--no-config-cache", str(cluster), entry, "grid", str(grid_file), timeout=600)
        assert f"Ray auto, MLflow {uri}" in done.stdout
        assert "| best epoch | 1_4 (4 labels) |" in done.stdout
        grid = load_grid(grid_file)
        assert (grid.storage / "table" / "table.md").is_file()
        # Training ran on loopback: the Ray Train workers' rendezvous address.
        trial = grid.trials[0]
        assert {r["master_addr"] for r in launch.read_reports(trial.config.out_dir)} == {"127.0.0.1"}

        # The runs are in the head's MLflow server, not in a local store.
        assert not (grid.storage / "mlflow.db").exists()
        mlflow = tracking.client(uri)
        experiment = mlflow.get_experiment_by_name("cluster-test").experiment_id
        (parent,) = mlflow.search_runs([experiment], filter_string=f"tags.`{tracking.ROLE_TAG}` = 'grid'")
        assert parent.info.status == "FINISHED"
        (child,) = tracking.child_runs(mlflow, experiment, parent.info.run_id)
        assert child.info.status == "FINISHED" and child.data.tags[tracking.TRIAL_TAG] == trial.key
        assert [step for step, _ in tracking.history(mlflow, child.info.run_id, "miou")] == [0]
        assert {a.path for a in mlflow.list_artifacts(parent.info.run_id, "table")} >= {"table/table.md"}

        run("exec", "--no-config-cache", str(cluster), "semiseg cluster mlflow --stop", timeout=120)
        assert not listening(ports["mlflow"])
        run(*down, timeout=120)
        down = ()
        assert not listening(ports["gcs"])
    finally:
        if down:
            subprocess.run([ray, *down], env=env, cwd=tmp_path, capture_output=True, timeout=120)
        remove_launcher_files(yaml.safe_load(cluster.read_text())["cluster_name"])


def remove_launcher_files(name: str) -> None:
    """The launcher's node state and lock, the config `ray down` caches, and the SSH control sockets
    (paths as Ray names them)."""
    for suffix in ("state", "lock"):
        Path(f"/tmp/ray/cluster-{name}.{suffix}").unlink(missing_ok=True)
    for cached in Path(tempfile.gettempdir()).glob("ray-config-*"):
        if f'"cluster_name": "{name}"' in cached.read_text(errors="replace"):
            cached.unlink()
    user, cluster = (hashlib.sha256(s.encode()).hexdigest()[:10] for s in (getpass.getuser(), name))
    shutil.rmtree(f"/tmp/ray_ssh_{user}/{cluster}", ignore_errors=True)


def cluster_config_for_test(node: Node, tmp_path: Path, ports: dict[str, int]) -> dict:
    """cluster.yaml with test values: this head over the private sshd, no workers, the test's venv
    instead of a fresh one, free ports, Ray kept on loopback, no dashboard."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["cluster_name"] = f"semiseg-test-{os.getpid()}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {
        "ssh_user": os.environ.get("USER", "root"),
        "ssh_private_key": str(node.key),
        "ssh_proxy_command": f"nc 127.0.0.1 {node.port}",
    }
    token = tmp_path / "auth_token"
    token.write_text(generate_new_authentication_token())
    config["file_mounts"] = {
        remote: str(token) if remote.endswith("auth_token") else str(REPO / local)
        for remote, local in config["file_mounts"].items()
    }
    loopback = {k: v for k, v in ray_local.LOCAL_ENV.items() if k != "RAY_AUTH_MODE"}
    loopback["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    exports = " ".join(f"{k}={v}" for k, v in loopback.items())
    config["setup_commands"] = [f"echo 'export PATH={BIN}:$PATH {exports}' >> ~/.bashrc"]
    flags = f"--port={ports['gcs']} --include-dashboard=false --ray-client-server-port={ports['client']} "
    flags += f"--dashboard-agent-listen-port={ports['agent']}"
    head = [
        c.replace("--port=6379", flags).replace("--port 5000", f"--port {ports['mlflow']}")
        for c in config["head_start_ray_commands"]
    ]
    assert head != config["head_start_ray_commands"] and len(head) == 3, "cluster.yaml's head commands moved"
    config["head_start_ray_commands"] = head
    return config


def tiny_grid(tmp_path: Path) -> dict:
    """One trial: supervised on a 16-image synthetic set, 1 epoch of 2 steps at 33 px, one CPU worker."""
    return {
        "name": "cluster-test",
        "synth": {"num_train": 16, "num_val": 4, "size": 33, "num_classes": 3, "seed": 0},
        "base": {
            "data": {
                "dataset": "synthetic",
                "root": str(tmp_path / "data"),
                "crop_size": 33,
                "num_workers": 0,
                "num_classes": 3,
            },  # fmt: skip
            "model": {"backbone": "tiny"},
            "optim": {
                "epochs": 1,
                "batch_size": 2,
                "lr": 0.01,
                "lr_multi": 1.0,
                "reference_global_batch": 2,
                "max_iters_per_epoch": 2,
            },  # fmt: skip
            "log_interval": 1,
        },
        "axes": {"method": ["supervised"], "split": ["1_4"]},
        "workers": 1,
        "storage": str(tmp_path / "runs"),
    }
