"""Every method, two short epochs on generated data, every reported metric written to a JSON file.

Run it on two commits (a refactor before and after) with the same arguments and compare the files
with `--compare`: on CPU the loop is deterministic, so a refactor that changed no result gives equal
numbers, not numbers within seed noise. (ST++ reports its three stages as one run of epochs.)

    python benchmarks/same_results.py --out /tmp/before.json        # on the old commit
    python benchmarks/same_results.py --out /tmp/after.json         # on the new one
    python benchmarks/same_results.py --compare /tmp/before.json /tmp/after.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from trainers.config import TrainConfig, from_dict
from trainers.entry import train_local
from trainers.synth import generate

METHODS = ("supervised", "fixmatch", "unimatch", "mspl", "u2pl", "stpp", "psmt")
CLASSES = 3


def config(method: str, root: Path, out_dir: Path, seed: int) -> TrainConfig:
    """A seconds-long run of `method` (threshold 0.5: 0.95 would mask every unlabeled pixel); PS-MT's
    runs past its 5 warm-up epochs, U2PL's past its 1."""
    return from_dict(
        TrainConfig,
        {
            "data": {
                "dataset": "synthetic",
                "root": str(root),
                "split": "1_4",
                "crop_size": 32,
                "num_workers": 0,
                "num_classes": CLASSES,
            },
            "model": {"backbone": "tiny"},
            "method": {"name": method, "conf_thresh": 0.5},  # 0.95 masks every pixel this early
            "optim": {
                "epochs": 7 if method == "psmt" else 3,
                "batch_size": 2,
                "lr": 0.01,
                "max_iters_per_epoch": 3,
            },
            "out_dir": str(out_dir),
            "log_interval": 1,
            "seed": seed,
        },
    )


def run_all(seed: int) -> dict[str, list[dict[str, float]]]:
    """method -> the metrics of every epoch it reported."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        root = generate(Path(folder) / "data", 16, 4, 40, CLASSES, 0)
        for method in METHODS:
            reports: list[dict[str, float]] = []
            cfg = config(method, root, Path(folder) / method, seed)
            train_local(
                cfg, report=lambda metrics, _path, kept=reports: kept.append(dict(metrics)), progress=False
            )
            results[method] = [
                {k: v for k, v in r.items() if not k.endswith("_s") and k != "epoch_time"} for r in reports
            ]
            print(method, [round(r["miou"], 4) for r in reports], flush=True)
    return results


def compare(before: Path, after: Path) -> int:
    """Print every metric that differs; 0 when none does."""
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differences = 0
    for method in sorted(set(a) | set(b)):
        if len(a.get(method, [])) != len(b.get(method, [])):
            print(f"{method}: {len(a.get(method, []))} epochs before, {len(b.get(method, []))} after")
            differences += 1
            continue
        for epoch, (x, y) in enumerate(zip(a[method], b[method], strict=True)):
            for key in sorted(set(x) | set(y)):
                if not (key in x and key in y and math.isclose(x[key], y[key], rel_tol=0, abs_tol=1e-9)):
                    print(f"{method} epoch {epoch} {key}: {x.get(key)} before, {y.get(key)} after")
                    differences += 1
    print(f"{differences} difference(s) over {len(a)} methods")
    return 1 if differences else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the metrics here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        parser.error("--out or --compare is required")
    args.out.write_text(json.dumps(run_all(args.seed), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
