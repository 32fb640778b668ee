"""A synthetic segmentation dataset in Pascal VOC's layout: the platform's embedded default.

Design rule (format versions 2 and 3): **the generator's invariances match the augmentations'.** The
semi-supervised methods assume a strong view (colour jitter, grayscale, blur, CutMix) keeps the label,
so a class here is defined only by what those views preserve, the object's *shape*. Each object's
colours, texture, scale, rotation and position are drawn independently of its class, and the mask is
computed from geometry alone (`Scene`: `label` never reads a colour or a texture). Backgrounds are
cluttered (gradients, colour noise, distractor blobs and strokes with the same textures) and objects
are occluded by each other and by background blobs; whatever is not a class shape is background.
Every object keeps a luminance contrast with the background under it, so its silhouette survives
grayscale and blur. Masks mark a thin ignore band (255) along object borders, like VOC's.
Version 1 tied a texture to each class: the strong views' blur erased the one cue that named it.
Version 3 (this one) keeps version 2's rule and makes background blobs ovals: version 2's blobs had
third and fourth harmonics, i.e. rounded triangles and squares, which blur makes look like a class.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from trainers.datasets import Pair, voc_palette, write_list
from trainers.splits import make_split, write_split

Grid = tuple[np.ndarray, np.ndarray]
"""Object-local pixel coordinates (u, v), rotated with the object."""

SPLITS = {"1_16": 1 / 16, "1_8": 1 / 8, "1_4": 1 / 4, "1_2": 1 / 2, "full": 1.0}
FORMAT_VERSION = 3


def _square(u, v, r):
    return np.maximum(abs(u), abs(v)) <= 0.8 * r


def _triangle(u, v, r):
    return (v >= -0.55 * r) & (v <= 1.1 * r - np.sqrt(3) * abs(u))


def _ring(u, v, r):
    d = u**2 + v**2
    return (d <= r**2) & (d >= (0.55 * r) ** 2)


def _cross(u, v, r):
    return ((abs(u) <= 0.32 * r) & (abs(v) <= r)) | ((abs(v) <= 0.32 * r) & (abs(u) <= r))


def _hexagon(u, v, r):
    return np.maximum(abs(v), (np.sqrt(3) * abs(u) + abs(v)) / 2) <= 0.85 * r


def _star(u, v, r):
    angle = np.arctan2(v, u)
    return np.hypot(u, v) <= r * (0.4 + 0.6 * ((1 + np.cos(5 * angle)) / 2) ** 2)


def _crescent(u, v, r):
    return (u**2 + v**2 <= r**2) & ((u - 0.5 * r) ** 2 + v**2 >= (0.8 * r) ** 2)


def _ellipse(u, v, r):
    return u**2 + (v / 0.45) ** 2 <= r**2


def _l_shape(u, v, r):
    return ((abs(u) <= r) & (v >= 0.3 * r) & (v <= r)) | ((u >= -r) & (u <= -0.3 * r) & (abs(v) <= r))


def _t_shape(u, v, r):
    return ((abs(u) <= r) & (v >= 0.45 * r) & (v <= r)) | ((abs(u) <= 0.3 * r) & (v >= -r) & (v <= r))


def _stripes(u, v, p, rng):
    return np.sin(2 * np.pi * u / p) > 0


def _checkers(u, v, p, rng):
    return (np.floor(u / p) + np.floor(v / p)) % 2 == 1


def _dots(u, v, p, rng):
    return ((u % p) - p / 2) ** 2 + ((v % p) - p / 2) ** 2 <= (0.3 * p) ** 2


def _speckle(u, v, p, rng):
    return rng.random(u.shape) < 0.3


def _zigzag(u, v, p, rng):
    return np.sin(2 * np.pi * (u + 0.6 * p * abs((v / p) % 2 - 1)) / p) > 0


def _rings(u, v, p, rng):
    return np.sin(2 * np.pi * np.hypot(u, v) / p) > 0


def _hatch(u, v, p, rng):
    return ((u % p) < 1.5) | ((v % p) < 1.5)


def _gradient(u, v, p, rng):
    return np.clip(0.5 + u / (6 * p), 0, 1)


def _camouflage(u, v, p, rng):
    coarse = rng.random((int(p) + 2, int(p) + 2)) < 0.5
    return coarse[(u // 4).astype(int) % coarse.shape[0], (v // 4).astype(int) % coarse.shape[1]]


def _plain(u, v, p, rng):
    return rng.random(u.shape) * 0.2


def _bricks(u, v, p, rng):
    row = np.floor(v / p)
    return ((v % p) < 1.5) | (((u + (row % 2) * p) % (2 * p)) < 1.5)


Shape = Callable[[np.ndarray, np.ndarray, float], np.ndarray]
Texture = Callable[[np.ndarray, np.ndarray, float, np.random.Generator], np.ndarray]

# Class i (from 1) is SHAPES[i - 1]. No disc: a disc is too close to the background's blobs.
SHAPES: tuple[tuple[str, Shape], ...] = (
    ("triangle", _triangle),
    ("ring", _ring),
    ("cross", _cross),
    ("star", _star),
    ("L", _l_shape),
    ("square", _square),
    ("crescent", _crescent),
    ("hexagon", _hexagon),
    ("ellipse", _ellipse),
    ("T", _t_shape),
)
# Any object, distractor or occluder wears any of these, whatever its class.
TEXTURES: tuple[Texture, ...] = (
    _plain,
    _stripes,
    _checkers,
    _dots,
    _speckle,
    _zigzag,
    _rings,
    _hatch,
    _gradient,
    _camouflage,
    _bricks,
)
MAX_CLASSES = len(SHAPES) + 1
OBJECTS = (1, 4)
"""How many class objects a scene has: from, to (exclusive)."""
RADIUS = (0.14, 0.26)
"""An object's radius as a fraction of the image side: from, to."""
CLUTTER = (0, 3)
"""How many background blobs and strokes a scene has: from, to (exclusive)."""
OCCLUDED = 0.1
"""Chance that a background blob covers part of an object."""
TEXTURE_CONTRAST = 30
"""Least luminance difference of a texture's two colours (0-255): visible, but weaker than the silhouette."""
SILHOUETTE_CONTRAST = 60
"""Least luminance difference of an object's colours from the background under it."""


@dataclass(frozen=True)
class SynthOptions:
    num_train: int = 400
    num_val: int = 100
    size: int = 96
    num_classes: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes: expected 2..{MAX_CLASSES}, got {self.num_classes}")
        if self.size < 32:
            raise ValueError(f"size: expected >= 32 pixels, got {self.size}")
        if self.num_train < 2 or self.num_val < 1:
            raise ValueError(f"num_train, num_val: expected >= 2, >= 1, got {self.num_train}, {self.num_val}")


def class_names(num_classes: int) -> list[str]:
    """Names of classes 0..num_classes-1 (0 is background)."""
    return ["background"] + [name for name, _ in SHAPES[: num_classes - 1]]


@dataclass(frozen=True)
class Pose:
    """Where a shape sits: centre (y, x) in pixels, radius in pixels, rotation in radians."""

    cy: float
    cx: float
    radius: float
    angle: float

    def grid(self, size: int) -> Grid:
        """Object-local coordinates (u, v) of every pixel."""
        yy, xx = _pixel_grid(size)
        dx, dy = xx - np.float32(self.cx), yy - np.float32(self.cy)
        c, s = np.float32(np.cos(self.angle)), np.float32(np.sin(self.angle))
        return dx * c + dy * s, dy * c - dx * s


@dataclass(frozen=True)
class Look:
    """How a region is painted: a texture between two colours, with its period; independent of class."""

    texture: int
    period: float
    colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    seed: int
    """Seeds the random textures (speckle, camouflage), so that painting is a function of the Look."""


@dataclass(frozen=True)
class Layer:
    """One painted region, drawn over the earlier ones: a class shape (cls >= 1) or background clutter.

    `shape` indexes SHAPES for objects; for clutter (cls 0) it is -1 for a blob, -2 for a stroke."""

    cls: int
    shape: int
    pose: Pose
    look: Look
    wobble: tuple[float, ...] = ()


@dataclass(frozen=True)
class Scene:
    """An image as data: a background and the layers painted over it, in order."""

    size: int
    background: np.ndarray = field(repr=False)
    layers: tuple[Layer, ...]
    noise_std: float
    noise_seed: int


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _pose(size: int, rng: np.random.Generator, margin: float) -> Pose:
    cy, cx = rng.uniform(margin * size, (1 - margin) * size, 2)
    return Pose(float(cy), float(cx), float(size * rng.uniform(*RADIUS)), float(rng.uniform(0, 2 * np.pi)))


LUMA = np.array([0.299, 0.587, 0.114])


def _look(size: int, rng: np.random.Generator, under: float | None) -> Look:
    """A random texture and colour pair, apart in luminance (the texture stays visible) and, when
    `under` (the luminance below the region) is given, both far from it (the silhouette survives
    grayscale and blur)."""
    texture = int(rng.integers(len(TEXTURES)))
    period = float(rng.uniform(4.5, 8.0) * size / 96)
    seed = int(rng.integers(2**31))
    for _ in range(200):
        a, b = rng.uniform(0, 255, (2, 3))
        far_apart = abs(LUMA @ (a - b)) >= TEXTURE_CONTRAST or TEXTURES[texture] is _plain
        stands_out = under is None or min(abs(LUMA @ a - under), abs(LUMA @ b - under)) >= SILHOUETTE_CONTRAST
        if far_apart and stands_out:
            break
    return Look(texture, period, (tuple(map(float, a)), tuple(map(float, b))), seed)


def _region(layer: Layer, grid: Grid) -> np.ndarray:
    u, v = grid
    r = layer.pose.radius
    if layer.shape >= 0:
        return SHAPES[layer.shape][1](u, v, r)
    if layer.shape == -2:
        return (abs(v) <= 0.12 * r) & (abs(u) <= 1.6 * r)
    amplitude, phase = layer.wobble
    # Only the second harmonic: an oval. Third and fourth harmonics made rounded triangles and
    # squares, which the strong views' blur could not tell from the class shapes (format version 3).
    radius = 0.85 + amplitude / 2 * np.cos(2 * np.arctan2(v, u) + phase)
    return np.hypot(u, v) <= r * radius


def _paint(image: np.ndarray, region: np.ndarray, grid: Grid, look: Look) -> None:
    rng = np.random.default_rng(look.seed)
    t = TEXTURES[look.texture](grid[0][region], grid[1][region], look.period, rng).astype(np.float32)
    a, b = (np.asarray(c, np.float32) for c in look.colours)
    image[region] = a + t[:, None] * (b - a)


def _paint_layer(image: np.ndarray, layer: Layer) -> None:
    grid = layer.pose.grid(image.shape[0])
    _paint(image, _region(layer, grid), grid, layer.look)


def paint(scene: Scene) -> np.ndarray:
    """The (H, W, 3) uint8 image of a scene."""
    image = scene.background.copy()
    for layer in scene.layers:
        _paint_layer(image, layer)
    noise = np.random.default_rng(scene.noise_seed).normal(0, scene.noise_std, image.shape)
    return (image + noise).clip(0, 255).astype(np.uint8)


def label(scene: Scene) -> np.ndarray:
    """The (H, W) uint8 mask of a scene with the ignore band: geometry only, no colour or texture."""
    mask = np.zeros((scene.size, scene.size), np.uint8)
    for layer in scene.layers:
        # Later layers cover earlier ones: the mask keeps what stays visible, clutter included.
        mask[_region(layer, layer.pose.grid(scene.size))] = layer.cls
    return ignore_band(mask, max(1, round(scene.size / 100)))


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A linear gradient between two random colours plus low-frequency colour noise."""
    yy, xx = _pixel_grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    g = np.clip(0.5 + (xx / size - 0.5) * np.cos(angle) + (yy / size - 0.5) * np.sin(angle), 0, 1)[..., None]
    a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    image = a * (1 - g) + b * g
    coarse = rng.normal(128, 35, (4, 4, 3)).clip(0, 255).astype(np.uint8)
    return image + np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32) - 128


def _clutter(size: int, rng: np.random.Generator, pose: Pose | None = None) -> Layer:
    """A background blob or stroke with any texture; over `pose` when it occludes an object."""
    if pose is None:
        pose = _pose(size, rng, margin=0.0)
    else:
        offset = rng.uniform(0.6, 1.1) * pose.radius
        angle = rng.uniform(0, 2 * np.pi)
        pose = Pose(
            pose.cy + offset * np.sin(angle), pose.cx + offset * np.cos(angle), pose.radius * 0.6, pose.angle
        )
    shape = -2 if rng.random() < 0.3 else -1
    wobble = (float(rng.uniform(-0.6, 0.6)), float(rng.uniform(0, 2 * np.pi)))
    return Layer(0, shape, pose, _look(size, rng, None), wobble)


def scene(size: int, num_classes: int, rng: np.random.Generator) -> Scene:
    """Draw a scene: clutter, then OBJECTS objects (each possibly occluded by a background blob)."""
    background = _background(size, rng)
    layers = [_clutter(size, rng) for _ in range(rng.integers(*CLUTTER))]
    # What is painted so far, kept up to date layer by layer: the objects' contrast is measured on it.
    canvas = background.copy()
    for layer in layers:
        _paint_layer(canvas, layer)
    for _ in range(rng.integers(*OBJECTS)):
        shape = int(rng.integers(num_classes - 1))
        pose = _pose(size, rng, margin=0.12)
        # The mean luminance below the object (as the image will show it) is what its silhouette must
        # stand out from.
        inside = canvas.clip(0, 255).astype(np.uint8)[SHAPES[shape][1](*pose.grid(size), pose.radius)]
        under = float(LUMA @ inside.mean(0)) if len(inside) else None
        added = [Layer(shape + 1, shape, pose, _look(size, rng, under))]
        if rng.random() < OCCLUDED:
            added.append(_clutter(size, rng, pose))
        for layer in added:
            _paint_layer(canvas, layer)
        layers += added
    return Scene(size, background, tuple(layers), float(rng.uniform(2, 9)), int(rng.integers(2**31)))


def ignore_band(label: np.ndarray, width: int, ignore_index: int = 255) -> np.ndarray:
    """Mark with `ignore_index` every pixel within `width` (Chebyshev) of a pixel of another class."""
    padded = np.pad(label, width, mode="edge")
    h, w = label.shape
    border = np.zeros(label.shape, bool)
    for dy in range(2 * width + 1):
        for dx in range(2 * width + 1):
            border |= padded[dy : dy + h, dx : dx + w] != label
    return np.where(border, ignore_index, label).astype(np.uint8)


def render(size: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 mask with the ignore band."""
    drawn = scene(size, num_classes, rng)
    return paint(drawn), label(drawn)


Renderer = Callable[[int, int, np.random.Generator], tuple[np.ndarray, np.ndarray]]
"""(size, num_classes, rng) -> (image, mask): how one sample is drawn."""


def _renderer_name(renderer: Renderer) -> str:
    return f"{renderer.__module__}.{renderer.__qualname__}"


def _write_sample(out: Path, name: str, options: SynthOptions, renderer: Renderer, rng) -> Pair:
    image, mask = renderer(options.size, options.num_classes, rng)
    pair = Pair(f"JPEGImages/{name}.jpg", f"SegmentationClass/{name}.png")
    Image.fromarray(image).save(out / pair.image, quality=int(rng.integers(60, 91)))
    png = Image.fromarray(mask)
    png.putpalette(voc_palette())
    png.save(out / pair.mask)
    return pair


def generate(
    out: str | Path,
    num_train: int = 400,
    num_val: int = 100,
    size: int = 96,
    num_classes: int = 6,
    seed: int = 0,
    renderer: Renderer = render,
) -> Path:
    """Write a synthetic dataset in VOC layout with splits 1_16..full under `<out>/splits/`; returns out.

    `renderer` draws each sample (default: this module's `render`; the benchmarks pass a second one)."""
    options = SynthOptions(num_train, num_val, size, num_classes, seed)
    out = Path(out)
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClass").mkdir(exist_ok=True)
    (out / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    # Its presence marks a complete tree, so it goes first and is written back last.
    (out / "synth.json").unlink(missing_ok=True)
    lists: dict[str, list[Pair]] = {}
    for stream, (part, count, offset) in enumerate((("train", num_train, 0), ("val", num_val, num_train))):
        # One generator per image: the val images stay the same whatever the number of train images.
        rngs = (np.random.default_rng([seed, stream, i]) for i in range(count))
        lists[part] = [
            _write_sample(out, f"{offset + i:06d}", options, renderer, rng) for i, rng in enumerate(rngs)
        ]
        ids = "".join(f"{Path(p.image).stem}\n" for p in lists[part])
        (out / "ImageSets" / "Segmentation" / f"{part}.txt").write_text(ids)
    write_list(out / "splits" / "val.txt", lists["val"])
    for name, fraction in SPLITS.items():
        write_split(out / "splits" / name, *make_split(lists["train"], fraction, seed))
    meta = {**asdict(options), "class_names": class_names(num_classes), "version": FORMAT_VERSION}
    meta["generator"] = _renderer_name(renderer)
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def ensure_generated(out: str | Path, renderer: Renderer = render, **options: int) -> Path:
    """Generate `out` unless its synth.json already records exactly these options and renderer."""
    wanted = {**asdict(SynthOptions(**options)), "version": FORMAT_VERSION}
    wanted["generator"] = _renderer_name(renderer)
    meta = Path(out) / "synth.json"
    if meta.is_file():
        found = json.loads(meta.read_text())
        if {k: found.get(k) for k in wanted} == wanted:
            return Path(out)
    return generate(out, **asdict(SynthOptions(**options)), renderer=renderer)


def main(argv: list[str] | None = None) -> None:
    """`python -m trainers.synth OUT [--num-train N ...]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    defaults = SynthOptions()
    for key, value in asdict(defaults).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=value)
    args = vars(parser.parse_args(argv))
    print(generate(args.pop("out"), **args))


if __name__ == "__main__":
    main()
