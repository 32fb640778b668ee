"""A second, independently written generator of the same kind as `trainers.synth` (task versions 2 and 3).

Same rule — a class is a shape; colour, texture, scale, rotation, clutter and occlusion are drawn
independently of it — but nothing else is shared: shapes are PIL polygons (jittered vertices, not
implicit functions), textures are smoothed noise, hatching and bands in HSV colours, clutter is
ellipses and poly-lines, occluders are rectangles, and the scale range differs. The benchmarks run the
same recipe on it (`--generator alt`) to show that the methods' ordering is not one generator's quirk.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from trainers.synth import ignore_band

Polygon = list[tuple[float, float]]


def _rotate(points: np.ndarray, angle: float, centre: np.ndarray) -> Polygon:
    c, s = np.cos(angle), np.sin(angle)
    turned = points @ np.array([[c, s], [-s, c]]) + centre
    return [tuple(p) for p in turned]


def _triangle(r: float, rng: np.random.Generator) -> list[np.ndarray]:
    angles = np.deg2rad([90, 210, 330]) + rng.uniform(-0.12, 0.12, 3)
    return [np.stack([np.cos(angles), np.sin(angles)], 1) * r]


def _ring(r: float, rng: np.random.Generator) -> list[np.ndarray]:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    # Outer outline then the hole (drawn as background afterwards).
    return [circle * r, circle * r * rng.uniform(0.45, 0.62)]


def _cross(r: float, rng: np.random.Generator) -> list[np.ndarray]:
    w = r * rng.uniform(0.28, 0.38)
    arm = np.array([[-w, -r], [w, -r], [w, r], [-w, r]])
    return [arm, arm[:, ::-1]]


# Class i (from 1) is SHAPES[i - 1]; ring's second polygon is its hole.
# The names are trainers.synth's first three, so the two datasets share class names and tables.
SHAPES = (("triangle", _triangle), ("ring", _ring), ("cross", _cross))
HOLED = {"ring"}


def _colour(rng: np.random.Generator, value: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.2, 1.0), value)
    return int(255 * r), int(255 * g), int(255 * b)


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """A full-canvas (H, W, 3) float texture: smoothed noise, hatching or bands between two colours."""
    light = rng.uniform(0.55, 1.0)
    dark = light - rng.uniform(0.3, 0.5)
    a, b = np.array(_colour(rng, light), np.float32), np.array(_colour(rng, max(dark, 0.05)), np.float32)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == 0:
        t = np.zeros((size, size), np.float32)
    elif kind == 1:
        cells = rng.random((size // 6 + 1, size // 6 + 1)) * 255
        t = np.asarray(Image.fromarray(cells.astype(np.uint8)).resize((size, size), Image.BICUBIC)) / 255.0
    elif kind == 2:
        theta, period = rng.uniform(0, np.pi), rng.uniform(3, 9)
        t = (np.sin((xx * np.cos(theta) + yy * np.sin(theta)) * 2 * np.pi / period) > 0.3).astype(np.float32)
    else:
        t = (rng.random((size, size)) < 0.35).astype(np.float32)
    return a + t[..., None] * (b - a)


def _polygons(cls: int, size: int, rng: np.random.Generator) -> list[Polygon]:
    r = size * rng.uniform(0.10, 0.24)
    centre = rng.uniform(0.15 * size, 0.85 * size, 2)
    angle = rng.uniform(0, 2 * np.pi)
    return [_rotate(p, angle, centre) for p in SHAPES[cls - 1][1](r, rng)]


def _draw(canvas: Image.Image, polygons: list[Polygon], holed: bool, fill: int) -> None:
    draw = ImageDraw.Draw(canvas)
    draw.polygon(polygons[0], fill=fill)
    for poly in polygons[1:]:
        draw.polygon(poly, fill=0 if holed else fill)


def _layer(
    image: np.ndarray,
    mask: np.ndarray,
    cls: int,
    polygons: list[Polygon],
    holed: bool,
    rng: np.random.Generator,
) -> None:
    region = Image.new("L", mask.shape[::-1])
    _draw(region, polygons, holed, 1)
    inside = np.asarray(region, bool)
    image[inside] = _texture(mask.shape[0], rng)[inside]
    mask[inside] = cls


def _clutter(size: int, rng: np.random.Generator) -> list[Polygon]:
    """An ellipse or a thick poly-line, as one polygon outline."""
    centre = rng.uniform(0, size, 2)
    if rng.random() < 0.6:
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        radii = size * rng.uniform(0.06, 0.2, 2)
        return [
            _rotate(np.stack([np.cos(t) * radii[0], np.sin(t) * radii[1]], 1), rng.uniform(0, 6.3), centre)
        ]
    length, width = size * rng.uniform(0.2, 0.5), rng.uniform(2, 4)
    return [
        _rotate(
            np.array([[-length, -width], [length, -width], [length, width], [-length, width]]),
            rng.uniform(0, 6.3),
            centre,
        )
    ]


def render(size: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 mask with the ignore band."""
    if num_classes > len(SHAPES) + 1:
        raise ValueError(f"num_classes: expected <= {len(SHAPES) + 1} for this generator, got {num_classes}")
    image = _texture(size, rng) * rng.uniform(0.5, 1.0)
    image = np.asarray(
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1)), np.float32
    ).copy()
    mask = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 4)):
        _layer(image, mask, 0, _clutter(size, rng), False, rng)
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, num_classes))
        _layer(image, mask, cls, _polygons(cls, size, rng), SHAPES[cls - 1][0] in HOLED, rng)
    if rng.random() < 0.3:
        x, y = rng.uniform(0, size, 2)
        w, h = size * rng.uniform(0.05, 0.15, 2)
        _layer(image, mask, 0, [[(x, y), (x + w, y), (x + w, y + h), (x, y + h)]], False, rng)
    image += rng.normal(0, rng.uniform(1, 6), image.shape)
    return image.clip(0, 255).astype(np.uint8), ignore_band(mask, max(1, round(size / 100)))
