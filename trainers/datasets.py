"""Datasets: what each one is (DATASETS), its split lists, their checks, and a torch Dataset of pairs.

A split list has one `<image path> <mask path>` line per image, relative to the dataset root.
Masks are palette ('P') or grayscale ('L') PNGs whose pixel value is the class id.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import io as tvio

from trainers.checkpoint import write_text_atomic
from trainers.config import DECODERS, DataConfig
from trainers.errors import DataError

PUBLISHED_SPLITS = Path(__file__).parent / "published_splits"

PASCAL_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon",
    "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


class BadFile(DataError):
    """An image or mask that cannot be read."""

    def __init__(self, path: Path | str, reason: str | None = None) -> None:
        if reason is None:
            # A DataLoader worker's error is rebuilt as BadFile(<its formatted traceback>), whose last
            # line reads "trainers.datasets.BadFile: <path>: <reason>": keep that one line.
            path, reason = str(path).rstrip().splitlines()[-1].split(": ", 1)[-1].split(": ", 1)
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # Pickled whole (a Ray worker's error reaches the driver so): args hold the joined message only.
        return BadFile, (self.path, self.reason)


@dataclass(frozen=True)
class DatasetSpec:
    num_classes: int
    ignore_index: int
    eval_mode: str
    """How UniMatch evaluates it: sliding_window for Cityscapes, whole image otherwise."""
    class_names: tuple[str, ...] = ()
    published: bool = False
    """Its split lists ship in trainers/published_splits/<name>/."""
    unlabeled_folder: str | None = None
    """When a split has no unlabeled.txt: every image of this folder that is not labeled."""


DATASETS = {
    "pascal": DatasetSpec(21, 255, "original", PASCAL_CLASSES, published=True),
    "cityscapes": DatasetSpec(19, 255, "sliding_window", CITYSCAPES_CLASSES, published=True),
    "coco": DatasetSpec(81, 255, "original", COCO_CLASSES, published=True, unlabeled_folder="train2017"),
    # Class names and count of a generated tree are in its synth.json (see dataset_spec).
    "synthetic": DatasetSpec(6, 255, "original"),
}


def dataset_spec(cfg: DataConfig) -> DatasetSpec:
    """The spec of `cfg.dataset` with the config's overrides and a synthetic tree's synth.json applied."""
    spec = _lookup(cfg.dataset)
    meta = Path(cfg.root) / "synth.json"
    if cfg.dataset == "synthetic" and meta.is_file():
        info = json.loads(meta.read_text())
        spec = replace(spec, num_classes=info["num_classes"], class_names=tuple(info["class_names"]))
    if cfg.num_classes is not None:
        spec = replace(spec, num_classes=cfg.num_classes)
    if cfg.eval_mode is not None:
        spec = replace(spec, eval_mode=cfg.eval_mode)
    names = spec.class_names[: spec.num_classes]
    names += tuple(f"class_{i}" for i in range(len(names), spec.num_classes))
    return replace(spec, class_names=names)


def _lookup(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"data.dataset: unknown dataset {name!r} (expected one of {sorted(DATASETS)})")
    return DATASETS[name]


def voc_palette() -> list[int]:
    """The 256-colour Pascal VOC palette as 768 RGB values (class i takes colour i)."""
    return list(_VOC_PALETTE)


def _voc_palette() -> tuple[int, ...]:
    palette = []
    for index in range(256):
        rgb = [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                rgb[channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
        palette += rgb
    return tuple(palette)


_VOC_PALETTE = _voc_palette()


NO_SPACES = "split lists cannot hold paths with spaces (rename the files)"


@dataclass(frozen=True)
class Pair:
    image: str
    mask: str


def read_list(path: str | Path) -> list[Pair]:
    """Read a split list of `<image path> <mask path>` lines; blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: split list not found") from None
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            # UniMatch's lists split on spaces too: a path with a space cannot be told from two paths.
            hint = f" ({len(fields)} fields: {NO_SPACES})" if len(fields) > 2 else ""
            raise DataError(
                f"{path}:{number}: expected '<image path> <mask path>', got {line.strip()!r}{hint}"
            )
        pairs.append(Pair(*fields))
    return pairs


def write_list(path: str | Path, pairs: Sequence[Pair]) -> None:
    """Write a split list atomically (temp file, fsync, rename), one `<image> <mask>` line per pair."""
    path = Path(path)
    spaced = next((f for p in pairs for f in (p.image, p.mask) if len(f.split()) != 1), None)
    if spaced is not None:
        raise DataError(f"{path}: cannot list {spaced!r}: {NO_SPACES}")
    text = "".join(f"{p.image} {p.mask}\n" for p in pairs)
    write_text_atomic(path, lambda f: f.write(text))


@dataclass
class SplitFiles:
    labeled: list[Pair]
    unlabeled: list[Pair]
    val: list[Pair]
    labeled_list: Path
    unlabeled_list: Path | None
    """None when the unlabeled list was derived from an image folder (COCO)."""
    val_list: Path

    def lists(self) -> dict[str, tuple[list[Pair], Path]]:
        """Each list with the file it came from (a derived unlabeled list: its split's labeled.txt)."""
        return {
            "labeled": (self.labeled, self.labeled_list),
            "unlabeled": (self.unlabeled, self.unlabeled_list or self.labeled_list),
            "val": (self.val, self.val_list),
        }


def resolve_split(cfg: DataConfig) -> SplitFiles:
    """Find and read the labeled, unlabeled and val lists that `cfg` names."""
    spec = _lookup(cfg.dataset)
    folder = _split_folder(cfg, spec)
    labeled_list = folder / "labeled.txt"
    labeled = read_list(labeled_list)
    unlabeled_list: Path | None = folder / "unlabeled.txt"
    if unlabeled_list.is_file():
        unlabeled = read_list(unlabeled_list)
    elif spec.unlabeled_folder is not None:
        unlabeled, unlabeled_list = derive_unlabeled(cfg.root, spec.unlabeled_folder, labeled), None
    else:
        raise DataError(f"{unlabeled_list}: split list not found")
    if cfg.val_list is not None:
        val_list = Path(cfg.val_list)
    elif spec.published:
        val_list = PUBLISHED_SPLITS / cfg.dataset / "val.txt"
    else:
        val_list = Path(cfg.root) / "splits" / "val.txt"
    return SplitFiles(labeled, unlabeled, read_list(val_list), labeled_list, unlabeled_list, val_list)


def splits_folder(dataset: str, root: str | Path) -> Path:
    """Where `data.split` names are looked up: the shipped lists of a published dataset, else
    `<root>/splits`."""
    return PUBLISHED_SPLITS / dataset if _lookup(dataset).published else Path(root) / "splits"


def split_names(dataset: str, root: str | Path) -> list[str]:
    """The split names `data.split` may take for `dataset` (each a folder with a labeled.txt)."""
    return sorted(p.parent.name for p in splits_folder(dataset, root).glob("*/labeled.txt"))


def _split_folder(cfg: DataConfig, spec: DatasetSpec) -> Path:
    if cfg.split_dir is not None:
        folder = Path(cfg.split_dir)
        if not (folder / "labeled.txt").is_file():
            raise DataError(f"data.split_dir: {folder} has no labeled.txt")
        return folder
    parent = splits_folder(cfg.dataset, cfg.root)
    folder = parent / cfg.split
    if not (folder / "labeled.txt").is_file():
        available = split_names(cfg.dataset, cfg.root)
        raise DataError(f"data.split: unknown split {cfg.split!r} in {parent} (expected one of {available})")
    return folder


def derive_unlabeled(root: str | Path, folder: str, labeled: Sequence[Pair]) -> list[Pair]:
    """COCO's unlabeled list: every `<folder>/*.jpg` not labeled, with mask `masks/<id>.png`, sorted."""
    path = Path(root) / folder
    if not path.is_dir():
        raise DataError(f"{path}: image folder not found (needed to derive the unlabeled list)")
    taken = {p.image for p in labeled}
    names = sorted(e.name for e in os.scandir(path) if e.name.endswith(".jpg"))
    pairs = (Pair(f"{folder}/{n}", f"masks/{n[: -len('.jpg')]}.png") for n in names)
    return [p for p in pairs if p.image not in taken]


@dataclass(frozen=True)
class Problem:
    what: str
    """Which list: labeled, unlabeled or val."""
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.what}: {self.file}: {self.message}"


def check_pairs(
    root: str | Path,
    pairs: Sequence[Pair],
    num_classes: int,
    ignore_index: int,
    decode: bool,
    what: str,
    masks: bool = True,
) -> list[Problem]:
    """Problems of the files of `pairs`: existence and size always, decoding and mask values if `decode`.

    `masks=False` checks images only (unlabeled masks are never read).
    """
    root = Path(root)
    problems = []
    for pair in pairs:
        found = [_stat_problem(root / pair.image, what)]
        if masks:
            found.append(_stat_problem(root / pair.mask, what))
        found = [p for p in found if p is not None]
        if not found and decode:
            found = _decode_problems(root, pair, num_classes, ignore_index, what, masks)
        problems += found
    return problems


def _stat_problem(path: Path, what: str) -> Problem | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return Problem(what, str(path), "file not found")
    return Problem(what, str(path), "empty file (0 bytes)") if size == 0 else None


def _decode_problems(
    root: Path, pair: Pair, num_classes: int, ignore_index: int, what: str, masks: bool
) -> list[Problem]:
    try:
        image = load_image(root / pair.image)
        if not masks:
            return []
        mask = load_mask(root / pair.mask)
    except BadFile as exc:
        return [Problem(what, str(exc.path), exc.reason)]
    file = str(root / pair.mask)
    if mask.size != image.size:
        return [Problem(what, file, f"mask size {mask.size} differs from image size {image.size}")]
    present = np.flatnonzero(np.bincount(np.asarray(mask).ravel(), minlength=256))
    bad = [int(v) for v in present if v >= num_classes and v != ignore_index]
    if bad:
        expected = f"0..{num_classes - 1} or {ignore_index}"
        return [Problem(what, file, f"mask values {bad[:10]} outside the classes (expected {expected})")]
    return []


def check_split(split: SplitFiles) -> list[Problem]:
    """Duplicate images within a list, and images both labeled and unlabeled (unless every one is)."""
    problems = []
    for what, (pairs, file) in split.lists().items():
        counts = Counter(p.image for p in pairs)
        dups = sorted(image for image, n in counts.items() if n > 1)
        if dups:
            problems.append(Problem(what, str(file), f"{len(dups)} duplicate images, first {dups[0]}"))
    labeled = {p.image for p in split.labeled}
    unlabeled = {p.image for p in split.unlabeled}
    shared = sorted(labeled & unlabeled)
    # A "full" split lists every image as both labeled and unlabeled: that overlap is intended.
    if shared and labeled != unlabeled:
        message = f"{len(shared)} images are both labeled and unlabeled, first {shared[0]}"
        problems.append(Problem("unlabeled", str(split.lists()["unlabeled"][1]), message))
    return problems


def empty_lists(split: SplitFiles, names: Sequence[str], why: str = "") -> list[Problem]:
    """A problem for each list of `names` that holds no image; `why` says what needs it."""
    lists = split.lists()
    expected = why or "expected one '<image path> <mask path>' line per image"
    return [Problem(n, str(lists[n][1]), f"empty list ({expected})") for n in names if not lists[n][0]]


def check_dataset(
    root: str | Path,
    split: SplitFiles,
    num_classes: int,
    ignore_index: int,
    decode: bool = False,
    val_only: bool = False,
) -> list[Problem]:
    """Every problem of a split's lists and files (for `data check` to print them all).

    Labeled and val files are always decoded (their mask values matter and the lists are short);
    `decode` also decodes the large unlabeled set instead of only checking that its files exist.
    """
    empty = empty_lists(split, ("val",) if val_only else ("labeled", "val"))
    if val_only:
        return empty + check_pairs(root, split.val, num_classes, ignore_index, True, "val")
    return (
        empty
        + check_split(split)
        + check_pairs(root, split.labeled, num_classes, ignore_index, True, "labeled")
        + check_pairs(root, split.unlabeled, num_classes, ignore_index, decode, "unlabeled", masks=False)
        + check_pairs(root, split.val, num_classes, ignore_index, True, "val")
    )


def check_split_for_training(
    root: str | Path,
    split: SplitFiles,
    num_classes: int,
    ignore_index: int,
    decode: bool = False,
    val_only: bool = False,
) -> None:
    """Raise one DataError naming the first problem and the total count; silent when all is well."""
    problems = check_dataset(root, split, num_classes, ignore_index, decode, val_only)
    if problems:
        more = f" ({len(problems)} problems in total; `data check` lists them all)"
        raise DataError(f"{problems[0]}{more if len(problems) > 1 else ''}")


def load_image(path: Path) -> Image.Image:
    """Decode an image as RGB; BadFile naming the file when it cannot be read."""
    return _load(path, lambda im: im.convert("RGB"))


def load_mask(path: Path) -> Image.Image:
    """Decode a mask as mode 'L' holding class ids (a palette PNG's indices, not its colours)."""
    return _load(path, _class_ids)


def _class_ids(im: Image.Image) -> Image.Image:
    if im.mode not in ("P", "L"):
        raise ValueError(f"mask mode {im.mode} (expected a palette 'P' or grayscale 'L' PNG of class ids)")
    # np.asarray of a 'P' image gives its indices; im.convert("L") would map them through the palette.
    return Image.fromarray(np.asarray(im))


def _load(path: Path, convert: Callable[[Image.Image], Image.Image]) -> Image.Image:
    try:
        with Image.open(path) as im:
            return convert(im)
    except FileNotFoundError:
        raise BadFile(path, "file not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadFile(path, f"cannot decode: {exc}") from None


def load_image_tensor(path: Path) -> torch.Tensor:
    """Decode an image with torchvision.io as a (3, H, W) uint8 RGB tensor (the same pixels as PIL's)."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders for TorchCodec's, which is not a dependency here.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            data = tvio.read_file(str(path))
        except RuntimeError:
            raise BadFile(path, "file not found") from None
        try:
            return tvio.decode_image(data, mode=tvio.ImageReadMode.RGB)
        except RuntimeError as exc:
            raise BadFile(path, f"cannot decode: {str(exc).split(', ', 2)[-1]}") from None


def load_mask_tensor(path: Path) -> torch.Tensor:
    """A mask's class ids as an (H, W) uint8 tensor (PIL reads the palette indices)."""
    return torch.from_numpy(np.array(load_mask(path)))


class PairDataset(Dataset):
    """Item i is `transform(image, mask)`: PIL RGB image and PIL 'L' mask of class ids, or with
    `decode="torchvision"` a (3, H, W) uint8 image tensor and an (H, W) uint8 mask tensor.

    With `with_masks=False` (unlabeled data, as UniMatch) the mask is all zeros, image-sized (None for
    tensors: the tensor geometry treats it as zeros without allocating it).
    """

    def __init__(
        self,
        root: str | Path,
        pairs: Sequence[Pair],
        transform: Callable[[Any, Any], Any] | None = None,
        with_masks: bool = True,
        decode: str = "pil",
    ) -> None:
        if decode not in DECODERS:
            raise ValueError(f"fast.decode: expected one of {DECODERS}, got {decode!r}")
        self.root = Path(root)
        self.pairs = list(pairs)
        self.transform = transform
        self.with_masks = with_masks
        self.decode = decode

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Any:
        pair = self.pairs[index]
        if self.decode == "torchvision":
            return self._tensors(pair)
        image = load_image(self.root / pair.image)
        if self.with_masks:
            mask = load_mask(self.root / pair.mask)
            self._check_size(pair, mask.size, image.size)
        else:
            mask = Image.new("L", image.size, 0)
        return (image, mask) if self.transform is None else self.transform(image, mask)

    def _tensors(self, pair: Pair) -> Any:
        image, mask = load_image_tensor(self.root / pair.image), None
        if self.with_masks:
            mask = load_mask_tensor(self.root / pair.mask)
            # (W, H) as PIL's sizes, so both decoders report a mismatch alike.
            self._check_size(pair, tuple(mask.shape[::-1]), tuple(image.shape[:0:-1]))
        return (image, mask) if self.transform is None else self.transform(image, mask)

    def _check_size(self, pair: Pair, mask_size: tuple[int, ...], image_size: tuple[int, ...]) -> None:
        if mask_size != image_size:
            raise BadFile(self.root / pair.mask, f"mask size {mask_size} differs from image {image_size}")


def repeat_to(pairs: Sequence[Pair], n: int) -> list[Pair]:
    """The list repeated and cut to length n, so one epoch of labeled data matches the unlabeled one."""
    if not pairs:
        raise DataError("cannot repeat an empty list of pairs")
    return (list(pairs) * math.ceil(n / len(pairs)))[:n]
