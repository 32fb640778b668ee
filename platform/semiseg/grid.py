"""Running an experiment grid (see grid_config.py for the file) with Ray Tune, and its driver state.

Each Tune trial is a small driver function (semiseg.trial) that builds one TorchTrainer (see launch.py),
records the trial as a nested MLflow run (see tracking.py) and reports its epochs to Tune. The grid resumes
with `Tuner.restore`: finished trials stay finished, unfinished ones continue from their checkpoints; the
MLflow parent run's ids wait in <storage>/grid.json in between.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from semiseg import storage
from semiseg.grid_config import Grid, check_split, load_grid
from trainers.config import ConfigError, load_yaml

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
            check_split(grid, trial.axes["dataset"], trial.axes["split"], trial.config.data.root)
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

    from semiseg import ray_local
    from semiseg.trial import run_trial

    if not verbose:
        quiet_driver()
    # A resume is checked before anything is written: prepare() may generate data.
    state = _existing_state(grid, resume, force)
    prepare(grid)
    ray_local.connect(address, quiet=not verbose)
    check_store_reaches_every_node(grid)  # before a new grid's MLflow run and grid.json are written
    state = state or _new_state(grid)
    trial_function = tune.with_parameters(run_trial, grid=grid, force=force, **state)
    trainable = tune.with_resources(trial_function, {"CPU": TRIAL_CPUS})
    return _outcome(grid, _tuner(grid, trainable, resume).fit(), state)


def check_store_reaches_every_node(grid: Grid) -> None:
    """Refuse a tracking URI that is a path on this node when the Ray cluster has other alive nodes, where
    the trials may run (`tracking.local_store_refusal`)."""
    import ray

    from semiseg import tracking

    refusal = tracking.local_store_refusal(grid.tracking_uri, sum(n["Alive"] for n in ray.nodes()))
    if refusal is not None:
        raise ConfigError(f"{grid.path}: {refusal}")


def _tuner(grid: Grid, trainable: Any, resume: bool) -> Any:
    """A new Tuner over every combination of the axes, or the interrupted one restored."""
    from ray import tune

    from semiseg.console import GridConsole

    if resume:
        return tune.Tuner.restore(str(grid.tune_dir), trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
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


def _outcome(grid: Grid, results: Any, state: dict[str, str]) -> GridRun:
    """The table from MLflow, the parent run closed unless the grid was interrupted; GridError if trials
    failed."""
    from semiseg import tables, tracking

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
    import mlflow  # noqa: F401  # configures its logger (level INFO) on first import: import it first

    logging.getLogger("mlflow").setLevel(logging.WARNING)
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
