"""The paper-style table rebuilt from a real MLflow store: seeds aggregated to hand-computed numbers,
resumed epochs counted once, failed runs and older grid runs left out, files and artifacts written."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow.entities import Metric
from PIL import Image
from semiseg import cli, plots, tables, tracking

EXPERIMENT = "table-test"
WORKERS = 2
EPOCH_TIME_S = 360.0
# (dataset, method, split, seed) -> val mIoU per epoch
HISTORIES = {
    ("synthetic", "supervised", "1_8", 0): [10.0, 30.0, 20.0],
    ("synthetic", "supervised", "1_8", 1): [20.0, 25.0, 24.0],
    ("synthetic", "supervised", "1_8", 2): [15.0, 40.0, 35.0],
    ("synthetic", "mspl", "1_8", 0): [12.0],
    ("pascal", "mspl", "92", 0): [70.0, 75.0],
}
NUM_LABELED = {"1_8": 20, "92": 92}


def _trial(mlflow, experiment, parent, dataset, method, split, seed, values, status="FINISHED"):
    key = f"{dataset}_{split}_{method}_seed{seed}"
    tags = {"dataset": dataset, "method": method, "split": split, "seed": str(seed)}
    tags |= {"num_labeled": str(NUM_LABELED[split]), "workers": str(WORKERS), "device": "CPU"}
    run_id = tracking.open_child(mlflow, experiment, parent, key, tags, {"seed": str(seed)})
    for epoch, value in enumerate(values):
        tracking.log_epoch(mlflow, run_id, {"epoch": float(epoch), "miou": value, "epoch_time": EPOCH_TIME_S})
    tracking.finish(mlflow, run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with an older grid run and the current one (children as in HISTORIES, one failed)."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow = tracking.client(uri)
    experiment = tracking.ensure_experiment(mlflow, EXPERIMENT, tracking.artifact_root(uri, root))
    old = tracking.start_parent(mlflow, experiment, EXPERIMENT, {})
    _trial(mlflow, experiment, old, "synthetic", "supervised", "1_8", 0, [99.0])
    parent = tracking.start_parent(mlflow, experiment, EXPERIMENT, {})
    runs = {k: _trial(mlflow, experiment, parent, *k, v) for k, v in HISTORIES.items()}
    _trial(mlflow, experiment, parent, "synthetic", "mspl", "1_8", 1, [98.0], status="FAILED")
    # A resumed epoch logged twice: the later write (the epoch that was kept) wins.
    seed1 = runs[("synthetic", "supervised", "1_8", 1)]
    stamp = max(m.timestamp for m in mlflow.get_metric_history(seed1, "miou"))
    mlflow.log_batch(seed1, metrics=[Metric("miou", 97.0, stamp - 1000, 2)])
    table = tables.build(uri, EXPERIMENT, root / "table")
    return {"uri": uri, "mlflow": mlflow, "parent": parent, "table": table, "root": root}


def _ours(table, dataset, method, split):
    (cell,) = [
        c for c in table.cells if (c.source, c.dataset, c.method, c.split) == ("ours", dataset, method, split)
    ]
    return cell


def test_cells_pinned_to_hand_computed_values(store):
    table = store["table"]
    assert table.parent_run_id == store["parent"]
    sup = _ours(table, "synthetic", "supervised", "1_8")
    # best per seed 30, 25, 40; last per seed 20, 24, 35 (sample std, n - 1 = 2)
    assert (sup.n_seeds, sup.num_labeled) == (3, 20)
    assert sup.best_mean == pytest.approx(95 / 3)
    assert sup.best_std == pytest.approx(math.sqrt((25 / 9 + 400 / 9 + 625 / 9) / 2))
    assert sup.last_mean == pytest.approx(79 / 3)
    assert sup.last_std == pytest.approx(math.sqrt((361 / 9 + 49 / 9 + 676 / 9) / 2))
    assert sup.device_hours == pytest.approx(3 * 3 * EPOCH_TIME_S * WORKERS / 3600)
    single = _ours(table, "synthetic", "mspl", "1_8")
    assert (single.n_seeds, single.best_mean, single.last_mean) == (1, 12.0, 12.0)
    assert math.isnan(single.best_std)
    ours = [c for c in table.cells if c.source == "ours"]
    assert len(ours) == 3  # the failed run and the older grid run add nothing


def test_reference_rows_only_for_the_pascal_splits_run(store):
    published = [c for c in store["table"].cells if c.source == "published"]
    assert {c.split for c in published} == {"92"}
    assert {c.method: c.best_mean for c in published}["MSPL (seed)"] == 77.15
    assert len(published) == len(tables.PUBLISHED_PASCAL)


def test_markdown_rows_are_methods_columns_are_splits(store):
    text = store["table"].paths["md"].read_text()
    assert "| best epoch | 1_8 (20 labels) |" in text
    assert "| supervised | 31.67 ± 7.64 (3) |" in text
    assert "| supervised | 26.33 ± 7.77 (3) |" in text
    assert "| mspl | 12.00 (1) |" in text
    assert "| MSPL (seed) (published) | 77.15 |" in text
    assert "| CPU-hours | 1_8 (20 labels) |" in text
    assert text.index("| supervised |") < text.index("| mspl | 12.00")


def test_csv_parquet_and_plot_written_and_logged_to_the_parent(store):
    table = store["table"]
    back = tables.read_parquet(table.paths["parquet"])
    assert [c.method for c in back] == [c.method for c in table.cells]
    for a, b in zip(back, table.cells, strict=True):
        assert a.best_std == pytest.approx(b.best_std, nan_ok=True)
    lines = table.paths["csv"].read_text().splitlines()
    assert lines[0].startswith("source,dataset,method,split,num_labeled,n_seeds,best_mean")
    assert len(lines) == 1 + len(table.cells)
    with Image.open(table.paths["png"]) as im:
        assert im.format == "PNG" and im.width > 200
    logged = {a.path for a in store["mlflow"].list_artifacts(store["parent"], "table")}
    assert logged == {f"table/{n}" for n in ("table.md", "table.csv", "table.parquet", "miou_vs_labels.png")}


def test_table_command_reads_the_store_alone(store, capsys, tmp_path):
    cli.main(["table", EXPERIMENT, "--tracking-uri", store["uri"], "--out", str(tmp_path), "--no-reference"])
    out = capsys.readouterr().out
    assert "| supervised | 31.67 ± 7.64 (3) |" in out
    assert "published" not in out
    assert (tmp_path / "table.parquet").is_file()


def test_table_command_names_a_missing_experiment(store, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["table", "no-such-grid", "--tracking-uri", store["uri"]])
    assert exit_info.value.code == 2
    assert "experiment 'no-such-grid': not in the MLflow store" in capsys.readouterr().err


def test_overlay_colours_labels_and_leaves_ignored_pixels(tmp_path):
    image = np.full((4, 4, 3), 100, np.uint8)
    mask = np.array([[0, 1, 255, 255]] * 4, np.uint8)
    palette = [0, 0, 0, 200, 0, 0] + [0] * (256 * 3 - 6)
    blended = plots._blend(image, mask, np.array(palette, np.float32).reshape(-1, 3), 255)
    assert blended[0, 0].tolist() == [50, 50, 50]
    assert blended[0, 1].tolist() == [150, 50, 50]
    assert blended[0, 2].tolist() == [100, 100, 100]
    path = plots.overlays([(image, mask, mask)], palette, tmp_path / "o.png", 255)
    with Image.open(path) as im:
        assert im.format == "PNG"


def test_curves_draw_only_the_metrics_a_run_has(tmp_path):
    path = plots.curves(
        {"miou": [(0, 1.0), (1, 2.0)], "loss_x": [(0, 0.5)], "aug": [(0, 0.1)]}, tmp_path / "c.png"
    )
    with Image.open(path) as im:
        # Two panels (mIoU, loss terms) of 4 inches at 90 dpi; no mask-ratio or lr panel.
        assert im.width == 2 * 4 * 90
