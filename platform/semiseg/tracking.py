"""MLflow records of a grid: one parent run per grid, one nested child run per trial.

Written from the driver side only (the grid driver, each Tune trial function, and the Ray Train
controller through `EpochLogger`); training workers never import MLflow. Tables and plots are built
afterwards from this store alone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import UserCallback
from sqlalchemy.exc import SQLAlchemyError

from semiseg import redact
from trainers.config import flatten as config_flatten

log = logging.getLogger(__name__)
T = TypeVar("T")

AXIS_TAGS = ("dataset", "split", "seed", "method")
"""Child-run tags that place a trial in the table."""
GRID_TAG = "semiseg.grid"
TRIAL_TAG = "semiseg.trial"
ROLE_TAG = "semiseg.role"
"""`grid` on parent runs, `trial` on child runs."""
PARENT_TAG = "mlflow.parentRunId"
"""MLflow's own tag: the UI nests a run under the run it names."""


def client(uri: str) -> MlflowClient:
    """A client of the store at `uri` (sqlite:///..., a folder, or an http server)."""
    return MlflowClient(tracking_uri=uri)


def artifact_root(uri: str, storage: Path) -> str | None:
    """Where a new experiment keeps artifacts: beside a local store; a server chooses its own."""
    return (storage / "mlartifacts").as_uri() if uri.startswith(("sqlite:", "file:", "/")) else None


def ensure_experiment(mlflow: MlflowClient, name: str, artifacts: str | None = None) -> str:
    """The id of experiment `name`, created (with `artifacts` as its artifact location) when absent."""
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(name, artifact_location=artifacts)


def start_parent(mlflow: MlflowClient, experiment_id: str, grid_name: str, params: dict[str, str]) -> str:
    """Create the parent run of one grid execution; returns its run id."""
    run = mlflow.create_run(experiment_id, run_name=grid_name, tags={GRID_TAG: grid_name, ROLE_TAG: "grid"})
    log_params(mlflow, run.info.run_id, params)
    return run.info.run_id


def find_child(mlflow: MlflowClient, experiment_id: str, parent_run_id: str, trial_key: str) -> str | None:
    """The child run of `trial_key` under `parent_run_id`, if a previous attempt created it."""
    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_key}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def open_child(
    mlflow: MlflowClient,
    experiment_id: str,
    parent_run_id: str,
    trial_key: str,
    tags: dict[str, str],
    params: dict[str, str],
) -> str:
    """The trial's child run, reopened (status RUNNING) when it exists, so a resumed trial keeps one run."""
    run_id = find_child(mlflow, experiment_id, parent_run_id, trial_key)
    if run_id is None:
        all_tags = {**tags, PARENT_TAG: parent_run_id, TRIAL_TAG: trial_key, ROLE_TAG: "trial"}
        run_id = mlflow.create_run(experiment_id, run_name=trial_key, tags=all_tags).info.run_id
        log_params(mlflow, run_id, params)
    else:
        mlflow.update_run(run_id, status="RUNNING")
    return run_id


def flatten(config: dict[str, Any]) -> dict[str, str]:
    """Nested config -> {"data.crop_size": "321", ...} (MLflow params are flat strings)."""
    return {key: str(value) for key, value in config_flatten(config).items()}


def log_params(mlflow: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Log params in batches (MLflow accepts at most 100 per call)."""
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_batch(run_id, params=items[start : start + 100])


def log_epoch(mlflow: MlflowClient, run_id: str, metrics: dict[str, Any]) -> None:
    """Log one epoch's numeric metrics at step = epoch."""
    step = int(metrics["epoch"])
    stamp = int(time.time() * 1000)
    batch = [Metric(k, float(v), stamp, step) for k, v in metrics.items() if _is_metric(v)]
    mlflow.log_batch(run_id, metrics=batch)


class EpochLogger(UserCallback):
    """Ray Train callback: logs rank 0's metrics of every report to a child run.

    It runs in the Ray Train controller (driver side), so workers never talk to MLflow. It never raises:
    Ray Train fails the whole run on a callback error, so epochs the store refuses wait in `pending`
    (retried at the next report) and stay in rank 0's ray_reports.jsonl, which `backfill` replays.
    """

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self.pending: list[dict[str, Any]] = []

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        self.pending.append(metrics[0])
        try:
            mlflow = client(self.uri)
            while self.pending:
                log_epoch(mlflow, self.run_id, self.pending[0])
                self.pending.pop(0)
        except Exception as exc:  # whatever the store raises (locked, gone, refused), training goes on
            log.warning(
                "MLflow store %s cannot take epoch %d of run %s (%s); training goes on, %d epoch(s) buffered "
                "(retried at the next report, and replayed from ray_reports.jsonl when the trial ends)",
                redact.text(self.uri),
                int(metrics[0]["epoch"]),
                self.run_id,
                redact.text(_one_line(exc)),
                len(self.pending),
            )


def finish(mlflow: MlflowClient, run_id: str, status: str = "FINISHED") -> None:
    """Close a run with `status` (FINISHED, FAILED or KILLED)."""
    mlflow.set_terminated(run_id, status)


def history(mlflow: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of a metric, one per step (the latest write wins: a resumed epoch re-logs), by step."""
    latest: dict[int, Metric] = {}
    for metric in mlflow.get_metric_history(run_id, key):
        kept = latest.get(metric.step)
        if kept is None or metric.timestamp >= kept.timestamp:
            latest[metric.step] = metric
    return [(step, latest[step].value) for step in sorted(latest)]


def child_runs(mlflow: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    """Every child run of a parent, all statuses."""
    return list(_pages(mlflow, [experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}'"))


def latest_parent(mlflow: MlflowClient, experiment_id: str) -> str | None:
    """The most recently started grid run of an experiment."""
    runs = mlflow.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'grid'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _pages(mlflow: MlflowClient, experiments: list[str], filter_string: str) -> Iterable[Any]:
    token = None
    while True:
        page = mlflow.search_runs(
            experiments, filter_string=filter_string, max_results=1000, page_token=token
        )
        yield from page
        token = page.token
        if not token:
            return


# --- Faults (RELIABILITY.md): epochs the store missed, and why a trial failed ----------------------------

REPORT_CONTEXT = frozenset({"world_size", "pid", "host", "node_ip", "master_addr"})
"""Keys semiseg.launch adds to each ray_reports.jsonl line beside the metrics (where an epoch ran)."""
ERROR_TAG = "semiseg.error"
"""On a FAILED trial run, what stopped it (`NonFiniteLossError: epoch 0 iteration 1: loss is nan`)."""


def backfill(mlflow: MlflowClient, run_id: str, reports: list[dict[str, Any]]) -> list[int]:
    """Log the epochs of `reports` (rank 0's ray_reports.jsonl lines) that the run lacks; returns them.

    An epoch run again after a restart appears twice in the reports: its last line wins, as in `history`.
    """
    logged = {step for step, _ in history(mlflow, run_id, "epoch")}
    last = {int(r["epoch"]): r for r in reports}
    missing = sorted(set(last) - logged)
    for epoch in missing:
        log_epoch(mlflow, run_id, {k: v for k, v in last[epoch].items() if k not in REPORT_CONTEXT})
    return missing


def failure_reason(exc: BaseException) -> str:
    """`Type: message` of what stopped a trial (of a WorkerGroupError: the lowest failed rank's own error)."""
    failures = getattr(exc, "worker_failures", None)
    if failures:
        exc = failures[min(failures)]
    return f"{type(exc).__name__}: {_one_line(exc)}"[:5000]  # MLflow caps tag values


def fail(mlflow: MlflowClient, run_id: str, exc: BaseException) -> None:
    """Close a trial's run as FAILED with `failure_reason` in its ERROR_TAG. A store that cannot take it is
    logged, not raised, so the trial's own error stays the one that is reported."""
    reason = failure_reason(exc)
    try:
        mlflow.set_tag(run_id, ERROR_TAG, reason)
        finish(mlflow, run_id, "FAILED")
    except Exception as store_error:
        log.error(
            "MLflow store %s cannot mark run %s FAILED (%s); it failed with %s",
            redact.text(mlflow.tracking_uri),
            run_id,
            redact.text(_one_line(store_error)),
            reason,
        )


def attach(mlflow: MlflowClient, run_id: str, path: Path) -> None:
    """Attach a file, or a folder's files, to a run as artifacts. A store that refuses them is a warning,
    not an error: the files stay where they are, and a log or a plot must not fail the trial it shows."""
    try:
        if path.is_dir():
            mlflow.log_artifacts(run_id, str(path))
        else:
            mlflow.log_artifact(run_id, str(path))
    except Exception as exc:
        log.warning(
            "MLflow store %s cannot take %s as artifacts of run %s (%s); the files stay there",
            redact.text(mlflow.tracking_uri),
            path,
            run_id,
            redact.text(_one_line(exc)),
        )


def report_histories(reports: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """`history` of every metric `log_epoch` logs, read from rank 0's ray_reports.jsonl lines instead of
    the store (the last line of an epoch wins, as there)."""
    last = {int(r["epoch"]): r for r in reports}
    keys = {k for r in last.values() for k, v in r.items() if _is_metric(v)} - REPORT_CONTEXT
    return {k: [(e, float(last[e][k])) for e in sorted(last) if _is_metric(last[e].get(k))] for k in keys}


# --- A store that is unreachable or locked on the trial path (RELIABILITY.md) ----------------------------

RETRY_ENV = "SEMISEG_MLFLOW_RETRY_S"
RETRY_S = 120.0
"""How long a trial keeps retrying a call it cannot go on without (its $SEMISEG_MLFLOW_RETRY_S overrides
it): long enough for a restarted tracking server or a remounted share, short enough that a store that is
gone fails the trial within minutes. MLflow's own retries (HTTP) and busy timeout (SQLite) come on top."""
PERMANENT = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "RESOURCE_ALREADY_EXISTS"})
"""MLflow error codes of a request the store understood and refused: asking again cannot help."""


class StoreUnavailableError(RuntimeError):
    """The MLflow store stayed unreachable or locked through the retries of a call the trial needs."""


def retry_s() -> float:
    """The retry window of `with_store`: $SEMISEG_MLFLOW_RETRY_S, else RETRY_S."""
    return float(os.environ.get(RETRY_ENV, RETRY_S))


def with_store(uri: str, what: str, then: str, call: Callable[..., T], *args: Any) -> T:
    """`call(*args)`, retried with backoff while the store at `uri` fails, for up to `retry_s()` seconds; then
    one StoreUnavailableError: the store (redacted), what could not be done (`what`), the store's last
    error and what to do (`then`). A refusal the store means (PERMANENT) is raised at once, unchanged."""
    window = retry_s()
    deadline = time.monotonic() + window
    delay, attempts = 0.5, 0
    while True:
        attempts += 1
        try:
            return call(*args)
        # What a store that is gone raises: MLflow's errors (HTTP ones wrapped), the OSError of a local
        # store's vanished path, SQLAlchemy's of a locked or unreadable SQLite file met while MLflow opens it.
        except (MlflowException, OSError, SQLAlchemyError) as exc:
            if getattr(exc, "error_code", None) in PERMANENT:
                raise
            if time.monotonic() + delay > deadline:
                raise StoreUnavailableError(
                    f"MLflow store {redact.text(uri)} cannot {what} after {attempts} attempt(s) within "
                    f"{window:.0f} s ({redact.text(_one_line(exc))}); {then}"
                ) from exc
            if attempts == 1:
                log.warning(
                    "MLflow store %s cannot %s (%s); retrying for up to %.0f s",
                    redact.text(uri),
                    what,
                    redact.text(_one_line(exc)),
                    window,
                )
        time.sleep(delay)
        delay = min(2 * delay, 15.0)


def local_store_refusal(uri: str, alive_nodes: int) -> str | None:
    """Why a grid must not log to `uri` from a cluster of `alive_nodes` nodes, or None when it may.

    A local path store (a sqlite: file, a file: or plain folder) is opened from the node each trial
    function runs on: on another node that is another file, or one SQLite file shared over NFS, whose
    locks do not hold across clients. A database or HTTP server store is one store for every node."""
    if alive_nodes <= 1 or urlsplit(uri).scheme not in ("", "file", "sqlite"):
        return None
    return (
        f"tracking URI {redact.text(uri)} is a path on this node, but the Ray cluster has {alive_nodes} "
        "alive nodes and a trial may run on any of them (each would write its own store, or share one SQLite "
        "file over NFS); log to an MLflow tracking server every node reaches instead: the one "
        "`semiseg cluster mlflow` (cluster.yaml) starts on the head, `tracking_uri: http://<head_ip>:5000` "
        "in the grid file or $MLFLOW_TRACKING_URI"
    )


def _is_metric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_line(exc: BaseException) -> str:
    """The last non-empty line of an error's message (a traceback's is its `Type: message` line)."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(exc).__name__
