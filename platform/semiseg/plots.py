"""Figures logged to MLflow: training curves, prediction overlays, and mIoU vs number of labels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import matplotlib

matplotlib.use("Agg")  # no display: runs inside Ray actors and on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from trainers.config import TrainConfig

LOSS_TERMS = ("aug", "self_training")
"""Method terms that are losses without a loss_ prefix."""
OVERLAY_ALPHA = 0.5


class LabelPoint(Protocol):
    """What `miou_vs_labels` reads of a table cell (semiseg.tables.Cell): declared here so that this
    module, which the tables module draws its plot with, does not import it back."""

    @property
    def source(self) -> str: ...
    @property
    def dataset(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def num_labeled(self) -> int: ...
    @property
    def best_mean(self) -> float: ...
    @property
    def best_std(self) -> float: ...


def curves(histories: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """One panel per metric group, value vs epoch; metrics a run lacks are skipped."""
    losses = sorted(k for k in histories if k.startswith("loss") or k in LOSS_TERMS)
    groups = (
        ("val mIoU (%)", ["miou", "best_miou"]),
        ("loss terms", losses),
        ("mask ratio", ["mask_ratio"]),
        ("lr", ["lr"]),
    )
    panels = [(name, [k for k in keys if histories.get(k)]) for name, keys in groups]
    panels = [(name, keys) for name, keys in panels if keys]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(4 * max(len(panels), 1), 3.2), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels, strict=False):
        for key in keys:
            steps, values = zip(*histories[key], strict=True)
            ax.plot(steps, values, marker="o", markersize=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def miou_vs_labels(cells: Sequence[LabelPoint], path: str | Path) -> Path:
    """Best-epoch mIoU (mean, std bars) vs the number of labeled images, one line per method, per dataset."""
    datasets = sorted({c.dataset for c in cells if c.source == "ours"})
    fig, axes = plt.subplots(
        1, max(len(datasets), 1), figsize=(5 * max(len(datasets), 1), 3.8), squeeze=False
    )
    for ax, dataset in zip(axes[0], datasets, strict=False):
        for source, style in (("ours", "-o"), ("published", "--x")):
            mine = [c for c in cells if c.dataset == dataset and c.source == source]
            for method in dict.fromkeys(c.method for c in mine):
                points = sorted((c.num_labeled, c.best_mean, c.best_std) for c in mine if c.method == method)
                x, y, err = zip(*points, strict=True)
                err = [0.0 if math.isnan(e) else e for e in err]
                label = method if source == "ours" else f"{method} (published)"
                ax.errorbar(
                    x, y, yerr=err, fmt=style, capsize=3, label=label, alpha=1.0 if source == "ours" else 0.5
                )
        ax.set_xscale("log")
        ticks = sorted({c.num_labeled for c in cells if c.dataset == dataset and c.source == "ours"})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("labeled images")
        ax.set_ylabel("best-epoch val mIoU (%)")
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    return _save(fig, path)


def overlays(
    samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    palette: list[int],
    path: str | Path,
    ignore_index: int,
) -> Path:
    """Rows of (image, ground truth over image, prediction over image) for (H, W, 3) uint8 images and
    (H, W) class-id masks; ignored pixels (`ignore_index`) stay uncoloured."""
    colours = np.array(palette, dtype=np.float32).reshape(-1, 3)
    fig, axes = plt.subplots(len(samples), 3, figsize=(9, 3 * len(samples)), squeeze=False)
    for row, (image, mask, pred) in zip(axes, samples, strict=True):
        for ax, (title, shown) in zip(
            row, (("image", None), ("ground truth", mask), ("prediction", pred)), strict=True
        ):
            ax.imshow(image if shown is None else _blend(image, shown, colours, ignore_index))
            ax.set_title(title)
            ax.axis("off")
    return _save(fig, path)


def _blend(image: np.ndarray, mask: np.ndarray, colours: np.ndarray, ignore_index: int) -> np.ndarray:
    out = image.astype(np.float32)
    valid = mask != ignore_index
    out[valid] = (1 - OVERLAY_ALPHA) * out[valid] + OVERLAY_ALPHA * colours[mask[valid]]
    return out.astype(np.uint8)


def predict_samples(cfg: TrainConfig, checkpoint_file: Path, count: int) -> list[tuple[np.ndarray, ...]]:
    """(image, mask, prediction) of the first `count` val images under a checkpoint's model, on the CPU."""
    import torch

    from trainers import augment
    from trainers.datasets import PairDataset, dataset_spec, resolve_split
    from trainers.evaluate import predict
    from trainers.network import load_network

    net, _ = load_network(checkpoint_file, cfg)
    split = resolve_split(cfg.data)
    plain = PairDataset(cfg.data.root, split.val[:count])
    normalized = PairDataset(cfg.data.root, split.val[:count], augment.eval_transform())
    spec = dataset_spec(cfg.data)
    samples = []
    with torch.no_grad():
        for (image, mask), item in zip(plain, normalized, strict=True):
            logits = predict(net, item["image"][None], spec.eval_mode, cfg.data.crop_size, spec.num_classes)
            pred = logits.argmax(1)[0].numpy().astype(np.uint8)
            image, mask = np.asarray(image), np.asarray(mask)
            if pred.shape != mask.shape:  # center_crop predicts the central square only
                image, mask = _center(image, pred.shape), _center(mask, pred.shape)
            samples.append((image, mask, pred))
    return samples


def _center(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    top, left = (array.shape[0] - shape[0]) // 2, (array.shape[1] - shape[1]) // 2
    return array[top : top + shape[0], left : left + shape[1]]


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
