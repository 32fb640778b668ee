"""The seed's per-sample augmentation, kept as the reference the batched views are checked against.

UniMatch / MSPL build each strong view per sample in the loader: colour jitter, grayscale, blur and
(MSPL) cutout with torchvision's functional ops, then normalization. Training builds the same views
batched (`trainers.batch_augment`) from the same drawn parameters (`trainers.augment`); tests and
benchmarks/ compare the two. Nothing in training imports this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from trainers.augment import (
    BOX_P,
    UNLABELED_PAD,
    Box,
    Jitter,
    Photometric,
    crop_pair,
    draw_cutmix,
    draw_photometric,
    normalize,
    to_unit,
)
from trainers.batch import UnlabeledBatch, ViewSpec
from trainers.config import SCALE_RANGE

IGNORE = 255
"""The seed's ignore value (training reads the dataset's `DatasetSpec.ignore_index`)."""


# ---- photometric ops (tensors; per-sample parameters) ----


def color_jitter(image: torch.Tensor, jitter: Jitter) -> torch.Tensor:
    """Apply brightness, contrast, saturation and hue in the drawn order."""
    ops = (
        lambda x: TF.adjust_brightness(x, jitter.brightness),
        lambda x: TF.adjust_contrast(x, jitter.contrast),
        lambda x: TF.adjust_saturation(x, jitter.saturation),
        lambda x: TF.adjust_hue(x, jitter.hue),
    )
    for index in jitter.order:
        image = ops[index](image)
    return image


def grayscale(image: torch.Tensor) -> torch.Tensor:
    """Luma copied to all three channels."""
    return TF.rgb_to_grayscale(image, num_output_channels=3)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with standard deviation `sigma` (PIL's GaussianBlur radius), kernel +-3 sigma."""
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(image, kernel_size=[k, k], sigma=[sigma, sigma])


def cutout(image: torch.Tensor, box: Box) -> torch.Tensor:
    """A copy of `image` whose box holds uniform random values per pixel and channel.

    MSPL draws U(0, 255) and truncates to uint8, i.e. integers 0..254; float images get them / 255.
    """
    out = image.clone()
    region = out[..., box.top : box.top + box.height, box.left : box.left + box.width]
    values = torch.randint(0, 255, region.shape, device=image.device)
    region.copy_(values if not image.is_floating_point() else values / 255.0)
    return out


def photometric(image: torch.Tensor, params: Photometric) -> torch.Tensor:
    """MSPL's strong-view order: jitter, grayscale, blur, cutout. Never modifies `image` in place."""
    if params.jitter is not None:
        image = color_jitter(image, params.jitter)
    if params.grayscale:
        image = grayscale(image)
    if params.blur_sigma is not None:
        image = gaussian_blur(image, params.blur_sigma)
    if params.cutout is not None:
        image = cutout(image, params.cutout)
    return image


def cutmix_box(size: int, p: float = BOX_P) -> torch.Tensor:
    """A (size, size) int64 0/1 CutMix mask; all zeros with probability 1 - p."""
    box = draw_cutmix(size, p)
    return torch.zeros(size, size, dtype=torch.int64) if box is None else box.mask(size, size)


# ---- per-sample transforms and collation ----


def labeled_transform(
    crop_size: int, scale_range: tuple[float, float] = SCALE_RANGE
) -> Callable[[Image.Image | torch.Tensor, Image.Image | torch.Tensor], dict]:
    """Labeled sample -> {"image": normalized (3, crop, crop), "mask": int64 (crop, crop), 255 = ignore}."""

    def transform(image: Image.Image | torch.Tensor, mask: Image.Image | torch.Tensor) -> dict:
        image, mask = crop_pair(image, mask, crop_size, IGNORE, scale_range)
        return {"image": normalize(to_unit(image)), "mask": mask}

    return transform


def unlabeled_transform(
    crop_size: int, views: ViewSpec, scale_range: tuple[float, float] = SCALE_RANGE
) -> Callable[[Image.Image, Image.Image], dict]:
    """Unlabeled sample -> the weak view, the strong views and boxes `views` asks for, the ignore mask."""

    def transform(image: Image.Image | torch.Tensor, mask: Image.Image | torch.Tensor | None) -> dict:
        base, mask = crop_pair(image, mask, crop_size, UNLABELED_PAD, scale_range)
        strong, boxes = [], []
        for _ in range(views.strong_views):
            params = draw_photometric(crop_size, crop_size, cutout=views.cutout)
            strong.append(normalize(to_unit(photometric(base, params))))
            boxes.append(cutmix_box(crop_size))
        cutout_view = None
        if views.cutout_view:
            view = to_unit(photometric(base, draw_photometric(crop_size, crop_size, cutout=True)))
            # The published quirk: this view is only scaled to [0, 1] unless the switch corrects it.
            cutout_view = normalize(view) if views.cutout_view_normalized else view
        ignore = torch.where(mask == UNLABELED_PAD, IGNORE, 0)
        return {
            "weak": normalize(to_unit(base)),
            "strong": strong,
            "boxes": boxes,
            "ignore": ignore,
            "cutout_view": cutout_view,
        }

    return transform


def collate_unlabeled(items: list[dict]) -> UnlabeledBatch:
    """Stack unlabeled samples view by view into an UnlabeledBatch."""

    def stack(key: str, index: int | None = None) -> torch.Tensor:
        return torch.stack([item[key] if index is None else item[key][index] for item in items])

    first = items[0]
    return UnlabeledBatch(
        weak=stack("weak"),
        strong=[stack("strong", i) for i in range(len(first["strong"]))],
        boxes=[stack("boxes", i) for i in range(len(first["boxes"]))],
        ignore=stack("ignore"),
        cutout_view=None if first["cutout_view"] is None else stack("cutout_view"),
    )
