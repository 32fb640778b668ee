"""Shared by the synthetic-data benchmarks: generate the data once, train (method, split, seed) runs
with `trainers.entry.train_local` (in this process, or in `--jobs` worker processes), and print a
mean ± std table.

Every run starts from `configs/synthetic.yaml` with the command line's overrides, so all methods of
one benchmark share the schedule, batch, learning rate and threshold; only method, split and seed vary.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import synth_alt
import torch
import yaml
from _machine import machine

from trainers.config import TrainConfig, load_config
from trainers.data import steps_per_epoch
from trainers.datasets import resolve_split
from trainers.entry import train_local
from trainers.synth import ensure_generated, render

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "configs" / "synthetic.yaml"

# The defaults both benchmarks share, chosen in the investigation recorded in benchmarks/README.md:
# with 4 classes and ~1,100 steps the tiny backbone learns the task from all labels (about 50 mIoU)
# inside the CPU budget; with 6 classes it stays near 20-35 mIoU, too weak to show any gap.
DEFAULT_EPOCHS = 24
DEFAULT_CLASSES = 4
DEFAULT_LR = 0.02


@dataclass(frozen=True)
class RunSpec:
    method: str
    split: str
    seed: int


@dataclass
class RunResult:
    spec: RunSpec
    best_miou: float
    last_miou: float
    mask_ratio: float | None
    """Share of valid unlabeled pixels above the threshold, averaged over the last epoch."""
    wall_s: float
    cpu_s: float
    iterations: int
    history: list[dict[str, float]] = field(default_factory=list)
    """Per epoch: miou, loss terms, mask_ratio (where logged), lr, per-class IoU."""


def add_options(parser: argparse.ArgumentParser, seeds: str, name: str) -> None:
    """The options both benchmarks share; `seeds` is the script's default; output: runs/bench/<name>."""
    add = parser.add_argument
    add("--seeds", default=seeds, help="comma-separated training seeds")
    add("--epochs", type=int, default=DEFAULT_EPOCHS, help="epochs per run (one pass over unlabeled each)")
    add("--size", type=int, default=96, help="generated image side in px")
    add("--crop", type=int, default=64, help="training crop size")
    add("--num-train", type=int, default=400, help="generated train images")
    add("--num-val", type=int, default=100, help="generated val images")
    add("--classes", type=int, default=DEFAULT_CLASSES, help="classes including background")
    add(
        "--generator",
        choices=("synth", "alt"),
        default="synth",
        help="trainers.synth or benchmarks/synth_alt.py",
    )
    add("--data-seed", type=int, default=0, help="seed of the generated data and its splits")
    add("--batch-size", type=int, default=None, help="labeled (and unlabeled) batch; None = the config's")
    add("--lr", type=float, default=DEFAULT_LR, help="backbone lr at the reference batch")
    add("--optimizer", default=None, help="optim.optimizer (sgd | adamw); None = the config's")
    add("--conf-thresh", type=float, default=None, help="pseudo-label threshold; None = the config's")
    add("--max-iters", type=int, default=None, help="cap on iterations per epoch")
    add("--method-set", action="append", default=[], metavar="KEY=VALUE", help="a method.KEY for every run")
    add("--backbone", default=None, help="model.backbone; None = the config's")
    add("--dilations", default=None, help="ASPP rates as a,b,c; None = the config's")
    add("--scale-range", default=None, help="data.scale_range as lo,hi; None = the config's")
    add("--pretrained", default=None, help="model.pretrained: backbone weights (e.g. a run's best.pth)")
    add("--threads", type=int, default=1, help="torch CPU threads per run")
    add("--jobs", type=int, default=2, help="runs trained at the same time, each in its own process")
    add("--out", type=Path, default=REPO / "runs" / "bench" / name, help="data, runs and results.jsonl")
    add("--keep-checkpoints", action="store_true", help="keep each run's checkpoints")


def seeds_of(args: argparse.Namespace) -> list[int]:
    """The --seeds list as ints."""
    return [int(s) for s in args.seeds.split(",") if s.strip()]


def prepare_data(args: argparse.Namespace) -> Path:
    """Generate the synthetic dataset under `<out>/data` unless it is already there with these options."""
    return ensure_generated(
        args.out / "data",
        renderer=synth_alt.render if args.generator == "alt" else render,
        num_train=args.num_train,
        num_val=args.num_val,
        size=args.size,
        num_classes=args.classes,
        seed=args.data_seed,
    )


def run_config(args: argparse.Namespace, data: Path, spec: RunSpec) -> TrainConfig:
    """configs/synthetic.yaml with this run's method, split and seed and the command line's settings."""
    optim: dict[str, Any] = {"epochs": args.epochs, "lr": args.lr, "max_iters_per_epoch": args.max_iters}
    if args.batch_size is not None:
        optim["batch_size"] = args.batch_size
    if args.optimizer is not None:
        optim["optimizer"] = args.optimizer
    method: dict[str, Any] = {"name": spec.method}
    if args.conf_thresh is not None:
        method["conf_thresh"] = args.conf_thresh
    for setting in args.method_set:
        key, _, value = setting.partition("=")
        method[key] = yaml.safe_load(value)
    model: dict[str, Any] = {}
    if args.backbone is not None:
        model["backbone"] = args.backbone
    if args.dilations is not None:
        model["dilations"] = [int(d) for d in args.dilations.split(",")]
    if args.pretrained is not None:
        model["pretrained"] = args.pretrained
    data_options: dict[str, Any] = {"root": str(data), "split": spec.split, "crop_size": args.crop}
    if args.scale_range is not None:
        data_options["scale_range"] = [float(r) for r in args.scale_range.split(",")]
    overrides = {
        "model": model,
        # No loader workers: the run's CPU time is then its own process's, and runs do not compete.
        "data": {**data_options, "num_workers": 0},
        "method": method,
        "optim": optim,
        "seed": spec.seed,
        "out_dir": str(args.out / "runs" / f"{spec.method}-{spec.split}-s{spec.seed}"),
    }
    return load_config(BASE_CONFIG, overrides)


def run_one(cfg: TrainConfig, spec: RunSpec, keep_checkpoints: bool = False) -> RunResult:
    """Train `cfg` from scratch in this process and measure it."""
    out_dir = Path(cfg.out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    history: list[dict[str, float]] = []
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_local(cfg, report=lambda metrics, path: history.append(metrics), progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if not keep_checkpoints:
        shutil.rmtree(out_dir, ignore_errors=True)
    keys = ["epoch", "miou", "loss", "loss_x", "loss_s", "mask_ratio", "lr"]
    keys += [k for k in history[-1] if k.startswith("iou_")]
    return RunResult(
        spec=spec,
        best_miou=result.best_miou,
        last_miou=result.last_miou,
        mask_ratio=history[-1].get("mask_ratio"),
        wall_s=wall,
        cpu_s=cpu,
        iterations=_iterations(cfg, len(history)),
        history=[{k: round(m[k], 4) for k in keys if k in m} for m in history],
    )


def _iterations(cfg: TrainConfig, epochs: int) -> int:
    """Optimizer steps run (`trainers.data.steps_per_epoch` per epoch)."""
    split = resolve_split(cfg.data)
    cap = cfg.optim.max_iters_per_epoch
    labeled_epoch = cfg.data.epoch_over == "labeled"
    images = len(split.labeled), len(split.unlabeled)
    return steps_per_epoch(*images, 1, cfg.optim.batch_size, cap, labeled_epoch) * epochs


def run_spec(args: argparse.Namespace, data: Path, spec: RunSpec) -> RunResult:
    """One run with the command line's settings (also the worker-process entry point)."""
    torch.set_num_threads(args.threads)
    return run_one(run_config(args, data, spec), spec, args.keep_checkpoints)


def run_all(args: argparse.Namespace, specs: Sequence[RunSpec]) -> list[RunResult]:
    """Run `specs`, `args.jobs` at a time; print a line per finished run and append it to results.jsonl."""
    data = prepare_data(args)
    log = args.out / "results.jsonl"
    done: dict[RunSpec, RunResult] = {}

    def finished(result: RunResult) -> None:
        done[result.spec] = result
        with log.open("a") as f:
            f.write(json.dumps(asdict(result)) + "\n")
        print(f"- [{len(done)}/{len(specs)}] {_run_line(result)}", flush=True)

    if args.jobs <= 1:
        for spec in specs:
            finished(run_spec(args, data, spec))
    else:
        _run_in_pool(args, data, specs, finished)
    return [done[spec] for spec in specs]


def _run_in_pool(
    args: argparse.Namespace, data: Path, specs: Sequence[RunSpec], finished: Callable[[RunResult], None]
) -> None:
    # Spawned, not forked: each worker starts its own torch thread pool and imports cleanly.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        for future in as_completed([pool.submit(run_spec, args, data, spec) for spec in specs]):
            finished(future.result())


def _run_line(r: RunResult) -> str:
    ratio = "" if r.mask_ratio is None else f", mask_ratio {r.mask_ratio:.3f}"
    return (
        f"{r.spec.method:10s} {r.spec.split:5s} seed {r.spec.seed}: best {r.best_miou:5.2f}, "
        f"last {r.last_miou:5.2f}{ratio}, {r.cpu_s:.0f} CPU-s, {r.wall_s:.0f} s wall"
    )


def describe(args: argparse.Namespace, specs: Sequence[RunSpec]) -> str:
    """The configuration a benchmark runs with, as markdown lines (the base config resolved)."""
    cfg = run_config(args, args.out / "data", specs[0])
    o, m = cfg.optim, cfg.method
    runs = list(dict.fromkeys(f"{s.method}@{s.split}" for s in specs))
    return "\n".join(
        [
            f"- data: synthetic, {args.num_train} train / {args.num_val} val images of {args.size} px, "
            f"{args.classes} classes (incl. background), data seed {args.data_seed}, "
            f"generator {args.generator}",
            f"- model: {cfg.model.backbone} backbone (DeepLabV3+), ASPP {list(cfg.model.dilations)}, "
            + (f"backbone from {cfg.model.pretrained}" if cfg.model.pretrained else "from scratch"),
            f"- schedule: {o.epochs} epochs, batch {o.batch_size} labeled (+ {o.batch_size} unlabeled for "
            f"the semi-supervised methods), "
            f"crop {cfg.data.crop_size}, rescale {list(cfg.data.scale_range)}, "
            f"max iters/epoch {o.max_iters_per_epoch}",
            f"- optimizer: {o.optimizer} lr {o.lr} (head x{o.lr_multi}, "
            f"reference batch {o.reference_global_batch}), "
            f"momentum {o.momentum}, wd {o.weight_decay}, poly {o.poly_power}",
            f"- method: conf_thresh {m.conf_thresh}, criterion {m.criterion}"
            + "".join(f", {setting}" for setting in args.method_set),
            f"- runs: {', '.join(runs)}; seeds {seeds_of(args)}",
            f"- machine: {machine()}; {args.jobs} run(s) at a time x {args.threads} thread(s); "
            f"base config {BASE_CONFIG.relative_to(REPO)}, code {_code_version()}",
        ]
    )


def _code_version() -> str:
    """The commit the code is at, and whether the working tree differs from it."""
    try:
        run = functools.partial(subprocess.run, cwd=REPO, capture_output=True, text=True, check=True)
        commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit}{' + uncommitted changes' if dirty else ''}"


def mean_std(values: Sequence[float]) -> str:
    """'mean ± sample std' with two decimals (std 0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def _groups(results: Sequence[RunResult]) -> dict[tuple[str, str], list[RunResult]]:
    groups: dict[tuple[str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.spec.method, r.spec.split), []).append(r)
    return groups


def table(results: Sequence[RunResult]) -> str:
    """One markdown row per (method, split), in run order: mIoU and cost over the seeds."""
    lines = [
        "| method | labels | best mIoU | last mIoU | n | mask ratio (end) | iters | CPU-s/run | wall-s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, split), rs in _groups(results).items():
        ratios = [r.mask_ratio for r in rs if r.mask_ratio is not None]
        ratio = f"{statistics.fmean(ratios):.3f}" if ratios else "-"
        lines.append(
            f"| {method} | {split} | {mean_std([r.best_miou for r in rs])} | "
            f"{mean_std([r.last_miou for r in rs])} | {len(rs)} | {ratio} | {rs[0].iterations} | "
            f"{statistics.fmean(r.cpu_s for r in rs):.0f} | {statistics.fmean(r.wall_s for r in rs):.0f} |"
        )
    return "\n".join(lines)


def per_seed(results: Sequence[RunResult]) -> str:
    """The last mIoU of every run, one row per (method, split), one column per seed."""
    seeds = sorted({r.spec.seed for r in results})
    lines = [
        "| method | labels | " + " | ".join(f"seed {s}" for s in seeds) + " |",
        "|---|---|" + "---|" * len(seeds),
    ]
    for (method, split), rs in _groups(results).items():
        by_seed = {r.spec.seed: r.last_miou for r in rs}
        cells = " | ".join(f"{by_seed[s]:.2f}" if s in by_seed else "-" for s in seeds)
        lines.append(f"| {method} | {split} | {cells} |")
    return "\n".join(lines)


def report(args: argparse.Namespace, specs: Sequence[RunSpec], title: str) -> list[RunResult]:
    """Print the title and configuration, run `specs`, print the tables and the total cost."""
    started = time.perf_counter()
    print(f"# {title}\n\n## Configuration\n\n{describe(args, specs)}\n\n## Runs\n", flush=True)
    results = run_all(args, specs)
    wall = time.perf_counter() - started
    cpu = sum(r.cpu_s for r in results)
    print(f"\n## Results (mean ± std over seeds)\n\n{table(results)}\n")
    print(f"Last-epoch mIoU per seed:\n\n{per_seed(results)}\n")
    print(
        f"Total: {len(results)} runs, {cpu / 60:.1f} CPU-min in the runs, {wall / 60:.1f} min wall.",
        flush=True,
    )
    return results
