"""Config loading: defaults, overrides, and one clear error per bad value."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.config import (
    ConfigError,
    MethodConfig,
    TrainConfig,
    check_paths,
    from_dict,
    load_config,
    parse_override,
)
from trainers.methods import METHODS, build_method

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_shipped_configs_load():
    for name in ("synthetic", "pascal", "cityscapes", "coco"):
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        assert isinstance(cfg, TrainConfig)
    city = load_config(REPO / "configs" / "cityscapes.yaml")
    assert (city.method.criterion, city.method.conf_thresh, city.optim.lr) == ("ohem", 0.0, 0.005)
    assert city.model.dilations == (6, 12, 18)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_section_round_trips_flat(name):
    """`to_dict` writes the method's own keys beside the common ones, and loading that gives the config."""
    cfg = TrainConfig(method=MethodConfig(name=name))
    section = cfg.to_dict()["method"]
    own = {f.name for f in dataclasses.fields(METHODS[name].settings_type)}
    assert "settings" not in section and own <= set(section)
    assert from_dict(TrainConfig, cfg.to_dict()) == cfg


def test_a_method_key_reaches_the_method(tmp_path):
    cfg = load_config(write(tmp_path, "method:\n  name: psmt\n  weight_u: 0.06\n  conf_thresh: 0.6\n"))
    method = build_method(cfg.method, 255)
    assert (method.conf_thresh, method.settings.weight_u, method.settings.ema_keep) == (0.6, 0.06, 0.996)


def test_ints_become_floats_and_overrides_merge(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\n"), parse_override("optim.epochs=3"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 3


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optim:\n  epochs: 3\n  lrr: 0.1\n", "optim.lrr: unknown key"),
        ("data:\n  crop_size: big\n", "data.crop_size: expected int, got 'big'"),
        ("data:\n  crop_size: 0\n", "data.crop_size: expected > 0, got 0"),
        ("method:\n  criterion: focal\n", "method.criterion: expected one of"),
        ("method:\n  conf_thresh: 1.5\n", "method.conf_thresh"),
        ("data:\n  eval_mode: whole\n", "data.eval_mode"),
        ("data:\n  scale_range: [2.0, 1.0]\n", "data.scale_range"),
        ("data:\n  scale_range: [0.5]\n", "data.scale_range"),
        ("seed: true\n", "seed: expected int, got True"),
        ("seed: -1\n", "seed: expected an int in 0..2147483647, got -1"),
        ("log_interval: 0\n", "log_interval: expected > 0, got 0"),
        ("optim:\n  lr: .nan\n", "optim.lr: expected a finite number, got nan"),
        ("optim:\n  momentum: .inf\n", "optim.momentum: expected a finite number, got inf"),
        ("model:\n  dilations: [6, 12]\n", "model.dilations: expected a list of 3 values"),
        ("bogus: 1\n", "bogus: unknown key"),
        ("method:\n  name: fixmatch\n  weight_u: 0.6\n", "method.weight_u: unknown key for method"),
        ("method:\n  name: psmt\n  ema_keep: 1.5\n", "method.ema_keep: expected a value in [0.0, 1.0]"),
        ("method:\n  name: psmt\n  assist_topk: 0\n", "method.assist_topk: expected >= 1, got 0"),
        ("method:\n  name: u2pl\n  contrast:\n    high_rank: 2\n", "method.contrast.high_rank"),
        ("method:\n  name: u2pl\n  contrast:\n    queries: 2\n", "method.contrast.queries: unknown key"),
        ("method:\n  name: mspl\n  weight_aug: -0.1\n", "method.weight_aug: expected >= 0.0"),
        ("method:\n  name: mspl\n  settings: {}\n", "method.settings: unknown key for method 'mspl'"),
        ("method:\n  name: meanteacher\n", "method.name: expected one of"),
        ("optim: 3\n", "optim: expected a mapping"),
        ("- a\n- b\n", "expected a mapping at the top level"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_missing_paths_are_named(tmp_path):
    cfg = load_config(write(tmp_path, f"data:\n  root: {tmp_path}/nowhere\n"))
    with pytest.raises(ConfigError, match="data.root: .*nowhere.* does not exist"):
        check_paths(cfg)
    cfg = load_config(write(tmp_path, f"data:\n  root: {tmp_path}\nmodel:\n  pretrained: {tmp_path}/r.pth\n"))
    with pytest.raises(ConfigError, match="model.pretrained"):
        check_paths(cfg)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))


def test_stdlib_platform_is_not_shadowed():
    # From the repository root, `platform` must still be Python's module, or torch cannot import.
    code = "import platform, torch; assert hasattr(platform, 'python_version'); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert "site-packages" not in out.stdout and str(REPO / "platform") not in out.stdout
