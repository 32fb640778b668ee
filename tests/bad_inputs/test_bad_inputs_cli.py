"""Bad inputs as a user meets them, through `semiseg`: exit code 2, one line naming the file or key and what
was expected, and nothing written that a later run could take for a finished one.

Each check is unit-tested where it lives (tests/test_datasets.py, test_config.py, test_pretrained.py,
test_grid.py); this suite proves that each one reaches the user, whole, before training writes anything.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from semiseg import cli

from trainers.datasets import Pair, read_list, write_list


def split_lists(root: Path) -> tuple[list[Pair], list[Pair]]:
    """The labeled and unlabeled lists of the fixture's split 1_4."""
    return read_list(root / "splits/1_4/labeled.txt"), read_list(root / "splits/1_4/unlabeled.txt")


def first_labeled(root: Path) -> Pair:
    return split_lists(root)[0][0]


def own_split(root: Path, labeled: list[Pair], unlabeled: list[Pair]) -> list[str]:
    """Write split `mine` under the synthetic root (where synthetic splits live) and select it."""
    write_list(root / "splits/mine/labeled.txt", labeled)
    write_list(root / "splits/mine/unlabeled.txt", unlabeled)
    return ["--set", "data.split=mine"]


def write_mask(path: Path, values: np.ndarray, mode: str = "L") -> None:
    Image.fromarray(values.astype(np.uint8)).convert(mode).save(path)


def missing_image(root: Path, tmp: Path) -> list[str]:
    (root / first_labeled(root).image).unlink()
    return []


def zero_byte_jpeg(root: Path, tmp: Path) -> list[str]:
    (root / first_labeled(root).image).write_bytes(b"")
    return []


def truncated_jpeg(root: Path, tmp: Path) -> list[str]:
    path = root / first_labeled(root).image
    path.write_bytes(path.read_bytes()[:200])
    return []


def corrupt_unlabeled_jpegs(root: Path, tmp: Path) -> list[str]:
    # Unlabeled images are only stat-ed before training (decoding 10k of them would take minutes): their
    # corruption surfaces when a loader worker reads them, and must still reach the user as one line.
    for pair in split_lists(root)[1]:
        (root / pair.image).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return ["--set", "method.name=fixmatch", "--set", "data.num_workers=1"]


def mask_of_wrong_size(root: Path, tmp: Path) -> list[str]:
    write_mask(root / first_labeled(root).mask, np.zeros((40, 41)))
    return []


def mask_with_unknown_class(root: Path, tmp: Path) -> list[str]:
    values = np.zeros((40, 40))
    values[0, 0] = 7
    write_mask(root / first_labeled(root).mask, values)
    return []


def colour_mask(root: Path, tmp: Path) -> list[str]:
    # A mask saved as colours (what a viewer shows) instead of palette indices or grayscale class ids.
    path = root / first_labeled(root).mask
    Image.open(path).convert("RGB").save(path)
    return []


def split_with_absent_id(root: Path, tmp: Path) -> list[str]:
    labeled, unlabeled = split_lists(root)
    return own_split(
        root, labeled + [Pair("JPEGImages/999999.jpg", "SegmentationClass/999999.png")], unlabeled
    )


def split_with_duplicate_id(root: Path, tmp: Path) -> list[str]:
    labeled, unlabeled = split_lists(root)
    return own_split(root, [labeled[0], *labeled], unlabeled)


def overlapping_split(root: Path, tmp: Path) -> list[str]:
    labeled, unlabeled = split_lists(root)
    return own_split(root, labeled, unlabeled + [labeled[1]])


def empty_val_list(root: Path, tmp: Path) -> list[str]:
    (root / "splits/val.txt").write_text("")
    return []


def empty_labeled_list(root: Path, tmp: Path) -> list[str]:
    return own_split(root, [], split_lists(root)[1])


def empty_unlabeled_list(root: Path, tmp: Path) -> list[str]:
    return [*own_split(root, split_lists(root)[0], []), "--set", "method.name=fixmatch"]


def path_with_a_space(root: Path, tmp: Path) -> list[str]:
    labeled, unlabeled = split_lists(root)
    own_split(root, labeled, unlabeled)
    with open(root / "splits/mine/labeled.txt", "a") as f:
        f.write("JPEGImages/my photo.jpg SegmentationClass/my photo.png\n")
    return ["--set", "data.split=mine"]


def weights_of_another_architecture(root: Path, tmp: Path) -> list[str]:
    # A torchvision-style ResNet stem and block: the tiny backbone has neither.
    state = {"conv1.weight": torch.zeros(8, 3, 7, 7), "layer1.0.conv1.weight": torch.zeros(8, 8, 3, 3)}
    torch.save(state, tmp / "resnet.pth")
    return ["--set", f"model.pretrained={tmp / 'resnet.pth'}"]


class Payload:
    """Unpickling this would create a file: the proof that a weights file ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def pickle_payload_weights(root: Path, tmp: Path) -> list[str]:
    torch.save({"conv1.weight": torch.zeros(1), "extra": Payload(tmp / "payload-ran")}, tmp / "evil.pth")
    return ["--set", f"model.pretrained={tmp / 'evil.pth'}"]


def overrides(*pairs: str) -> Callable[[Path, Path], list[str]]:
    return lambda root, tmp: [arg for pair in pairs for arg in ("--set", pair)]


@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[Path, Path], list[str]]
    """Breaks the copied dataset (or writes a bad file) and returns the extra `semiseg train` arguments."""
    message: str
    """Regular expression the single error line must match."""


CASES = [
    Case("missing image", missing_image, r"labeled: \S+/JPEGImages/000000\.jpg: file not found$"),
    Case("zero-byte jpeg", zero_byte_jpeg, r"labeled: \S+/JPEGImages/000000\.jpg: empty file \(0 bytes\)$"),
    Case("truncated jpeg", truncated_jpeg, r"labeled: \S+/JPEGImages/000000\.jpg: cannot decode"),
    Case(
        "corrupt unlabeled jpeg",
        corrupt_unlabeled_jpegs,
        r"^error: \S+/JPEGImages/0000\d\d\.jpg: cannot decode",
    ),
    Case(
        "mask of the wrong size",
        mask_of_wrong_size,
        r"labeled: \S+/000000\.png: mask size \(41, 40\) differs from image size \(40, 40\)$",
    ),
    Case(
        "mask with an unknown class id",
        mask_with_unknown_class,
        r"labeled: \S+/000000\.png: mask values \[7\] outside the classes \(expected 0\.\.2 or 255\)$",
    ),
    Case(
        "colour mask instead of palette or grayscale",
        colour_mask,
        r"labeled: \S+/000000\.png: cannot decode: mask mode RGB \(expected a palette 'P' or grayscale 'L'",
    ),
    Case(
        "split lists an absent id",
        split_with_absent_id,
        r"labeled: \S+/JPEGImages/999999\.jpg: file not found \(2 problems in total",
    ),
    Case(
        "split lists an id twice",
        split_with_duplicate_id,
        r"labeled: \S+/splits/mine/labeled\.txt: 1 duplicate images, first JPEGImages/000000\.jpg$",
    ),
    Case(
        "labeled and unlabeled lists overlap",
        overlapping_split,
        r"unlabeled: \S+/mine/unlabeled\.txt: 1 images are both labeled and unlabeled, "
        r"first JPEGImages/000006",
    ),
    Case(
        "unknown config key",
        overrides("optim.lrr=0.1"),
        r"train\.yaml: optim\.lrr: unknown key \(expected one of",
    ),
    Case("wrong type", overrides("data.crop_size=big"), r"data\.crop_size: expected int, got 'big' \(str\)$"),
    Case(
        "split name read as a number",
        overrides("data.split=1_16"),
        r"data\.split: expected str, got 116 \(int\) \(quote it: YAML reads 1_16 as the number 116\)$",
    ),
    Case("zero size", overrides("data.crop_size=0"), r"data\.crop_size: expected > 0, got 0$"),
    Case("negative size", overrides("optim.batch_size=-2"), r"optim\.batch_size: expected > 0, got -2$"),
    Case("log interval of zero", overrides("log_interval=0"), r"log_interval: expected > 0, got 0$"),
    Case("negative seed", overrides("seed=-1"), r"seed: expected an int in 0\.\.2147483647, got -1$"),
    Case(
        "unknown method",
        overrides("method.name=mean_teacher"),
        r"method\.name: expected one of \[.*'supervised'.*\], got 'mean_teacher'$",
    ),
    Case(
        "unknown backbone",
        overrides("model.backbone=resnet18"),
        r"model\.backbone: expected one of \[.*'tiny'.*\], got 'resnet18'$",
    ),
    Case("NaN learning rate", overrides("optim.lr=.nan"), r"optim\.lr: expected a finite number, got nan$"),
    Case("empty val list", empty_val_list, r"val: \S+/splits/val\.txt: empty list \(expected one "),
    Case("empty labeled list", empty_labeled_list, r"labeled: \S+/mine/labeled\.txt: empty list \(expected "),
    Case(
        "empty unlabeled list",
        empty_unlabeled_list,
        r"unlabeled: \S+/mine/unlabeled\.txt: empty list \(method fixmatch trains on unlabeled images\)",
    ),
    Case(
        "batch larger than the unlabeled set",
        overrides("method.name=fixmatch", "optim.batch_size=13"),
        r"unlabeled: \S+/1_4/unlabeled\.txt: 12 images, fewer than one batch of 13 per worker x \d worker",
    ),
    Case(
        "path with a space in a split list",
        path_with_a_space,
        r"\S+/mine/labeled\.txt:5: expected '<image path> <mask path>', got 'JPEGImages/my photo\.jpg "
        r".*\(4 fields: split lists cannot hold paths with spaces",
    ),
    Case(
        "weights of another architecture",
        weights_of_another_architecture,
        r"model\.pretrained: \S+/resnet\.pth: weights do not fit the backbone; "
        r"\d+ missing: \['stem\.0\.0\.weight'"
        r".*; 2 unexpected: \['conv1\.weight', 'layer1\.0\.conv1\.weight'\]",
    ),
    Case(
        "pickle payload in a weights file",
        pickle_payload_weights,
        r"model\.pretrained: \S+/evil\.pth: not a plain tensor state dict; "
        r"refusing to unpickle anything else",
    ),
]


def tiny_train_config(root: Path, out_dir: Path) -> dict:
    return {
        "data": {
            "dataset": "synthetic",
            "root": str(root),
            "split": "1_4",
            "crop_size": 32,
            "num_workers": 0,
        },
        "model": {"backbone": "tiny"},
        "method": {"name": "supervised", "conf_thresh": 0.0},
        "optim": {"epochs": 1, "batch_size": 2, "lr": 0.01, "max_iters_per_epoch": 2},
        "out_dir": str(out_dir),
        "log_interval": 1,
    }


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_error_line(err: str, message: str) -> None:
    """One `error:` line matching `message`, no traceback (an unfinished progress bar may precede it)."""
    errors = [line[line.index("error: ") :] for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert re.search(message, errors[0]), errors[0]


RAY_PREFIX = re.compile(r"(\x1b\[\d+m)?\(\w+ pid=\d+[,)]")
"""How Ray prefixes a line it relays from an actor or worker process."""


def check_bad_input(
    case: Case, workers: list[str], synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`semiseg train` on damaged data: exit 2, one error line, no checkpoint, and no payload ran."""
    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    out_dir = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_train_config(root, out_dir)))
    extra = case.damage(root, tmp_path)

    code, err = run_cli(["train", "--config", str(config), *workers, *extra], capsys)
    if workers:
        # Ray prints the workers' output here (`(RayTrainWorker pid=N) ...`): a file first decoded
        # mid-epoch fails in the workers, whose tracebacks show as Ray retries them. The command's own
        # lines are the rest.
        err = "\n".join(line for line in err.splitlines() if not RAY_PREFIX.match(line))

    assert code == 2
    assert_one_error_line(err, case.message)
    # Only a failure inside the first epoch gets as far as creating out_dir, and it holds nothing (under
    # Ray: the run's Ray storage and logs, no checkpoint).
    assert not out_dir.exists() or not (list(out_dir.rglob("*.pth")) if workers else any(out_dir.iterdir()))
    assert not (tmp_path / "payload-ran").exists()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_error_and_leaves_no_checkpoint(case, synthetic_root, tmp_path, capsys):
    check_bad_input(case, [], synthetic_root, tmp_path, capsys)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_under_ray_workers_is_the_same_one_error(
    case, ray_cluster, synthetic_root, tmp_path, capsys
):
    # The launcher checks names, files and weights on the driver before any worker starts, and a bad
    # file first met mid-epoch in the workers comes back as their own error: before, either failed in
    # every worker, was retried twice and ended in 175 lines of tracebacks and exit 1 (measured).
    check_bad_input(case, ["--workers", "2"], synthetic_root, tmp_path, capsys)


def test_bad_split_request_writes_no_split_files(synthetic_root, tmp_path, capsys):
    out = tmp_path / "split"
    argv = [
        "data",
        "split",
        "--train-list",
        str(synthetic_root / "splits/full/labeled.txt"),
        "--out",
        str(out),
    ]
    code, err = run_cli([*argv, "--labeled", "0"], capsys)
    assert code == 2
    assert_one_error_line(err, r"labeled: expected a count in 1\.\.16, got 0$")
    assert not out.exists()


def truncate_both_checkpoints(out_dir: Path) -> list[str]:
    for name in ("latest.pth", "previous.pth"):
        (out_dir / name).write_bytes((out_dir / name).read_bytes()[:100])
    return []


RESUME_CASES = [
    Case(
        "both checkpoints corrupt",
        lambda out_dir, tmp: truncate_both_checkpoints(out_dir),
        r"\S+/run: no checkpoint to resume from \(\S+/latest\.pth: SHA-256 does not match .*; "
        r"\S+/previous\.pth: SHA-256 does not match .*\); a fresh run would overwrite latest\.pth, "
        r"previous\.pth, best\.pth: pass `--restart` to move them aside",
    ),
    Case(
        "config changed under the same out_dir",
        overrides("optim.lr=0.02", "method.name=fixmatch"),
        r"\S+/run/latest\.pth was trained with another config: method\.name: checkpoint 'supervised', "
        r"config 'fixmatch'; optim\.lr: checkpoint 0\.01, config 0\.02\. .*`--restart`.*`--force-resume`",
    ),
    Case(
        "epochs below those the checkpoint trained",
        overrides("optim.epochs=1"),
        r"^error: optim\.epochs: 1 is below the 2 epochs \S+/run/latest\.pth has already trained",
    ),
]


def run_files(out_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out_dir)): p.read_bytes() for p in sorted(out_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", RESUME_CASES, ids=[c.name for c in RESUME_CASES])
def test_bad_resume_is_one_clear_error_and_changes_no_file(case, synthetic_root, tmp_path, capsys):
    out_dir = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_train_config(synthetic_root, out_dir)))
    cli.main(["train", "--config", str(config), "--set", "optim.epochs=2"])
    extra = case.damage(out_dir, tmp_path)
    before = run_files(out_dir)
    capsys.readouterr()

    code, err = run_cli(["train", "--config", str(config), "--set", "optim.epochs=2", *extra], capsys)

    assert code == 2
    assert_one_error_line(err, case.message)
    assert run_files(out_dir) == before


def test_restart_moves_the_run_aside_and_force_resume_accepts_a_change(synthetic_root, tmp_path, capsys):
    out_dir = tmp_path / "run"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(tiny_train_config(synthetic_root, out_dir)))
    train = ["train", "--config", str(config)]
    cli.main(train)
    cli.main([*train, "--set", "optim.epochs=2", "--set", "optim.lr=0.02", "--force-resume"])
    resumed = run_files(out_dir)
    assert torch.load(out_dir / "latest.pth", weights_only=True)["epoch"] == 2

    cli.main([*train, "--restart"])
    (aside,) = out_dir.glob("replaced-*")
    assert run_files(aside) == resumed
    assert torch.load(out_dir / "latest.pth", weights_only=True)["epoch"] == 1
    assert "mIoU" in capsys.readouterr().out
