"""Validation: per-class intersection/union, mIoU, and the three prediction modes (original,
center_crop, sliding_window). No torch.distributed here: the caller passes a `reduce` hook.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm import tqdm

from trainers.batch import LabeledBatch
from trainers.config import EVAL_MODES


@dataclass
class EvalResult:
    miou: float
    """Mean IoU in percent."""
    per_class: list[float]
    """IoU of each class in [0, 1]."""
    inter: torch.Tensor
    """(C,) int64 intersection pixel counts summed over images and ranks."""
    union: torch.Tensor
    """(C,) int64 union pixel counts summed over images and ranks."""


def intersection_union(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (C,) int64 intersection and union pixel counts; pixels with target == ignore_index skipped.

    Targets must be class ids in [0, C) or ignore_index; both counts sum over images and ranks.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"intersection_union: pred shape {tuple(pred.shape)} != target {tuple(target.shape)}"
        )
    k = num_classes
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    # One bincount over (target, pred) pairs gives the confusion matrix; ignored pixels go to bin k*k.
    index = torch.where(target == ignore_index, k * k, target * k + pred)
    confusion = torch.bincount(index, minlength=k * k + 1)[: k * k].view(k, k)
    inter = confusion.diagonal()
    return inter.clone(), confusion.sum(0) + confusion.sum(1) - inter


def miou(inter: torch.Tensor, union: torch.Tensor, ignore_absent: bool = False) -> tuple[float, list[float]]:
    """(mIoU in percent, per-class IoU) from summed counts.

    By default, as UniMatch (and so the published tables): IoU = inter / (union + 1e-10) and the mean
    runs over ALL classes, so a class absent from both prediction and ground truth counts as 0.
    `ignore_absent=True` averages only classes with union > 0 (0.0 if there is none).
    """
    iou = inter.double().cpu() / (union.double().cpu() + 1e-10)
    kept = iou[union.cpu() > 0] if ignore_absent else iou
    value = kept.mean().item() * 100.0 if kept.numel() else 0.0
    return value, iou.tolist()


def _center_slices(height: int, width: int, size: int) -> tuple[slice, slice]:
    # Sides already shorter than `size` are kept whole (UniMatch would slice from a negative start).
    top, left = max((height - size) // 2, 0), max((width - size) // 2, 0)
    return slice(top, top + size), slice(left, left + size)


def center_crop(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The central size x size region of (B, 3, H, W) image and (B, H, W) mask, taken identically."""
    rows, cols = _center_slices(image.shape[-2], image.shape[-1], size)
    return image[..., rows, cols], mask[..., rows, cols]


def _logits(net: nn.Module, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    out = net(x)
    if out.shape[1] != num_classes or out.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"evaluate: network output {tuple(out.shape)} for input {tuple(x.shape)}; "
            f"expected {num_classes} classes (num_classes) at input resolution"
        )
    return out


def _window_starts(length: int, window: int, stride: int) -> list[int]:
    # The last window is aligned to the border, so every window has the same size and they batch.
    count = math.ceil(max(length - window, 0) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def _sliding_window(
    net: nn.Module, image: torch.Tensor, crop_size: int, num_classes: int, window_batch: int
) -> torch.Tensor:
    b, _, h, w = image.shape
    wh, ww = min(crop_size, h), min(crop_size, w)
    stride = max(1, int(crop_size * 2 / 3))
    windows = [(t, left) for t in _window_starts(h, wh, stride) for left in _window_starts(w, ww, stride)]
    out = image.new_zeros(b, num_classes, h, w)
    per_forward = max(1, window_batch // b)
    for first in range(0, len(windows), per_forward):
        chunk = windows[first : first + per_forward]
        patches = torch.cat([image[:, :, t : t + wh, left : left + ww] for t, left in chunk])
        probs = _logits(net, patches, num_classes).softmax(dim=1)
        for i, (t, left) in enumerate(chunk):
            out[:, :, t : t + wh, left : left + ww] += probs[i * b : (i + 1) * b]
    return out


def predict(
    net: nn.Module, image: torch.Tensor, mode: str, crop_size: int, num_classes: int, window_batch: int = 8
) -> torch.Tensor:
    """(B, C, H', W') scores of a normalized (B, 3, H, W) image: logits, or summed softmax (sliding_window).

    original: whole image. center_crop: the central crop_size square (H' = min(H, crop_size)).
    sliding_window: crop_size windows at stride int(2/3 crop_size), the last aligned to the border,
    up to `window_batch` windows per forward; sides shorter than the crop make one window.
    """
    _check_mode(mode)
    return _predict(net, image, mode, crop_size, num_classes, window_batch)


def predict_multiscale(
    net: nn.Module, image: torch.Tensor, scales: Sequence[float], flip: bool, num_classes: int
) -> torch.Tensor:
    """(B, C, H, W) softmax of a whole normalized (B, 3, H, W) image summed over `scales` (and mirrored).

    ST++'s test-time augmentation (model/semseg/base.py:27-42): each scale resized bilinearly with
    align_corners=True, its softmax resized back the same way; `flip` adds each scale's mirror image.
    """
    b, _, h, w = image.shape
    total = image.new_zeros(b, num_classes, h, w)
    for scale in scales:
        x = F.interpolate(image, size=(int(h * scale), int(w * scale)), mode="bilinear", align_corners=True)
        # One forward per view, as ST++: at scale 2 a whole Cityscapes image is 4096 x 2048 already.
        for mirror in (False, True) if flip else (False,):
            probs = _logits(net, x.flip(-1) if mirror else x, num_classes).softmax(dim=1)
            probs = probs.flip(-1) if mirror else probs
            total += F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=True)
    return total


def _check_mode(mode: str) -> None:
    if mode not in EVAL_MODES:
        raise ValueError(f"evaluate mode: expected one of {EVAL_MODES}, got {mode!r}")


def _predict(
    net: nn.Module, image: torch.Tensor, mode: str, crop_size: int, num_classes: int, window_batch: int
) -> torch.Tensor:
    if mode == "sliding_window":
        return _sliding_window(net, image, crop_size, num_classes, window_batch)
    if mode == "center_crop":
        rows, cols = _center_slices(image.shape[-2], image.shape[-1], crop_size)
        image = image[..., rows, cols]
    return _logits(net, image, num_classes)


def evaluate(
    net: nn.Module,
    loader: Iterable[LabeledBatch],
    mode: str,
    crop_size: int,
    num_classes: int,
    ignore_index: int,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    device: torch.device | str = "cpu",
    progress: bool = False,
    window_batch: int = 8,
    on_prediction: Callable[[int, torch.Tensor], None] | None = None,
) -> EvalResult:
    """mIoU of `net` (plain image -> logits network) over whole-image batches, in eval mode without grad.

    `reduce` receives the (2, C) int64 tensor [inter; union] summed over this process's images and
    returns its sum over all processes (identity in one process). The train/eval mode is restored.
    `on_prediction(i, pred)` receives each batch's (B, H, W) class map (e.g. to save PNGs).
    """
    _check_mode(mode)
    was_training = net.training
    net.eval()
    counts = torch.zeros(2, num_classes, dtype=torch.int64, device=device)
    try:
        with torch.no_grad():
            for i, batch in enumerate(tqdm(loader, desc="eval", disable=not progress)):
                batch = batch.to(device, non_blocking=True)
                pred = _predict(net, batch.image, mode, crop_size, num_classes, window_batch).argmax(dim=1)
                mask = batch.mask
                if mode == "center_crop":  # the prediction covers the central square: score it there
                    _, mask = center_crop(batch.image, mask, crop_size)
                inter, union = intersection_union(pred, mask, num_classes, ignore_index)
                counts[0] += inter
                counts[1] += union
                if on_prediction is not None:
                    on_prediction(i, pred)
    finally:
        net.train(was_training)
    inter, union = reduce(counts).cpu()
    value, per_class = miou(inter, union)
    return EvalResult(value, per_class, inter, union)


def save_prediction(pred: torch.Tensor, path: str | Path, palette: list[int]) -> None:
    """Write an (H, W) class-id map as a palette PNG (mode 'P'); `palette` is flat [r, g, b, ...]."""
    if pred.dim() != 2:
        raise ValueError(
            f"save_prediction {path}: expected an (H, W) class map, got shape {tuple(pred.shape)}"
        )
    if pred.numel() and not 0 <= int(pred.min()) <= int(pred.max()) <= 255:
        raise ValueError(f"save_prediction {path}: class ids must lie in [0, 255] for a palette PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pred.to(torch.uint8).cpu().numpy())
    image.putpalette(palette)
    image.save(path)
