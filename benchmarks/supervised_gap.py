"""The gap semi-supervision must close: supervised training at 1/16 of the labels vs all of them.

Synthetic data, tiny backbone, CPU, several seeds; prints the configuration and a mean ± std table.
Run from the repository root: `.venv/bin/python benchmarks/supervised_gap.py [--seeds 0,1,2 ...]`.
"""

from __future__ import annotations

import argparse

import _runs


def main(argv: list[str] | None = None) -> None:
    """Run supervised@1_16 and supervised@full for every seed and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _runs.add_options(parser, seeds="0,1,2", out="runs/bench/supervised_gap")
    parser.add_argument("--splits", default="1_16,full", help="comma-separated label splits to compare")
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    specs = [_runs.RunSpec("supervised", split, seed) for seed in _runs.seeds_of(args) for split in splits]
    _runs.report(args, specs, "Supervised training: 1/16 of the labels vs all labels")


if __name__ == "__main__":
    main()
