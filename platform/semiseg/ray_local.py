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
}


class RayClusterError(RuntimeError):
    """Ray could not be started or joined as asked."""


def connect(address: str | None = None, num_cpus: int | None = None) -> str:
    """Join `address` (else $RAY_ADDRESS; "auto" finds a running local one), else start a private
    loopback cluster. Returns the cluster's GCS address."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return start_local(num_cpus)
    try:
        ray.init(address=address, logging_level="WARNING")
    except ConnectionError as exc:
        raise RayClusterError(f"cannot join the Ray cluster at {address!r}: {exc}") from exc
    return ray.get_runtime_context().gcs_address


def start_local(num_cpus: int | None = None) -> str:
    """Start a private single-node cluster bound to 127.0.0.1 and check that it is; returns its address."""
    # The raylet and every worker inherit this process's environment.
    os.environ.update(LOCAL_ENV)
    # Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when imported, possibly before this call.
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        # "local": a new cluster even when another one runs on this machine (ray.init() would join it).
        address="local",
        _node_ip_address=LOOPBACK,
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level="WARNING",
    )
    addresses = node_addresses()
    if addresses != [LOOPBACK]:
        ray.shutdown()
        raise RayClusterError(f"local Ray cluster: expected one node on {LOOPBACK}, got {addresses}")
    return ray.get_runtime_context().gcs_address


def node_addresses() -> list[str]:
    """The IP address of every live node of the connected cluster."""
    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
