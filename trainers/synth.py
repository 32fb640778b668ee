"""A synthetic segmentation dataset in Pascal VOC's layout: the platform's embedded default.

Each object class is a shape with its own texture, painted in random colours, so neither colour nor
texture alone names the class. Backgrounds are cluttered: gradients, noise, and distractor blobs that
carry object textures (or object shapes without them) but are labeled background. Masks mark a thin
ignore band (255) along object borders, like VOC's.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from trainers.datasets import Pair, voc_palette, write_list
from trainers.splits import make_split, write_split

Grid = tuple[np.ndarray, np.ndarray]
"""Object-local pixel coordinates (u, v), rotated with the object."""

SPLITS = {"1_16": 1 / 16, "1_8": 1 / 8, "1_4": 1 / 4, "1_2": 1 / 2, "full": 1.0}
FORMAT_VERSION = 1


def _disc(u, v, r):
    return u**2 + v**2 <= r**2


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

# Class i (from 1) is CLASSES[i - 1]: a shape and the texture that goes with it.
CLASSES: tuple[tuple[str, Shape, Texture], ...] = (
    ("striped disc", _disc, _stripes),
    ("checkered square", _square, _checkers),
    ("dotted triangle", _triangle, _dots),
    ("speckled ring", _ring, _speckle),
    ("zigzag cross", _cross, _zigzag),
    ("ringed hexagon", _hexagon, _rings),
    ("hatched star", _star, _hatch),
    ("shaded crescent", _crescent, _gradient),
    ("camouflage ellipse", _ellipse, _camouflage),
    ("brick L", _l_shape, _bricks),
)
MAX_CLASSES = len(CLASSES) + 1


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
    return ["background"] + [name for name, _, _ in CLASSES[: num_classes - 1]]


def _local_grid(size: int, rng: np.random.Generator, margin: float) -> tuple[Grid, float]:
    """Rotated pixel coordinates around a random centre, and a random radius."""
    radius = size * rng.uniform(0.11, 0.27)
    cy, cx = rng.uniform(margin * size, (1 - margin) * size, 2)
    angle = rng.uniform(0, 2 * np.pi)
    dy, dx = _pixel_grid(size)
    dx, dy = dx - np.float32(cx), dy - np.float32(cy)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return (dx * c + dy * s, dy * c - dx * s), radius


@functools.lru_cache(maxsize=4)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours far enough apart in luminance that a texture stays visible after JPEG."""
    weights = np.array([0.299, 0.587, 0.114])
    while True:
        a, b = rng.uniform(0, 255, (2, 3))
        if abs(weights @ (a - b)) >= 70:
            return a, b


def _paint(image: np.ndarray, region: np.ndarray, grid: Grid, texture: Texture, size: int, rng) -> None:
    """Fill `region` of `image` with `texture` (evaluated only there) between two random colours."""
    u, v = grid[0][region], grid[1][region]
    t = texture(u, v, rng.uniform(4.5, 8.0) * size / 96, rng).astype(np.float32)[:, None]
    a, b = _colour_pair(rng)
    image[region] = a + t * (b - a)


def _blob(u, v, r, rng):
    """An irregular smooth blob: a disc whose radius wobbles with a few random harmonics."""
    angle = np.arctan2(v, u)
    wobble = sum(rng.uniform(-0.6, 0.6) / k * np.cos(k * angle + rng.uniform(0, 6.3)) for k in (2, 3, 4))
    return np.hypot(u, v) <= r * (0.85 + wobble)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A gradient with low-frequency colour noise and distractors that are not objects."""
    yy, xx = _pixel_grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    g = np.clip(0.5 + (xx / size - 0.5) * np.cos(angle) + (yy / size - 0.5) * np.sin(angle), 0, 1)[..., None]
    a, b = rng.uniform(0, 255, (2, 3)).astype(np.float32)
    image = a * (1 - g) + b * g
    coarse = rng.normal(128, 35, (4, 4, 3)).clip(0, 255).astype(np.uint8)
    image += np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), np.float32) - 128
    for _ in range(rng.integers(2, 6)):
        _distractor(image, size, rng)
    return image


def _distractor(image: np.ndarray, size: int, rng: np.random.Generator) -> None:
    """A blob with an object texture, or an object shape without its texture: both are background."""
    grid, r = _local_grid(size, rng, margin=0.0)
    if rng.random() < 0.6:
        region = _blob(*grid, r, rng)
        texture = CLASSES[rng.integers(len(CLASSES))][2] if rng.random() < 0.7 else _plain
    else:
        region, texture = CLASSES[rng.integers(len(CLASSES))][1](*grid, r), _plain
    _paint(image, region, grid, texture, size, rng)


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
    image = _background(size, rng)
    label = np.zeros((size, size), np.uint8)
    for _ in range(rng.integers(1, 5)):
        cls = int(rng.integers(1, num_classes))
        _, shape, texture = CLASSES[cls - 1]
        grid, r = _local_grid(size, rng, margin=0.12)
        region = shape(*grid, r)
        # Later objects are drawn over earlier ones: the mask keeps only what stays visible.
        _paint(image, region, grid, texture, size, rng)
        label[region] = cls
    image += rng.normal(0, rng.uniform(2, 9), image.shape)
    return image.clip(0, 255).astype(np.uint8), ignore_band(label, max(1, round(size / 100)))


def _write_sample(out: Path, name: str, size: int, num_classes: int, rng: np.random.Generator) -> Pair:
    image, mask = render(size, num_classes, rng)
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
) -> Path:
    """Write a synthetic dataset in VOC layout with splits 1_16..full under `<out>/splits/`; returns out."""
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
            _write_sample(out, f"{offset + i:06d}", size, num_classes, rng) for i, rng in enumerate(rngs)
        ]
        ids = "".join(f"{Path(p.image).stem}\n" for p in lists[part])
        (out / "ImageSets" / "Segmentation" / f"{part}.txt").write_text(ids)
    write_list(out / "splits" / "val.txt", lists["val"])
    for name, fraction in SPLITS.items():
        write_split(out / "splits" / name, *make_split(lists["train"], fraction, seed))
    meta = {**asdict(options), "class_names": class_names(num_classes), "version": FORMAT_VERSION}
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def ensure_generated(out: str | Path, **options: int) -> Path:
    """Generate `out` unless its synth.json already records exactly these options."""
    wanted = {**asdict(SynthOptions(**options)), "version": FORMAT_VERSION}
    meta = Path(out) / "synth.json"
    if meta.is_file():
        found = json.loads(meta.read_text())
        if {k: found.get(k) for k in wanted} == wanted:
            return Path(out)
    return generate(out, **asdict(SynthOptions(**options)))


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
