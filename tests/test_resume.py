"""Resume policy: a run continues only with its checkpoint's config (MAY_CHANGE aside), never to fewer
epochs than trained; `--restart` moves the old run aside; `--force-resume` accepts a changed config."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from trainers import checkpoint as ckpt
from trainers import resume
from trainers.config import ConfigError, MethodConfig, TrainConfig, from_dict
from trainers.entry import train_local
from trainers.errors import CheckpointError
from trainers.methods.psmt import PSMTSettings


def files(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_differences_in_a_methods_own_keys_are_named_and_a_changed_method_lists_only_its_name():
    psmt = TrainConfig(method=from_dict(MethodConfig, {"name": "psmt", "weight_u": 0.06}))
    assert resume.differences(psmt.to_dict(), psmt) == []
    other = replace(psmt, method=replace(psmt.method, settings=PSMTSettings(weight_u=0.6)))
    assert resume.differences(psmt.to_dict(), other) == ["method.weight_u: checkpoint 0.06, config 0.6"]
    fixmatch = replace(psmt, method=MethodConfig(name="fixmatch", conf_thresh=0.95))
    expected = ["method.name: checkpoint 'psmt', config 'fixmatch'"]
    assert resume.differences(psmt.to_dict(), fixmatch) == expected
    # A checkpoint that predates a key of its method's settings counts it as that method's default.
    saved = psmt.to_dict()
    del saved["method"]["ema_keep"]
    assert resume.differences(saved, psmt) == []


def test_differences_name_dotted_keys_and_skip_what_may_change(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"))
    saved = replace(
        cfg,
        optim=replace(cfg.optim, lr=0.02, epochs=3),
        data=replace(cfg.data, num_workers=7),
        out_dir="elsewhere",
        log_interval=1,
    ).to_dict()
    assert resume.differences(saved, cfg) == ["optim.lr: checkpoint 0.02, config 0.001"]


def test_paths_naming_the_same_file_and_keys_a_checkpoint_predates_are_the_same(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(data=replace(TrainConfig().data, root="data"))
    saved = replace(cfg, data=replace(cfg.data, root=str(tmp_path / "data"))).to_dict()
    del saved["fast"]["compile"]
    assert resume.differences(saved, cfg) == []
    saved["fast"]["compile"] = True
    assert resume.differences(saved, cfg) == ["fast.compile: checkpoint True, config False"]


def test_check_refuses_fewer_epochs_even_when_forced(tmp_path):
    cfg = TrainConfig(optim=replace(TrainConfig().optim, epochs=2))
    state = {"epoch": 3, "config": cfg.to_dict()}
    with pytest.raises(ConfigError, match=r"^optim\.epochs: 2 is below the 3 epochs \S+ has already trained"):
        resume.check(state, cfg, tmp_path / ckpt.LATEST, force=True)


def test_changed_config_is_refused_naming_keys_and_leaves_every_file_as_it_was(tiny_config):
    first = train_local(tiny_config(optim={"epochs": 1}), progress=False)
    before = files(first.out_dir)
    changed = tiny_config(optim={"epochs": 2, "lr": 0.02}, method={"name": "fixmatch"})
    with pytest.raises(ConfigError) as err:
        train_local(changed, progress=False)
    message = str(err.value)
    assert message.startswith(f"{first.out_dir / ckpt.LATEST} was trained with another config: ")
    assert (
        "method.name: checkpoint 'supervised', config 'fixmatch'; optim.lr: checkpoint 0.01, config 0.02"
        in (message)
    )
    assert "`--restart`" in message and "`--force-resume`" in message
    assert files(first.out_dir) == before


def test_allowed_changes_resume_and_a_finished_run_reports_its_checkpoint(tiny_config):
    first = train_local(tiny_config(optim={"epochs": 1}), progress=False)
    again = train_local(
        tiny_config(optim={"epochs": 1}, data={"num_workers": 1}, log_interval=2), progress=False
    )
    assert (
        again.epochs_run == [] and again.last_miou == first.last_miou and again.best_miou == first.best_miou
    )


def test_fewer_epochs_than_trained_is_an_error_not_a_zero_result(tiny_config):
    train_local(tiny_config(optim={"epochs": 2}), progress=False)
    with pytest.raises(
        ConfigError, match=r"^optim\.epochs: 1 is below the 2 epochs \S+latest\.pth has already"
    ):
        train_local(tiny_config(optim={"epochs": 1}), progress=False)


def test_force_resume_continues_with_the_new_config_and_says_so(tiny_config, caplog):
    first = train_local(tiny_config(optim={"epochs": 1}), progress=False)
    with caplog.at_level(logging.WARNING, logger="trainers.resume"):
        again = train_local(tiny_config(optim={"epochs": 2, "lr": 0.02}), progress=False, force_resume=True)
    assert again.epochs_run == [1]
    assert (
        "resuming with a changed config (--force-resume): optim.lr: checkpoint 0.01, config 0.02"
        in caplog.text
    )
    assert ckpt.load(first.out_dir / ckpt.LATEST)["config"]["optim"]["lr"] == 0.02


def test_restart_moves_the_old_run_aside_and_trains_afresh(tiny_config):
    first = train_local(tiny_config(optim={"epochs": 1}), progress=False)
    before = files(first.out_dir)
    again = train_local(tiny_config(optim={"epochs": 1, "lr": 0.02}), progress=False, restart=True)
    assert again.epochs_run == [0]
    (aside,) = first.out_dir.glob(f"{resume.REPLACED}*")
    assert files(aside) == before
    # A second restart keeps the first moved-aside folder where it is and adds another.
    train_local(tiny_config(optim={"epochs": 1}), progress=False, restart=True)
    folders = sorted(first.out_dir.glob(f"{resume.REPLACED}*"))
    assert len(folders) == 2 and aside in folders and files(aside) == before


def test_both_checkpoints_bad_refuses_to_train_over_best(tiny_config):
    first = train_local(tiny_config(optim={"epochs": 2}), progress=False)
    for name in (ckpt.LATEST, ckpt.PREVIOUS):
        path = first.out_dir / name
        path.write_bytes(path.read_bytes()[:100])
    before = files(first.out_dir)
    with pytest.raises(CheckpointError, match=r"no checkpoint to resume from .*would overwrite .*best\.pth"):
        train_local(tiny_config(optim={"epochs": 3}), progress=False)
    assert files(first.out_dir) == before
