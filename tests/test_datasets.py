"""Datasets: the lookup table, split lists, the three real layouts, and every kind of bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.config import EVAL_MODES, DataConfig
from trainers.datasets import (
    DATASETS,
    PUBLISHED_SPLITS,
    DataError,
    Pair,
    PairDataset,
    SplitFiles,
    check_dataset,
    check_pairs,
    check_split,
    check_split_for_training,
    dataset_spec,
    read_list,
    repeat_to,
    resolve_split,
    voc_palette,
    write_list,
)

W, H = 33, 25


def _image(path: Path, size: tuple[int, int] = (W, H)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(len(str(path))).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _mask(path: Path, values: np.ndarray, palette: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    png = Image.fromarray(values.astype(np.uint8))
    if palette:
        png.putpalette(voc_palette())
    png.save(path)


def _labels(size: tuple[int, int] = (W, H), cls: int = 15) -> np.ndarray:
    values = np.zeros((size[1], size[0]), np.uint8)
    values[5:15, 8:20] = cls
    values[4, 8:20] = 255
    return values


def _tree(root: Path, pairs: list[Pair], palette: bool = True) -> None:
    for pair in pairs:
        _image(root / pair.image)
        _mask(root / pair.mask, _labels(), palette)


def _split_dir(
    tmp: Path, dataset: str, labeled: list[Pair], unlabeled: list[Pair] | None, val: list[Pair]
) -> DataConfig:
    write_list(tmp / "split" / "labeled.txt", labeled)
    if unlabeled is not None:
        write_list(tmp / "split" / "unlabeled.txt", unlabeled)
    write_list(tmp / "val.txt", val)
    root, split_dir, val_list = str(tmp / "root"), str(tmp / "split"), str(tmp / "val.txt")
    return DataConfig(dataset=dataset, root=root, split_dir=split_dir, val_list=val_list)


def _published(dataset: str, name: str, n: int) -> list[Pair]:
    return read_list(PUBLISHED_SPLITS / dataset / name)[:n]


def test_table_is_consistent():
    assert (DATASETS["pascal"].num_classes, DATASETS["pascal"].eval_mode) == (21, "original")
    assert (DATASETS["cityscapes"].num_classes, DATASETS["cityscapes"].eval_mode) == (19, "sliding_window")
    assert (DATASETS["coco"].num_classes, DATASETS["coco"].eval_mode) == (81, "original")
    for spec in DATASETS.values():
        assert spec.eval_mode in EVAL_MODES and spec.ignore_index == 255
        assert not spec.class_names or len(spec.class_names) == spec.num_classes
    assert DATASETS["pascal"].class_names[15] == "person"
    assert DATASETS["cityscapes"].class_names[::18] == ("road", "bicycle")


def test_voc_palette_colours():
    palette = voc_palette()
    assert len(palette) == 768
    colour = {i: tuple(palette[3 * i : 3 * i + 3]) for i in (0, 1, 2, 3, 15, 20, 255)}
    assert colour == {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        3: (128, 128, 0),
        15: (192, 128, 128),
        20: (0, 64, 128),
        255: (224, 224, 192),
    }


def test_read_list_skips_blank_lines_and_needs_no_final_newline(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("a.jpg a.png\n\nb.jpg  b.png\n\n")
    assert read_list(path) == [Pair("a.jpg", "a.png"), Pair("b.jpg", "b.png")]
    path.write_text("a.jpg a.png\nb.jpg b.png")
    assert len(read_list(path)) == 2


def test_read_list_names_file_and_line(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("a.jpg a.png\nb.jpg\n")
    with pytest.raises(DataError, match=r"l\.txt:2: expected '<image path> <mask path>', got 'b\.jpg'"):
        read_list(path)
    with pytest.raises(DataError, match="missing.txt: split list not found"):
        read_list(tmp_path / "missing.txt")


def test_paths_with_spaces_are_refused_by_name_when_read_and_before_written(tmp_path):
    path = tmp_path / "l.txt"
    path.write_text("a.jpg a.png\nmy photo.jpg my photo.png\n")
    with pytest.raises(DataError, match=r"l\.txt:2: .*\(4 fields: split lists cannot hold paths with spaces"):
        read_list(path)
    with pytest.raises(DataError, match=r"o\.txt: cannot list 'my photo\.jpg': split lists cannot hold"):
        write_list(tmp_path / "o.txt", [Pair("a.jpg", "a.png"), Pair("my photo.jpg", "m.png")])
    assert not (tmp_path / "o.txt").exists()


def test_write_list_round_trips(tmp_path):
    pairs = [Pair("JPEGImages/x.jpg", "SegmentationClass/x.png"), Pair("a b".replace(" ", "_"), "m.png")]
    write_list(tmp_path / "d" / "l.txt", pairs)
    assert read_list(tmp_path / "d" / "l.txt") == pairs
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["l.txt"]


def test_pascal_layout(tmp_path):
    labeled = _published("pascal", "92/labeled.txt", 3)
    unlabeled = _published("pascal", "92/unlabeled.txt", 3)
    val = _published("pascal", "val.txt", 2)
    assert labeled[0].image.startswith("JPEGImages/") and labeled[0].mask.startswith("SegmentationClass/")
    cfg = _split_dir(tmp_path, "pascal", labeled, unlabeled, val)
    _tree(tmp_path / "root", labeled + unlabeled + val)
    split = resolve_split(cfg)
    assert (split.labeled, split.unlabeled, split.val) == (labeled, unlabeled, val)
    assert check_dataset(cfg.root, split, 21, 255, decode=True) == []
    image, mask = PairDataset(cfg.root, split.labeled)[0]
    assert image.mode == "RGB" and mask.mode == "L" and image.size == mask.size == (W, H)
    np.testing.assert_array_equal(np.asarray(mask), _labels())


def test_cityscapes_layout(tmp_path):
    labeled = _published("cityscapes", "1_16/labeled.txt", 2)
    unlabeled = _published("cityscapes", "1_16/unlabeled.txt", 2)
    val = _published("cityscapes", "val.txt", 2)
    assert labeled[0].image.startswith("leftImg8bit/train/") and val[0].mask.startswith("gtFine/val/")
    assert labeled[0].mask.endswith("_gtFine_labelTrainIds.png")
    cfg = _split_dir(tmp_path, "cityscapes", labeled, unlabeled, val)
    _tree(tmp_path / "root", labeled + unlabeled + val, palette=False)
    split = resolve_split(cfg)
    assert check_dataset(cfg.root, split, 19, 255, decode=True) == []
    mask = PairDataset(cfg.root, split.val, lambda image, mask: mask)[1]
    np.testing.assert_array_equal(np.asarray(mask), _labels())


def test_coco_layout_derives_unlabeled_from_train2017(tmp_path):
    labeled = _published("coco", "1_512/labeled.txt", 3)
    val = _published("coco", "val.txt", 2)
    others = [Pair("train2017/000000000009.jpg", "masks/000000000009.png"),
              Pair("train2017/000000000025.jpg", "masks/000000000025.png")]  # fmt: skip
    cfg = _split_dir(tmp_path, "coco", labeled, None, val)
    _tree(tmp_path / "root", labeled + others + val)
    (tmp_path / "root" / "train2017" / "notes.txt").write_text("not an image")
    split = resolve_split(cfg)
    assert split.labeled == labeled and split.val == val
    assert split.unlabeled == others and split.unlabeled_list is None
    assert check_dataset(cfg.root, split, 81, 255, decode=True) == []


def test_coco_without_train2017_folder(tmp_path):
    cfg = _split_dir(tmp_path, "coco", _published("coco", "1_512/labeled.txt", 1), None, [])
    with pytest.raises(DataError, match="train2017: image folder not found"):
        resolve_split(cfg)
    with pytest.raises(DataError, match="unlabeled.txt: split list not found"):
        resolve_split(replace(cfg, dataset="pascal"))


def test_published_splits_are_the_default(tmp_path):
    split = resolve_split(DataConfig(dataset="pascal", root=str(tmp_path), split="92"))
    assert (len(split.labeled), len(split.unlabeled), len(split.val)) == (92, 10490, 1449)
    assert split.labeled_list == PUBLISHED_SPLITS / "pascal" / "92" / "labeled.txt"


def test_unknown_split_lists_the_available_ones(tmp_path):
    with pytest.raises(DataError, match=r"unknown split '93'.*'1464', '183'.*'92'"):
        resolve_split(DataConfig(dataset="pascal", root=str(tmp_path), split="93"))
    with pytest.raises(DataError, match=r"unknown dataset 'voc'"):
        resolve_split(DataConfig(dataset="voc", root=str(tmp_path)))


def test_synthetic_splits_live_under_the_root(tmp_path):
    pairs = [Pair(f"JPEGImages/{i}.jpg", f"SegmentationClass/{i}.png") for i in range(4)]
    write_list(tmp_path / "splits" / "half" / "labeled.txt", pairs[:2])
    write_list(tmp_path / "splits" / "half" / "unlabeled.txt", pairs[2:])
    write_list(tmp_path / "splits" / "val.txt", pairs[:1])
    split = resolve_split(DataConfig(dataset="synthetic", root=str(tmp_path), split="half"))
    assert (split.labeled, split.unlabeled, split.val) == (pairs[:2], pairs[2:], pairs[:1])
    with pytest.raises(DataError, match=r"expected one of \['half'\]"):
        resolve_split(DataConfig(dataset="synthetic", root=str(tmp_path), split="full"))


def test_dataset_spec_reads_synth_json_and_overrides(tmp_path):
    meta = {"num_classes": 3, "class_names": ["background", "striped disc", "checkered square"]}
    (tmp_path / "synth.json").write_text(json.dumps(meta))
    spec = dataset_spec(DataConfig(dataset="synthetic", root=str(tmp_path)))
    assert (spec.num_classes, spec.class_names) == (3, tuple(meta["class_names"]))
    spec = dataset_spec(DataConfig(dataset="pascal", num_classes=2, eval_mode="center_crop"))
    assert (spec.num_classes, spec.eval_mode) == (2, "center_crop")
    assert spec.class_names == ("background", "aeroplane")
    bare = dataset_spec(DataConfig(dataset="synthetic", root=str(tmp_path / "none")))
    assert bare.num_classes == 6 and bare.class_names[5] == "class_5"


# Bad inputs: each is reported by check_pairs naming the file, and by the raising variant.

PAIR = Pair("JPEGImages/a.jpg", "SegmentationClass/a.png")


def _problems(root: Path, decode: bool = True, num_classes: int = 21) -> list[str]:
    return [str(p) for p in check_pairs(root, [PAIR], num_classes, 255, decode, "labeled")]


def test_palette_and_grayscale_masks_are_both_accepted(tmp_path):
    for palette in (True, False):
        _tree(tmp_path, [PAIR], palette)
        assert _problems(tmp_path) == []
        np.testing.assert_array_equal(np.asarray(PairDataset(tmp_path, [PAIR])[0][1]), _labels())


def test_missing_image(tmp_path):
    _mask(tmp_path / PAIR.mask, _labels())
    assert _problems(tmp_path, decode=False) == [f"labeled: {tmp_path / PAIR.image}: file not found"]
    with pytest.raises(DataError, match="a.jpg: file not found"):
        PairDataset(tmp_path, [PAIR])[0]


def test_zero_byte_jpeg(tmp_path):
    _tree(tmp_path, [PAIR])
    (tmp_path / PAIR.image).write_bytes(b"")
    assert _problems(tmp_path, decode=False) == [f"labeled: {tmp_path / PAIR.image}: empty file (0 bytes)"]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg_found_only_when_decoding(tmp_path, damage):
    _tree(tmp_path, [PAIR])
    path = tmp_path / PAIR.image
    Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(b"not a jpeg at all" if damage == "garbage" else data[: len(data) // 2])
    assert _problems(tmp_path, decode=False) == []
    (problem,) = _problems(tmp_path)
    assert problem.startswith(f"labeled: {path}: cannot decode")
    with pytest.raises(DataError, match="a.jpg: cannot decode"):
        PairDataset(tmp_path, [PAIR])[0]


def test_mask_of_wrong_size(tmp_path):
    _tree(tmp_path, [PAIR])
    _mask(tmp_path / PAIR.mask, _labels((W + 1, H)))
    assert _problems(tmp_path) == [
        f"labeled: {tmp_path / PAIR.mask}: mask size ({W + 1}, {H}) differs from image size ({W}, {H})"
    ]
    with pytest.raises(DataError, match="a.png: mask size"):
        PairDataset(tmp_path, [PAIR])[0]


def test_mask_with_unknown_class_ids(tmp_path):
    _tree(tmp_path, [PAIR])
    values = _labels(cls=15)
    values[0, :3] = [21, 40, 254]
    _mask(tmp_path / PAIR.mask, values)
    (problem,) = _problems(tmp_path)
    assert problem.endswith("a.png: mask values [21, 40, 254] outside the classes (expected 0..20 or 255)")
    assert _problems(tmp_path, num_classes=255) == []


def test_rgb_mask_is_rejected(tmp_path):
    _tree(tmp_path, [PAIR])
    Image.new("RGB", (W, H)).save(tmp_path / PAIR.mask)
    (problem,) = _problems(tmp_path)
    assert "mask mode RGB (expected a palette 'P' or grayscale 'L' PNG" in problem


def test_unlabeled_masks_are_not_required(tmp_path):
    _image(tmp_path / PAIR.image)
    assert check_pairs(tmp_path, [PAIR], 21, 255, True, "unlabeled", masks=False) == []
    image, mask = PairDataset(tmp_path, [PAIR], with_masks=False)[0]
    assert mask.size == image.size and not np.asarray(mask).any()


def _split(labeled, unlabeled, val=()) -> SplitFiles:
    return SplitFiles(list(labeled), list(unlabeled), list(val), Path("l.txt"), Path("u.txt"), Path("v.txt"))


def test_split_naming_an_absent_id(tmp_path):
    present = Pair("JPEGImages/b.jpg", "SegmentationClass/b.png")
    _tree(tmp_path, [present])
    split = _split([PAIR], [present], [present])
    assert [str(p) for p in check_dataset(tmp_path, split, 21, 255)] == [
        f"labeled: {tmp_path / PAIR.image}: file not found",
        f"labeled: {tmp_path / PAIR.mask}: file not found",
    ]


def test_duplicates_and_overlap():
    b = Pair("JPEGImages/b.jpg", "SegmentationClass/b.png")
    c = Pair("JPEGImages/c.jpg", "SegmentationClass/c.png")
    problems = [str(p) for p in check_split(_split([PAIR, PAIR, b], [b, c], [c, c]))]
    assert problems == [
        "labeled: l.txt: 1 duplicate images, first JPEGImages/a.jpg",
        "val: v.txt: 1 duplicate images, first JPEGImages/c.jpg",
        "unlabeled: u.txt: 1 images are both labeled and unlabeled, first JPEGImages/b.jpg",
    ]
    # A full split labels every image and also lists each one as unlabeled: not a problem.
    assert check_split(_split([PAIR, b], [b, PAIR])) == []


def test_empty_labeled_and_val_lists_are_named(tmp_path):
    problems = [str(p) for p in check_dataset(tmp_path, _split([], [], []), 21, 255)]
    assert problems == [
        "labeled: l.txt: empty list (expected one '<image path> <mask path>' line per image)",
        "val: v.txt: empty list (expected one '<image path> <mask path>' line per image)",
    ]
    assert [str(p) for p in check_dataset(tmp_path, _split([], []), 21, 255, val_only=True)] == problems[1:]


def test_an_epoch_without_a_step_is_refused_naming_the_list():
    from trainers.batch import ViewSpec
    from trainers.data import check_epoch

    twelve = [Pair(f"{i}.jpg", f"{i}.png") for i in range(12)]
    split = _split([PAIR], twelve)
    check_epoch(split, ViewSpec(strong_views=1), "fixmatch", world_size=2, batch_size=6)
    with pytest.raises(DataError, match=r"^unlabeled: u\.txt: 12 images, fewer than one batch of 7 per "):
        check_epoch(split, ViewSpec(), "supervised", world_size=2, batch_size=7)
    with pytest.raises(DataError, match=r"^unlabeled: u\.txt: empty list \(method unimatch trains on"):
        check_epoch(_split(twelve, []), ViewSpec(strong_views=2), "unimatch", world_size=1, batch_size=2)
    # Supervised needs no unlabeled list: its epoch is one pass over the labeled one.
    check_epoch(_split(twelve, []), ViewSpec(), "supervised", world_size=1, batch_size=12)
    with pytest.raises(DataError, match=r"^labeled: l\.txt: 12 images, fewer than one batch of 13"):
        check_epoch(_split(twelve, []), ViewSpec(), "supervised", world_size=1, batch_size=13)


def test_raising_variant_names_the_first_problem_and_the_count(tmp_path):
    split = _split([PAIR], [Pair("JPEGImages/b.jpg", "x.png")], [PAIR])
    with pytest.raises(DataError, match=r"^labeled: .*a\.jpg: file not found \(5 problems in total"):
        check_split_for_training(tmp_path, split, 21, 255)
    with pytest.raises(DataError, match=r"^val: .*a\.jpg: file not found \(2 problems in total"):
        check_split_for_training(tmp_path, split, 21, 255, val_only=True)
    _tree(tmp_path, [PAIR, Pair("JPEGImages/b.jpg", "x.png")])
    check_split_for_training(tmp_path, split, 21, 255, decode=True)


def test_repeat_to_matches_unimatch():
    pairs = [Pair(str(i), str(i)) for i in range(3)]
    assert [p.image for p in repeat_to(pairs, 7)] == ["0", "1", "2", "0", "1", "2", "0"]
    assert [p.image for p in repeat_to(pairs, 2)] == ["0", "1"]
    with pytest.raises(DataError):
        repeat_to([], 3)


def test_a_bad_file_error_survives_pickling():
    # Ray sends a worker's error to the driver pickled; BadFile's args hold only the joined message.
    import pickle

    from trainers.datasets import BadFile

    error = pickle.loads(pickle.dumps(BadFile("/data/x.jpg", "cannot decode: truncated")))
    assert (str(error), error.path, error.reason) == (
        "/data/x.jpg: cannot decode: truncated",
        Path("/data/x.jpg"),
        "cannot decode: truncated",
    )
