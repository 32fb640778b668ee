"""The synthetic dataset: VOC layout and formats, determinism, class coverage, ignore band, splits, and
classes that depend on shape alone (colour and texture never change a label)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.config import DataConfig
from trainers.datasets import check_dataset, dataset_spec, read_list, resolve_split, voc_palette
from trainers.synth import (
    MAX_CLASSES,
    TEXTURES,
    Look,
    ensure_generated,
    generate,
    ignore_band,
    label,
    main,
    paint,
    scene,
)

OPTIONS = dict(num_train=24, num_val=6, size=64, num_classes=6, seed=0)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "data", **OPTIONS)


def _masks(root: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((root / "SegmentationClass").glob("*.png"))]


def test_voc_layout_and_formats(tree):
    ids = (tree / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    val_ids = (tree / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert (len(ids), len(val_ids)) == (24, 6) and not set(ids) & set(val_ids)
    for name in ids + val_ids:
        image = Image.open(tree / "JPEGImages" / f"{name}.jpg")
        mask = Image.open(tree / "SegmentationClass" / f"{name}.png")
        assert (image.format, image.mode, mask.format, mask.mode) == ("JPEG", "RGB", "PNG", "P")
        assert image.size == mask.size == (64, 64)
        assert mask.getpalette() == voc_palette()
        assert set(np.unique(np.asarray(mask))) <= set(range(6)) | {255}
    meta = json.loads((tree / "synth.json").read_text())
    assert {k: meta[k] for k in OPTIONS} == OPTIONS
    assert meta["class_names"][:2] == ["background", "triangle"] and len(meta["class_names"]) == 6


def test_generated_splits_are_valid(tree):
    counts = {"1_16": 2, "1_8": 3, "1_4": 6, "1_2": 12, "full": 24}
    for name, n in counts.items():
        cfg = DataConfig(dataset="synthetic", root=str(tree), split=name)
        split = resolve_split(cfg)
        assert len(split.labeled) == n and len(split.val) == 6
        assert len(split.unlabeled) == (24 if name == "full" else 24 - n)
        spec = dataset_spec(cfg)
        assert check_dataset(tree, split, spec.num_classes, spec.ignore_index, decode=True) == []
    assert read_list(tree / "splits" / "1_2" / "labeled.txt")[0].image.startswith("JPEGImages/")


def test_objects_and_background_everywhere(tree):
    masks = _masks(tree)
    assert all(((m > 0) & (m < 255)).any() for m in masks)
    assert all((m == 0).mean() > 0.2 for m in masks)
    assert set(np.unique(np.concatenate([m.ravel() for m in masks]))) == set(range(6)) | {255}


def test_every_class_appears_with_many_classes(tmp_path):
    root = generate(tmp_path, num_train=30, num_val=1, size=48, num_classes=MAX_CLASSES, seed=1)
    values = set(np.unique(np.concatenate([m.ravel() for m in _masks(root)])))
    assert values == set(range(MAX_CLASSES)) | {255}


def test_ignore_band_is_thin_and_on_borders_only(tree):
    far = total = 0
    for mask in _masks(tree):
        ignored = mask == 255
        assert 0 < ignored.mean() < 0.25
        # Two different classes never touch: a band of 255 always separates them.
        padded = np.pad(mask, 1, constant_values=255)
        for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
            other = padded[1 + dy : 65 + dy, 1 + dx : 65 + dx]
            assert not ((mask != 255) & (other != 255) & (mask != other)).any()
        near = np.zeros_like(ignored)
        labeled = np.pad(~ignored, 2)
        for dy in range(5):
            for dx in range(5):
                near |= labeled[dy : dy + 64, dx : dx + 64]
        far, total = far + (ignored & ~near).sum(), total + ignored.sum()
    # A band pixel has a labeled pixel close by (a border, not a region), except in slivers of
    # objects squeezed between others.
    assert far / total < 0.005


def test_ignore_band_pinned():
    label = np.zeros((6, 6), np.uint8)
    label[2:4, 2:5] = 3
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0],
            [0, 255, 255, 255, 255, 255],
            [0, 255, 255, 255, 255, 255],
            [0, 255, 255, 255, 255, 255],
            [0, 255, 255, 255, 255, 255],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    np.testing.assert_array_equal(ignore_band(label, 1), expected)
    label[2:4, 1:5] = 3
    label[:, 5] = 1
    band = ignore_band(label, 1)
    assert band[0, 0] == 0 and band[0, 4] == 255 and band[3, 2] == 255


def test_deterministic_for_a_seed(tmp_path, tree):
    again = generate(tmp_path / "again", **OPTIONS)
    other = generate(tmp_path / "other", **{**OPTIONS, "seed": 1})
    for path in sorted(p for p in tree.rglob("*") if p.is_file()):
        relative = path.relative_to(tree)
        assert (again / relative).read_bytes() == path.read_bytes(), relative
    assert (other / "SegmentationClass" / "000000.png").read_bytes() != (
        tree / "SegmentationClass" / "000000.png"
    ).read_bytes()


def test_ensure_generated_reuses_a_matching_tree(tmp_path):
    options = dict(num_train=4, num_val=1, size=32, num_classes=3, seed=0)
    root = ensure_generated(tmp_path, **options)
    (root / "JPEGImages" / "000000.jpg").write_bytes(b"marker")
    ensure_generated(tmp_path, **options)
    assert (root / "JPEGImages" / "000000.jpg").read_bytes() == b"marker"
    ensure_generated(tmp_path, **{**options, "seed": 2})
    assert json.loads((root / "synth.json").read_text())["seed"] == 2
    assert (root / "JPEGImages" / "000000.jpg").read_bytes()[:2] == b"\xff\xd8"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("num_classes", 1, "num_classes: expected 2..11"), ("size", 16, "size: expected >= 32")],
)
def test_bad_options(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        generate(tmp_path, **{**OPTIONS, key: value})


def test_command_line(tmp_path, capsys):
    main([str(tmp_path / "cli"), "--num-train", "3", "--num-val", "1", "--size", "32", "--num-classes", "3"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert json.loads((tmp_path / "cli" / "synth.json").read_text())["num_train"] == 3


def _restyled(look: Look, rng: np.random.Generator) -> Look:
    """Another texture and other colours for the same region."""
    texture = (look.texture + int(rng.integers(1, len(TEXTURES)))) % len(TEXTURES)
    colours = tuple(tuple(float(c) for c in rng.uniform(0, 255, 3)) for _ in range(2))
    return replace(look, texture=texture, colours=colours, seed=look.seed + 1)


@pytest.mark.parametrize("seed", range(8))
def test_recolouring_and_retexturing_never_changes_a_label(seed):
    """A class is its shape: new colours and textures on every object and every piece of clutter
    give another image and exactly the same mask."""
    drawn = scene(64, MAX_CLASSES, np.random.default_rng(seed))
    rng = np.random.default_rng(100 + seed)
    restyled = replace(drawn, layers=tuple(replace(la, look=_restyled(la.look, rng)) for la in drawn.layers))
    np.testing.assert_array_equal(label(restyled), label(drawn))
    assert (paint(restyled) != paint(drawn)).any()


def test_every_class_wears_every_texture(tmp_path):
    """Textures are drawn independently of the class: over a few hundred objects each class shows
    (almost) all of them, so no texture names a class."""
    seen: dict[int, set[int]] = {}
    for i in range(300):
        for layer in scene(48, 4, np.random.default_rng(i)).layers:
            if layer.cls:
                seen.setdefault(layer.cls, set()).add(layer.look.texture)
    assert sorted(seen) == [1, 2, 3]
    assert all(len(textures) == len(TEXTURES) for textures in seen.values()), seen
