"""`semiseg data check` on trees laid out like Pascal VOC, Cityscapes and COCO, holding a few of the real
published ids, and its report on a tree with missing, corrupt and out-of-range files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from semiseg import cli
from semiseg.datacheck import check_tree

from trainers.datasets import PUBLISHED_SPLITS, read_list, split_names, voc_palette, write_list

SIZE = (20, 14)
SPLITS = {
    "pascal": ("92", 3, 4),
    "cityscapes": ("1_30", 2, 3),
    "coco": ("1_512", 3, 0),
}
"""Dataset -> (published split the ids come from, labeled ids kept, unlabeled ids kept)."""
COCO_EXTRA = ["000000000009", "000000000025"]
"""train2017 images outside the labeled list: COCO's unlabeled list is derived from them."""


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_mask(path: Path, values: list[int], palette: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.resize(np.array(values, dtype=np.uint8), SIZE[0] * SIZE[1]).reshape(SIZE[1], SIZE[0])
    mask = Image.fromarray(ids)
    if palette:
        mask.putpalette(voc_palette())
    mask.save(path)


def make_tree(tmp_path: Path, dataset: str) -> tuple[Path, Path]:
    """(root, split folder) with the first published ids of one split, images and masks in the real layout."""
    split, n_labeled, n_unlabeled = SPLITS[dataset]
    root, lists = tmp_path / dataset, tmp_path / f"{dataset}-lists" / split
    labeled = read_list(PUBLISHED_SPLITS / dataset / split / "labeled.txt")[:n_labeled]
    val = read_list(PUBLISHED_SPLITS / dataset / "val.txt")[:2]
    write_list(lists / "labeled.txt", labeled)
    write_list(lists / "val.txt", val)
    unlabeled = []
    if dataset == "coco":
        for i, name in enumerate(COCO_EXTRA):
            write_image(root / "train2017" / f"{name}.jpg", 100 + i)
    else:
        unlabeled = read_list(PUBLISHED_SPLITS / dataset / split / "unlabeled.txt")[:n_unlabeled]
        write_list(lists / "unlabeled.txt", unlabeled)
    top = {"pascal": 20, "cityscapes": 18, "coco": 80}[dataset]
    for i, pair in enumerate(labeled + val):
        write_image(root / pair.image, i)
        write_mask(root / pair.mask, [0, top, 255, i % top], palette=dataset == "pascal")
    for i, pair in enumerate(unlabeled):
        write_image(root / pair.image, 50 + i)
    return root, lists


def data_check(capsys, *args: str) -> tuple[int, str]:
    try:
        cli.main(["data", "check", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().out


@pytest.mark.parametrize("dataset", sorted(SPLITS))
def test_tree_with_real_ids_passes(tmp_path, capsys, dataset):
    root, lists = make_tree(tmp_path, dataset)
    code, out = data_check(
        capsys, dataset, "--root", str(root), "--split-dir", str(lists), "--val-list", str(lists / "val.txt")
    )
    split, n_labeled, n_unlabeled = SPLITS[dataset]
    n_unlabeled = len(COCO_EXTRA) if dataset == "coco" else n_unlabeled
    assert code == 0, out
    assert f"split {split}: {n_labeled} labeled, {n_unlabeled} unlabeled, 2 val listed" in out
    assert f"{2 * (n_labeled + 2) + n_unlabeled} files checked, 0 problems" in out
    assert out.rstrip().endswith("ok: the tree matches the lists")


def test_coco_partial_train2017_is_only_a_note_with_own_lists(tmp_path, capsys):
    root, lists = make_tree(tmp_path, "coco")
    report = check_tree("coco", root, split_dir=str(lists), val_list=str(lists / "val.txt"))
    assert report.ok
    assert report.notes == [
        f"{root / 'train2017'}: holds 5 images, the full set 118,287: the unlabeled lists are derived from "
        f"this folder, so a partial copy changes the published splits"
    ]


def test_broken_tree_lists_each_problem_and_its_fix(tmp_path, capsys):
    root, lists = make_tree(tmp_path, "pascal")
    labeled = read_list(lists / "labeled.txt")
    unlabeled = read_list(lists / "unlabeled.txt")
    (root / labeled[0].image).unlink()
    jpeg = (root / labeled[1].image).read_bytes()
    (root / labeled[1].image).write_bytes(jpeg[: len(jpeg) // 3])
    write_mask(root / labeled[2].mask, [0, 7, 40, 255], palette=True)
    (root / unlabeled[0].image).write_bytes(b"")
    (root / unlabeled[1].image).write_bytes(b"not a jpeg")
    args = ["pascal", "--root", str(root), "--split-dir", str(lists), "--val-list", str(lists / "val.txt")]

    code, out = data_check(capsys, *args)
    assert code == 1
    missing = f"missing files (1):\n  labeled: {root / labeled[0].image}: file not found\n  fix: put the "
    assert missing in out
    assert "unreadable or empty files (2):" in out
    assert f"labeled: {root / labeled[1].image}: cannot decode" in out
    assert f"unlabeled: {root / unlabeled[0].image}: empty file (0 bytes)" in out
    assert "fix: re-download or re-extract these files" in out
    values = "mask values [40] outside the classes (expected 0..20 or 255)"
    assert f"masks with values outside the classes (1):\n  labeled: {root / labeled[2].mask}: {values}" in out
    assert "fix: masks must hold class ids 0..20 and 255 for ignore" in out
    assert "4 problems" in out and out.rstrip().endswith("not ready: fix the problems above")
    # Unlabeled images are decoded only when asked: then the non-JPEG one shows up too.
    code, out = data_check(capsys, *args, "--decode")
    assert code == 1 and "5 problems" in out
    assert f"unlabeled: {root / unlabeled[1].image}: cannot decode" in out


def test_cityscapes_label_ids_instead_of_train_ids_get_their_fix(tmp_path, capsys):
    root, lists = make_tree(tmp_path, "cityscapes")
    write_mask(root / read_list(lists / "val.txt")[0].mask, [7, 8, 26, 33], palette=False)
    report = check_tree("cityscapes", root, split_dir=str(lists), val_list=str(lists / "val.txt"))
    assert [p.message for p in report.problems] == [
        "mask values [26, 33] outside the classes (expected 0..18 or 255)"
    ]
    code, out = data_check(capsys, "cityscapes", "--root", str(root), "--split-dir", str(lists),
                           "--val-list", str(lists / "val.txt"))  # fmt: skip
    assert code == 1 and "cityscapesscripts' createTrainIdLabelImgs" in out


def test_published_split_against_an_empty_root_reports_the_real_counts(tmp_path, capsys):
    code, out = data_check(capsys, "pascal", "--root", str(tmp_path), "--split", "92")
    assert code == 1
    assert "split 92: 92 labeled, 10490 unlabeled, 1449 val listed" in out
    assert "fix: nothing listed was found: is --root the folder that holds JPEGImages/" in out
    assert f"... and {2 * 92 + 10490 + 2 * 1449 - 10} more" in out


def test_coco_without_train2017_says_which_folder(tmp_path, capsys):
    code, out = data_check(capsys, "coco", "--root", str(tmp_path))
    assert code == 1
    assert f"missing folders (1):\n  split: 1_128: {tmp_path / 'train2017'}: image folder not found" in out


def test_every_published_split_is_selectable_by_name():
    assert split_names("pascal", "unused: shipped lists") == sorted(
        ["92", "183", "366", "732", "1464", "1_16", "1_8", "1_4", "u2pl_1_16", "u2pl_1_8", "u2pl_1_4"]
    )
    assert split_names("cityscapes", "unused: shipped lists") == sorted(["1_30", "1_16", "1_8", "1_4", "1_2"])
    assert split_names("coco", "unused: shipped lists") == sorted(["1_512", "1_256", "1_128", "1_64", "1_32"])
