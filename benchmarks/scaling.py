"""Scaling: training images/s with 1 vs N Ray Train workers (CPU: gloo, one core each; GPU: one GPU each).

Each run is `semiseg.launch.train_distributed` with MLflow logging, as in orchestration.py; the
per-worker batch is kept (optim.lr_scaling: linear), so N workers train N times the images per
iteration. Reported: rank 0's `images_per_s` metric (training images of all workers per second of
the training loop, median over epochs after the first) and the end-to-end rate (all images of an
epoch, with evaluation and checkpointing, per steady epoch). Repetitions alternate the worker counts.
Run from the repository root: `.venv/bin/python benchmarks/scaling.py [--workers 1,2 --reps 2]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from orchestration import Tracker, add_options, config, describe, run_ray, start_ray
from semiseg.launch import read_reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_options(parser, "runs/bench/scaling")
    parser.add_argument(
        "--workers", default="1,2", help="worker counts to compare, the first is the baseline"
    )
    parser.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    print(f"# Scaling: images/s with {' vs '.join(map(str, counts))} Ray Train workers\n")
    print(describe(args))
    device = torch.cuda.get_device_name() if args.gpu else "CPU (gloo)"
    cluster_s = start_ray(num_cpus=None if args.gpu else max(counts))
    print(f"- workers on {device}; Ray cluster start {cluster_s:.1f} s (once)\n")
    tracker = Tracker(args.out / "mlflow")
    train_rate: dict[int, list[float]] = {n: [] for n in counts}
    epoch_rate: dict[int, list[float]] = {n: [] for n in counts}
    print("| rep | workers | global batch | train images/s (rank 0) | end-to-end images/s | steady s/epoch |")
    print("|---|---|---|---|---|---|")
    for rep in range(args.reps):
        for n in counts:
            cfg = config(args, args.out / "runs" / f"w{n}-{rep}")
            timing = run_ray(cfg, n, tracker, f"scaling-w{n}-{rep}-{time.time_ns()}", use_gpu=args.gpu)
            reports = read_reports(cfg.out_dir)[1:]
            rate = statistics.median(r["images_per_s"] for r in reports)
            images = args.iters * args.batch * n * (1 if args.method == "supervised" else 2)
            train_rate[n].append(rate)
            epoch_rate[n].append(images / timing.epoch_s)
            print(
                f"| {rep} | {n} | {args.batch * n} | {rate:.2f} | {images / timing.epoch_s:.2f} | "
                f"{timing.epoch_s:.2f} |",
                flush=True,
            )
    base = counts[0]
    print()
    for n in counts[1:]:
        train = statistics.median(train_rate[n]) / statistics.median(train_rate[base])
        end = statistics.median(epoch_rate[n]) / statistics.median(epoch_rate[base])
        print(
            f"**{n} vs {base} workers: {train:.2f}× training images/s, {end:.2f}× end to end** "
            f"(ideal {n / base:.0f}×)."
        )


if __name__ == "__main__":
    main()
