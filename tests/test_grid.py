"""Grid files: validation before any trial, expansion into trials, and real runs through Ray Tune, Ray Train
and MLflow (end to end, and interrupted by a signal then resumed)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from semiseg import cli, launch, tables, tracking
from semiseg.grid import load_grid
from semiseg.trial import open_run

from trainers import recipes
from trainers.config import ConfigError, TrainConfig, flatten, from_dict, load_yaml
from trainers.entry import plan
from trainers.methods import METHODS
from trainers.methods.psmt import PSMTSettings

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def tiny_grid(tmp: Path, **changes) -> dict:
    """A grid of 2 methods x 2 splits on a 16-image synthetic set, 1 epoch of 2 steps at 33 px."""
    grid = {
        "name": "tiny",
        "synth": {"num_train": 16, "num_val": 4, "size": 33, "num_classes": 3, "seed": 0},
        "base": {
            "data": {
                "dataset": "synthetic",
                "root": str(tmp / "data"),
                "crop_size": 33,
                "num_workers": 0,
                "num_classes": 3,
            },
            "model": {"backbone": "tiny"},
            "optim": {
                "epochs": 1,
                "batch_size": 2,
                "lr": 0.01,
                "lr_multi": 1.0,
                "reference_global_batch": 2,
                "max_iters_per_epoch": 2,
            },
            "log_interval": 1,
        },
        "axes": {"method": ["supervised", "fixmatch"], "split": ["1_4", "1_2"]},
        "workers": 1,
        "storage": str(tmp / "runs"),
    }
    grid.update(changes)
    return grid


def write(tmp: Path, grid: dict, name: str = "grid.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_shipped_grids_load_and_expand(path):
    grid = load_grid(path)
    sizes = [len(v) for v in grid.axes.values()]
    assert len(grid.trials) == math.prod(sizes) and len({t.key for t in grid.trials}) == len(grid.trials)
    assert all(Path(t.config.out_dir).parent == grid.storage / "trials" for t in grid.trials)


def test_pascal_grid_is_the_seed_table_with_its_hyperparameters():
    grid = load_grid(REPO / "experiments" / "pascal-unified.yaml")
    assert grid.axes["method"] == ["supervised", "u2pl", "stpp", "psmt", "unimatch", "mspl"]
    # Only PS-MT's own settings differ from the shared protocol, and only in its trials' method section;
    # its weight is the published one of each split.
    for trial in grid.trials:
        method = trial.config.method
        if trial.axes["method"] == "psmt":
            weight = 0.06 if trial.axes["split"] == "92" else 0.6
            assert (method.conf_thresh, method.settings) == (0.6, PSMTSettings(weight_u=weight))
        else:
            assert (method.conf_thresh, method.settings) == (0.95, type(method.settings)())
        assert (trial.config.optim, trial.config.data.crop_size) == (grid.trials[0].config.optim, 321)
    assert grid.axes["split"] == ["92", "183", "366", "732", "1464"]
    cfg = grid.trials[0].config
    assert (cfg.model.backbone, cfg.data.crop_size, cfg.optim.epochs, cfg.optim.lr) == (
        "resnet101",
        321,
        200,
        0.001,
    )
    assert (cfg.optim.batch_size * grid.workers, cfg.optim.lr_multi, cfg.method.conf_thresh) == (
        8,
        10.0,
        0.95,
    )


def test_published_pascal_runs_each_method_on_its_own_recipe_and_unified_on_one():
    published = load_grid(REPO / "experiments" / "pascal.yaml")
    unified = load_grid(REPO / "experiments" / "pascal-unified.yaml")
    assert (published.protocol, unified.protocol) == ("published", "unified")
    table = recipes.recipes("pascal")
    for ours, theirs in zip(published.trials, unified.trials, strict=True):
        assert ours.axes == theirs.axes
        mine, other = (flatten(t.config.to_dict()) for t in (ours, theirs))
        changed = {k for k in mine if mine[k] != other[k] and k != "out_dir"}
        recipe = flatten(table[ours.axes["method"]])
        # Exactly the recipe's keys differ (where the unified base did not already hold its value).
        assert changed == {k for k in recipe if other[k] != recipe[k]}
        assert all(mine[k] == v for k, v in recipe.items())
    # Under unified every method shares the base's data, model and optim sections.
    assert (
        len(
            {
                (t.config.data, t.config.model, t.config.optim)
                for t in unified.trials
                if t.axes["split"] == "92"
            }
        )
        == 1
    )
    by_key = {t.key: t.config for t in published.trials}
    supervised, u2pl = by_key["pascal_92_supervised_seed0"], by_key["pascal_92_u2pl_seed0"]
    assert (supervised.data.epoch_over, supervised.optim.epochs) == ("labeled", 80)
    assert plan(supervised, published.workers)[0].steps == 80 * 11  # UniMatch supervised.py: 92 / 4 / 2
    assert (u2pl.data.crop_size, u2pl.model.output_stride, u2pl.model.dilations) == (513, 8, (12, 24, 36))
    assert by_key["pascal_92_psmt_seed0"].optim.decay_norm_and_bias is False


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"protocol": "paper"}, "protocol: expected one of ['unified', 'published'], got 'paper'"),
        ({"protocol": "published"}, "protocol: published: no published recipes for dataset 'synthetic'"),
    ],
)
def test_a_bad_protocol_is_one_error_naming_it(tmp_path, monkeypatch, change, message):
    monkeypatch.setattr(recipes, "RECIPES", tmp_path / "no_recipes")  # a dataset without a recipe file
    recipes.recipes.cache_clear()
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_grid(write(tmp_path, tiny_grid(tmp_path, **change)))
    recipes.recipes.cache_clear()


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ({"method": {"conf_thresh": 0.5}}, "fixmatch.method: a recipe sets only ['data', 'model', 'optim']"),
        ({"optim": {"epochs": 0}}, "fixmatch.optim.epochs: expected > 0, got 0"),
        ([], "fixmatch: expected a mapping of data/model/optim keys, got []"),
        (..., "fixmatch: missing (a mapping of data/model/optim keys, or null where the method publishes"),
    ],
)
def test_a_bad_recipe_file_is_one_error_naming_file_and_key(tmp_path, recipe, message):
    table = dict(recipes.recipes("pascal"), fixmatch=recipe)
    if recipe is ...:  # the method's key absent: null says "no published recipe", absence is an error
        del table["fixmatch"]
    path = tmp_path / "pascal.yaml"
    path.write_text(yaml.safe_dump(table))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {message}")):
        recipes.read_recipes(path)


def test_a_method_without_a_published_recipe_is_refused_under_published_only(tmp_path, monkeypatch):
    """A null entry reads (its repository publishes no recipe for the dataset); a grid expanding one of its
    trials under `published` is one error naming method, dataset and file, not a run of the unified recipe."""
    table = dict(recipes.recipes("synthetic"), fixmatch=None)
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "synthetic.yaml").write_text(yaml.safe_dump(table))
    monkeypatch.setattr(recipes, "RECIPES", tmp_path / "recipes")
    recipes.recipes.cache_clear()
    try:
        assert recipes.recipes("synthetic")["fixmatch"] is None
        message = (
            "protocol: published: fixmatch publishes no synthetic recipe "
            "(trainers/published_recipes/synthetic.yaml)"
        )
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_grid(write(tmp_path, tiny_grid(tmp_path, protocol="published")))
        # supervised alone still runs on its recipe; under unified the null entry is never read.
        only = load_grid(
            write(tmp_path, tiny_grid(tmp_path, protocol="published", axes={"method": ["supervised"]}))
        )
        assert {t.config.data.epoch_over for t in only.trials} == {"labeled"}
        assert len(load_grid(write(tmp_path, tiny_grid(tmp_path, protocol="unified"))).trials) == 4
    finally:
        recipes.recipes.cache_clear()


def test_published_cityscapes_and_coco_recipes_are_the_repositories_values():
    """Each entry against the values trainers/published_recipes/{cityscapes,coco}.yaml cites (UniMatch
    configs/cityscapes.yaml, configs/coco.yaml; U2PL experiments/cityscapes/744/ours/config.yaml;
    ST-PlusPlus main.py:325-329; MSP_CCL's recipe is the unified base); null where none is published."""
    city, coco = (
        flatten({k: v for k, v in recipes.recipes(d).items() if v is not None})
        for d in ("cityscapes", "coco")
    )
    assert {k: city[k] for k in city if k.startswith("supervised.")} == {
        "supervised.data.crop_size": 801,
        "supervised.data.epoch_over": "labeled",
        "supervised.optim.epochs": 240,
    }
    for method in ("fixmatch", "unimatch"):
        assert (city[f"{method}.data.crop_size"], city[f"{method}.optim.epochs"]) == (801, 240)
        assert (coco[f"{method}.model.backbone"], coco[f"{method}.optim.epochs"]) == ("xception65", 30)
    assert recipes.recipes("cityscapes")["mspl"] == recipes.recipes("coco")["mspl"] == {}
    assert recipes.recipes("cityscapes")["u2pl"] == {
        "data": {"crop_size": 769},
        "model": {"output_stride": 8, "dilations": [12, 24, 36]},
        "optim": {
            "epochs": 200,
            "batch_size": 4,
            "reference_global_batch": 16,
            "lr": 0.01,
            "weight_decay": 0.0005,
        },
    }
    assert (city["stpp.data.crop_size"], city["stpp.optim.epochs"], city["stpp.optim.lr"]) == (
        721,
        240,
        0.004,
    )
    assert (city["stpp.optim.lr_multi"], city["stpp.model.output_stride"]) == (10.0, 8)
    assert recipes.recipes("cityscapes")["psmt"] is None
    assert [m for m, r in recipes.recipes("coco").items() if r is None] == ["u2pl", "stpp", "psmt"]


def test_published_cityscapes_grid_expands_each_method_on_its_recipe(tmp_path):
    """experiments/cityscapes.yaml under `published`: every method with a recipe trains on the base plus
    exactly its recipe (global batch 16 and lr 0.01 for U2PL); PS-MT is refused, naming the file."""
    raw = yaml.safe_load((REPO / "experiments" / "cityscapes.yaml").read_text())
    raw.update(
        protocol="published",
        axes={"method": ["supervised", "unimatch", "mspl", "u2pl", "stpp"], "split": ["1_16"]},
    )
    grid = load_grid(write(tmp_path, raw))
    by_method = {t.axes["method"]: t.config for t in grid.trials}
    assert (by_method["mspl"].data.crop_size, by_method["mspl"].optim.epochs) == (513, 300)
    assert (by_method["unimatch"].data.crop_size, by_method["unimatch"].optim.epochs) == (801, 240)
    u2pl = by_method["u2pl"]
    assert (u2pl.optim.batch_size * grid.workers, u2pl.optim.reference_global_batch, u2pl.optim.lr) == (
        16,
        16,
        0.01,
    )
    assert (u2pl.model.output_stride, u2pl.optim.lr_multi, u2pl.method.criterion) == (8, 1.0, "ohem")
    assert (by_method["stpp"].optim.lr, by_method["stpp"].optim.lr_multi) == (0.004, 10.0)
    raw["axes"]["method"] = ["psmt"]
    message = (
        "protocol: published: psmt publishes no cityscapes recipe "
        "(trainers/published_recipes/cityscapes.yaml)"
    )
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_grid(write(tmp_path, raw))


def test_a_per_split_setting_reaches_its_trials_and_mlflow_records_each(tmp_path):
    """PS-MT's published weight differs by split (0.06 at 92 labels, 0.6 from 183): each trial's child run
    in a real MLflow store holds its own split's value."""
    grid = load_grid(REPO / "experiments" / "pascal.yaml")
    grid = dataclasses.replace(grid, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    mlflow = tracking.client(grid.tracking_uri)
    experiment = tracking.ensure_experiment(mlflow, grid.name)
    parent = tracking.start_parent(mlflow, experiment, grid.name, {})
    logged = {}
    for trial in grid.trials:
        if trial.axes["method"] == "psmt" and trial.axes["seed"] == 0:
            run_id = open_run(grid, trial, experiment, parent)
            logged[trial.axes["split"]] = mlflow.get_run(run_id).data.params["method.weight_u"]
    assert logged == {"92": "0.06", "183": "0.6", "366": "0.6", "732": "0.6", "1464": "0.6"}


def test_expansion_order_keys_and_configs(tmp_path):
    grid = load_grid(
        write(tmp_path, tiny_grid(tmp_path, axes={"method": ["mspl", "supervised"], "seed": [3, 4]}))
    )
    assert [t.key for t in grid.trials] == [
        "synthetic_1_16_mspl_seed3",
        "synthetic_1_16_mspl_seed4",
        "synthetic_1_16_supervised_seed3",
        "synthetic_1_16_supervised_seed4",
    ]
    trial = grid.trial({"method": "supervised", "seed": 4})
    assert (trial.config.method.name, trial.config.seed, trial.config.data.split) == ("supervised", 4, "1_16")
    assert trial.config.out_dir == str(tmp_path / "runs" / "trials" / "synthetic_1_16_supervised_seed4")
    assert grid.tracking_uri == f"sqlite:///{tmp_path / 'runs'}/mlflow.db"


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = tiny_grid(tmp_path)
    raw["base"]["data"]["root"] = "data/tiny"
    del raw["storage"]
    grid = load_grid(write(tmp_path, raw))
    assert grid.trials[0].config.data.root == str(tmp_path / "data" / "tiny")
    assert grid.storage == tmp_path / "runs" / "tiny"


def test_tracking_uri_from_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    grid = load_grid(write(tmp_path, tiny_grid(tmp_path, tracking_uri="sqlite:////elsewhere.db")))
    assert grid.tracking_uri == "http://127.0.0.1:5999"


def test_dry_run_prints_every_resolved_trial_config_and_starts_nothing(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.chdir(tmp_path)  # the grid's storage is runs/<name> under the working directory
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    path = REPO / "experiments" / "pascal-unified.yaml"
    cli.main(["grid", str(path), "--dry-run"])  # returns (exit code 0) instead of running anything

    out = capsys.readouterr().out
    grid = load_grid(path)
    assert len(grid.trials) == math.prod(len(v) for v in grid.axes.values()) == 6 * 5 * 3
    headers = re.findall(r"^--- # trial (\d+)/90: (\S+)$", out, re.M)
    assert headers == [(str(i), t.key) for i, t in enumerate(grid.trials, 1)]
    # 10,490 unlabeled images over 4 workers x batch 2 per epoch, the labeled list repeated to match
    # (UniMatch's protocol for every method); ST++'s stages on 92 labeled, 5,245 reliable, then all.
    assert (
        "--- # trial 1/90: pascal_92_supervised_seed0\n# 262,200 steps (200 epochs x 1,311, global batch 8)\n"
        in out
    )
    assert (
        "--- # trial 31/90: pascal_92_stpp_seed0\n# stage 1: 4,400 steps (400 epochs x 11, global batch 8)\n"
        "# stage 2: 131,000 steps (200 epochs x 655, global batch 8)\n"
        "# stage 3: 262,200 steps (200 epochs x 1,311, global batch 8)\n# total: 397,600 steps\n"
    ) in out
    documents = list(yaml.safe_load_all(out))
    assert len(documents) == len(grid.trials)
    for document, trial in zip(documents, grid.trials, strict=True):
        config = from_dict(TrainConfig, document)  # each document is a training config as it stands
        assert config == trial.config
        assert (config.method.name, config.data.split, config.seed) == tuple(
            trial.axes[a] for a in ("method", "split", "seed")
        )
        assert (config.optim.lr, config.optim.epochs, config.data.root) == (
            0.001,
            200,
            str(tmp_path / "data/VOC2012"),
        )
        assert config.method.conf_thresh == (0.6 if config.method.name == "psmt" else 0.95)
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == []


def test_dry_run_piped_into_a_reader_that_stops_early_exits_cleanly(tmp_path):
    # `semiseg grid ... --dry-run | head`: the pipe closes after a few lines of ~4,800.
    command = [
        sys.executable,
        "-m",
        "semiseg.cli",
        "grid",
        str(REPO / "experiments" / "pascal.yaml"),
        "--dry-run",
    ]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert run.stdout.readline().startswith(b"# grid pascal")
    run.stdout.close()
    assert run.wait(timeout=60) == 0
    assert b"Traceback" not in run.stderr.read()


BAD = [
    (
        "unknown axis",
        {"axes": {"method": ["mspl"], "colour": ["red"]}},
        "axes.colour: unknown key (expected one of ['dataset', 'method', 'seed', 'split'])",
    ),
    (
        "absent split",
        {"axes": {"split": ["1_16", "1_3"]}},
        "axes.split: dataset 'synthetic' has no split '1_3' "
        "(expected one of ['1_16', '1_2', '1_4', '1_8', 'full'])",
    ),
    (
        "published split absent",
        {"base": {"data": {"dataset": "pascal"}}, "axes": {"split": ["92", "1_30"]}},
        "axes.split: dataset 'pascal' has no split '1_30'",
    ),
    (
        "method typo",
        {"axes": {"method": ["supervised", "unimach"]}},
        f"axes.method: expected one of {sorted(METHODS)}, got 'unimach'",
    ),
    (
        "split read as a number",
        {"axes": {"split": [116]}},
        "axes.split: expected str, got 116 (int) (quote it: YAML reads 1_16 as the number 116)",
    ),
    ("unknown top-level key", {"seeds": [0, 1]}, "seeds: unknown key"),
    ("base typo", {"base": {"optim": {"lrr": 0.1}}}, "base.optim.lrr: unknown key"),
    ("bad synth option", {"synth": {"size": 8}}, "synth.size: expected >= 32 pixels, got 8"),
    ("zero workers", {"workers": 0}, "workers: expected >= 1, got 0"),
    (
        "method setting typo",
        {"method_settings": {"fixmatch": {"conf_tresh": 0.5}}},
        "method_settings.fixmatch.conf_tresh: unknown key",
    ),
    (
        "method setting out of range",
        {"method_settings": {"fixmatch": {"conf_thresh": 1.5}}},
        "method.conf_thresh: expected a value in [0, 1], got 1.5",
    ),
    (
        "settings for a method the grid does not run",
        {"method_settings": {"psmt": {"weight_u": 0.6}}},
        "method_settings.psmt: not a method of this grid (it runs ['supervised', 'fixmatch'])",
    ),
    (
        "settings renaming the method",
        {"method_settings": {"fixmatch": {"name": "mspl"}}},
        "method_settings.fixmatch.name: set by the method axis",
    ),
    (
        "a key of another method",
        {"method_settings": {"fixmatch": {"weight_u": 0.6}}},
        "method_settings.fixmatch.weight_u: unknown key for method 'fixmatch'",
    ),
    (
        "a method key in base that one method of the axis lacks",
        {"base": {"method": {"weight_s": 0.5}}},
        "base.method.weight_s: unknown key for method 'supervised'",
    ),
    (
        "per-split settings for a split the grid does not run",
        {"method_settings": {"fixmatch": {"by_split": {"1_8": {"weight_s": 0.5}}}}},
        "method_settings.fixmatch.by_split.1_8: not a split of this grid (it runs ['1_4', '1_2'])",
    ),
    (
        "per-split settings with a typo",
        {"method_settings": {"fixmatch": {"by_split": {"1_4": {"weight_ss": 0.5}}}}},
        "method_settings.fixmatch.by_split.1_4.weight_ss: unknown key for method 'fixmatch'",
    ),
]


@pytest.mark.parametrize(("change", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
@pytest.mark.parametrize("extra", [[], ["--dry-run"]], ids=["run", "dry run"])
def test_bad_grid_is_one_clear_error_before_any_trial(tmp_path, capsys, change, message, extra):
    path = write(tmp_path, tiny_grid(tmp_path, **change))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["grid", str(path), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith(f"error: {path}: {message}")
    assert err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_resume_without_a_previous_run_is_an_error(tmp_path):
    from semiseg.grid import run

    with pytest.raises(ConfigError, match="nothing to resume under"):
        run(load_grid(write(tmp_path, tiny_grid(tmp_path))), resume=True)


# --- real runs: Ray Tune + Ray Train + MLflow, through the command line -------------------------------------


def _env() -> dict[str, str]:
    paths = [str(REPO), str(REPO / "platform"), os.environ.get("PYTHONPATH", "")]
    # Ray Train's controller polls workers every 2 s by default: most of a tiny epoch.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each grid starts a private cluster
    return env | {
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    }


def _grid_command(path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "semiseg.cli", "grid", str(path), *extra]


def _store(grid):
    mlflow = tracking.client(grid.tracking_uri)
    experiment = mlflow.get_experiment_by_name(grid.name).experiment_id
    (parent,) = mlflow.search_runs([experiment], filter_string=f"tags.`{tracking.ROLE_TAG}` = 'grid'")
    return mlflow, experiment, parent


def _reported(grid) -> dict[tuple[str, str], dict]:
    """Each trial's last result as Tune recorded it (what TuneReportCallback reported), by (method, split)."""
    out = {}
    for result in grid.tune_dir.glob("*/result.json"):
        last = json.loads(result.read_text().splitlines()[-1])
        out[(last["config"]["method"], last["config"]["split"])] = last
    return out


@dataclass
class Finished:
    """A `semiseg grid` command run to its end: its grid file, working directory and output."""

    path: Path
    cwd: Path
    done: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def tiny_grid_run(tmp_path_factory) -> Finished:
    """The tiny grid (2 methods x 2 splits) through `semiseg grid` as a user runs it: a private cluster,
    the quiet console, stdout a pipe. Run once for the tests that each inspect one side of its result."""
    tmp = tmp_path_factory.mktemp("tiny_grid_run")
    path = write(tmp, tiny_grid(tmp))
    # stdout is a pipe, not a terminal: plain status lines, not a block rewritten in place.
    done = subprocess.run(
        _grid_command(path), env=_env(), cwd=tmp, capture_output=True, text=True, timeout=900
    )
    return Finished(path, tmp, done)


def test_grid_end_to_end_through_tune_train_and_mlflow(tiny_grid_run):
    path, tmp_path, done = tiny_grid_run.path, tiny_grid_run.cwd, tiny_grid_run.done
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| best epoch | 1_4 (4 labels) | 1_2 (8 labels) |" in done.stdout

    grid = load_grid(path)
    mlflow, experiment, parent = _store(grid)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    children = tracking.child_runs(mlflow, experiment, parent.info.run_id)
    combos = {(c.data.tags["method"], c.data.tags["split"]) for c in children}
    assert combos == set(itertools.product(["supervised", "fixmatch"], ["1_4", "1_2"]))
    for child in children:
        tags, trial = child.data.tags, grid.trial(child.data.tags)
        assert child.info.status == "FINISHED"
        assert (tags["dataset"], tags["seed"], tags["device"], tags["workers"]) == (
            "synthetic",
            "0",
            "CPU",
            "1",
        )
        assert tags["num_labeled"] == {"1_4": "4", "1_2": "8"}[tags["split"]]
        assert child.data.params == tracking.flatten(trial.config.to_dict())
        wanted = {"miou", "best_miou", "iou_0", "iou_2", "loss", "loss_x", "lr", "images_per_s", "epoch_time"}
        wanted |= {"mask_ratio", "loss_s"} if tags["method"] == "fixmatch" else set()
        assert wanted <= set(child.data.metrics)
        assert [m.step for m in mlflow.get_metric_history(child.info.run_id, "miou")] == [0]
        artifacts = {a.path for a in mlflow.list_artifacts(child.info.run_id)}
        assert artifacts == {"config.yaml", "curves.png", "overlays.png", launch.RUN_LOG}
        assert {r["master_addr"] for r in launch.read_reports(trial.config.out_dir)} == {"127.0.0.1"}
    logged = {a.path for a in mlflow.list_artifacts(parent.info.run_id, "table")}
    assert {"table/table.md", "table/table.parquet", "table/table.csv", "table/miou_vs_labels.png"} == logged

    # The table, rebuilt from MLflow alone, matches what each trial reported to Tune.
    table = tables.build(grid.tracking_uri, grid.name, tmp_path / "again", log_artifacts=False)
    reported = _reported(grid)
    assert len(table.cells) == len(reported) == 4
    for cell in table.cells:
        last = reported[(cell.method, cell.split)]
        assert cell.n_seeds == 1
        assert cell.best_mean == pytest.approx(last["best_miou"])
        assert cell.last_mean == pytest.approx(last["miou"])
        assert cell.device_hours == pytest.approx(last["epoch_time"] / 3600)


RAY_NOISE = ("WARNING", "Warning", "(raylet)", "pid=", "Failed to query", "Ray", "Trial status", "╭")
"""What Ray, Ray Train and Tune print on their own (worker prefixes, warnings, Tune's tables)."""


def test_grid_console_is_a_status_line_per_trial_and_the_table(tiny_grid_run):
    quiet, tmp_path, done = tiny_grid_run.path, tiny_grid_run.cwd, tiny_grid_run.done
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # Nothing on stderr: what the user sees is stdout alone (the same as both streams on one pipe).
    assert done.stderr == ""
    out = done.stdout
    grid = load_grid(quiet)
    table = (grid.storage / "table" / "table.md").read_text().splitlines()
    lines = out.splitlines()
    status, tail = lines[: -len(table) - 2], lines[-len(table) - 2 :]
    # Status lines, the table, where the table is; nothing else.
    assert tail[:-1] == ["", *table] and tail[-1].startswith("table -> ")
    assert len(lines) <= 3 * len(grid.trials) + len(table) + 2 < 40
    assert not [line for line in lines if any(noise in line for noise in RAY_NOISE)]
    texts = {t.key: f"{t.axes['method']} {t.axes['split']} seed {t.axes['seed']}" for t in grid.trials}
    labels = {key: f"{text.ljust(max(map(len, texts.values())))}  " for key, text in texts.items()}
    assert all(any(line.startswith(label) for label in labels.values()) for line in status)
    mlflow, experiment, parent = _store(grid)
    children = _children_by_key(mlflow, experiment, parent.info.run_id)
    for trial in grid.trials:
        mine = [line for line in status if line.startswith(labels[trial.key])]
        assert mine[0].startswith(f"{labels[trial.key]}started, log: ")
        assert mine[-1].startswith(f"{labels[trial.key]}done  epoch 1/1  mIoU ")
        assert sum("log: " in line for line in mine) == 1
        run_log = tmp_path / mine[0].split("log: ")[1]
        assert run_log == Path(trial.config.out_dir) / launch.RUN_LOG
        assert "rank 0 INFO trainers.loop: epoch 0: mIoU" in run_log.read_text()
        assert launch.RUN_LOG in {a.path for a in mlflow.list_artifacts(children[trial.key].info.run_id)}


@pytest.fixture(scope="module")
def methods_grid_run(ray_cluster, tmp_path_factory) -> Finished:
    """U2PL, ST++ and PS-MT on split 1_2 through `semiseg grid --verbose` under the published protocol
    (trainers/published_recipes/synthetic.yaml), joining the module's cluster."""
    tmp = tmp_path_factory.mktemp("methods_grid_run")
    raw = tiny_grid(tmp, axes={"method": ["u2pl", "stpp", "psmt"]}, protocol="published")
    raw["base"]["data"]["split"] = "1_2"
    raw["method_settings"] = {"psmt": {"conf_thresh": 0.6, "weight_u": 0.6}}
    path = write(tmp, raw)
    done = subprocess.run(
        _grid_command(path, "--address", ray_cluster, "--verbose"),
        env=_env(),
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return Finished(path, tmp, done)


def test_u2pl_stpp_and_psmt_train_through_the_grid_into_the_table(methods_grid_run):
    path, tmp_path, done = methods_grid_run.path, methods_grid_run.cwd, methods_grid_run.done
    assert done.returncode == 0, done.stderr[-3000:]
    grid = load_grid(path)
    mlflow, experiment, parent = _store(grid)
    children = _children_by_key(mlflow, experiment, parent.info.run_id)
    assert {c.data.tags["method"] for c in children.values()} == {"u2pl", "stpp", "psmt"}
    assert all(c.info.status == "FINISHED" and "miou" in c.data.metrics for c in children.values())
    psmt = next(c for c in children.values() if c.data.tags["method"] == "psmt")
    assert (psmt.data.params["method.conf_thresh"], psmt.data.params["method.weight_u"]) == ("0.6", "0.6")
    # The published protocol's recipe reached the trial: PS-MT without BN/bias weight decay.
    decay = {c.data.tags["method"]: c.data.params["optim.decay_norm_and_bias"] for c in children.values()}
    assert decay == {"u2pl": "True", "stpp": "True", "psmt": "False"}
    table = tables.build(grid.tracking_uri, grid.name, tmp_path / "table", log_artifacts=False)
    # The table's rows follow the seed table's order, and every cell holds its trial's mIoU.
    assert [c.method for c in table.cells] == ["u2pl", "stpp", "psmt"]
    assert all(0 <= c.best_mean <= 100 and c.n_seeds == 1 for c in table.cells)
    for method in ("u2pl", "stpp", "psmt"):
        assert f"| {method} |" in done.stdout


def test_grid_verbose_console_shows_the_workers_output(methods_grid_run):
    done = methods_grid_run.done
    loud = done.stdout + done.stderr
    assert done.returncode == 0, loud[-3000:]
    # --verbose brings back what the workers print, each line prefixed by its Ray actor.
    assert "(RayTrainWorker pid=" in loud and "epoch 0: mIoU" in loud


def _children_by_key(mlflow, experiment, parent_id):
    return {c.data.tags[tracking.TRIAL_TAG]: c for c in tracking.child_runs(mlflow, experiment, parent_id)}


def _wait_for_interrupt_point(process, grid, epochs: int, deadline_s: float = 900) -> tuple[str, str]:
    """Poll until one trial has reported every epoch and the next has an epoch in MLflow (so Ray Train has
    committed its checkpoint) but is not done. Trials run one at a time: the first is done in Tune's eyes."""
    deadline, mlflow = time.monotonic() + deadline_s, None
    while time.monotonic() < deadline:
        assert process.poll() is None, "the grid ended before it could be interrupted"
        counts = {t.key: len(launch.read_reports(t.config.out_dir)) for t in grid.trials}
        done = [k for k, n in counts.items() if n == epochs]
        running = [k for k, n in counts.items() if 0 < n < epochs - 1]
        if done and running:
            mlflow = mlflow or tracking.client(grid.tracking_uri)
            state = json.loads((grid.storage / "grid.json").read_text())
            child = _children_by_key(mlflow, state["experiment_id"], state["parent_run_id"])[running[0]]
            if "miou" in child.data.metrics:
                return done[0], running[0]
        time.sleep(0.1)
    pytest.fail("no trial finished within the deadline")


EPOCHS = 6


def _history(mlflow, run_id: str) -> list[tuple[int, float, int]]:
    return [(m.step, m.value, m.timestamp) for m in mlflow.get_metric_history(run_id, "miou")]


def test_interrupted_grid_resumes_without_rerunning_finished_trials(tmp_path):
    raw = tiny_grid(tmp_path, axes={"split": ["1_4", "1_2"]}, max_concurrent_trials=1)
    raw["base"]["optim"]["epochs"] = EPOCHS
    path = write(tmp_path, raw)
    grid = load_grid(path)
    # Ray Train's default 2 s report poll keeps the epochs of the interrupted trial long enough to catch.
    env = {k: v for k, v in _env().items() if k != "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"}
    with open(tmp_path / "first.log", "w") as log:
        process = subprocess.Popen(_grid_command(path), env=env, cwd=tmp_path, stdout=log, stderr=log)
        try:
            finished, started = _wait_for_interrupt_point(process, grid, EPOCHS)
            os.kill(process.pid, signal.SIGINT)
            assert process.wait(timeout=180) == 130, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    mlflow, experiment, parent = _store(grid)
    before = _children_by_key(mlflow, experiment, parent.info.run_id)
    reports_before = {t.key: launch.read_reports(t.config.out_dir) for t in grid.trials}
    history_before = _history(mlflow, before[finished].info.run_id)
    logged_before = [step for step, _, _ in _history(mlflow, before[started].info.run_id)]
    assert logged_before == list(range(len(logged_before))) and logged_before
    assert parent.info.status == "RUNNING"

    done = subprocess.run(
        _grid_command(path, "--resume"), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    mlflow, experiment, parent = _store(grid)
    after = _children_by_key(mlflow, experiment, parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert {k: c.info.run_id for k, c in after.items() if k in before} == {
        k: c.info.run_id for k, c in before.items()
    }
    assert len(after) == 2 and all(c.info.status == "FINISHED" for c in after.values())
    assert _history(mlflow, after[finished].info.run_id) == history_before
    out_dirs = {t.key: t.config.out_dir for t in grid.trials}
    assert launch.read_reports(out_dirs[finished]) == reports_before[finished]
    # The interrupted trial continued from the last checkpoint Ray Train had committed: at or after the
    # last epoch MLflow got (logged after the commit), at most the one epoch in progress run again.
    reports = launch.read_reports(out_dirs[started])
    assert reports[: len(reports_before[started])] == reports_before[started]
    resumed = [int(r["epoch"]) for r in reports[len(reports_before[started]) :]]
    assert logged_before[-1] < resumed[0] <= reports_before[started][-1]["epoch"] + 1
    assert resumed == list(range(resumed[0], EPOCHS))
    # Every epoch in MLflow once; one committed but unlogged at the interrupt is backfilled at the end.
    assert sorted(step for step, _, _ in _history(mlflow, after[started].info.run_id)) == list(range(EPOCHS))


def test_a_recipes_paths_are_absolute_in_its_trials(tmp_path, monkeypatch):
    # Trials run in their own folders, so COCO's published Xception weights resolve as base's paths do.
    monkeypatch.chdir(tmp_path)
    raw = load_yaml(REPO / "experiments" / "coco.yaml") | {"protocol": "published"}
    raw["axes"] = {"method": ["unimatch"], "split": raw["axes"]["split"][:1]}
    raw.pop("method_settings", None)
    grid = load_grid(write(tmp_path, raw))
    assert {t.config.model.pretrained for t in grid.trials} == {str(tmp_path / "pretrained" / "xception.pth")}
