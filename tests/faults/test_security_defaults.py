"""Security defaults: Ray and the MLflow UI listen on loopback only, and paths taken from configs cannot make
the platform write outside a run's folder. (That logged params hold the config and nothing of the
environment: test_fault_grid.py::test_nan_loss_fails_its_trial_with_the_reason_and_the_grid_goes_on.)
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
import yaml
from semiseg import cli, grid, ui

from trainers.config import ConfigError
from trainers.datasets import Pair, read_list, write_list
from trainers.entry import evaluate_checkpoint, train_local

REPO = Path(__file__).resolve().parents[2]


def listening_sockets(processes: list) -> list[tuple[str, str, int]]:
    """(holder's name, address, port) of every listening TCP socket of `processes`. A process that exits
    while being read (Ray recycles idle workers) holds no socket any more and is passed over."""
    import psutil

    found = []
    for process in processes:
        try:
            name, connections = process.name(), process.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        found += [(name, c.laddr.ip, c.laddr.port) for c in connections if c.status == "LISTEN"]
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def test_local_ray_cluster_listens_on_loopback_only(ray_cluster):
    import psutil  # comes with Ray, on sys.path once ray is imported

    # Ray's own services and idle workers. A Ray Train worker of rank 0, while it trains, also holds
    # torch.distributed's rendezvous store, which torch binds to every interface: see RELIABILITY.md.
    everything = listening_sockets(psutil.Process().children(recursive=True))
    sockets = [s for s in everything if "RayTrainWorker" not in s[0]]
    addresses = {address for _, address, _ in sockets}
    assert addresses and all(is_loopback(a) for a in addresses), sockets
    # The dashboard is not started at all (include_dashboard=False): nothing serves its port.
    assert 8265 not in {port for _, _, port in sockets}


def test_cluster_head_leaves_the_ray_dashboard_on_loopback():
    from ray.scripts.scripts import start

    (option,) = [p for p in start.params if p.name == "dashboard_host"]
    assert is_loopback(option.default)
    commands = yaml.safe_load((REPO / "cluster.yaml").read_text())["head_start_ray_commands"]
    assert not any("--dashboard-host" in c for c in commands)


def test_mlflow_ui_binds_loopback_and_offers_no_other_host():
    command = ui.server_command("sqlite:////tmp/store.db", 5000)
    assert command[command.index("--host") + 1] == "127.0.0.1"
    ui_parser = cli.build_parser()._subparsers._group_actions[0].choices["ui"]
    assert not any("--host" in action.option_strings for action in ui_parser._actions)


def grid_file(tmp: Path, root: Path, **changes) -> Path:
    raw = {
        "name": "safe",
        "base": {"data": {"dataset": "synthetic", "root": str(root)}, "model": {"backbone": "tiny"}},
        "axes": {"split": ["1_4"], "method": ["supervised"]},
        "storage": str(tmp / "runs"),
    }
    for key, value in changes.items():
        raw[key] = value if not isinstance(value, dict) else {**raw[key], **value}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


ESCAPES = [
    ("name", {"name": "../../elsewhere"}, "name: expected letters, digits"),
    ("split", {"axes": {"split": ["../../../elsewhere"]}}, "axes.split: dataset 'synthetic' has no split"),
    ("method", {"axes": {"method": ["../x"]}}, r"axes.method: expected one of \[.*\], got '../x'"),
    ("out_dir", {"base": {"out_dir": "/elsewhere"}}, "base.out_dir: set by the grid"),
]


@pytest.mark.parametrize(("change", "message"), [e[1:] for e in ESCAPES], ids=[e[0] for e in ESCAPES])
def test_grid_values_cannot_point_writes_outside_storage(synthetic_root, tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        grid.load_grid(grid_file(tmp_path, synthetic_root, **change))


def test_every_trial_writes_below_the_grid_storage(synthetic_root, tmp_path):
    loaded = grid.load_grid(
        grid_file(tmp_path, synthetic_root, axes={"seed": [0, 1], "split": ["1_4", "1_2"]})
    )
    for trial in loaded.trials:
        assert Path(trial.config.out_dir).resolve().is_relative_to(loaded.storage / "trials")
        assert "/" not in trial.key and ".." not in trial.key


def test_prediction_files_stay_in_their_folder_whatever_the_val_list_says(
    tiny_config, synthetic_root, tmp_path
):
    # A val list naming an image outside the dataset root: it is read, and its prediction is written
    # into the chosen folder under its file name alone.
    (pair,) = read_list(synthetic_root / "splits/val.txt")[:1]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "image.jpg").write_bytes((synthetic_root / pair.image).read_bytes())
    (outside / "mask.png").write_bytes((synthetic_root / pair.mask).read_bytes())
    write_list(tmp_path / "val.txt", [Pair("../../outside/image.jpg", "../../outside/mask.png")])
    root = tmp_path / "a" / "b"
    root.mkdir(parents=True)
    trained = train_local(tiny_config(optim={"epochs": 1, "max_iters_per_epoch": 1}), progress=False)
    data = {
        "root": str(root),
        "split_dir": str(synthetic_root / "splits/1_4"),
        "val_list": str(tmp_path / "val.txt"),
    }

    evaluate_checkpoint(trained.out_dir / "latest.pth", tiny_config(data=data), tmp_path / "pred")

    assert [p.name for p in (tmp_path / "pred").iterdir()] == ["image.png"]
    assert sorted(p.name for p in outside.iterdir()) == ["image.jpg", "mask.png"]
