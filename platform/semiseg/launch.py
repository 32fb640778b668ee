"""Run the trainer on 1..N Ray Train workers (TorchTrainer): gloo on CPU, NCCL + SyncBatchNorm on GPU.

Each worker runs `train_worker`, which calls the plain-PyTorch `trainers.loop.fit`; Ray sets up the
process group, and `fit` reads rank and world size from it. Every epoch rank 0's `latest.pth` is
reported as a Ray checkpoint, so a restarted worker group (or the same launch run again) resumes from
`ray.train.get_checkpoint()`.

Storage: checkpoints and run state go to `<storage_path>/<name>`, by default `<out_dir>/ray` on this
machine. On several nodes every worker must reach that path: pass shared storage (an NFS mount present
at the same path on all nodes, or a URI such as s3://bucket/runs).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from trainers import checkpoint as ckpt
from trainers import resume
from trainers.config import ConfigError, TrainConfig, from_dict
from trainers.entry import train
from trainers.errors import USER_ERRORS, CheckpointError
from trainers.loop import Reporter, preflight
from trainers.network import build_network

WORKER_CPUS = 0.99
"""CPUs each CPU worker asks for: a whole core each, less a sliver for a Tune trial's driver function."""

log = logging.getLogger(__name__)

REPORTS = "ray_reports.jsonl"
"""Rank 0 appends each epoch's metrics and its pid/node once reported, across restarts: what a fault cost."""


RUN_LOG = "run.log"
"""In `<out_dir>`: what every worker of the run (and, in a grid, the trial's driver function) logged,
appended across restarts. The console shows none of it unless asked (`semiseg grid --verbose`)."""


class LaunchError(RuntimeError):
    """The run cannot start as asked (placement, GPU, storage); raised before any worker starts."""


def train_distributed(
    cfg: TrainConfig,
    workers: int,
    use_gpu: bool = False,
    storage_path: str | None = None,
    name: str | None = None,
    max_failures: int = 2,
    callbacks: list[Any] | None = None,
    cpus_per_worker: float = WORKER_CPUS,
    restart: bool = False,
    force_resume: bool = False,
) -> Result:
    """Train `cfg` on `workers` DDP workers through TorchTrainer, resuming from the run's latest checkpoint.

    Needs a connected Ray cluster (`semiseg.ray_local.connect`). Relative paths in `cfg` are taken
    from this process's working directory. `callbacks` go to RunConfig (e.g. a Tune trial's
    `TuneReportCallback()`). `restart` and `force_resume` as in `trainers.resume.prepare`.
    """
    cfg = absolute_paths(cfg)
    storage = storage_path or str(Path(cfg.out_dir) / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())  # Ray reads a relative path as a URI without a scheme
    check_placement(workers, use_gpu, cpus_per_worker)
    # Here, not in the workers: a refused resume or a bad file is one error, not a worker group retried.
    resume.prepare(cfg, restart, force_resume)
    preflight(cfg, workers)
    build_network(cfg)  # loads model.pretrained: a weights file that does not fit fails here too
    check_storage(storage)
    trainer = InterruptibleTrainer(
        train_worker,
        train_loop_config={"config": cfg.to_dict(), "force_resume": force_resume},
        torch_config=torch_config(cfg, use_gpu),
        scaling_config=scaling_config(workers, use_gpu, cpus_per_worker),
        run_config=RunConfig(
            name=name or run_name(cfg),
            storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=checkpoint_config(),
            callbacks=callbacks,
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:
        error = worker_error(exc)
        if error is None:
            raise
        raise error from None
    if trainer.interrupted:
        # Ray aborted the run gracefully and fit() returned: to the caller it is still a Ctrl-C.
        raise KeyboardInterrupt
    return result


def worker_error(exc: BaseException) -> Exception | None:
    """Of a run whose workers failed, the lowest failed rank's own error when it is one of USER_ERRORS (a
    file only decoded mid-epoch, a diverged run), unwrapped from Ray's RayTaskError when Ray wrapped it."""
    failures = getattr(exc, "worker_failures", None) or {}
    if not failures:
        return None
    first = failures[min(failures)]
    cause = getattr(first, "cause", None) or first
    return cause if isinstance(cause, USER_ERRORS) else None


class InterruptibleTrainer(TorchTrainer):
    """TorchTrainer whose Ctrl-C reaches the caller as KeyboardInterrupt, after Ray's graceful abort.

    Ray Train's own SIGINT handler aborts the run, then returns or calls sys.exit(0), which the process
    turned into exit 1 with no message. Here the handler is wrapped: Ray still aborts the run; the
    caller (`semiseg train`: exit 130, "run the same command again to resume") is told."""

    interrupted = False

    def _register_sigint_handler(self, controller: Any) -> None:
        super()._register_sigint_handler(controller)
        ray_handler = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            self.interrupted = True
            try:
                ray_handler(signum, frame)
            except SystemExit:
                raise KeyboardInterrupt from None

        signal.signal(signal.SIGINT, handler)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its paths made absolute here: Ray workers run in a working directory of their own."""

    def absolute(path: str | None) -> str | None:
        return None if path is None else str(Path(path).resolve())

    data = replace(
        cfg.data,
        root=absolute(cfg.data.root),
        split_dir=absolute(cfg.data.split_dir),
        val_list=absolute(cfg.data.val_list),
    )
    model = replace(cfg.model, pretrained=absolute(cfg.model.pretrained))
    return replace(cfg, data=data, model=model, out_dir=absolute(cfg.out_dir))


def torch_config(cfg: TrainConfig, use_gpu: bool) -> TorchConfig:
    """NCCL on GPU, gloo on CPU; collectives fail after `dist.timeout_s` instead of torch's 30 minutes."""
    return TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=cfg.dist.timeout_s)


def scaling_config(workers: int, use_gpu: bool, cpus_per_worker: float = WORKER_CPUS) -> ScalingConfig:
    """One GPU per worker on GPU; otherwise `cpus_per_worker` CPUs, so N workers fit on N cores."""
    resources = {"GPU": 1.0} if use_gpu else {"CPU": cpus_per_worker}
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources)


def checkpoint_config() -> CheckpointConfig:
    """Keep the best checkpoint by val mIoU and the latest one.

    Ray keeps the `num_to_keep` best-scoring checkpoints and never deletes the latest, so
    num_to_keep=1 scored by mIoU leaves exactly best + latest (one folder when they coincide).
    """
    return CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="miou", checkpoint_score_order="max")


def run_name(cfg: TrainConfig) -> str:
    """A name fixed by the (absolute) out_dir, so the same launch run again finds its checkpoints."""
    out_dir = Path(cfg.out_dir).resolve()
    return f"{out_dir.name}-{hashlib.sha1(str(out_dir).encode()).hexdigest()[:8]}"


def placeable_workers(use_gpu: bool, cpus_per_worker: float = WORKER_CPUS) -> int:
    """How many workers of this shape the live nodes of the cluster can hold at once."""
    total = 0
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        resources = node["Resources"]
        if use_gpu:
            total += int(resources.get("GPU", 0.0))
        else:
            # Rounded so that 2 x 0.99 fits on 2.0 despite float error.
            total += int(round(resources.get("CPU", 0.0) / cpus_per_worker, 6))
    return total


def check_placement(workers: int, use_gpu: bool, cpus_per_worker: float = WORKER_CPUS) -> None:
    """Fail before starting workers if the cluster has no GPU or cannot place `workers` workers."""
    if workers < 1:
        raise LaunchError(f"workers: expected >= 1, got {workers}")
    resources = ray.cluster_resources()
    if use_gpu and resources.get("GPU", 0.0) < 1:
        raise LaunchError(
            f"--gpu: the Ray cluster has no GPU (its resources: CPU {resources.get('CPU', 0.0):g}, "
            f"GPU 0); drop --gpu to train on CPU with gloo"
        )
    fits = placeable_workers(use_gpu, cpus_per_worker)
    if workers > fits:
        shape = "1 GPU" if use_gpu else f"{cpus_per_worker:g} CPU"
        raise LaunchError(
            f"workers: {workers} workers of {shape} each do not fit on the Ray cluster "
            f"(CPU {resources.get('CPU', 0.0):g}, GPU {resources.get('GPU', 0.0):g}: room for {fits}); "
            f"ask for at most {fits} or add nodes"
        )


def check_storage(storage: str) -> None:
    """Fail before starting workers if a local storage path cannot be created and written."""
    if "://" in storage:
        return
    try:
        ckpt.check_writable(Path(storage), "storage_path")
    except ConfigError as exc:
        raise LaunchError(str(exc)) from None


def train_worker(config: dict[str, Any]) -> dict[str, Any]:
    """What each Ray Train worker runs: the method's training, resumed from the run's checkpoint."""
    cfg, force = from_dict(TrainConfig, config["config"]), config.get("force_resume", False)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    with capture_logs(Path(cfg.out_dir) / RUN_LOG, f"rank {rank}"):
        # Which process is which rank, for whoever reads the log after a fault.
        log.info(
            "rank %d of %d is pid %d on %s", rank, context.get_world_size(), os.getpid(), socket.gethostname()
        )
        result = train(
            cfg,
            report=ray_reporter(Path(cfg.out_dir)),
            resume_state=resume_state(cfg, force),
            progress=False,
            force_resume=force,
        )
    return {"epochs_run": result.epochs_run, "best_miou": result.best_miou, "last_miou": result.last_miou}


@contextmanager
def capture_logs(path: Path, source: str) -> Iterator[None]:
    """Append this process's log records (root logger, Ray's and Ray Train's) to `path` while inside,
    each line naming `source`. Ray Train sends a worker's `print` to the root logger too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)  # append mode: several ranks, restarts and resumes share the file
    handler.setFormatter(logging.Formatter(f"%(asctime)s {source} %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)  # Ray Train's loggers pass DEBUG records on to their handlers
    root = logging.getLogger()
    # `ray` and Train's `ray.train` do not pass their records on to the root logger.
    loggers = [root] + [log for log in map(logging.getLogger, ("ray", "ray.train")) if not log.propagate]
    level = root.level
    root.setLevel(min(root.getEffectiveLevel(), logging.INFO))
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def resume_state(cfg: TrainConfig, force: bool = False) -> dict[str, Any] | None:
    """The run's latest Ray checkpoint; else (none, or it cannot be read) the newest good one of
    `<out_dir>` (latest.pth, else previous.pth, as in-process), else None; checked against `cfg`.

    Every rank reads the same files (Ray's storage and out_dir are shared by all nodes), so all ranks
    fall back alike and start from the same epoch."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return resume.resumable(cfg, force)
    try:
        with checkpoint.as_directory() as folder:
            path = Path(folder) / ckpt.LATEST
            state = ckpt.load(path)
    except (CheckpointError, OSError) as exc:
        log.warning(
            "Ray checkpoint %s cannot be read (%s); resuming from the newest good checkpoint of %s instead",
            checkpoint.path,
            exc,
            cfg.out_dir,
        )
        return resume.resumable(cfg, force)
    resume.check(state, cfg, path, force)
    return state


def ray_reporter(out_dir: Path) -> Reporter:
    """The `report` callback of `fit`: every rank reports the metrics; rank 0 adds its `latest.pth`."""

    def report(metrics: dict[str, float], checkpoint_file: Path | None) -> None:
        if checkpoint_file is None:
            ray.train.report(metrics)
            return
        # Logged before the report, not after: a stop between Ray registering the checkpoint and the log
        # line would leave a resumable epoch that no log shows. Logged but not registered, it is redone.
        _log_report(out_dir, metrics)
        # A folder next to latest.pth, so the files are hard-linked rather than copied before upload.
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ray-report-") as folder:
            for source in (checkpoint_file, checkpoint_file.with_suffix(".pth.sha256")):
                if source.exists():
                    _link_or_copy(source, Path(folder) / source.name)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    return report


def _log_report(out_dir: Path, metrics: dict[str, float]) -> None:
    where = {
        "world_size": ray.train.get_context().get_world_size(),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "node_ip": ray.util.get_node_ip_address(),
        "master_addr": os.environ.get("MASTER_ADDR"),
    }
    with open(out_dir / REPORTS, "a") as f:
        f.write(json.dumps({**metrics, **where}) + "\n")


def read_reports(out_dir: str | Path) -> list[dict[str, Any]]:
    """The lines rank 0 wrote to `<out_dir>/ray_reports.jsonl`, oldest first."""
    path = Path(out_dir) / REPORTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        target.write_bytes(source.read_bytes())
