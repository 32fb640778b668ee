"""Shared fixtures: a tiny generated synthetic dataset, a tiny training config, a private loopback Ray."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from trainers.config import TrainConfig, from_dict, merge
from trainers.synth import generate

SYNTH_CLASSES = 3
IDLE_WAIT_S = 60
WARNED = re.compile(r"[Mm]emory|[Dd]isk|full")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Torch on one thread: two threads on two shared cores spin against each other on tiny forwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 train + 4 val images of 40 px, 3 classes; split 1_4 has 4 labeled and 12 unlabeled."""
    return generate(tmp_path_factory.mktemp("synthetic"), 16, 4, 40, SYNTH_CLASSES, 0)


@pytest.fixture(scope="session")
def make_tiny_config(synthetic_root: Path) -> Callable[..., TrainConfig]:
    """Builds a seconds-long config on `synthetic_root` writing to `out_dir`; kwargs override it."""

    def make(out_dir: Path, **overrides: Any) -> TrainConfig:
        base = {
            "data": {
                "dataset": "synthetic",
                "root": str(synthetic_root),
                "split": "1_4",
                "crop_size": 32,
                "num_workers": 0,
                "num_classes": SYNTH_CLASSES,
            },
            "model": {"backbone": "tiny"},
            "method": {"name": "supervised"},
            "optim": {"epochs": 2, "batch_size": 2, "lr": 0.01, "max_iters_per_epoch": 2},
            "out_dir": str(out_dir),
            "log_interval": 1,
        }
        return from_dict(TrainConfig, merge(base, overrides))

    return make


@pytest.fixture
def tiny_config(make_tiny_config: Callable[..., TrainConfig], tmp_path: Path) -> Callable[..., TrainConfig]:
    """`make_tiny_config` writing to tmp_path/run."""
    return lambda **overrides: make_tiny_config(tmp_path / "run", **overrides)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A private 2-CPU Ray cluster on 127.0.0.1 for the test module; yields its address.

    One per module, not per session: whatever a module leaves in its cluster (actors, placement groups,
    a driver's state) cannot reach the next module, for ~5 s of start-up each."""
    import ray
    from semiseg import ray_local

    # A report waits for the controller's poll, 2 s by default: most of a tiny test epoch.
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.25"
    address = ray_local.start_local(num_cpus=2)
    yield address
    ray.shutdown()


@pytest.fixture(autouse=True)
def ray_cluster_idle(request: pytest.FixtureRequest) -> None:
    """A test on the module's cluster starts with every CPU free: Ray Train waits for its workers' CPUs
    without end, so a leftover of an earlier test would hang the test instead of failing it."""
    if "ray_cluster" not in request.fixturenames:
        return
    import ray

    deadline = time.monotonic() + IDLE_WAIT_S
    while ray.available_resources().get("CPU", 0.0) < ray.cluster_resources().get("CPU", 0.0):
        if time.monotonic() > deadline:
            pytest.fail(f"the test module's Ray cluster still has busy CPUs after {IDLE_WAIT_S} s")
        time.sleep(0.2)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed test on a test Ray cluster reports the cluster's and the machine's state with it."""
    report = yield
    if report.failed and "ray_cluster" in getattr(item, "fixturenames", ()):
        report.sections.append(("ray cluster and machine state", ray_state()))
    return report


def ray_state() -> str:
    """Resources, live actors, memory, disk, the largest processes and the raylet's last errors."""
    import shutil
    import tempfile

    import psutil
    import ray
    from ray._private import state

    if not ray.is_initialized():
        return "Ray is not initialized in this process"
    lines = [f"resources: {ray.cluster_resources()}", f"available: {ray.available_resources()}"]
    for actor in state.actors().values():
        if actor["State"] != "DEAD":
            name, pid, job = actor["ActorClassName"], actor["Pid"], actor["JobID"]
            lines.append(f"actor {name} {actor['State']} pid {pid} job {job}")
    memory, tmp = psutil.virtual_memory(), tempfile.gettempdir()
    disk = shutil.disk_usage(tmp)
    lines.append(f"memory: {memory.available / 2**30:.1f} of {memory.total / 2**30:.1f} GiB available")
    lines.append(f"disk {tmp}: {disk.free / 2**30:.1f} of {disk.total / 2**30:.0f} GiB free")
    processes = sorted(psutil.process_iter(["pid", "memory_info", "cmdline"]), key=_rss, reverse=True)
    for process in processes[:8]:
        command = " ".join(process.info["cmdline"] or [])[:120].rstrip()
        lines.append(f"pid {process.info['pid']} rss {_rss(process) / 2**20:.0f} MiB: {command}")
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for log in [p for p in (logs / "raylet.out", logs / "gcs_server.out") if p.exists()]:
        # Errors, and warnings of the memory monitor (killed workers) and the disk monitor (disk full).
        errors = [
            line
            for line in log.read_text(errors="replace").splitlines()
            if re.match(r"\[\S+ \S+ E ", line) or (re.match(r"\[\S+ \S+ W ", line) and WARNED.search(line))
        ]
        lines += [f"{log.name}: {line[:300]}" for line in errors[-10:]]
    return "\n".join(lines)


def _rss(process: Any) -> int:
    info = process.info.get("memory_info")
    return info.rss if info else 0


@pytest.fixture(scope="session")
def learn_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images for a tiny model to learn something in a few CPU seconds."""
    return generate(tmp_path_factory.mktemp("learn"), 64, 16, 48, SYNTH_CLASSES, 1)


@pytest.fixture(scope="session")
def learn_chance(learn_root: Path) -> float:
    """Val mIoU of predicting background everywhere on `learn_root`: the bar a learned model must clear."""
    import numpy as np
    import torch

    from trainers.datasets import load_mask, read_list
    from trainers.evaluate import intersection_union, miou

    inter = union = 0
    for pair in read_list(learn_root / "splits" / "val.txt"):
        mask = torch.from_numpy(np.array(load_mask(learn_root / pair.mask))).long()
        i, u = intersection_union(torch.zeros_like(mask), mask, SYNTH_CLASSES, 255)
        inter, union = inter + i, union + u
    return miou(inter, union)[0]


@pytest.fixture
def learn_config(make_tiny_config: Callable[..., TrainConfig], learn_root: Path, tmp_path: Path) -> Callable:
    """A 2-epoch run of `method` (the `method:` section) on `learn_root`, long enough for U2PL's and PS-MT's
    teachers to score differently from the student; contiguous tensors, as offline evaluation runs them."""

    def make(**method: Any) -> TrainConfig:
        return make_tiny_config(
            tmp_path / "run",
            data={"root": str(learn_root), "split": "full", "crop_size": 32},
            method=method,
            optim={"epochs": 2, "batch_size": 4, "lr": 0.02, "lr_multi": 1.0, "max_iters_per_epoch": 4},
            fast={"channels_last": False},
        )

    return make


@pytest.fixture(scope="session")
def val_miou() -> Callable[[TrainConfig, Any], float]:
    """mIoU of a network on `cfg`'s val list, through the loop's own val loader (one process)."""
    from trainers import dist
    from trainers.data import val_loader
    from trainers.datasets import dataset_spec, resolve_split
    from trainers.evaluate import evaluate

    def score(cfg: TrainConfig, net: Any) -> float:
        spec = dataset_spec(cfg.data)
        loader = val_loader(cfg, resolve_split(cfg.data), dist.context(), cfg.fast.decode)
        return evaluate(
            net, loader, spec.eval_mode, cfg.data.crop_size, spec.num_classes, spec.ignore_index
        ).miou

    return score
