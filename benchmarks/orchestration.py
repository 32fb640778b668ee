"""Orchestration overhead: the same epochs run plainly (`train_local`) vs inside TorchTrainer + MLflow.

plain: `trainers.entry.train_local` in this process (one torch thread), its report callback stamping
each epoch's end. ray: `semiseg.launch.train_distributed` with 1 worker on a private loopback Ray
cluster, logging every epoch to an MLflow run through `semiseg.tracking.EpochLogger` (what a grid
trial does); an epoch ends when rank 0 has reported it (checkpoint persisted), which a thread here
sees within 0.05 s as a new line of `ray_reports.jsonl`.
The steady per-epoch cost is (last stamp - first stamp) / (epochs - 1), so startup is not in it;
the fixed cost is the rest of the total. Repetitions alternate plain and ray.
Run from the repository root: `.venv/bin/python benchmarks/orchestration.py [--epochs 5 --reps 2]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from _machine import machine

from trainers.config import TrainConfig, load_config
from trainers.synth import ensure_generated

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "synthetic.yaml"

# Set before Ray starts: its processes inherit them. One thread per worker, as the plain run uses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@dataclass
class Timing:
    total_s: float
    stamps: list[float]
    """Seconds from the start of the run to the end of each epoch."""

    @property
    def epoch_s(self) -> float:
        """Steady per-epoch seconds: from the first epoch's end to the last's, per epoch."""
        return (self.stamps[-1] - self.stamps[0]) / (len(self.stamps) - 1)

    @property
    def fixed_s(self) -> float:
        """Everything that is not a steady epoch: startup, first-epoch warm-up, teardown."""
        return self.total_s - self.epoch_s * len(self.stamps)


def add_options(parser: argparse.ArgumentParser, out: str) -> None:
    """The data and schedule options orchestration.py and scaling.py share."""
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--reps", type=int, default=2, help="alternating repetitions of each mode")
    parser.add_argument("--method", default="mspl")
    parser.add_argument("--split", default="1_4")
    parser.add_argument("--iters", type=int, default=30, help="iterations per epoch")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--out", type=Path, default=Path(out))


def config(args: argparse.Namespace, out_dir: Path) -> TrainConfig:
    """configs/synthetic.yaml on the generated data, with this benchmark's schedule, from scratch."""
    data = ensure_generated(args.out / "data", num_train=args.num_train, num_val=args.num_val, size=args.size)
    shutil.rmtree(out_dir, ignore_errors=True)
    overrides: dict[str, Any] = {
        "data": {"root": str(data), "split": args.split, "crop_size": args.crop, "num_workers": 0},
        "method": {"name": args.method},
        "optim": {"epochs": args.epochs, "batch_size": args.batch, "max_iters_per_epoch": args.iters},
        "out_dir": str(out_dir),
    }
    return load_config(BASE_CONFIG, overrides)


def run_plain(cfg: TrainConfig) -> Timing:
    """Train in this process; an epoch ends when its report arrives."""
    from trainers.entry import train_local

    stamps: list[float] = []
    start = time.perf_counter()
    train_local(cfg, report=lambda metrics, path: stamps.append(time.perf_counter() - start), progress=False)
    return Timing(time.perf_counter() - start, stamps)


class Tracker:
    """One MLflow experiment in a local sqlite store, with a parent run for this benchmark."""

    def __init__(self, folder: Path) -> None:
        from semiseg import tracking

        folder = folder.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{folder / 'mlflow.db'}"
        self.client = tracking.client(self.uri)
        self.experiment = tracking.ensure_experiment(
            self.client, "benchmarks", tracking.artifact_root(self.uri, folder)
        )
        self.parent = tracking.start_parent(self.client, self.experiment, "orchestration", {})

    def child(self, key: str, cfg: TrainConfig) -> str:
        from semiseg import tracking

        return tracking.open_child(
            self.client, self.experiment, self.parent, key, {}, tracking.flatten(cfg.to_dict())
        )


class ReportWatcher(threading.Thread):
    """Stamps each new line rank 0 appends to `<out_dir>/ray_reports.jsonl` (one per reported epoch)."""

    def __init__(self, out_dir: Path, start: float) -> None:
        super().__init__(daemon=True)
        self.path, self.start_time, self.stamps = out_dir / "ray_reports.jsonl", start, []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            lines = self.path.read_text().count("\n") if self.path.exists() else 0
            now = time.perf_counter() - self.start_time
            self.stamps.extend([now] * (lines - len(self.stamps)))


def run_ray(cfg: TrainConfig, workers: int, tracker: Tracker, key: str, use_gpu: bool = False) -> Timing:
    """Train through TorchTrainer on `workers` workers, logging every epoch to MLflow as a grid trial does."""
    from semiseg import launch, tracking

    run_id = tracker.child(key, cfg)
    start = time.perf_counter()
    watcher = ReportWatcher(Path(cfg.out_dir), start)
    watcher.start()
    launch.train_distributed(
        cfg,
        workers,
        use_gpu=use_gpu,
        storage_path=str(Path(cfg.out_dir).parent / "ray-storage"),
        name=key,
        callbacks=[tracking.EpochLogger(tracker.uri, run_id)],
    )
    total = time.perf_counter() - start
    watcher.done.set()
    watcher.join()
    tracking.finish(tracker.client, run_id)
    logged = len(tracker.client.get_metric_history(run_id, "epoch"))
    if logged != cfg.optim.epochs or len(watcher.stamps) != cfg.optim.epochs:
        raise RuntimeError(
            f"{key}: {logged} epochs in MLflow, {len(watcher.stamps)} reported; expected {cfg.optim.epochs}"
        )
    return Timing(total, watcher.stamps)


def start_ray(num_cpus: int | None = None) -> float:
    """Start a private loopback Ray cluster; returns the seconds it took."""
    from semiseg import ray_local

    start = time.perf_counter()
    ray_local.start_local(num_cpus=num_cpus)
    return time.perf_counter() - start


def describe(args: argparse.Namespace) -> str:
    return (
        f"- {args.method} on synthetic data ({args.num_train} train images of {args.size} px, split "
        f"{args.split}), tiny backbone, crop {args.crop}, batch {args.batch}, {args.iters} iterations + "
        f"val ({args.num_val} images) per epoch, {args.epochs} epochs, checkpoints every epoch\n"
        f"- {args.reps} alternating repetitions per mode; loader in-process (num_workers 0); one torch "
        f"thread per process; {machine()}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_options(parser, "runs/bench/orchestration")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("# Orchestration: plain train_local vs TorchTrainer (1 worker) + MLflow\n")
    print(describe(args))
    cluster_s = start_ray(num_cpus=2)
    print(f"- Ray cluster start (once per session, not in the rows below): {cluster_s:.1f} s\n")
    tracker = Tracker(args.out / "mlflow")
    timings: dict[str, list[Timing]] = {"plain": [], "ray": []}
    print("| rep | mode | total s | steady s/epoch | fixed s |")
    print("|---|---|---|---|---|")
    for rep in range(args.reps):
        for mode in ("plain", "ray"):
            cfg = config(args, args.out / "runs" / f"{mode}-{rep}")
            t = run_plain(cfg) if mode == "plain" else run_ray(cfg, 1, tracker, f"ray-{rep}-{time.time_ns()}")
            timings[mode].append(t)
            print(f"| {rep} | {mode} | {t.total_s:.1f} | {t.epoch_s:.2f} | {t.fixed_s:.1f} |", flush=True)
    plain = statistics.median(t.epoch_s for t in timings["plain"])
    ray = statistics.median(t.epoch_s for t in timings["ray"])
    fixed = statistics.median(t.fixed_s for t in timings["ray"]) - statistics.median(
        t.fixed_s for t in timings["plain"]
    )
    per_rep = ", ".join(
        f"{100 * (r.epoch_s / p.epoch_s - 1):+.1f} %"
        for p, r in zip(timings["plain"], timings["ray"], strict=True)
    )
    overhead = f"**Per-epoch overhead of TorchTrainer + MLflow: {100 * (ray / plain - 1):+.1f} %**"
    steady = f"median steady epoch {ray:.2f} s vs {plain:.2f} s; per repetition {per_rep}"
    print(f"\n{overhead} ({steady}); target <= 3 %.")
    print(
        f"\nFixed cost per run on top of plain (worker group start, process group, checkpoint upload of the "
        f"last epoch, teardown): {fixed:+.1f} s; plus {cluster_s:.1f} s to start the cluster once."
    )


if __name__ == "__main__":
    main()
