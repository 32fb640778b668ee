"""The paper-style table, rebuilt from the MLflow store alone: methods as rows, label splits as columns.

Each cell is the mean ± sample std over seeds of a trial's best-epoch and last-epoch val mIoU (papers
report the best epoch of one run; best and last differ by 0.1-1.4 points, seeds by 0.4-0.7 at few
labels, so both are shown), with the number of seeds and the device-hours the cell cost.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from semiseg import tracking

METHOD_ORDER = ("supervised", "fixmatch", "u2pl", "stpp", "psmt", "unimatch", "mspl")
"""Row order: the seed table's (baseline, older methods, UniMatch, MSPL); others follow by name."""
PUBLISHED_PASCAL = {
    "SupBaseline": (45.1, 55.3, 64.8, 69.7, 73.5),
    "U2PL": (68.0, 69.2, 73.7, 76.2, 79.5),
    "ST++": (65.2, 71.0, 74.6, 77.3, 79.1),
    "PS-MT": (65.8, 69.6, 76.6, 78.4, 80.0),
    "UniMatch": (75.2, 77.2, 78.8, 79.9, 81.2),
    "MSPL (seed)": (77.15, 78.44, 79.74, 81.65, 83.78),
}
"""The seed's Pascal VOC table (classic splits, R101, mIoU %, best epoch of one run)."""
PUBLISHED_SPLITS = ("92", "183", "366", "732", "1464")


@dataclass(frozen=True)
class TrialRecord:
    """One finished child run, as read back from MLflow."""

    dataset: str
    method: str
    split: str
    seed: int
    num_labeled: int
    best_miou: float
    last_miou: float
    epochs: int
    device: str
    """CPU or GPU."""
    device_hours: float
    """Workers x the summed epoch times (re-run epochs included: they were paid for)."""


@dataclass(frozen=True)
class Cell:
    source: str
    """ours | published."""
    dataset: str
    method: str
    split: str
    num_labeled: int
    n_seeds: int
    best_mean: float
    best_std: float
    """Sample std over seeds; NaN with one seed."""
    last_mean: float
    last_std: float
    device_hours: float
    """Summed over the cell's seeds."""
    device: str


def read_trials(mlflow: tracking.MlflowClient, experiment_id: str, parent_run_id: str) -> list[TrialRecord]:
    """Every FINISHED child run of a grid run, with its best and last val mIoU from the metric history."""
    records = []
    for run in tracking.child_runs(mlflow, experiment_id, parent_run_id):
        if run.info.status != "FINISHED":
            continue
        miou = [v for _, v in tracking.history(mlflow, run.info.run_id, "miou")]
        if not miou:
            continue
        times = [m.value for m in mlflow.get_metric_history(run.info.run_id, "epoch_time")]
        t = run.data.tags
        records.append(
            TrialRecord(
                dataset=t["dataset"],
                method=t["method"],
                split=t["split"],
                seed=int(t["seed"]),
                num_labeled=int(t["num_labeled"]),
                best_miou=max(miou),
                last_miou=miou[-1],
                epochs=len(miou),
                device=t["device"],
                device_hours=int(t["workers"]) * sum(times) / 3600,
            )
        )
    return records


def summarize(records: list[TrialRecord]) -> list[Cell]:
    """One cell per dataset x method x split, sorted by dataset, method order, number of labels."""
    groups: dict[tuple[str, str, str], list[TrialRecord]] = {}
    for r in records:
        groups.setdefault((r.dataset, r.method, r.split), []).append(r)
    cells = [_cell(rs) for rs in groups.values()]
    return sorted(cells, key=lambda c: (c.dataset, _method_rank(c.method), c.num_labeled, c.split))


def _method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def _cell(records: list[TrialRecord]) -> Cell:
    first = records[0]
    best = [r.best_miou for r in records]
    last = [r.last_miou for r in records]
    return Cell(
        source="ours",
        dataset=first.dataset,
        method=first.method,
        split=first.split,
        num_labeled=first.num_labeled,
        n_seeds=len(records),
        best_mean=statistics.fmean(best),
        best_std=_std(best),
        last_mean=statistics.fmean(last),
        last_std=_std(last),
        device_hours=sum(r.device_hours for r in records),
        device=first.device,
    )


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def published_cells(splits: list[str]) -> list[Cell]:
    """The seed's Pascal numbers for the classic splits among `splits`, as reference cells."""
    nan = math.nan
    return [
        Cell("published", "pascal", method, split, int(split), 1, value, nan, nan, nan, nan, "GPU")
        for method, values in PUBLISHED_PASCAL.items()
        for split, value in zip(PUBLISHED_SPLITS, values, strict=True)
        if split in splits
    ]


def with_reference(cells: list[Cell]) -> list[Cell]:
    """`cells` plus the published Pascal rows for the Pascal splits the grid ran."""
    splits = sorted({c.split for c in cells if c.dataset == "pascal" and c.source == "ours"})
    return cells + published_cells(splits)


def _mean_std(mean: float, std: float, decimals: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{decimals}f}" if math.isnan(std) else f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def to_markdown(cells: list[Cell]) -> str:
    """Per dataset: best-epoch and last-epoch mIoU tables (methods x splits, `mean ± std (n)`) and hours."""
    parts = []
    for dataset in sorted({c.dataset for c in cells}):
        mine = [c for c in cells if c.dataset == dataset]
        ours = [c for c in mine if c.source == "ours"]
        if not ours:
            continue
        splits = sorted({(c.num_labeled, c.split) for c in ours})
        device = ours[0].device
        parts.append(f"### {dataset}: val mIoU (%), mean ± std over seeds (n seeds)\n")
        parts.append(
            _grid(mine, splits, "best epoch", lambda c: _with_n(_mean_std(c.best_mean, c.best_std), c))
        )
        parts.append(
            _grid(ours, splits, "last epoch", lambda c: _with_n(_mean_std(c.last_mean, c.last_std), c))
        )
        parts.append(_grid(ours, splits, f"{device}-hours", lambda c: f"{c.device_hours:.3f}"))
    return "\n".join(parts)


def _with_n(text: str, cell: Cell) -> str:
    return text if cell.source == "published" else f"{text} ({cell.n_seeds})"


def _grid(cells: list[Cell], splits: list[tuple[int, str]], title: str, show) -> str:
    rows = []
    for source in ("ours", "published"):
        keyed = {(c.method, c.split): c for c in cells if c.source == source}
        methods = (
            sorted({m for m, _ in keyed}, key=_method_rank) if source == "ours" else list(PUBLISHED_PASCAL)
        )
        for method in methods:
            if not any((method, s) in keyed for _, s in splits):
                continue
            name = method if source == "ours" else f"{method} (published)"
            rows.append(
                [name] + [show(keyed[(method, s)]) if (method, s) in keyed else "" for _, s in splits]
            )
    header = [title] + [f"{s} ({n} labels)" if s != str(n) else s for n, s in splits]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(cells: list[Cell], out_dir: str | Path) -> dict[str, Path]:
    """Write table.md, table.csv and table.parquet into `out_dir`; returns them by format."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "table.md", "csv": out / "table.csv", "parquet": out / "table.parquet"}
    paths["md"].write_text(to_markdown(cells))
    names = [f.name for f in fields(Cell)]
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(asdict(c) for c in cells)
    pq.write_table(pa.Table.from_pylist([asdict(c) for c in cells]), paths["parquet"])
    return paths


def read_parquet(path: str | Path) -> list[Cell]:
    """Cells back from a table.parquet."""
    import pyarrow.parquet as pq

    return [Cell(**row) for row in pq.read_table(path).to_pylist()]


@dataclass
class Table:
    cells: list[Cell]
    paths: dict[str, Path]
    """md, csv, parquet and the plot (png)."""
    parent_run_id: str


def build(
    uri: str,
    experiment: str,
    out_dir: str | Path,
    parent_run_id: str | None = None,
    reference: bool = True,
    log_artifacts: bool = True,
) -> Table:
    """Rebuild the table of a grid run (default: the experiment's latest) from MLflow, write its files and
    plot, and log them as artifacts of the grid's parent run."""
    from semiseg import plots
    from trainers.config import ConfigError

    mlflow = tracking.client(uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise ConfigError(f"experiment {experiment!r}: not in the MLflow store {uri}")
    parent = parent_run_id or tracking.latest_parent(mlflow, found.experiment_id)
    if parent is None:
        raise ConfigError(f"experiment {experiment!r}: no grid run in the MLflow store {uri}")
    cells = summarize(read_trials(mlflow, found.experiment_id, parent))
    if reference:
        cells = with_reference(cells)
    paths = write_table(cells, out_dir)
    paths["png"] = plots.miou_vs_labels(cells, Path(out_dir) / "miou_vs_labels.png")
    if log_artifacts:
        for path in paths.values():
            mlflow.log_artifact(parent, str(path), "table")
    return Table(cells, paths, parent)
