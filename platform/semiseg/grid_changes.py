"""`semiseg grid --resume` only with the grid file the grid ran with, or `--force` for what cannot alter a
finished trial.

The first run stores a snapshot of the resolved grid in `<storage>/grid.json`: its settings (credentials
redacted) and each trial's config. A resume compares the grid file given now with it, before anything
starts. Any difference is one ConfigError naming each dotted key. `--force` accepts a difference when the
grid keeps its trials (same axes, so Tune restores the same ones) and its MLflow store, and no trial that
FINISHED in MLflow gets another config: the unfinished trials then continue with the new values.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainers.config import ConfigError, flatten

if TYPE_CHECKING:
    from semiseg.grid_config import Grid

SNAPSHOT = "snapshot"
"""The key of grid.json that holds the snapshot."""
FIXED = ("name", "tracking_uri")
"""Settings even `--force` keeps: the MLflow experiment and store the grid's records are in."""
FORCED_TAG = "semiseg.forced_resume"
"""On the parent run and each changed unfinished trial's run: what `--force` changed."""
log = logging.getLogger(__name__)


def snapshot(grid: Grid) -> dict[str, Any]:
    """What a resume compares: the grid's resolved settings (credentials redacted) and its trials' configs."""
    from semiseg import redact

    settings = {
        "name": grid.name,
        "base": grid.base,
        "axes": grid.axes,
        "workers": grid.workers,
        "use_gpu": grid.use_gpu,
        "tracking_uri": grid.tracking_uri,
        "synth": grid.synth,
        "max_concurrent_trials": grid.max_concurrent_trials,
        "method_settings": grid.method_settings,
    }
    trials = {t.key: t.config.to_dict() for t in grid.trials}
    return redact.data({"settings": settings, "trials": trials})


def _changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    from trainers.resume import changed_keys  # imports torch: not on `semiseg table`'s path

    return [f"{k}: was {a!r}, now {b!r}" for k, a, b in changed_keys(flatten(before), flatten(now))]


def check(grid: Grid, state: dict[str, Any], force: bool = False) -> dict[str, Any]:
    """Refuse to resume `grid` when its file differs from the run's snapshot (see the module's rules);
    returns the snapshot of `grid`, which the caller stores as the new one."""
    old, new = state.get(SNAPSHOT) or logged_snapshot(grid, state), snapshot(grid)
    changed = _changes(old["settings"], new["settings"])
    if not changed:
        return new
    where = f"the grid in {grid.storage} ran with other values (see its grid.json)"
    if not force:
        raise ConfigError(
            f"{grid.path}: --resume with a changed grid file: {'; '.join(changed)}; {where}. Resume with "
            "the old values, run the new grid in another storage folder, or pass --force to continue the "
            "unfinished trials with the new values (finished trials must keep theirs)"
        )
    _check_forced(grid, state, old, new, changed)
    return new


def _check_forced(grid: Grid, state: dict[str, Any], old: dict, new: dict, changed: list[str]) -> None:
    from semiseg import tracking

    fixed = [c for c in changed if c.split(":")[0].split(".")[0] in FIXED]
    if fixed or old["trials"].keys() != new["trials"].keys():
        what = "; ".join(fixed) or _trial_set_change(old, new)
        raise ConfigError(
            f"{grid.path}: --force cannot resume this change: {what}. Tune resumes the trials the grid "
            "started with, in its MLflow store: run the new grid in another storage folder"
        )
    mlflow = tracking.client(grid.tracking_uri)
    children = tracking.child_runs(mlflow, state["experiment_id"], state["parent_run_id"])
    altered = {}
    for child in children:
        key = child.data.tags[tracking.TRIAL_TAG]
        altered[key] = (child, _changes(old["trials"][key], new["trials"][key]))
    finished = [
        f"{k}: {'; '.join(c)}" for k, (run, c) in altered.items() if c and run.info.status == "FINISHED"
    ]
    if finished:
        raise ConfigError(
            f"{grid.path}: --force cannot change finished trials (they are not run again): "
            f"{' | '.join(finished)}. Run the new grid in another storage folder"
        )
    log.warning("%s: resuming with a changed grid file (--force): %s", grid.path, "; ".join(changed))
    mlflow.set_tag(state["parent_run_id"], FORCED_TAG, "; ".join(changed)[:5000])
    for run, trial_changes in altered.values():
        if trial_changes:  # its params stay those it was started with: the tag says what changed
            mlflow.set_tag(run.info.run_id, FORCED_TAG, "; ".join(trial_changes)[:5000])


def _trial_set_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    removed, added = (
        sorted(old["trials"].keys() - new["trials"]),
        sorted(new["trials"].keys() - old["trials"]),
    )
    return f"trials removed: {removed or 'none'}, added: {added or 'none'}"


def logged_snapshot(grid: Grid, state: dict[str, Any]) -> dict[str, Any]:
    """The snapshot of the grid file the parent run logged, for a grid.json written before snapshots."""
    from semiseg import tracking
    from semiseg.grid_config import load_grid

    mlflow = tracking.client(grid.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(mlflow.download_artifacts(state["parent_run_id"], "grid", tmp))
        (logged,) = [p for p in folder.iterdir() if p.suffix in (".yaml", ".yml")]
        return snapshot(load_grid(logged))
