"""Grid files: the schema of experiments/*.yaml, checked as a training config is, and its expansion into
trials of one resolved TrainConfig each.

A grid file loads through trainers.config's machinery (`from_dict`, `choice`): every error is one
ConfigError naming the file and the dotted key. Nothing here starts Ray or MLflow or needs a dataset on
disk beyond its split lists, so `semiseg grid --dry-run` shows what a grid would run from this alone.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainers import recipes
from trainers.config import (
    ConfigError,
    DataConfig,
    MethodConfig,
    TrainConfig,
    choice,
    from_dict,
    load_yaml,
    merge,
)
from trainers.recipes import PROTOCOLS
from trainers.synth import SynthOptions

AXES = {
    "dataset": ("data", "dataset"),
    "split": ("data", "split"),
    "method": ("method", "name"),
    "seed": ("seed",),
}
"""Grid axis -> its place in TrainConfig."""
MAPPINGS = ("base", "axes", "method_settings")
"""Keys kept as the file writes them, to be merged into each trial's config: `from_dict` cannot type a
partial section or a list of any length, so `_base`, `_axes` and `_method_settings` check them, each with
`from_dict` on the trainer dataclass their values fill."""
PATH_KEYS = (("data", "root"), ("data", "split_dir"), ("data", "val_list"), ("model", "pretrained"))
"""Config paths made absolute on load: Tune runs each trial in its own working directory."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class GridFile:
    """A grid file's keys, typed and range-checked like a TrainConfig (see `read_file`)."""

    name: str | None = None
    """Required: the MLflow experiment, and the default storage folder runs/<name>."""
    base: dict[str, Any] = field(default_factory=dict)
    """The part of a TrainConfig every trial shares, its paths made absolute (out_dir is the grid's)."""
    axes: dict[str, list[Any]] = field(default_factory=dict)
    """Axis (see AXES) -> its values, in file order."""
    workers: int = 1
    """Ray Train workers per trial."""
    use_gpu: bool = False
    storage: str | None = None
    """Default: runs/<name>, against the working directory."""
    tracking_uri: str | None = None
    """Default: the SQLite store in the storage folder ($MLFLOW_TRACKING_URI wins over both)."""
    synth: SynthOptions | None = None
    """Generate the synthetic dataset at base.data.root when absent (see `semiseg.grid.prepare`)."""
    max_concurrent_trials: int | None = None
    """Default: as many trials as the cluster holds workers for."""
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Method name -> keys of the `method:` section for that method's trials only."""
    protocol: str = "unified"
    """unified: every method on `base`'s recipe; published: each method's own paper's recipe over it
    (trainers/published_recipes/<dataset>.yaml, see trainers.recipes)."""

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol: expected one of {list(PROTOCOLS)}, got {self.protocol!r}")
        if self.name is None:
            raise ConfigError("name: missing (expected str)")
        if not NAME.match(self.name):
            raise ConfigError(f"name: expected letters, digits, '_', '.', '-', got {self.name!r}")
        for key in ("workers", "max_concurrent_trials"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}: expected >= 1, got {value}")


@dataclass(frozen=True)
class AxisValue:
    """One value of each axis, typed as the TrainConfig setting it selects (see AXES)."""

    dataset: str = ""
    split: str = ""
    method: str = ""
    seed: int = 0


@dataclass(frozen=True)
class Trial:
    key: str
    """Unique, file-name safe: dataset_split_method_seedN."""
    axes: dict[str, Any]
    """This trial's value on every axis (dataset, split, method, seed), whether varied or not."""
    config: TrainConfig


@dataclass(frozen=True)
class Grid:
    name: str
    path: Path
    """The grid file."""
    base: dict[str, Any]
    axes: dict[str, list[Any]]
    """Only the axes the file varies, in file order."""
    workers: int
    use_gpu: bool
    storage: Path
    """Everything of this grid: Tune state, Ray Train runs, trial outputs, the default MLflow store."""
    tracking_uri: str
    synth: dict[str, int] | None
    """Options of trainers.synth: generate the synthetic dataset at data.root when absent."""
    max_concurrent_trials: int | None
    method_settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Method name -> keys of the `method:` section for that method's trials only (its paper's loss
    weights and thresholds)."""
    protocol: str = "unified"
    """unified: schedule, crop, batch, backbone and evaluation are the base's for every method;
    published: each method's own (trainers.recipes)."""
    trials: tuple[Trial, ...] = ()
    """Every combination of the axes, validated (see `expand`)."""

    @property
    def tune_dir(self) -> Path:
        """Tune's experiment folder (what `Tuner.restore` reads)."""
        return self.storage / "tune"

    def trial(self, params: dict[str, Any]) -> Trial:
        """The trial whose varied axes take the values in `params` (a Tune config)."""
        wanted = {axis: params[axis] for axis in self.axes}
        for trial in self.trials:
            if all(trial.axes[a] == v for a, v in wanted.items()):
                return trial
        raise KeyError(f"{self.path}: no trial with {wanted}")


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid file and every trial it expands to; one ConfigError names file and key."""
    path = Path(path)
    data = load_yaml(path)
    try:
        return _build(path, read_file(data))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def read_file(data: dict[str, Any]) -> GridFile:
    """A grid file's mapping, checked: `from_dict` types every key but MAPPINGS, which are checked apart
    (one ConfigError naming the dotted key)."""
    known = {f.name for f in dataclasses.fields(GridFile)}
    # A known key set to null means its default, as if absent; an unknown one is still reported.
    given = {k: v for k, v in data.items() if v is not None or k not in known}
    try:
        typed = from_dict(GridFile, {k: v for k, v in given.items() if k not in MAPPINGS})
    except ValueError as exc:  # SynthOptions checks its ranges with plain ValueErrors
        raise ConfigError(exc if isinstance(exc, ConfigError) else f"synth.{exc}") from None
    axes = _axes(given.get("axes"))
    base = _base(given.get("base", {}), axes)
    settings = _method_settings(given.get("method_settings", {}), base, axes)
    return dataclasses.replace(typed, base=base, axes=axes, method_settings=settings)


def _build(path: Path, spec: GridFile) -> Grid:
    storage = Path(f"runs/{spec.name}" if spec.storage is None else spec.storage).resolve()
    uri = spec.tracking_uri if spec.tracking_uri is not None else f"sqlite:///{storage}/mlflow.db"
    grid = Grid(
        spec.name,
        path,
        spec.base,
        spec.axes,
        spec.workers,
        spec.use_gpu,
        storage,
        os.environ.get("MLFLOW_TRACKING_URI") or uri,
        dataclasses.asdict(spec.synth) if spec.synth is not None else None,
        spec.max_concurrent_trials,
        spec.method_settings,
        spec.protocol,
    )
    return dataclasses.replace(grid, trials=expand(grid))


def _base(raw: Any, axes: dict[str, list[Any]]) -> dict[str, Any]:
    """`base:` checked as a TrainConfig (under each method of the method axis, whose keys differ), with
    its paths made absolute (see PATH_KEYS)."""
    from trainers.methods import METHODS

    for method in axes.get("method", [None]):
        if method is not None:
            choice("axes.method", method, METHODS)
        from_dict(TrainConfig, raw if method is None else merge(raw, {"method": {"name": method}}), "base")
    if "out_dir" in raw:
        raise ConfigError("base.out_dir: set by the grid (each trial writes under storage/trials/)")
    return absolute_paths(raw)


def absolute_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with its PATH_KEYS resolved against the working directory."""
    out = raw
    for section, key in PATH_KEYS:
        value = raw.get(section, {}).get(key)
        if value is not None:  # null keeps its meaning (default lists, no pretrained weights)
            out = merge(out, {section: {key: str(Path(value).resolve())}})
    return out


def _axes(raw: Any) -> dict[str, list[Any]]:
    if raw is None:
        raise ConfigError("axes: missing (expected a mapping)")
    if not isinstance(raw, dict):
        raise ConfigError(f"axes: expected a mapping, got {raw!r}")
    for axis, values in raw.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"axes.{axis}: expected a non-empty list, got {values!r}")
        for value in values:  # names the axis and types its values, as a TrainConfig types the setting
            from_dict(AxisValue, {axis: value}, "axes")
        if len(set(values)) != len(values):
            raise ConfigError(f"axes.{axis}: repeated values in {values}")
    return {axis: list(values) for axis, values in raw.items()}


def _method_settings(raw: Any, base: dict[str, Any], axes: dict[str, list[Any]]) -> dict[str, dict]:
    from trainers.methods import METHODS

    if not isinstance(raw, dict):
        raise ConfigError(f"method_settings: expected a mapping, got {raw!r}")
    runs = axes.get("method", [base.get("method", {}).get("name", MethodConfig.name)])
    splits = axes.get("split", [base.get("data", {}).get("split", DataConfig.split)])
    for method, settings in raw.items():
        key = f"method_settings.{method}"
        choice(key, method, METHODS)
        if method not in runs:
            raise ConfigError(f"{key}: not a method of this grid (it runs {runs})")
        if not isinstance(settings, dict):
            raise ConfigError(f"{key}: expected a mapping of method keys, got {settings}")
        by_split = _by_split(settings.get(BY_SPLIT, {}), f"{key}.{BY_SPLIT}", splits)
        for split, keys in {"": {}, **by_split}.items():
            where = f"{key}.{BY_SPLIT}.{split}" if split else key
            if "name" in keys or "name" in settings:
                raise ConfigError(f"{where if 'name' in keys else key}.name: set by the method axis")
            # Checked as their own section over the base's, so an error names method_settings, not base.
            section = merge(merge(base.get("method", {}), own_keys(settings)), keys) | {"name": method}
            from_dict(MethodConfig, section, where)
    return raw


BY_SPLIT = "by_split"
"""Key of `method_settings.<method>` whose mapping, split name -> method keys, overrides the method's
settings in that split's trials only (PS-MT's weight is 0.06 at 92 labels, 0.6 from 183)."""


def own_keys(settings: dict[str, Any]) -> dict[str, Any]:
    """A method's `method_settings` entry without its per-split overrides."""
    return {k: v for k, v in settings.items() if k != BY_SPLIT}


def _by_split(raw: Any, key: str, splits: list[str]) -> dict[str, dict[str, Any]]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected a mapping of split name -> method keys, got {raw!r}")
    for split, keys in raw.items():
        if split not in splits:
            hint = " (quote it: YAML reads 92 as a number)" if not isinstance(split, str) else ""
            raise ConfigError(f"{key}.{split}: not a split of this grid (it runs {splits}){hint}")
        if not isinstance(keys, dict):
            raise ConfigError(f"{key}.{split}: expected a mapping of method keys, got {keys!r}")
    return raw


def expand(grid: Grid) -> tuple[Trial, ...]:
    """Every combination of the axes as a validated trial, in file order (the last axis varies fastest)."""
    defaults = from_dict(TrainConfig, grid.base, "base")
    fixed = {axis: functools.reduce(getattr, place, defaults) for axis, place in AXES.items()}
    combos = itertools.product(*grid.axes.values())
    return tuple(
        _trial(grid, fixed | dict(zip(grid.axes, combo, strict=True)), defaults.data.root) for combo in combos
    )


def _trial(grid: Grid, values: dict[str, Any], root: str) -> Trial:
    from trainers.methods import METHODS

    choice("axes.method" if "method" in grid.axes else "base.method.name", values["method"], METHODS)
    check_split(grid, values["dataset"], values["split"], root)
    key = f"{values['dataset']}_{values['split']}_{values['method']}_seed{values['seed']}"
    overrides = {"out_dir": str(grid.storage / "trials" / key)}
    for axis, value in values.items():
        overrides = merge(overrides, _nested(AXES[axis], value))
    settings = grid.method_settings.get(values["method"], {})
    split_keys = settings.get(BY_SPLIT, {}).get(values["split"], {})
    # A recipe's paths (COCO's Xception weights) resolve as base's do: trials run in their own folders.
    recipe = absolute_paths(recipes.apply(grid.protocol, grid.base, values["dataset"], values["method"]))
    base = merge(recipe, {"method": merge(own_keys(settings), split_keys)})
    return Trial(key, values, from_dict(TrainConfig, merge(base, overrides), "base"))


def _nested(keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    for key in reversed(keys):
        value = {key: value}
    return value


def available_splits(dataset: str, root: str, synth: dict[str, int] | None, key: str) -> list[str]:
    """Split names a dataset offers: shipped ones for published datasets, else the folders under root/splits
    (or, for a synthetic dataset still to be generated, the splits trainers.synth writes). `key` is the
    grid key an unknown dataset is reported under."""
    from trainers.datasets import DATASETS, split_names, splits_folder

    choice(key, dataset, DATASETS)
    if dataset == "synthetic" and synth is not None and not splits_folder(dataset, root).is_dir():
        from trainers.synth import SPLITS

        return sorted(SPLITS)
    return split_names(dataset, root)


def check_split(grid: Grid, dataset: str, split: str, root: str) -> None:
    """One ConfigError, under the grid key that chose them, when `dataset` is unknown or has no `split`."""
    key = {
        axis: f"axes.{axis}" if axis in grid.axes else f"base.data.{axis}" for axis in ("dataset", "split")
    }
    available = available_splits(dataset, root, grid.synth, key["dataset"])
    if split not in available:
        hint = f"under {root}/splits" if not available else f"(expected one of {available})"
        raise ConfigError(f"{key['split']}: dataset {dataset!r} has no split {split!r} {hint}")


def plan(grid: Grid) -> str:
    """What `semiseg grid --dry-run` prints: a line on the grid, then each trial's resolved TrainConfig as
    a YAML document headed by its key (each document is a config `semiseg train --config` takes)."""
    import yaml

    sizes = " x ".join(f"{len(values)} {axis}" for axis, values in grid.axes.items())
    device = "GPU" if grid.use_gpu else "CPU"
    lines = [
        f"# grid {grid.name} ({grid.path}): {len(grid.trials)} trials ({sizes}), {grid.workers} worker(s) "
        f"per trial on {device}, protocol {grid.protocol}; storage {grid.storage}; dry run: nothing "
        "started or written"
    ]
    for number, trial in enumerate(grid.trials, 1):
        lines.append(f"--- # trial {number}/{len(grid.trials)}: {trial.key}")
        lines += [f"# {line}" for line in schedule(trial.config, grid.workers, grid.use_gpu)]
        lines.append(yaml.safe_dump(trial.config.to_dict(), sort_keys=False).rstrip("\n"))
    return "\n".join(lines)


SECONDS_PER_STEP = 14 * 60 / 1245
"""GPU seconds per step of 2 + 2 images per GPU at crop 321: the seed's timing of UniMatch/MSPL on Pascal
(one 92-label epoch, 1,245 steps on 4 GPUs, about 14 minutes plus 3 of evaluation). Not measured here:
no GPU images/s has been measured for these models on this platform yet."""


def gpu_hours(cfg: TrainConfig, steps: int, workers: int) -> float:
    """An estimate of a training's GPU-hours from `SECONDS_PER_STEP`, scaled by crop area and per-GPU
    batch (a method's own step cost, e.g. MSPL's three strong views, is not modelled; evaluation not
    counted)."""
    scale = (cfg.data.crop_size / 321) ** 2 * cfg.optim.batch_size / 2
    return steps * SECONDS_PER_STEP * scale * workers / 3600


def schedule(cfg: TrainConfig, workers: int, use_gpu: bool = False) -> list[str]:
    """A trial's trainings with their optimizer steps, one line each (several for a multi-stage method),
    then the total; on GPU with an estimate of the GPU-hours (see `gpu_hours`)."""
    from trainers.entry import plan

    stages = plan(cfg, workers)
    lines = []
    for number, stage in enumerate(stages, 1):
        where = f"stage {number}: " if len(stages) > 1 else ""
        if stage.steps is None:
            lines.append(f"{where}{stage.epochs} epochs; steps per epoch known once its lists exist")
        else:
            lines.append(
                f"{where}{stage.steps:,} steps ({stage.epochs} epochs x {stage.steps_per_epoch:,}, "
                f"global batch {stage.global_batch})"
            )
    steps = [stage.steps for stage in stages]
    if len(stages) > 1:
        lines.append(
            f"total: {sum(steps):,} steps"
            if None not in steps
            else "total: known once every stage's lists exist"
        )
    if use_gpu and None not in steps:
        hours = gpu_hours(cfg, sum(steps), workers)
        lines.append(
            f"about {hours:,.1f} GPU-hours (estimated from the seed's published step time: gpu_hours)"
        )
    return lines
