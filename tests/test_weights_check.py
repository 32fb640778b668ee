"""`semiseg weights check`: present, absent and broken backbone files, pinned SHA-256 sums, and the error a
config gets when its weights file is absent."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from semiseg import cli
from semiseg.weights import check_file

from trainers.backbones import BACKBONES
from trainers.config import ConfigError, TrainConfig, check_paths, from_dict


def weights_check(capsys, *args: str) -> tuple[int, str]:
    try:
        cli.main(["weights", "check", *args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().out


def test_present_absent_and_wrong_depth_files(tmp_path, capsys):
    torch.manual_seed(0)
    # Half precision halves the file; load_state_dict casts into the float32 backbone.
    state = {
        k: v.half() if v.is_floating_point() else v for k, v in BACKBONES["resnet50"]().state_dict().items()
    }
    torch.save(state, tmp_path / "resnet50.pth")
    shutil.copy(tmp_path / "resnet50.pth", tmp_path / "resnet101.pth")
    data = (tmp_path / "resnet50.pth").read_bytes()
    digest, size = hashlib.sha256(data).hexdigest(), len(data)
    tensors = sum(1 for k in state if not k.endswith("num_batches_tracked"))

    code, out = weights_check(capsys, "--dir", str(tmp_path))
    assert code == 1
    lines = out.splitlines()
    assert lines[0] == f"resnet50.pth: {size:,} bytes, SHA-256 {digest}"
    assert lines[1] == f"  loads into resnet50: {tensors} tensors"
    assert lines[2] == f"resnet101.pth: {size:,} bytes, SHA-256 {digest}"
    assert lines[3].startswith(
        f"  does NOT load into resnet101: {tmp_path / 'resnet101.pth'}: weights do not fit"
    )
    assert "(blocks per stage: file (3, 4, 6, 3), model (3, 4, 23, 3): a different ResNet depth?)" in lines[3]
    assert lines[4].startswith(
        f"xception.pth: absent; configs with model.pretrained: {tmp_path / 'xception.pth'}"
    )
    assert lines[5] == "1 of 3 expected files present and loading, 1 broken"


def test_pinned_sum_is_checked_before_loading(tmp_path):
    (tmp_path / "xception.pth").write_bytes(b"not weights")
    good = hashlib.sha256(b"not weights").hexdigest()
    status = check_file(tmp_path, "xception.pth", "xception65", pinned="0" * 64)
    assert status.error == (
        f"SHA-256 {good} differs from {'0' * 64} pinned in {tmp_path / 'SHA256SUMS'}: re-download it"
    )
    status = check_file(tmp_path, "xception.pth", "xception65", pinned=good)
    # The sum matches, so it goes on to the load, which refuses the bytes.
    assert status.loaded is None and status.error.startswith(
        f"{tmp_path / 'xception.pth'}: not a plain tensor"
    )


def test_sums_file_pins_the_files_it_names(tmp_path, capsys):
    (tmp_path / "resnet50.pth").write_bytes(b"partial download")
    (tmp_path / "SHA256SUMS").write_text(f"{'ab' * 32}  resnet50.pth\n")
    code, out = weights_check(capsys, "--dir", str(tmp_path))
    assert code == 1 and f"differs from {'ab' * 32} pinned" in out


def test_nothing_present_is_not_an_error(tmp_path, capsys):
    code, out = weights_check(capsys, "--dir", str(tmp_path))
    assert code == 0 and out.count(": absent;") == 3 and "0 of 3 expected files" in out


def test_config_naming_absent_weights_fails_before_training(tmp_path):
    cfg = from_dict(
        TrainConfig, {"data": {"root": str(tmp_path)}, "model": {"pretrained": "pretrained/none.pth"}}
    )
    with pytest.raises(
        ConfigError, match=r"model.pretrained: 'pretrained/none.pth' does not exist .*null to train"
    ):
        check_paths(cfg)
