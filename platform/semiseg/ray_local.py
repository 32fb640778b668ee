"""Connect to Ray: join the cluster at an address (or RAY_ADDRESS), else start a private one on loopback.

A private cluster stays on 127.0.0.1: Ray would otherwise advertise the machine's eth0 address and
gloo would rendezvous over it.
"""

from __future__ import annotations

import os

import ray
from ray._private import ray_constants

LOOPBACK = "127.0.0.1"

LOCAL_ENV = {
    # Lets a single-node cluster bind 127.0.0.1 instead of replacing it with the eth0 address.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # gloo picks the interface of the hostname (eth0) unless told otherwise.
    "GLOO_SOCKET_IFNAME": "lo",
    # The head would otherwise report usage to an outside host.
    "RAY_USAGE_STATS_ENABLED": "0",
    # A private loopback cluster needs no token; with one, `ray status` needs the token file.
    "RAY_AUTH_MODE": "disabled",
    # Nothing preempts a private node; the watcher is one more process per run, and the worker-pool warning
    # ("N PYTHON worker processes have been started") counts them.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


_quiet = False
"""Whether this process connected with `quiet` (see `shows_worker_logs`)."""


class RayClusterError(RuntimeError):
    """Ray could not be started or joined as asked."""


def connect(address: str | None = None, num_cpus: int | None = None, quiet: bool = False) -> str:
    """Join `address` (else $RAY_ADDRESS; "auto" finds a running local one), else start a private
    loopback cluster. Returns the cluster's GCS address. `quiet`: see `_init`."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return start_local(num_cpus, quiet)
    try:
        _init(quiet, address=address)
    except ConnectionError as exc:
        raise RayClusterError(f"cannot join the Ray cluster at {address!r}: {exc}") from exc
    return ray.get_runtime_context().gcs_address


def _init(quiet: bool, **options: object) -> None:
    """`ray.init`; `quiet` keeps the workers' output (it stays in Ray's session logs and each run's
    run.log) and Ray's own warnings off this process's console."""
    global _quiet
    ray.init(log_to_driver=not quiet, logging_level="ERROR" if quiet else "WARNING", **options)
    _quiet = quiet


def shows_worker_logs() -> bool:
    """Whether Ray prints the workers' output on this process's console (not after a `quiet` connect)."""
    return not _quiet


def start_local(num_cpus: int | None = None, quiet: bool = False) -> str:
    """Start a private single-node cluster bound to 127.0.0.1 and check that it is; returns its address."""
    # The raylet and every worker inherit this process's environment.
    os.environ.update(LOCAL_ENV)
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when imported, possibly before this call.
    ray_constants.ENABLE_RAY_CLUSTER = False
    _init(
        quiet,
        # "local": a new cluster even when another one runs on this machine (ray.init() would join it).
        address="local",
        _node_ip_address=LOOPBACK,
        num_cpus=num_cpus,
        include_dashboard=False,
    )
    addresses = node_addresses()
    if addresses != [LOOPBACK]:
        ray.shutdown()
        raise RayClusterError(f"local Ray cluster: expected one node on {LOOPBACK}, got {addresses}")
    return ray.get_runtime_context().gcs_address


def node_addresses() -> list[str]:
    """The IP address of every live node of the connected cluster."""
    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
