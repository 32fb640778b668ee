"""Splits: counts pinned to the published ones, reproducibility, the classic Pascal rule, I/O."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainers.datasets import PUBLISHED_SPLITS, DataError, Pair, SplitFiles, check_split, read_list
from trainers.splits import (
    import_splits,
    labeled_count,
    make_pascal_classic_split,
    make_split,
    write_split,
)

TRAIN = [Pair(f"JPEGImages/{i:04d}.jpg", f"SegmentationClass/{i:04d}.png") for i in range(100)]


@pytest.mark.parametrize(
    ("total", "fraction", "count"),
    [
        (10582, 1 / 16, 662),
        (10582, 1 / 8, 1323),
        (10582, 1 / 4, 2646),
        (2975, 1 / 30, 100),
        (2975, 1 / 16, 186),
        (2975, 1 / 8, 372),
        (2975, 1 / 4, 744),
        (2975, 1 / 2, 1488),
        (118287, 1 / 512, 232),
        (118287, 1 / 32, 3697),
        (100, 0.25, 25),
        (100, 1.0, 100),
    ],
)
def test_fractions_round_up_like_the_published_splits(total, fraction, count):
    assert labeled_count(total, fraction) == count


@pytest.mark.parametrize("bad", [0, 101, 0.0, 1.5, -0.1, True, "half"])
def test_bad_labeled_amount(bad):
    with pytest.raises(DataError, match="labeled: expected"):
        make_split(TRAIN, bad, seed=0)


def test_make_split_is_reproducible_disjoint_and_complete():
    labeled, unlabeled = make_split(TRAIN, 10, seed=3)
    assert (labeled, unlabeled) == make_split(TRAIN, 10, seed=3)
    assert make_split(TRAIN, 10, seed=4)[0] != labeled
    assert (len(labeled), len(unlabeled)) == (10, 90)
    assert not {p.image for p in labeled} & {p.image for p in unlabeled}
    assert sorted(labeled + unlabeled, key=TRAIN.index) == TRAIN
    # Both lists keep the order of the train list.
    assert labeled == sorted(labeled, key=TRAIN.index) and unlabeled == sorted(unlabeled, key=TRAIN.index)


def test_fraction_split():
    labeled, unlabeled = make_split(TRAIN, 1 / 16, seed=0)
    assert (len(labeled), len(unlabeled)) == (7, 93)


def test_full_split_keeps_every_image_unlabeled_too():
    for amount in (1.0, len(TRAIN)):
        labeled, unlabeled = make_split(TRAIN, amount, seed=0)
        assert labeled == TRAIN and unlabeled == TRAIN
        assert check_split(SplitFiles(labeled, unlabeled, [], Path("l"), Path("u"), Path("v"))) == []


def test_pascal_classic_split_draws_from_the_high_quality_images():
    train_aug = read_list(PUBLISHED_SPLITS / "pascal" / "train_aug.txt")
    high_quality = read_list(PUBLISHED_SPLITS / "pascal" / "1464" / "labeled.txt")
    labeled, unlabeled = make_pascal_classic_split(train_aug, high_quality, 92, seed=1)
    assert len(labeled) == 92 and len(unlabeled) == 10582 - 92
    assert {p.image for p in labeled} <= {p.image for p in high_quality}
    assert {p.image for p in labeled} | {p.image for p in unlabeled} == {p.image for p in train_aug}
    assert make_pascal_classic_split(train_aug, high_quality, 92, seed=1) == (labeled, unlabeled)


def test_pascal_classic_split_rejects_high_quality_images_outside_train_aug():
    with pytest.raises(DataError, match="1 high-quality images are not in train_aug, first x.jpg"):
        make_pascal_classic_split(TRAIN, TRAIN[:3] + [Pair("x.jpg", "x.png")], 2, seed=0)


def test_write_split_round_trips(tmp_path):
    labeled, unlabeled = make_split(TRAIN, 5, seed=0)
    folder = write_split(tmp_path / "s", labeled, unlabeled)
    assert read_list(folder / "labeled.txt") == labeled and read_list(folder / "unlabeled.txt") == unlabeled
    assert sorted(p.name for p in folder.iterdir()) == ["labeled.txt", "unlabeled.txt"]


def _unimatch_tree(root: Path) -> None:
    for name, n in (("92", 2), ("183", 3)):
        write_split(root / "splits" / "pascal" / name, TRAIN[:n], TRAIN[n:10])
    (root / "splits" / "pascal" / "val.txt").write_text("JPEGImages/v.jpg SegmentationClass/v.png")


def test_import_splits(tmp_path):
    _unimatch_tree(tmp_path / "unimatch")
    assert import_splits(tmp_path / "unimatch", "pascal", tmp_path / "mine") == ["183", "92"]
    assert read_list(tmp_path / "mine" / "183" / "labeled.txt") == TRAIN[:3]
    assert read_list(tmp_path / "mine" / "92" / "unlabeled.txt") == TRAIN[2:10]
    assert read_list(tmp_path / "mine" / "val.txt") == [Pair("JPEGImages/v.jpg", "SegmentationClass/v.png")]


def test_import_splits_validates_before_writing(tmp_path):
    _unimatch_tree(tmp_path / "unimatch")
    (tmp_path / "unimatch" / "splits" / "pascal" / "92" / "unlabeled.txt").write_text("a.jpg a.png\nbroken\n")
    with pytest.raises(DataError, match=r"92/unlabeled.txt:2: expected"):
        import_splits(tmp_path / "unimatch", "pascal", tmp_path / "mine")
    assert not (tmp_path / "mine").exists()
    with pytest.raises(DataError, match="no split folders"):
        import_splits(tmp_path / "unimatch", "coco", tmp_path / "mine")


SHIPPED = sorted(PUBLISHED_SPLITS.glob("*/*/labeled.txt"))


@pytest.mark.parametrize("labeled_list", SHIPPED, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_every_shipped_split_reads_and_is_consistent(labeled_list):
    dataset = labeled_list.parent.parent.name
    labeled = read_list(labeled_list)
    unlabeled_list = labeled_list.parent / "unlabeled.txt"
    unlabeled = read_list(unlabeled_list) if unlabeled_list.is_file() else []
    val = read_list(PUBLISHED_SPLITS / dataset / "val.txt")
    assert check_split(SplitFiles(labeled, unlabeled, val, labeled_list, unlabeled_list, Path("val"))) == []
    total = {"pascal": 10582, "cityscapes": 2975, "coco": 118287}[dataset]
    if dataset != "coco":
        assert len(labeled) + len(unlabeled) == total
    name = labeled_list.parent.name.removeprefix("u2pl_")
    if name.startswith("1_"):
        assert len(labeled) == labeled_count(total, 1 / int(name[2:]))
    else:
        assert len(labeled) == int(name)


def test_shipped_split_counts():
    def count(*parts: str) -> int:
        return len(read_list(PUBLISHED_SPLITS.joinpath(*parts)))

    assert len(SHIPPED) == 21
    assert count("pascal", "92", "labeled.txt") == 92
    assert count("pascal", "val.txt") == 1449
    assert count("pascal", "train_aug.txt") == 10582
    assert count("cityscapes", "val.txt") == 500
    assert count("cityscapes", "1_30", "labeled.txt") == 100
    assert count("coco", "1_512", "labeled.txt") == 232
    assert count("coco", "val.txt") == 5000
    high_quality = {p.image for p in read_list(PUBLISHED_SPLITS / "pascal" / "1464" / "labeled.txt")}
    for n in ("92", "183", "366", "732"):
        assert {p.image for p in read_list(PUBLISHED_SPLITS / "pascal" / n / "labeled.txt")} <= high_quality
