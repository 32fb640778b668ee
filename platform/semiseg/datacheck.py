"""`semiseg data check`: validate a real dataset tree against the shipped published split lists.

Every listed file must exist and be non-empty; labeled and val images and masks are decoded (mask values
within the dataset's classes or its ignore index); unlabeled images are only decoded with `decode`.
The report counts what each split lists, groups the problems by kind and says how to fix each kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainers.config import DataConfig
from trainers.datasets import (
    DATASETS,
    DataError,
    Pair,
    Problem,
    SplitFiles,
    check_pairs,
    check_split,
    resolve_split,
    split_names,
)

LAYOUTS = {
    "pascal": "JPEGImages/<id>.jpg and SegmentationClass/<id>.png (UniMatch's augmented masks: "
    "SegmentationClassAug renamed to SegmentationClass)",
    "cityscapes": "leftImg8bit/{train,val}/<city>/<id>_leftImg8bit.png and "
    "gtFine/{train,val}/<city>/<id>_gtFine_labelTrainIds.png",
    "coco": "train2017/<id>.jpg, val2017/<id>.jpg and masks/<id>.png (UniMatch's class-id masks)",
}
"""What the published lists expect under --root."""
COCO_TRAIN_IMAGES = 118_287
"""train2017's size: COCO's unlabeled lists are every train2017 image not labeled."""
SHOWN = 10
"""Problems printed per kind."""

FIXES = {
    "missing": "put the files where the lists expect them under --root: {layout}",
    "corrupt": "re-download or re-extract these files (an interrupted copy leaves truncated or empty files)",
    "mask mode": "masks must be palette ('P') or grayscale ('L') PNGs whose pixel values are class ids, "
    "not RGB colour images",
    "mask values": "masks must hold class ids 0..{last} and {ignore} for ignore",
    "mask size": "each mask must have its image's size: it belongs to another image or was resized",
    "lists": "fix the split lists named above (or use the shipped ones: drop --split-dir/--val-list)",
    "folder": "put the folder the lists are derived from under --root: {layout}",
}
KIND_TITLES = {
    "missing": "missing files",
    "corrupt": "unreadable or empty files",
    "mask mode": "masks that are not class-id PNGs",
    "mask values": "masks with values outside the classes",
    "mask size": "masks whose size differs from their image",
    "lists": "split list problems",
    "folder": "missing folders",
}


@dataclass(frozen=True)
class SplitCount:
    name: str
    labeled: int
    unlabeled: int
    val: int


@dataclass
class DataReport:
    dataset: str
    root: Path
    splits: list[SplitCount] = field(default_factory=list)
    checked: int = 0
    """Distinct files examined."""
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_tree(
    dataset: str,
    root: str | Path,
    splits: Sequence[str] | None = None,
    split_dir: str | None = None,
    val_list: str | None = None,
    decode: bool = False,
) -> DataReport:
    """Check `root` against the given published splits (default: all of them), or against the lists in
    `split_dir`/`val_list`; each file is examined once however many splits list it."""
    if dataset not in LAYOUTS:
        raise DataError(f"dataset {dataset!r}: expected one of {sorted(LAYOUTS)}")
    spec = DATASETS[dataset]
    report = DataReport(dataset, Path(root))
    names = [Path(split_dir).name] if split_dir else list(splits or split_names(dataset, root))
    seen: set[tuple[Pair, bool, bool]] = set()
    for name in names:
        cfg = DataConfig(dataset=dataset, root=str(root), split=name, split_dir=split_dir, val_list=val_list)
        try:
            files = resolve_split(cfg)
        except DataError as exc:
            problem = Problem("split", name, str(exc))
            if all(p.message != problem.message for p in report.problems):
                report.problems.append(problem)
            continue
        report.splits.append(SplitCount(name, len(files.labeled), len(files.unlabeled), len(files.val)))
        report.problems += check_split(files)
        for what, pairs, masks, full in _lists(files, decode):
            new = [p for p in dict.fromkeys(pairs) if (p, masks, full) not in seen]
            seen.update((p, masks, full) for p in new)
            report.checked += len(new) * (2 if masks else 1)
            report.problems += check_pairs(root, new, spec.num_classes, spec.ignore_index, full, what, masks)
    if dataset == "coco":
        _coco_train_count(report, strict=split_dir is None)
    return report


def _lists(files: SplitFiles, decode: bool) -> list[tuple[str, list[Pair], bool, bool]]:
    # (which list, its pairs, whether masks are needed, whether files are decoded)
    return [
        ("labeled", files.labeled, True, True),
        ("unlabeled", files.unlabeled, False, decode),
        ("val", files.val, True, True),
    ]


def _coco_train_count(report: DataReport, strict: bool) -> None:
    folder = report.root / "train2017"
    if not folder.is_dir():
        return
    count = sum(1 for p in folder.iterdir() if p.suffix == ".jpg")
    if count == COCO_TRAIN_IMAGES:
        return
    message = (
        f"holds {count:,} images, the full set {COCO_TRAIN_IMAGES:,}: the unlabeled lists are derived "
        f"from this folder, so a partial copy changes the published splits"
    )
    if strict:
        report.problems.append(Problem("unlabeled", str(folder), message))
    else:
        report.notes.append(f"{folder}: {message}")


def kind(problem: Problem) -> str:
    """Which kind of fix a problem needs (a key of FIXES)."""
    text = problem.message
    if problem.what == "split":
        return "folder" if "folder not found" in text else "lists"
    for needle, name in (
        ("file not found", "missing"),
        ("mask mode", "mask mode"),
        ("mask values", "mask values"),
        ("mask size", "mask size"),
        ("empty file", "corrupt"),
        ("cannot decode", "corrupt"),
    ):
        if needle in text:
            return name
    return "lists"


def fix_for(report: DataReport, name: str, problems: list[Problem]) -> str:
    """How to fix one kind of problem, specific to the dataset where its usual cause is known."""
    spec = DATASETS[report.dataset]
    layout = LAYOUTS[report.dataset]
    text = FIXES[name].format(layout=layout, last=spec.num_classes - 1, ignore=spec.ignore_index)
    if name == "missing" and report.checked and len(problems) >= report.checked:
        text = f"nothing listed was found: is --root the folder that holds {layout}?"
    if name == "mask values" and report.dataset == "cityscapes":
        text += "; values up to 33 are Cityscapes label ids: make *_labelTrainIds.png with "
        text += "cityscapesscripts' createTrainIdLabelImgs"
    return text


def format_report(report: DataReport) -> str:
    """The printed report: counts per split, problems grouped by kind (first few of each), and fixes."""
    lines = [f"{report.dataset} at {report.root}"]
    for s in report.splits:
        lines.append(f"  split {s.name}: {s.labeled} labeled, {s.unlabeled} unlabeled, {s.val} val listed")
    lines.append(f"  {report.checked} files checked, {len(report.problems)} problems")
    lines += [f"  note: {note}" for note in report.notes]
    groups: dict[str, list[Problem]] = {}
    for problem in report.problems:
        groups.setdefault(kind(problem), []).append(problem)
    for name, problems in groups.items():
        lines.append(f"{KIND_TITLES[name]} ({len(problems)}):")
        lines += [f"  {p}" for p in problems[:SHOWN]]
        if len(problems) > SHOWN:
            lines.append(f"  ... and {len(problems) - SHOWN} more")
        lines.append(f"  fix: {fix_for(report, name, problems)}")
    lines.append("ok: the tree matches the lists" if report.ok else "not ready: fix the problems above")
    return "\n".join(lines)
