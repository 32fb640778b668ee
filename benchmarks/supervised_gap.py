"""The gap semi-supervision must close: supervised training at 1/16 of the labels vs all of them.

Synthetic data, tiny backbone, CPU, several seeds; prints the configuration and a mean ± std table.
Run: `.venv/bin/python benchmarks/supervised_gap.py [--seeds 0,1,2 ...]`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import _runs


def main(argv: list[str] | None = None) -> None:
    """Run supervised@1_16 and supervised@full for every seed and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _runs.add_options(parser, seeds="0,1,2", name="supervised_gap")
    parser.add_argument("--splits", default="1_16,full", help="comma-separated label splits to compare")
    args = parser.parse_args(argv)
    splits = [s for s in args.splits.split(",") if s]
    specs = [_runs.RunSpec("supervised", split, seed) for seed in _runs.seeds_of(args) for split in splits]
    title = f"Supervised training: {' vs '.join(splits)} labels"
    results = _runs.report(args, specs, title)
    if len(splits) == 2:
        print(f"\n{gap(results, *splits)}")


def gap(results: Sequence[_runs.RunResult], low: str, high: str) -> str:
    """The last-epoch mIoU of `high` minus that of `low`, paired by seed: mean ± std and the smallest."""
    by_split: dict[str, dict[int, float]] = {}
    for r in results:
        by_split.setdefault(r.spec.split, {})[r.spec.seed] = r.last_miou
    diffs = [by_split[high][s] - by_split[low][s] for s in by_split[low] if s in by_split[high]]
    return (
        f"Gap {high} - {low} (last mIoU, paired by seed): {_runs.mean_std(diffs)} points, "
        f"smallest {min(diffs):.2f}, n {len(diffs)}: the headroom semi-supervision can win back at {low}."
    )


if __name__ == "__main__":
    main()
