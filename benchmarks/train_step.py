"""Images/s and peak memory of one MSPL iteration: the reference vs the platform's fast path.

reference: eager fp32, NCHW, for-loop SGD, float batches copied with a blocking `.to(device)` and the
loss read back every step (UniMatch's AverageMeter does `loss.item()`), as the seed runs it.
fast: the switches `trainers.speed.settings` resolves for the device (channels_last and foreach SGD
everywhere; on GPU also bf16 autocast and strong views built on the device from uint8 crops), losses
left on the device; `--compile` adds a torch.compile variant. Both run the platform's MSPL step (same
math), from the same initial weights, on batches made by the real transforms; repetitions interleave.
`--accuracy` instead trains MSPL on synthetic data with the reference switches and with the GPU's fast
path (bf16 autocast, strong views built batched, channels_last, tensor decode, foreach SGD) for
several seeds, and prints both mIoUs: the fast path must land within seed noise of the reference.
Run from the repository root: `.venv/bin/python benchmarks/train_step.py [--backbones tiny:97,resnet50:129]`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from _machine import machine

from trainers import augment, speed
from trainers.augment_reference import IGNORE
from trainers.batch import ViewSpec
from trainers.config import FastConfig, MethodConfig, OptimConfig
from trainers.data import collates
from trainers.forward import Forwarder
from trainers.methods import build_method
from trainers.model import DeepLabV3Plus
from trainers.optim import build_optimizer

CLASSES = 21
VIEWS = ViewSpec(strong_views=2, cutout=True, cutout_view=True, mix_batch=True)


@dataclass(frozen=True)
class Variant:
    name: str
    switches: speed.FastSettings
    read_loss_every_step: bool


def variants(device: torch.device, compile_too: bool, cpu_bf16: bool) -> list[Variant]:
    """The reference, the fast path as resolved for `device`, and optionally its compiled form."""
    reference = speed.FastSettings(False, False, False, "pil", False, False)
    platform_default = speed.settings(FastConfig(autocast_bf16=True if cpu_bf16 else None), device)
    out = [Variant("reference", reference, True), Variant("fast", platform_default, False)]
    if compile_too:
        out.append(Variant("fast+compile", replace(platform_default, compile=True), False))
    return out


def _pinned(batch: Any) -> Any:
    changes = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.pin_memory()
        elif isinstance(value, list):
            changes[f.name] = [v.pin_memory() for v in value]
    return replace(batch, **changes)


def host_batches(variant: Variant, crop: int, batch: int, count: int, device: torch.device) -> list[tuple]:
    """`count` (labeled, unlabeled, mix) triples as the variant's loader yields them (pinned for a GPU)."""
    raw = variant.switches.device_augment
    labeled_t = augment.labeled_transform(crop, IGNORE)
    unlabeled_t = augment.unlabeled_transform(crop, VIEWS, IGNORE)
    collate_l, collate_u = collates(raw)
    gen = torch.Generator().manual_seed(0)
    random.seed(0)

    def image() -> torch.Tensor:
        return torch.randint(
            0, 256, (3, crop + crop // 4, crop + crop // 3), dtype=torch.uint8, generator=gen
        )

    def mask() -> torch.Tensor:
        return torch.randint(
            0, CLASSES, (crop + crop // 4, crop + crop // 3), dtype=torch.uint8, generator=gen
        )

    out = []
    for _ in range(count):
        triple = (
            collate_l([labeled_t(image(), mask()) for _ in range(batch)]),
            collate_u([unlabeled_t(image(), None) for _ in range(batch)]),
            collate_u([unlabeled_t(image(), None) for _ in range(batch)]),
        )
        out.append(
            tuple(b.pin_memory() if raw else _pinned(b) for b in triple) if device.type == "cuda" else triple
        )
    return out


class Trainer:
    """One variant's network, optimizer and method; `step` runs one MSPL iteration."""

    def __init__(self, variant: Variant, backbone: str, device: torch.device, batches: list[tuple]) -> None:
        torch.manual_seed(0)
        self.variant, self.device, self.batches, self.count = variant, device, batches, 0
        self.warmup_s = 0.0
        net = DeepLabV3Plus(backbone, CLASSES).to(device)
        self.net = speed.prepare_network(net, variant.switches)
        self.model = Forwarder(self.net).train()
        self.optimizer = build_optimizer(self.net, OptimConfig(), 0.001, foreach=variant.switches.foreach)
        self.method = build_method(MethodConfig(name="mspl", conf_thresh=0.95), IGNORE)

    def step(self) -> None:
        host = self.batches[self.count % len(self.batches)]
        self.count += 1
        batches = [b.to(self.device, non_blocking=True) for b in host]
        if self.variant.switches.device_augment:
            batches = [b.finish() for b in batches]
        with speed.autocast(self.variant.switches, self.device):
            out = self.method.step(self.model, *batches)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        if self.variant.read_loss_every_step:
            out.loss.item()

    def timed(self, steps: int) -> tuple[float, float]:
        """(wall s, CPU s) of `steps` iterations, the device drained before and after."""
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            self.step()
        sync()
        return time.perf_counter() - wall, time.process_time() - cpu


def peak_memory_mb(trainer: Trainer) -> float:
    """Peak memory of one step above what was allocated before it: CUDA allocator, or process RSS."""
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        trainer.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    trainer.step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20


def cpu_memory_probe(args: argparse.Namespace, variant: str, backbone: str, crop: int) -> float:
    """Peak RSS of one step, measured in a fresh process (RSS high-water marks never go down)."""
    command = [
        sys.executable,
        __file__,
        "--probe",
        f"{variant}:{backbone}:{crop}",
        "--batch",
        str(args.batch),
    ]
    command += ["--threads", str(args.threads)] + (["--cpu-bf16"] if args.cpu_bf16 else [])
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def probe(args: argparse.Namespace) -> None:
    name, backbone, crop = args.probe.split(":")
    device = torch.device("cpu")
    variant = next(v for v in variants(device, True, args.cpu_bf16) if v.name == name)
    trainer = Trainer(variant, backbone, device, host_batches(variant, int(crop), args.batch, 1, device))
    trainer.step()  # the first step allocates gradients and optimizer state, as every later one reuses
    print(json.dumps({"peak_mb": peak_memory_mb(trainer)}))


def compare(args: argparse.Namespace, backbone: str, crop: int, device: torch.device) -> list[str]:
    """Markdown rows for one backbone: images/s (wall and per CPU-second), peak memory, ratios."""
    candidates = variants(device, args.compile, args.cpu_bf16)
    trainers = []
    for v in candidates:
        t = Trainer(v, backbone, device, host_batches(v, crop, args.batch, 2, device))
        started = time.perf_counter()
        for _ in range(args.warmup):
            t.step()
        t.warmup_s = time.perf_counter() - started
        trainers.append(t)
    wall = {v.name: [] for v in candidates}
    cpu = {v.name: [] for v in candidates}
    for _ in range(args.reps):
        for t in trainers:
            w, c = t.timed(args.steps)
            wall[t.variant.name].append(w)
            cpu[t.variant.name].append(c)
    images = args.steps * 2 * args.batch
    rows = []
    ref_ips = images / statistics.median(wall["reference"])
    ref_ipc = images / statistics.median(cpu["reference"])
    memory = {}
    for t in trainers:
        name = t.variant.name
        if device.type == "cuda":
            memory[name] = peak_memory_mb(t)
        else:
            memory[name] = cpu_memory_probe(args, name, backbone, crop)
    for t in trainers:
        name = t.variant.name
        ips, ipc = images / statistics.median(wall[name]), images / statistics.median(cpu[name])
        s = t.variant.switches
        switches = f"cl={int(s.channels_last)} bf16={int(s.autocast_bf16)} dev_aug={int(s.device_augment)} "
        switches += f"foreach={int(s.foreach)} compile={int(s.compile)}"
        speed = f"{ips:.2f} | **{ips / ref_ips:.2f}×** | {ipc:.2f} | {ipc / ref_ipc:.2f}×"
        peak = f"{memory[name]:.0f} | {memory[name] / memory['reference']:.2f}"
        rows.append(f"| {backbone} @ {crop} | {name} ({switches}) | {speed} | {peak} | {t.warmup_s:.1f} |")
    return rows


ACCURACY_PATHS = {
    "reference": {"channels_last": False, "autocast_bf16": False, "device_augment": False, "decode": "pil"}
    | {"foreach": False},
    "fast (GPU defaults)": {"channels_last": True, "autocast_bf16": True, "device_augment": True}
    | {"decode": "torchvision", "foreach": True},
    "fast (CPU defaults)": {"channels_last": True, "autocast_bf16": False, "device_augment": False}
    | {"decode": "torchvision", "foreach": True},
}


def accuracy(args: argparse.Namespace) -> None:
    """Train MSPL per seed with each path's switches (same seed = same initial weights and data order)."""
    from trainers.config import load_config
    from trainers.entry import train_local
    from trainers.synth import ensure_generated

    repo = Path(__file__).resolve().parents[1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # what train_local picks
    data = ensure_generated(args.out / "data", num_train=400, num_val=100, size=96, num_classes=args.classes)
    seeds = [int(s) for s in args.seeds.split(",")]
    print("# Accuracy: the fast path reaches the reference path's mIoU\n")
    print(
        f"- MSPL on synthetic data (400 train / 100 val images of 96 px, {args.classes} classes, split "
        f"{args.split}), tiny backbone, configs/synthetic.yaml's schedule with lr {args.lr} for "
        f"{args.epochs} epochs; seeds {seeds}; both paths run on {machine(device)}\n"
    )
    print("| path | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |")
    print("|---|" + "---|" * (len(seeds) + 1))
    results = {}
    paths = [p for p in ACCURACY_PATHS if p.split("(")[-1].split()[0] in args.paths.split(",")]
    for name in paths:
        switches = ACCURACY_PATHS[name]
        values = []
        for seed in seeds:
            out_dir = args.out / "accuracy" / f"{name.split()[0]}-{seed}"
            shutil.rmtree(out_dir, ignore_errors=True)
            overrides = {
                "data": {"root": str(data), "split": args.split, "num_workers": 0},
                "method": {"name": "mspl"},
                "optim": {"epochs": args.epochs, "lr": args.lr},
                "fast": switches,
                "seed": seed,
                "out_dir": str(out_dir),
            }
            cfg = load_config(repo / "configs" / "synthetic.yaml", overrides)
            values.append(train_local(cfg, progress=False).last_miou)
        results[name] = values
        cells = " | ".join(f"{v:.2f}" for v in values)
        print(
            f"| {name} | {cells} | {statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} |",
            flush=True,
        )
    if "reference" not in results:
        return
    ref = results["reference"]
    print(f"\nSeed-to-seed std of the reference: {statistics.stdev(ref):.2f}. Paired by seed:")
    for name, values in results.items():
        if name != "reference":
            differences = [v - r for v, r in zip(values, ref, strict=True)]
            paired = f"{statistics.fmean(differences):+.2f} ± {statistics.stdev(differences):.2f}"
            print(f"- {name} - reference: {paired}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--backbones", default="tiny:97,resnet50:129", help="backbone:crop pairs")
    parser.add_argument(
        "--batch", type=int, default=2, help="labeled and unlabeled images per step (seed: 2)"
    )
    parser.add_argument("--steps", type=int, default=3, help="iterations per timed repetition")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations per variant first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--compile", action="store_true", help="also time the fast path under torch.compile")
    parser.add_argument("--cpu-bf16", action="store_true", help="bf16 autocast in the fast path on CPU too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--accuracy", action="store_true", help="compare mIoU instead of speed")
    parser.add_argument("--seeds", default="0,1,2", help="--accuracy: training seeds")
    parser.add_argument("--paths", default="reference,GPU,CPU", help="--accuracy: which paths to train")
    parser.add_argument("--epochs", type=int, default=16, help="--accuracy: epochs per run")
    parser.add_argument("--split", default="1_2", help="--accuracy: labeled split")
    parser.add_argument("--classes", type=int, default=4, help="--accuracy: synthetic classes")
    parser.add_argument("--lr", type=float, default=0.02, help="--accuracy: learning rate")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/train_step"), help="--accuracy: runs")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        probe(args)
        return
    if args.accuracy:
        accuracy(args)
        return
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as UniMatch sets it
    print("# Training step: one MSPL iteration, reference vs fast path\n")
    print(
        f"- {args.batch} labeled + {args.batch} unlabeled images per step (+ {args.batch} for u'), {CLASSES} "
        f"classes; {args.steps} steps x {args.reps} interleaved repetitions after {args.warmup} warm-up "
        f"steps; median"
    )
    print(f"- device {device}: {machine(device)}; {args.threads} CPU thread(s)")
    print(
        "- images/s counts labeled + unlabeled images; peak memory is the growth during one step "
        f"({'CUDA allocator' if device.type == 'cuda' else 'process RSS, one fresh process per variant'})\n"
    )
    print(
        "| model | variant | images/s | ratio | images per CPU-s | ratio | peak MB | memory ratio "
        "| warm-up s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for item in args.backbones.split(","):
        backbone, crop = item.split(":")
        for row in compare(args, backbone, int(crop), device):
            print(row, flush=True)


if __name__ == "__main__":
    main()
