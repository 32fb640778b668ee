"""Experiment grids: a YAML file of axes over a base config, expanded into trials and run with Ray Tune.

Each Tune trial is a small driver function that builds one TorchTrainer (see launch.py), records
the trial as a nested MLflow run (see tracking.py) and reports its epochs to Tune. The grid resumes
with `Tuner.restore`: finished trials stay finished, unfinished ones continue from their checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semiseg import storage
from trainers.config import ConfigError, MethodConfig, TrainConfig, from_dict, load_yaml, merge

AXES = {
    "dataset": ("data", "dataset"),
    "split": ("data", "split"),
    "method": ("method", "name"),
    "seed": ("seed",),
}
"""Grid axis -> its place in TrainConfig."""
GRID_KEYS = (
    "name",
    "base",
    "axes",
    "workers",
    "use_gpu",
    "storage",
    "tracking_uri",
    "synth",
    "max_concurrent_trials",
    "method_settings",
)
PATH_KEYS = (("data", "root"), ("data", "split_dir"), ("data", "val_list"), ("model", "pretrained"))
"""Config paths made absolute on load: Tune runs each trial in its own working directory."""
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
log = logging.getLogger(__name__)


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
    weights and thresholds); schedule, crop, backbone and evaluation stay the base's for every method."""
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
        return _build(path, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _build(path: Path, data: dict[str, Any]) -> Grid:
    unknown = sorted(set(data) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (expected one of {sorted(GRID_KEYS)})")
    name = _required(data, "name", str)
    if not NAME.match(name):
        raise ConfigError(f"name: expected letters, digits, '_', '.', '-', got {name!r}")
    base = _typed(data, "base", dict, {})
    if "out_dir" in base:
        raise ConfigError("base.out_dir: set by the grid (each trial writes under storage/trials/)")
    axes = _axes(_required(data, "axes", dict))
    workers = _typed(data, "workers", int, 1)
    concurrent = _typed(data, "max_concurrent_trials", int, None)
    for key, value in (("workers", workers), ("max_concurrent_trials", concurrent)):
        if value is not None and value < 1:
            raise ConfigError(f"{key}: expected >= 1, got {value}")
    storage = Path(_typed(data, "storage", str, f"runs/{name}")).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or _typed(
        data, "tracking_uri", str, f"sqlite:///{storage}/mlflow.db"
    )
    synth = _synth(data.get("synth"))
    use_gpu = _typed(data, "use_gpu", bool, False)
    settings = _method_settings(_typed(data, "method_settings", dict, {}))
    grid = Grid(
        name, path, _absolute_paths(base), axes, workers, use_gpu, storage, uri, synth, concurrent, settings
    )
    return dataclasses.replace(grid, trials=expand(grid))


def _typed(data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    if data.get(key) is None:
        return default
    value = data[key]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        expected = "a mapping" if kind is dict else kind.__name__
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")
    return value


def _required(data: dict[str, Any], key: str, kind: type) -> Any:
    if data.get(key) is None:
        raise ConfigError(f"{key}: missing (expected {'a mapping' if kind is dict else kind.__name__})")
    return _typed(data, key, kind, None)


def _axes(raw: dict[str, Any]) -> dict[str, list[Any]]:
    axes = {}
    for axis, values in raw.items():
        if axis not in AXES:
            raise ConfigError(f"axes.{axis}: unknown axis (expected one of {sorted(AXES)})")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"axes.{axis}: expected a non-empty list, got {values!r}")
        kind = int if axis == "seed" else str
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, kind):
                hint = " (quote it: YAML reads 1_16 as the number 116)" if kind is str else ""
                raise ConfigError(f"axes.{axis}[{i}]: expected {kind.__name__}, got {value!r}{hint}")
        if len(set(values)) != len(values):
            raise ConfigError(f"axes.{axis}: repeated values in {values}")
        axes[axis] = list(values)
    return axes


def _method_settings(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    from trainers.methods import METHODS

    for method, settings in raw.items():
        _check_method(method, f"method_settings.{method}", METHODS)
        if not isinstance(settings, dict):
            raise ConfigError(f"method_settings.{method}: expected a mapping of method keys, got {settings}")
        if "name" in settings:
            raise ConfigError(f"method_settings.{method}.name: set by the method axis")
    return raw


def _synth(raw: Any) -> dict[str, int] | None:
    if raw is None:
        return None
    from trainers.synth import SynthOptions

    try:
        return dataclasses.asdict(from_dict(SynthOptions, raw, "synth"))
    except ValueError as exc:  # SynthOptions checks its ranges with plain ValueErrors
        raise ConfigError(exc if isinstance(exc, ConfigError) else f"synth.{exc}") from None


def _absolute_paths(base: dict[str, Any]) -> dict[str, Any]:
    out = base
    for section, key in PATH_KEYS:
        value = base.get(section, {}).get(key) if isinstance(base.get(section), dict) else None
        if isinstance(value, str):
            out = merge(out, {section: {key: str(Path(value).resolve())}})
    return out


def expand(grid: Grid) -> tuple[Trial, ...]:
    """Every combination of the axes as a validated trial, in file order (the last axis varies fastest)."""
    from trainers.methods import METHODS

    defaults = from_dict(TrainConfig, grid.base, "base")
    fixed = {
        "dataset": defaults.data.dataset,
        "split": defaults.data.split,
        "method": defaults.method.name,
        "seed": defaults.seed,
    }
    methods = grid.axes.get("method", [defaults.method.name])
    sections = {}
    for method, settings in grid.method_settings.items():
        if method not in methods:
            raise ConfigError(f"method_settings.{method}: not a method of this grid (it runs {methods})")
        sections[method] = merge(grid.base.get("method", {}), settings)
        # Checked as their own section, so an error names method_settings, not base.
        from_dict(MethodConfig, sections[method] | {"name": method}, f"method_settings.{method}")
    trials = []
    for combo in itertools.product(*grid.axes.values()):
        values = fixed | dict(zip(grid.axes, combo, strict=True))
        _check_method(
            values["method"], "axes.method" if "method" in grid.axes else "base.method.name", METHODS
        )
        _check_split(grid, values["dataset"], values["split"], defaults.data.root)
        key = f"{values['dataset']}_{values['split']}_{values['method']}_seed{values['seed']}"
        overrides = {"out_dir": str(grid.storage / "trials" / key)}
        for axis, value in values.items():
            overrides = merge(overrides, _nested(AXES[axis], value))
        base = merge(grid.base, {"method": sections.get(values["method"], {})})
        trials.append(Trial(key, values, from_dict(TrainConfig, merge(base, overrides), "base")))
    return tuple(trials)


def _nested(keys: tuple[str, ...], value: Any) -> dict[str, Any]:
    for key in reversed(keys):
        value = {key: value}
    return value


def _check_method(name: str, key: str, methods: dict[str, Any]) -> None:
    if name not in methods:
        raise ConfigError(f"{key}: unknown method {name!r} (expected one of {sorted(methods)})")


def available_splits(dataset: str, root: str, synth: dict[str, int] | None) -> list[str]:
    """Split names a dataset offers: shipped ones for published datasets, else the folders under root/splits
    (or, for a synthetic dataset still to be generated, the splits trainers.synth writes)."""
    from trainers.datasets import DATASETS, PUBLISHED_SPLITS

    if dataset not in DATASETS:
        raise ConfigError(f"data.dataset: unknown dataset {dataset!r} (expected one of {sorted(DATASETS)})")
    folder = PUBLISHED_SPLITS / dataset if DATASETS[dataset].published else Path(root) / "splits"
    if folder.is_dir():
        return sorted(p.parent.name for p in folder.glob("*/labeled.txt"))
    if dataset == "synthetic" and synth is not None:
        from trainers.synth import SPLITS

        return sorted(SPLITS)
    return []


def _check_split(grid: Grid, dataset: str, split: str, root: str) -> None:
    available = available_splits(dataset, root, grid.synth)
    if split not in available:
        key = "axes.split" if "split" in grid.axes else "base.data.split"
        where = f"under {root}/splits" if not available else f"(expected one of {available})"
        raise ConfigError(f"{key}: dataset {dataset!r} has no split {split!r} {where}")


STATE_FILE = "grid.json"


def state_file(grid: Grid) -> Path:
    """Where the driver keeps the MLflow parent run id between an interrupted run and its --resume."""
    return grid.storage / STATE_FILE


def read_state(grid: Grid) -> dict[str, str] | None:
    """The saved driver state ({"parent_run_id", "experiment_id"}), or None before the first run."""
    path = state_file(grid)
    return json.loads(path.read_text()) if path.is_file() else None


TRIAL_CPUS = 0.01
"""What a trial's driver function holds: a sliver, so the Ray Train workers get whole cores (a function
holding a whole CPU deadlocks two concurrent trials on two cores)."""
OVERLAY_IMAGES = 3


class GridError(RuntimeError):
    """Trials of the grid failed; their errors are in Tune's and MLflow's records."""


@dataclass
class GridRun:
    table: Any
    """semiseg.tables.Table built from MLflow after the trials."""
    results: Any
    """Tune's ResultGrid: each trial's last reported metrics."""
    interrupted: bool


def prepare(grid: Grid) -> None:
    """Generate a synthetic dataset the grid asks for, then check every trial's paths and splits."""
    from trainers.config import check_paths
    from trainers.synth import ensure_generated

    synthetic = {t.config.data.root for t in grid.trials if t.axes["dataset"] == "synthetic"}
    roots = sorted(synthetic) if grid.synth is not None else []
    for root in roots:  # every root checked before any is written
        check_synth_root(grid, Path(root))
    for root in roots:
        ensure_generated(root, **grid.synth)
    try:
        for trial in grid.trials:
            check_paths(trial.config)
            _check_split(grid, trial.axes["dataset"], trial.axes["split"], trial.config.data.root)
    except ConfigError as exc:
        raise ConfigError(f"{grid.path}: {exc}") from None


def check_synth_root(grid: Grid, root: Path) -> None:
    """`synth:` writes only inside the grid's storage, into an absent or empty folder, or over a dataset it
    generated (synth.json): never into a folder of other files, such as a real dataset's."""
    inside = root.resolve().is_relative_to(grid.storage)
    if inside or not root.exists() or (root / "synth.json").is_file() or not any(root.iterdir()):
        return
    raise ConfigError(
        f"{grid.path}: base.data.root: {str(root)!r} holds files but no synth.json: synth: generates a "
        f"dataset only inside the grid's storage ({grid.storage}), into a new or empty folder, or over one "
        "it generated before; drop synth: to train on this folder as it is, or point data.root elsewhere"
    )


@storage.locked
def run(
    grid: Grid, resume: bool = False, address: str | None = None, verbose: bool = False, force: bool = False
) -> GridRun:
    """Run every trial of `grid` with Ray Tune (or continue an interrupted run with `resume`; `force`: with
    a changed grid file, see `semiseg.grid_changes`), then build the table from MLflow. Concurrency
    follows the cluster: as many trials as their workers fit. The console shows one line per trial
    (`semiseg.console`); `verbose` adds Ray's and the workers' output. Holds the storage folder's lock."""
    from ray import tune

    from semiseg import ray_local, tables, tracking
    from semiseg.console import GridConsole

    if not verbose:
        quiet_driver()
    # A resume is checked before anything is written: prepare() may generate data.
    state = _existing_state(grid, resume, force)
    prepare(grid)
    state = state or _new_state(grid)
    ray_local.connect(address, quiet=not verbose)
    trial_function = tune.with_parameters(run_trial, grid=grid, force=force, **state)
    trainable = tune.with_resources(trial_function, {"CPU": TRIAL_CPUS})
    if resume:
        tuner = tune.Tuner.restore(str(grid.tune_dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={axis: tune.grid_search(values) for axis, values in grid.axes.items()},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency(grid)),
            run_config=tune.RunConfig(
                name=grid.tune_dir.name,
                storage_path=str(grid.storage),
                verbose=0,  # GridConsole replaces Tune's progress tables
                callbacks=[GridConsole(grid)],
            ),
        )
    results = tuner.fit()
    mlflow = tracking.client(grid.tracking_uri)
    # On SIGINT Tune saves its state, stops the running trials and returns normally: only the store
    # tells that some trials never finished.
    children = tracking.child_runs(mlflow, state["experiment_id"], state["parent_run_id"])
    finished = sum(c.info.status == "FINISHED" for c in children)
    interrupted = not results.num_errors and finished < len(grid.trials)
    table = tables.build(grid.tracking_uri, grid.name, grid.storage / "table", state["parent_run_id"])
    if not interrupted:
        tracking.finish(mlflow, state["parent_run_id"], "FAILED" if results.num_errors else "FINISHED")
    if results.num_errors:
        failed = [r.path for r in results if r.error is not None]
        raise GridError(f"{grid.path}: {len(failed)} of {len(results)} trials failed; see {failed}")
    return GridRun(table, results, interrupted)


def quiet_driver() -> None:
    """Keep MLflow's INFO lines (its store set-up) and Tune's banners off this process's console."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow configures it when imported
    # Tune's default output engine prints an experiment banner even at verbose=0; the legacy one does not.
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def concurrency(grid: Grid) -> int:
    """Trials at once: the file's max_concurrent_trials, else as many as the cluster holds workers for."""
    from semiseg.launch import placeable_workers

    return grid.max_concurrent_trials or max(1, placeable_workers(grid.use_gpu) // grid.workers)


DRIVER_IDS = ("experiment_id", "parent_run_id")
"""What grid.json gives each trial (beside the snapshot that `--resume` compares)."""


def _existing_state(grid: Grid, resume: bool, force: bool) -> dict[str, str] | None:
    """The ids of the run `resume` continues, once its grid file is checked against the snapshot; None for
    a new run (one ConfigError if the grid already ran)."""
    from semiseg import grid_changes

    state = read_state(grid)
    if not resume:
        if state is not None:
            raise ConfigError(
                f"{grid.path}: this grid already ran in {grid.storage}; pass --resume to continue it, "
                f"`semiseg table {grid.path}` to print its table, or remove the folder to start over"
            )
        return None
    if state is None or not grid.tune_dir.is_dir():
        raise ConfigError(f"{grid.path}: nothing to resume under {grid.storage} (run it without --resume)")
    state[grid_changes.SNAPSHOT] = grid_changes.check(grid, state, force)
    storage.write_json(state_file(grid), state)
    storage.warn_if_shared(grid.storage, grid.tune_dir)
    return {k: state[k] for k in DRIVER_IDS}


def _new_state(grid: Grid) -> dict[str, str]:
    """Create the grid's MLflow parent run and grid.json (written atomically, with the snapshot)."""
    from semiseg import grid_changes, redact, tracking

    mlflow = tracking.client(grid.tracking_uri)
    experiment = tracking.ensure_experiment(
        mlflow, grid.name, tracking.artifact_root(grid.tracking_uri, grid.storage)
    )
    params = {
        "grid.file": str(grid.path),
        "grid.trials": str(len(grid.trials)),
        "grid.workers": str(grid.workers),
        "grid.use_gpu": str(grid.use_gpu),
    } | {f"grid.axes.{a}": str(v) for a, v in grid.axes.items()}
    parent = tracking.start_parent(mlflow, experiment, grid.name, redact.data(params))
    log_grid_file(mlflow, parent, grid.path)
    state = {"experiment_id": experiment, "parent_run_id": parent}
    storage.write_json(state_file(grid), state | {grid_changes.SNAPSHOT: grid_changes.snapshot(grid)})
    return state


def log_grid_file(mlflow: Any, run_id: str, path: Path) -> None:
    """Attach the grid file to the run as `grid/<name>`, its credentials redacted (comments are not kept)."""
    import tempfile

    import yaml

    from semiseg import redact

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_text(yaml.safe_dump(redact.data(load_yaml(path)), sort_keys=False))
        mlflow.log_artifact(run_id, str(copy), "grid")


def run_trial(
    params: dict[str, Any], grid: Grid, experiment_id: str, parent_run_id: str, force: bool = False
) -> None:
    """One Tune trial (driver side): open its MLflow child run, train through TorchTrainer, log artifacts
    (the trial's run.log among them, failed or not). `force`: its checkpoint may hold an older config."""
    from semiseg import launch

    trial = grid.trial(params)
    with launch.capture_logs(Path(trial.config.out_dir) / launch.RUN_LOG, "trial"):
        _train_trial(grid, trial, experiment_id, parent_run_id, force)


def _train_trial(grid: Grid, trial: Trial, experiment_id: str, parent_run_id: str, force: bool) -> None:
    from ray.tune.integration.ray_train import TuneReportCallback

    from semiseg import launch, tracking

    mlflow = tracking.client(grid.tracking_uri)
    if finished_in_mlflow(mlflow, experiment_id, parent_run_id, trial.key):
        return
    run_id = tracking.open_child(
        mlflow,
        experiment_id,
        parent_run_id,
        trial.key,
        trial_tags(grid, trial),
        tracking.flatten(trial.config.to_dict()),
    )
    try:
        result = launch.train_distributed(
            trial.config,
            grid.workers,
            grid.use_gpu,
            storage_path=str(grid.storage / "train"),
            name=trial.key,
            callbacks=[TuneReportCallback(), tracking.EpochLogger(grid.tracking_uri, run_id)],
            force_resume=force,
        )
        # Epochs the store missed (unreachable, or the driver killed between checkpoint and log).
        tracking.backfill(mlflow, run_id, launch.read_reports(trial.config.out_dir))
        log_trial_artifacts(mlflow, run_id, trial, result)
    except Exception as exc:
        log.exception("%s failed", trial.key)
        tracking.log_file(mlflow, run_id, Path(trial.config.out_dir) / launch.RUN_LOG)
        tracking.fail(mlflow, run_id, exc)
        raise
    tracking.log_file(mlflow, run_id, Path(trial.config.out_dir) / launch.RUN_LOG)
    tracking.finish(mlflow, run_id)


def finished_in_mlflow(mlflow: Any, experiment_id: str, parent_run_id: str, key: str) -> bool:
    """Whether trial `key` already finished under this grid run. Tune saves its own state at most every
    10 s, so after a SIGKILL it may restore a finished trial as unfinished: MLflow has the last word."""
    from semiseg import tracking

    run_id = tracking.find_child(mlflow, experiment_id, parent_run_id, key)
    if run_id is None or mlflow.get_run(run_id).info.status != "FINISHED":
        return False
    log.info("%s: already finished in MLflow (run %s); not run again", key, run_id)
    return True


def trial_tags(grid: Grid, trial: Trial) -> dict[str, str]:
    """The tags the table groups by, and what the trial ran on."""
    from semiseg import tracking
    from trainers.datasets import resolve_split

    labeled = len(resolve_split(trial.config.data).labeled)
    return {
        **{axis: str(trial.axes[axis]) for axis in tracking.AXIS_TAGS},
        tracking.GRID_TAG: grid.name,
        "num_labeled": str(labeled),
        "workers": str(grid.workers),
        "device": "GPU" if grid.use_gpu else "CPU",
    }


def log_trial_artifacts(mlflow: Any, run_id: str, trial: Trial, result: Any) -> None:
    """The resolved config, training curves and prediction overlays of the best checkpoint."""
    import tempfile

    import yaml

    from semiseg import plots, tracking
    from trainers import checkpoint as ckpt
    from trainers.datasets import voc_palette

    keys = [k for k in mlflow.get_run(run_id).data.metrics if not k.startswith("iou_")]
    histories = {k: tracking.history(mlflow, run_id, k) for k in keys}
    best = result.get_best_checkpoint(metric="miou", mode="max")
    with tempfile.TemporaryDirectory() as tmp, best.as_directory() as folder:
        out = Path(tmp)
        (out / "config.yaml").write_text(yaml.safe_dump(trial.config.to_dict(), sort_keys=False))
        plots.curves(histories, out / "curves.png", trial.key)
        samples = plots.predict_samples(trial.config, Path(folder) / ckpt.LATEST, OVERLAY_IMAGES)
        plots.overlays(samples, voc_palette(), out / "overlays.png")
        mlflow.log_artifacts(run_id, tmp)


def locate(target: str, tracking_uri: str | None = None) -> tuple[str, str, Path]:
    """(tracking URI, experiment name, storage folder) of a grid file (experiments/demo.yaml), a grid's
    storage folder (runs/demo), or an experiment name whose store is $MLFLOW_TRACKING_URI or the default
    runs/<name>/mlflow.db."""
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        grid = load_grid(target)
        return tracking_uri or grid.tracking_uri, grid.name, grid.storage
    folder = Path(target).resolve()
    is_storage = (folder / "mlflow.db").is_file() or (folder / STATE_FILE).is_file()
    storage = folder if is_storage else Path("runs", target).resolve()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        if not (storage / "mlflow.db").is_file():
            raise ConfigError(
                f"{target}: no grid file, grid storage folder or MLflow store at {storage / 'mlflow.db'} "
                f"(pass the grid file, --tracking-uri, or set MLFLOW_TRACKING_URI)"
            )
        uri = f"sqlite:///{storage}/mlflow.db"
    return uri, _experiment_name(storage, uri) if is_storage else target, storage


def _experiment_name(storage: Path, uri: str) -> str:
    """The experiment a grid's storage folder recorded in its state file, else the folder's name."""
    from semiseg import tracking

    state = storage / STATE_FILE
    if not state.is_file():
        return storage.name
    return tracking.client(uri).get_experiment(json.loads(state.read_text())["experiment_id"]).name
