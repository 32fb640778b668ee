"""CPU-seconds per MSPL training sample (all views, crop 321): the seed's PIL path vs the platform's.

The reference is UniMatch's per-sample PIL pipeline with MSPL's views, reproduced below (PIL resize,
crop, flip; torchvision PIL ColorJitter / RandomGrayscale; PIL GaussianBlur; numpy cutout;
ToTensor + Normalize). Every path decodes the same Pascal-sized JPEGs and collates batches as a
DataLoader worker would; repetitions of the paths are interleaved and timed in CPU seconds of this
process (one torch thread, like a worker), so a busy shared machine moves all of them alike.
Run from the repository root: `.venv/bin/python benchmarks/data_pipeline.py [--reps 7 ...]`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
from _machine import machine
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import default_collate
from torchvision import transforms

from trainers import augment
from trainers import augment_reference as reference
from trainers.augment_reference import IGNORE
from trainers.batch import ViewSpec
from trainers.data import collates
from trainers.datasets import Pair, PairDataset, voc_palette
from trainers.synth import render

MSPL_VIEWS = ViewSpec(strong_views=2, cutout=True, cutout_view=True, mix_batch=True)

# ---- the reference: UniMatch's dataset/transform.py and semi.py, with MSPL's cutout and cutout view ----


def seed_resize(img, mask, ratio_range):
    w, h = img.size
    long_side = random.randint(int(max(h, w) * ratio_range[0]), int(max(h, w) * ratio_range[1]))
    if h > w:
        oh, ow = long_side, int(1.0 * w * long_side / h + 0.5)
    else:
        ow, oh = long_side, int(1.0 * h * long_side / w + 0.5)
    return img.resize((ow, oh), Image.BILINEAR), mask.resize((ow, oh), Image.NEAREST)


def seed_crop(img, mask, size, ignore_value=255):
    w, h = img.size
    padw, padh = max(size - w, 0), max(size - h, 0)
    img = ImageOps.expand(img, border=(0, 0, padw, padh), fill=0)
    mask = ImageOps.expand(mask, border=(0, 0, padw, padh), fill=ignore_value)
    w, h = img.size
    x, y = random.randint(0, w - size), random.randint(0, h - size)
    return img.crop((x, y, x + size, y + size)), mask.crop((x, y, x + size, y + size))


def seed_hflip(img, mask, p=0.5):
    if random.random() < p:
        return img.transpose(Image.FLIP_LEFT_RIGHT), mask.transpose(Image.FLIP_LEFT_RIGHT)
    return img, mask


def seed_normalize(img, mask=None):
    img = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )(img)
    if mask is not None:
        return img, torch.from_numpy(np.array(mask)).long()
    return img


def seed_blur(img, p=0.5):
    if random.random() < p:
        img = img.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(0.1, 2.0)))
    return img


def seed_cutmix_box(img_size, p=0.5, size_min=0.02, size_max=0.4, ratio_1=0.3, ratio_2=1 / 0.3):
    mask = torch.zeros(img_size, img_size)
    if random.random() > p:
        return mask
    size = np.random.uniform(size_min, size_max) * img_size * img_size
    while True:
        ratio = np.random.uniform(ratio_1, ratio_2)
        cutmix_w, cutmix_h = int(np.sqrt(size / ratio)), int(np.sqrt(size * ratio))
        x, y = np.random.randint(0, img_size), np.random.randint(0, img_size)
        if x + cutmix_w <= img_size and y + cutmix_h <= img_size:
            break
    mask[y : y + cutmix_h, x : x + cutmix_w] = 1
    return mask


def seed_cutout(img, p=0.5, size_min=0.02, size_max=0.4, ratio_1=0.3, ratio_2=1 / 0.3):
    if random.random() >= p:
        return img
    img = np.array(img)
    img_h, img_w, img_c = img.shape
    while True:
        size = np.random.uniform(size_min, size_max) * img_h * img_w
        ratio = np.random.uniform(ratio_1, ratio_2)
        erase_w, erase_h = int(np.sqrt(size / ratio)), int(np.sqrt(size * ratio))
        x, y = np.random.randint(0, img_w), np.random.randint(0, img_h)
        if x + erase_w <= img_w and y + erase_h <= img_h:
            break
    img[y : y + erase_h, x : x + erase_w] = np.random.uniform(0, 255, (erase_h, erase_w, img_c))
    return Image.fromarray(img.astype(np.uint8))


def seed_strong(img, cutout=True):
    if random.random() < 0.8:
        img = transforms.ColorJitter(0.5, 0.5, 0.5, 0.25)(img)
    img = transforms.RandomGrayscale(p=0.2)(img)
    img = seed_blur(img, p=0.5)
    return seed_cutout(img) if cutout else img


class SeedDataset(torch.utils.data.Dataset):
    """UniMatch's SemiDataset.__getitem__ for train_l / train_u, with MSPL's cutout and cutout view."""

    def __init__(self, root: Path, pairs: list[Pair], mode: str, size: int) -> None:
        self.root, self.pairs, self.mode, self.size = root, pairs, mode, size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item):
        pair = self.pairs[item]
        img = Image.open(os.path.join(self.root, pair.image)).convert("RGB")
        if self.mode == "train_u":
            mask = Image.fromarray(np.zeros((img.size[1], img.size[0])))
        else:
            mask = Image.fromarray(np.array(Image.open(os.path.join(self.root, pair.mask))))
        img, mask = seed_resize(img, mask, (0.5, 2.0))
        ignore_value = 254 if self.mode == "train_u" else 255
        img, mask = seed_crop(img, mask, self.size, ignore_value)
        img, mask = seed_hflip(img, mask, p=0.5)
        if self.mode == "train_l":
            return seed_normalize(img, mask)
        img_w, img_s1, img_s2, img_c = deepcopy(img), deepcopy(img), deepcopy(img), deepcopy(img)
        img_s1 = seed_strong(img_s1)
        cutmix_box1 = seed_cutmix_box(self.size, p=0.5)
        img_s2 = seed_strong(img_s2)
        cutmix_box2 = seed_cutmix_box(self.size, p=0.5)
        img_c = seed_strong(img_c)
        ignore_mask = Image.fromarray(np.zeros((mask.size[1], mask.size[0])))
        img_s1, ignore_mask = seed_normalize(img_s1, ignore_mask)
        img_s2 = seed_normalize(img_s2)
        mask = torch.from_numpy(np.array(mask)).long()
        ignore_mask[mask == 254] = 255
        # MSPL's quirk: the cutout view is only scaled to [0, 1].
        return (
            seed_normalize(img_w),
            img_s1,
            img_s2,
            ignore_mask,
            cutmix_box1,
            cutmix_box2,
            transforms.ToTensor()(img_c),
        )


# ---- the paths ----


def write_images(folder: Path, count: int, width: int, height: int) -> list[Pair]:
    """Pascal-sized JPEGs (quality 90) of synthetic scenes and their palette masks."""
    rng = np.random.default_rng(0)
    (folder / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (folder / "SegmentationClass").mkdir(exist_ok=True)
    pairs = []
    for i in range(count):
        image, mask = render(max(width, height), 11, rng)
        pair = Pair(f"JPEGImages/{i:06d}.jpg", f"SegmentationClass/{i:06d}.png")
        Image.fromarray(image[:height, :width]).save(folder / pair.image, quality=90)
        png = Image.fromarray(mask[:height, :width])
        png.putpalette(voc_palette())
        png.save(folder / pair.mask)
        pairs.append(pair)
    return pairs


Batches = Callable[[list[int]], object]
"""Builds one collated batch of the given item indices (what a DataLoader worker does)."""


def loader(dataset, collate) -> Batches:
    return lambda items: collate([dataset[i] for i in items])


def paths(root: Path, pairs: list[Pair], crop: int) -> dict[str, tuple[Batches, Batches]]:
    """name -> (labeled batch, unlabeled batch)."""
    out = {
        "seed PIL (reference)": (
            loader(SeedDataset(root, pairs, "train_l", crop), default_collate),
            loader(SeedDataset(root, pairs, "train_u", crop), default_collate),
        )
    }
    for decode in ("pil", "torchvision"):
        out[f"per-sample reference ops, decode={decode}"] = (
            loader(
                PairDataset(root, pairs, reference.labeled_transform(crop), decode=decode),
                augment.collate_labeled,
            ),
            loader(
                PairDataset(root, pairs, reference.unlabeled_transform(crop, MSPL_VIEWS), False, decode),
                reference.collate_unlabeled,
            ),
        )
    raw_labeled = PairDataset(root, pairs, augment.labeled_transform(crop, IGNORE), decode="torchvision")
    raw_unlabeled = PairDataset(
        root, pairs, augment.unlabeled_transform(crop, MSPL_VIEWS, IGNORE), False, "torchvision"
    )
    in_loader, on_device = collates(device_augment=False), collates(device_augment=True)
    out["platform, views batched in the collate (CPU default)"] = (
        loader(raw_labeled, in_loader[0]),
        loader(raw_unlabeled, in_loader[1]),
    )
    out["platform device_augment: loader part"] = (
        loader(raw_labeled, on_device[0]),
        loader(raw_unlabeled, on_device[1]),
    )
    return out


def cpu_ms_per_sample(build: Batches, batches: list[list[int]]) -> float:
    """CPU-ms of building every batch, per sample."""
    start = time.process_time()
    for items in batches:
        build(items)
    return (time.process_time() - start) * 1000 / sum(map(len, batches))


def measure(args: argparse.Namespace, root: Path, pairs: list[Pair]) -> dict[str, dict[str, list[float]]]:
    """CPU-ms per labeled and per unlabeled sample for each path, repetitions interleaved."""
    candidates = paths(root, pairs, args.crop)
    times = {name: {"labeled": [], "unlabeled": []} for name in candidates}
    batches = [list(range(i, i + args.batch)) for i in range(0, len(pairs) - args.batch + 1, args.batch)]
    for rep in range(args.reps + 1):
        for name, (labeled, unlabeled) in candidates.items():
            random.seed(rep)
            np.random.seed(rep)
            torch.manual_seed(rep)
            spent_l = cpu_ms_per_sample(labeled, batches)
            spent_u = cpu_ms_per_sample(unlabeled, batches)
            if rep:  # repetition 0 warms caches and lazy imports
                times[name]["labeled"].append(spent_l)
                times[name]["unlabeled"].append(spent_u)
    return times


def table(times: dict[str, dict[str, list[float]]]) -> str:
    """Median CPU-ms per sample and reference / path ratios; a training sample = 1 labeled + 2 unlabeled."""
    med = {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}
    for m in med.values():
        m["train"] = m["labeled"] + 2 * m["unlabeled"]
    ref = med[next(iter(med))]
    lines = [
        "| path | CPU-ms / labeled | CPU-ms / unlabeled (all views) | CPU-ms / training sample "
        "(1 l + 2 u) | ratio (reference ÷ path) |",
        "|---|---|---|---|---|",
    ]
    for name, m in med.items():
        lines.append(
            f"| {name} | {m['labeled']:.2f} | {m['unlabeled']:.2f} | {m['train']:.2f} | "
            f"**{ref['train'] / m['train']:.2f}×** (l {ref['labeled'] / m['labeled']:.2f}×, "
            f"u {ref['unlabeled'] / m['unlabeled']:.2f}×) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--crop", type=int, default=321)
    parser.add_argument(
        "--images", type=int, default=16, help="distinct JPEGs, each sampled once per repetition"
    )
    parser.add_argument("--size", default="500x375", help="JPEG width x height (Pascal's typical size)")
    parser.add_argument("--batch", type=int, default=8, help="samples per collated batch")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of every path (interleaved)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    width, height = (int(v) for v in args.size.split("x"))
    print("# Data pipeline: CPU-seconds per MSPL training sample\n")
    print(
        f"- crop {args.crop}; {args.images} JPEGs of {width}x{height} (quality 90), batches of {args.batch}; "
        f"{args.reps} interleaved repetitions (after one warm-up), median reported"
    )
    print(
        "- MSPL views per unlabeled sample: weak, s1 and s2 (jitter, grayscale, blur, cutout), 2 CutMix "
        "boxes, cutout view, ignore mask; a training sample = 1 labeled + 2 unlabeled (u and u')"
    )
    print(f"- one torch thread (as a DataLoader worker); CPU time of this process; {machine()}\n")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pairs = write_images(root, args.images, width, height)
        times = measure(args, root, pairs)
    print(table(times))
    print(
        "\nThe `CPU default` row is what a CPU-only run's loader does: views built batched in the collate."
        "\nThe `loader part` row is what the CPU does per sample when `fast.device_augment` builds the strong"
        "\nviews on the GPU after the copy (the default there). The per-sample rows are the seed's ops on"
        "\nthe platform's geometry, kept as the reference the batched views are checked against."
    )


if __name__ == "__main__":
    main()
