"""The loader's half of UniMatch / MSPL augmentation: geometry per sample, and each strong view's
random parameters drawn per sample; `trainers.batch_augment` builds the views from them, batched.

Geometry works on pairs `(image, mask) -> (image, mask)` and keeps mask values as class ids: PIL pairs
(the seed's path), or uint8 tensors from torchvision.io (`fast.decode`), drawing the same random numbers.
`trainers.augment_reference` applies the same parameters per sample, as the seed does.
Randomness comes from Python's `random` and, for cutout values, torch's (DataLoader workers seed both).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageOps

from trainers.batch import LabeledBatch, ViewSpec
from trainers.config import SCALE_RANGE

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNLABELED_PAD = 254
"""Mask fill of unlabeled crops, so that padding can later be told apart (-> ignore mask)."""
BOX_AREA = (0.02, 0.4)
BOX_ASPECT = (0.3, 1 / 0.3)
JITTER_P, GRAYSCALE_P, BLUR_P, BOX_P, CUTOUT_P = 0.8, 0.2, 0.5, 0.5, 0.5
JITTER = (0.5, 0.5, 0.5, 0.25)
"""Colour jitter strengths: brightness, contrast, saturation, hue."""
BLUR_SIGMA = (0.1, 2.0)

Pair = tuple[Image.Image, Image.Image]


# ---- geometry (PIL, image and mask together) ----


def _scaled_size(height: int, width: int, ratio_range: tuple[float, float] = SCALE_RANGE) -> tuple[int, int]:
    # The one draw of both geometry paths: the long side becomes randint(0.5 x, 2 x) of itself, aspect kept.
    side = max(height, width)
    long_side = random.randint(int(side * ratio_range[0]), int(side * ratio_range[1]))
    if height > width:
        return long_side, int(width * long_side / height + 0.5)
    return int(height * long_side / width + 0.5), long_side


def resize(image: Image.Image, mask: Image.Image, ratio_range: tuple[float, float] = SCALE_RANGE) -> Pair:
    """Rescale so the long side becomes a random int in ratio_range x its size (aspect kept)."""
    w, h = image.size
    new_h, new_w = _scaled_size(h, w, ratio_range)
    size = (new_w, new_h)
    return image.resize(size, Image.Resampling.BILINEAR), mask.resize(size, Image.Resampling.NEAREST)


def crop(image: Image.Image, mask: Image.Image, size: int, mask_fill: int) -> Pair:
    """Pad right/bottom up to `size` (image 0, mask `mask_fill`), then take a random size x size crop."""
    w, h = image.size
    border = (0, 0, max(size - w, 0), max(size - h, 0))
    image = ImageOps.expand(image, border=border, fill=0)
    mask = ImageOps.expand(mask, border=border, fill=mask_fill)
    w, h = image.size
    x, y = random.randint(0, w - size), random.randint(0, h - size)
    box = (x, y, x + size, y + size)
    return image.crop(box), mask.crop(box)


def hflip(image: Image.Image, mask: Image.Image, p: float = 0.5) -> Pair:
    """Mirror both left-right with probability p."""
    if random.random() < p:
        flip = Image.Transpose.FLIP_LEFT_RIGHT
        return image.transpose(flip), mask.transpose(flip)
    return image, mask


def geometry(
    image: Image.Image,
    mask: Image.Image,
    crop_size: int,
    mask_fill: int,
    scale_range: tuple[float, float] = SCALE_RANGE,
) -> Pair:
    """The geometry shared by labeled and unlabeled samples: resize, crop, flip."""
    image, mask = resize(image, mask, scale_range)
    image, mask = crop(image, mask, crop_size, mask_fill)
    return hflip(image, mask)


# ---- the same geometry on uint8 tensors: image (3, H, W), mask (H, W) or None (all zeros) ----

TensorPair = tuple[torch.Tensor, torch.Tensor | None]


@functools.lru_cache(maxsize=256)
def _pil_nearest_index(length: int, new_length: int) -> torch.Tensor:
    # Pillow's NEAREST resize accumulates the source position in doubles; cumsum adds in the same order.
    steps = np.full(new_length, length / new_length)
    steps[0] *= 0.5
    return torch.from_numpy(np.cumsum(steps).astype(np.int64))


def geometry_tensor(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    crop_size: int,
    mask_fill: int,
    scale_range: tuple[float, float] = SCALE_RANGE,
) -> TensorPair:
    """`geometry` on a uint8 (3, H, W) image and (H, W) mask (None = all zeros), with the same draws.

    The bilinear image is within 1 of PIL's; the nearest-neighbour mask is exactly PIL's, and is only
    computed inside the crop.
    """
    height, width = image.shape[-2:]
    new_height, new_width = _scaled_size(height, width, scale_range)
    image = TF.resize(image, [new_height, new_width], antialias=True)
    x = random.randint(0, max(new_width, crop_size) - crop_size)
    y = random.randint(0, max(new_height, crop_size) - crop_size)
    rows, cols = min(new_height - y, crop_size), min(new_width - x, crop_size)
    out = image.new_zeros(3, crop_size, crop_size)
    out[:, :rows, :cols] = image[:, y : y + rows, x : x + cols]
    out_mask = torch.full((crop_size, crop_size), mask_fill, dtype=torch.uint8)
    if mask is None:
        out_mask[:rows, :cols] = 0
    else:
        source_rows = _pil_nearest_index(height, new_height)[y : y + rows]
        source_cols = _pil_nearest_index(width, new_width)[x : x + cols]
        out_mask[:rows, :cols] = mask[source_rows][:, source_cols]
    if random.random() < 0.5:
        return out.flip(-1), out_mask.flip(-1)
    return out, out_mask


def crop_pair(
    image: Image.Image | torch.Tensor,
    mask: Image.Image | torch.Tensor | None,
    crop_size: int,
    mask_fill: int,
    scale_range: tuple[float, float] = SCALE_RANGE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Geometry of either decoder's output -> uint8 (3, crop, crop) image and int64 (crop, crop) mask."""
    if isinstance(image, torch.Tensor):
        image, mask = geometry_tensor(image, mask, crop_size, mask_fill, scale_range)
        return image, mask.long()
    image, mask = geometry(image, mask, crop_size, mask_fill, scale_range)
    return image_to_tensor(image), mask_to_tensor(mask)


# ---- boxes (CutMix and cutout) ----


@dataclass(frozen=True)
class Box:
    top: int
    left: int
    height: int
    width: int

    def mask(self, height: int, width: int) -> torch.Tensor:
        """(height, width) int64 tensor, 1 inside the box."""
        return self.fill(torch.zeros(height, width, dtype=torch.int64))

    def fill(self, target: torch.Tensor) -> torch.Tensor:
        """Set `target`'s last two dims to 1 inside the box, in place; returns `target`."""
        target[..., self.top : self.top + self.height, self.left : self.left + self.width] = 1
        return target


def draw_box(height: int, width: int, redraw_area: bool = False) -> Box:
    """A box of area U(0.02, 0.4) x H x W and aspect h/w U(0.3, 1/0.3), wholly inside the image.

    UniMatch's CutMix draws the area once and retries aspect and position until the box fits;
    MSPL's cutout (`redraw_area=True`) redraws the area on every try as well.
    """
    area = random.uniform(*BOX_AREA) * height * width
    while True:
        if redraw_area:
            area = random.uniform(*BOX_AREA) * height * width
        aspect = random.uniform(*BOX_ASPECT)
        box_w, box_h = int(math.sqrt(area / aspect)), int(math.sqrt(area * aspect))
        x, y = random.randrange(width), random.randrange(height)
        if x + box_w <= width and y + box_h <= height:
            return Box(y, x, box_h, box_w)


def draw_cutmix(size: int, p: float = BOX_P) -> Box | None:
    """A CutMix box in a size x size crop with probability p, else None."""
    return None if random.random() > p else draw_box(size, size)


# ---- photometric parameters (one draw per sample and view) ----


@dataclass(frozen=True)
class Jitter:
    order: tuple[int, ...]
    """Order in which brightness (0), contrast (1), saturation (2) and hue (3) are applied."""
    brightness: float
    contrast: float
    saturation: float
    hue: float


@dataclass(frozen=True)
class Photometric:
    """One strong view's random parameters; None / False = op not applied."""

    jitter: Jitter | None
    grayscale: bool
    blur_sigma: float | None
    cutout: Box | None


def draw_jitter(strengths: tuple[float, float, float, float] = JITTER) -> Jitter:
    """torchvision ColorJitter's law: factors U(1 - s, 1 + s), hue U(-s, s), ops in random order."""
    b, c, s, h = strengths
    order = tuple(random.sample(range(4), 4))
    factor = random.uniform
    return Jitter(order, factor(1 - b, 1 + b), factor(1 - c, 1 + c), factor(1 - s, 1 + s), factor(-h, h))


def draw_photometric(height: int, width: int, cutout: bool) -> Photometric:
    """Draw a strong view: jitter p=0.8, grayscale p=0.2, blur p=0.5, and (if `cutout`) cutout p=0.5."""
    jitter = draw_jitter() if random.random() < JITTER_P else None
    gray = random.random() < GRAYSCALE_P
    sigma = random.uniform(*BLUR_SIGMA) if random.random() < BLUR_P else None
    box = draw_box(height, width, redraw_area=True) if cutout and random.random() < CUTOUT_P else None
    return Photometric(jitter, gray, sigma, box)


def to_unit(image: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1] (torchvision's ToTensor scaling)."""
    return image.float().div(255)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalization of a [0, 1] float image."""
    return TF.normalize(image, list(IMAGENET_MEAN), list(IMAGENET_STD))


# ---- the loaders' transforms and collation ----


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> (3, H, W) uint8 RGB tensor."""
    return TF.pil_to_tensor(image.convert("RGB") if image.mode != "RGB" else image)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Mode L or P mask -> (H, W) int64 class ids (palette indices, not colours)."""
    if mask.mode not in ("L", "P"):
        raise ValueError(f"mask: expected a mode 'L' or 'P' image of class ids, got mode {mask.mode!r}")
    return TF.pil_to_tensor(mask)[0].long()


def draw_noise(box: Box | None) -> torch.Tensor | None:
    """A cutout box's (3, h, w) uint8 values: MSPL's U(0, 255) truncated, i.e. 0..254; None without a box.

    Drawn from torch's RNG in the loader, in the order the seed's per-sample cutout draws them."""
    if box is None:
        return None
    return torch.randint(0, 255, (3, box.height, box.width), dtype=torch.uint8)


def labeled_transform(
    crop_size: int, ignore_index: int, scale_range: tuple[float, float] = SCALE_RANGE, strong: bool = False
) -> Callable[[Image.Image | torch.Tensor, Image.Image | torch.Tensor], dict]:
    """Labeled sample -> uint8 crop and uint8 mask, `ignore_index` where padded (finished batched), and
    with `strong` (PS-MT) a strong view's parameters."""

    def transform(image: Image.Image | torch.Tensor, mask: Image.Image | torch.Tensor) -> dict:
        image, mask = crop_pair(image, mask, crop_size, ignore_index, scale_range)
        params = draw_photometric(crop_size, crop_size, cutout=False) if strong else None
        return {"image": image, "mask": mask.to(torch.uint8), "strong": params}

    return transform


def unlabeled_transform(
    crop_size: int, views: ViewSpec, ignore_index: int, scale_range: tuple[float, float] = SCALE_RANGE
) -> Callable[[Image.Image | torch.Tensor, Image.Image | torch.Tensor | None], dict]:
    """Unlabeled sample -> uint8 crop, padding mask and the parameters of the views `views` asks for,
    drawn in the order the seed draws them (`augment_reference.unlabeled_transform`)."""

    def transform(image: Image.Image | torch.Tensor, mask: Image.Image | torch.Tensor | None) -> dict:
        base, mask = crop_pair(image, mask, crop_size, UNLABELED_PAD, scale_range)
        strong, noise, boxes = [], [], []
        for _ in range(views.strong_views):
            strong.append(draw_photometric(crop_size, crop_size, cutout=views.cutout))
            noise.append(draw_noise(strong[-1].cutout))
            boxes.append(draw_cutmix(crop_size))
        cutout_view = cutout_view_noise = None
        if views.cutout_view:
            cutout_view = draw_photometric(crop_size, crop_size, cutout=True)
            cutout_view_noise = draw_noise(cutout_view.cutout)
        padded = mask == UNLABELED_PAD
        return {
            "base": base,
            "ignore": torch.where(padded, ignore_index, 0).to(torch.uint8),
            "mask": torch.where(padded, ignore_index, mask).to(torch.uint8) if views.masks else None,
            "strong": strong,
            "strong_noise": noise,
            "boxes": boxes,
            "cutout_view": cutout_view,
            "cutout_view_noise": cutout_view_noise,
            "cutout_view_normalized": views.cutout_view_normalized,
        }

    return transform


def eval_transform() -> Callable[[Image.Image, Image.Image], dict]:
    """Whole image, no geometry -> {"image": normalized (3, H, W), "mask": int64 (H, W)}."""

    def transform(image: Image.Image | torch.Tensor, mask: Image.Image | torch.Tensor) -> dict:
        if isinstance(image, torch.Tensor):
            return {"image": normalize(to_unit(image)), "mask": mask.long()}
        return {"image": normalize(to_unit(image_to_tensor(image))), "mask": mask_to_tensor(mask)}

    return transform


def collate_labeled(items: list[dict]) -> LabeledBatch:
    """Stack labeled (or eval) samples into a LabeledBatch."""
    return LabeledBatch(
        image=torch.stack([item["image"] for item in items]),
        mask=torch.stack([item["mask"] for item in items]),
    )
