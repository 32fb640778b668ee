"""Making, writing and importing label splits (a labeled list plus an unlabeled list)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

from trainers.datasets import DataError, Pair, read_list, write_list


def labeled_count(total: int, labeled: int | float) -> int:
    """How many images a split labels: a count, or ceil(fraction x total) as the published splits do."""
    if isinstance(labeled, bool) or not isinstance(labeled, (int, float)):
        raise DataError(f"labeled: expected a count or a fraction in (0, 1], got {labeled!r}")
    if isinstance(labeled, float):
        if not 0.0 < labeled <= 1.0:
            raise DataError(f"labeled: expected a fraction in (0, 1], got {labeled}")
        # The published 1/16 of Pascal's 10,582 images is 662 = ceil(661.4); the epsilon absorbs float error.
        return max(1, math.ceil(labeled * total - 1e-9))
    if not 0 < labeled <= total:
        raise DataError(f"labeled: expected a count in 1..{total}, got {labeled}")
    return labeled


def make_split(train: Sequence[Pair], labeled: int | float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Draw `labeled` images (count or fraction) with `seed`; the rest are unlabeled, both in list order.

    When every image is labeled, the unlabeled list is the whole train list, so an epoch is still one pass.
    """
    n = labeled_count(len(train), labeled)
    chosen = set(random.Random(seed).sample(range(len(train)), n))
    labeled_pairs = [p for i, p in enumerate(train) if i in chosen]
    if n == len(train):
        return labeled_pairs, list(train)
    return labeled_pairs, [p for i, p in enumerate(train) if i not in chosen]


def make_pascal_classic_split(
    train_aug: Sequence[Pair], high_quality: Sequence[Pair], n: int, seed: int
) -> tuple[list[Pair], list[Pair]]:
    """Pascal's classic split: n labeled from the high-quality images, the rest of train_aug unlabeled."""
    pool = {p.image for p in train_aug}
    outside = [p.image for p in high_quality if p.image not in pool]
    if outside:
        raise DataError(f"{len(outside)} high-quality images are not in train_aug, first {outside[0]}")
    labeled, _ = make_split(high_quality, n, seed)
    taken = {p.image for p in labeled}
    return labeled, [p for p in train_aug if p.image not in taken]


def write_split(folder: str | Path, labeled: Sequence[Pair], unlabeled: Sequence[Pair]) -> Path:
    """Write `labeled.txt` and `unlabeled.txt` into `folder`, each atomically."""
    folder = Path(folder)
    write_list(folder / "labeled.txt", labeled)
    write_list(folder / "unlabeled.txt", unlabeled)
    return folder


def import_splits(src_root: str | Path, dataset: str, dst_root: str | Path) -> list[str]:
    """Copy UniMatch-format splits `<src_root>/splits/<dataset>/<name>/*.txt` (and val.txt) to `<dst_root>/`.

    Every list is parsed before anything is written; returns the imported split names.
    """
    src = Path(src_root) / "splits" / dataset
    folders = sorted(p.parent for p in src.glob("*/labeled.txt"))
    if not folders:
        raise DataError(f"{src}: no split folders with a labeled.txt")
    lists = {}
    for folder in folders:
        for name in ("labeled.txt", "unlabeled.txt"):
            if (folder / name).is_file():
                lists[Path(folder.name) / name] = read_list(folder / name)
    if (src / "val.txt").is_file():
        lists[Path("val.txt")] = read_list(src / "val.txt")
    for relative, pairs in lists.items():
        write_list(Path(dst_root) / relative, pairs)
    return [f.name for f in folders]
