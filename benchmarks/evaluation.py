"""Evaluation speed: UniMatch's window-by-window loop vs the platform's batched `trainers.evaluate`.

seed: UniMatch's `evaluate` reproduced below: one forward per window (the last row and column of
windows cut short at the border), softmax summed, numpy intersection/union per image.
platform: `trainers.evaluate.evaluate` with the reference switches (NCHW, fp32): border-aligned
windows of equal size, `--window-batch` per forward, bincount metrics.
fast: the same with the switches `trainers.speed.settings` resolves for the device (channels_last;
bf16 autocast on GPU). Sliding windows use Cityscapes' geometry (2 x 1 aspect, crop about half the
height, stride 2/3 of the crop); whole-image eval uses Pascal-like images of varying size, one per
forward as the val loader gives them. The same images and weights for every path; repetitions interleave.
Run from the repository root: `.venv/bin/python benchmarks/evaluation.py [--backbone resnet50 ...]`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from _machine import machine

from trainers import augment, speed
from trainers.batch import LabeledBatch
from trainers.config import FastConfig
from trainers.evaluate import evaluate
from trainers.model import DeepLabV3Plus
from trainers.synth import render

CLASSES = 11


def intersection_and_union(output, target, K, ignore_index=255):
    """UniMatch's util/utils.py intersectionAndUnion (numpy)."""
    output = output.reshape(output.size).copy()
    target = target.reshape(target.size)
    output[np.where(target == ignore_index)[0]] = ignore_index
    intersection = output[np.where(output == target)[0]]
    area_intersection, _ = np.histogram(intersection, bins=np.arange(K + 1))
    area_output, _ = np.histogram(output, bins=np.arange(K + 1))
    area_target, _ = np.histogram(target, bins=np.arange(K + 1))
    return area_intersection, area_output + area_target - area_intersection, area_target


def seed_evaluate(model, items, mode, crop, nclass, device, preds) -> float:
    """UniMatch's evaluate() in one process (its all_reduce of the counts is the identity here);
    appends each class map to `preds`."""
    model.eval()
    inter_sum, union_sum = np.zeros(nclass), np.zeros(nclass)
    with torch.no_grad():
        for batch in items:
            img, mask = batch.image.to(device), batch.mask
            if mode == "sliding_window":
                grid = crop
                b, _, h, w = img.shape
                final = torch.zeros(b, nclass, h, w, device=device)
                row = 0
                while row < h:
                    col = 0
                    while col < w:
                        pred = model(img[:, :, row : min(h, row + grid), col : min(w, col + grid)])
                        final[:, :, row : min(h, row + grid), col : min(w, col + grid)] += pred.softmax(dim=1)
                        col += int(grid * 2 / 3)
                    row += int(grid * 2 / 3)
                pred = final.argmax(dim=1)
            else:
                pred = model(img).argmax(dim=1)
            preds.append(pred.cpu())
            inter, union, _ = intersection_and_union(pred.cpu().numpy(), mask.numpy(), nclass, 255)
            inter_sum += inter
            union_sum += union
    return float(np.mean(inter_sum / (union_sum + 1e-10) * 100.0))


def images(mode: str, count: int, height: int, width: int) -> list[LabeledBatch]:
    """Normalized synthetic scenes; whole-image ones vary in size around height x width, as Pascal's do."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        h, w = (
            (height, width)
            if mode == "sliding_window"
            else (int(height * rng.uniform(0.75, 1.0)), int(width * rng.uniform(0.75, 1.0)))
        )
        image, mask = render(max(h, w), CLASSES, rng)
        pixels = torch.from_numpy(image[:h, :w]).permute(2, 0, 1).contiguous()
        out.append(
            LabeledBatch(
                augment.normalize(augment.to_unit(pixels))[None], torch.from_numpy(mask[:h, :w]).long()[None]
            )
        )
    return out


Path = Callable[[list[LabeledBatch], list[torch.Tensor]], float]
"""Evaluates the images, appends each class map to the list, returns the mIoU."""


def calibrated(
    net: torch.nn.Module, items: list[LabeledBatch], crop: int, device: torch.device
) -> torch.nn.Module:
    """Random weights with BatchNorm statistics of these images, so that predictions vary from pixel to
    pixel (with the default statistics a random network predicts one class everywhere)."""
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    net.train()
    with torch.no_grad():
        for batch in items:
            net(batch.image[..., :crop, :crop].to(device))
    return net.eval()


def paths(
    items: list[LabeledBatch],
    backbone: str,
    mode: str,
    crop: int,
    device: torch.device,
    window_batch: int,
    cpu_bf16: bool = False,
) -> dict[str, Path]:
    """Each path by name; every network has the same weights."""
    torch.manual_seed(0)
    net = calibrated(DeepLabV3Plus(backbone, CLASSES).to(device), items, crop, device)
    reference = speed.FastSettings(False, False, False, "pil", False, False)
    switches = speed.settings(FastConfig(), device)
    fast_net = speed.prepare_network(DeepLabV3Plus(backbone, CLASSES).to(device), switches)
    fast_net.load_state_dict(net.state_dict())

    def platform_path(model, settings):
        def run(items, preds):
            def keep(i, pred):
                preds.append(pred.cpu())

            with speed.autocast(settings, device):
                result = evaluate(
                    model,
                    items,
                    mode,
                    crop,
                    CLASSES,
                    255,
                    device=device,
                    window_batch=window_batch,
                    on_prediction=keep,
                )
            return result.miou

        return run

    name = f"platform fast (cl={int(switches.channels_last)} bf16={int(switches.autocast_bf16)})"
    out = {
        "seed (UniMatch loop)": lambda items, preds: seed_evaluate(
            net, items, mode, crop, CLASSES, device, preds
        ),
        "platform batched (NCHW fp32)": platform_path(net, reference),
        name: platform_path(fast_net.eval(), switches),
    }
    if cpu_bf16 and not switches.autocast_bf16:
        out["platform fast + opt-in bf16 (cl=1 bf16=1)"] = platform_path(
            fast_net, replace(switches, autocast_bf16=True)
        )
    return out


def compare(args: argparse.Namespace, mode: str, device: torch.device) -> list[str]:
    """Markdown rows: images/s (wall, per CPU-second), ratios to the seed loop, mIoU of each path."""
    height, width = args.window_image if mode == "sliding_window" else args.whole_image
    crop = args.crop
    items = images(mode, args.images, height, width)
    candidates = paths(items, args.backbone, mode, crop, device, args.window_batch, args.cpu_bf16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wall = {n: [] for n in candidates}
    cpu = {n: [] for n in candidates}
    preds = {n: [] for n in candidates}
    mious = {n: fn(items, preds[n]) for n, fn in candidates.items()}  # warm-up (and cuDNN autotuning)
    names = list(candidates)
    for rep in range(args.reps):
        # Each repetition starts with another path, so a burst of load elsewhere hits them alike.
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            sync()
            w, c = time.perf_counter(), time.process_time()
            candidates[name](items, [])
            sync()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    rows = []
    seed_name = names[0]
    seed_wall, seed_cpu = statistics.median(wall[seed_name]), statistics.median(cpu[seed_name])
    shape = f"{height}x{width}" if mode == "sliding_window" else f"~{height}x{width}"
    for name in candidates:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        agree = statistics.fmean(
            (a == b).float().mean().item() for a, b in zip(preds[name], preds[seed_name], strict=True)
        )
        rows.append(
            f"| {mode} {shape}, crop {crop} | {name} | {len(items) / w:.2f} | {seed_wall / w:.2f}× | "
            f"{len(items) / c:.2f} | **{seed_cpu / c:.2f}×** | {mious[name]:.2f} | {100 * agree:.2f} % |"
        )
    return rows


def size(text: str) -> tuple[int, int]:
    h, w = text.split("x")
    return int(h), int(w)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--crop", type=int, default=129, help="window size (Cityscapes: 513 on 1024x2048)")
    parser.add_argument("--window-image", type=size, default=(256, 512), help="HxW for sliding_window")
    parser.add_argument("--whole-image", type=size, default=(128, 170), help="largest HxW for original")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--window-batch", type=int, default=8, help="windows per forward (platform)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default="sliding_window,original")
    parser.add_argument("--cpu-bf16", action="store_true", help="also time bf16 autocast on CPU (AMX)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print("# Evaluation: UniMatch's window-by-window loop vs batched `trainers.evaluate`\n")
    print(
        f"- {args.backbone} DeepLabV3+ ({CLASSES} classes, random weights), {args.images} synthetic images "
        f"per mode; {args.reps} interleaved repetitions (rotating which path goes first) after a warm-up; "
        f"median; the last column compares each path's class maps with the seed loop's, pixel by pixel"
    )
    threads = f"{args.threads} CPU thread(s); window batch {args.window_batch}"
    print(f"- device {device}: {machine(device)}; {threads}\n")
    print("| eval | path | images/s | ratio | images per CPU-s | ratio | mIoU | pixels as the seed's |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for row in compare(args, mode, device):
            print(row, flush=True)
    print(
        "\nThe seed cuts its last row and column of windows short at the border; the platform aligns them to"
        "\nthe border at full size (so it computes up to ~20% more pixels, and its mIoU may differ slightly)."
    )


if __name__ == "__main__":
    main()
