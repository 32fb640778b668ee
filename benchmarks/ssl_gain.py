"""What semi-supervision buys at 1/16 of the labels: supervised vs fixmatch vs unimatch vs mspl.

Synthetic data, tiny backbone, CPU; every method on the same schedule (the same labeled batches per
epoch), several seeds. Prints the configuration, a mean ± std table and each method's gain over the
supervised baseline (paired by seed: the same seed gives the same initial weights).
Run: `.venv/bin/python benchmarks/ssl_gain.py [--seeds 0,1,2 ...]`.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import _runs

METHODS = ("supervised", "fixmatch", "unimatch", "mspl")


def gains(results: Sequence[_runs.RunResult], baseline: str = "supervised") -> str:
    """Each method's last-epoch mIoU minus the baseline's of the same seed: mean ± std, and the minimum."""
    base = {r.spec.seed: r.last_miou for r in results if r.spec.method == baseline}
    by_method: dict[str, list[float]] = {}
    for r in results:
        if r.spec.method != baseline and r.spec.seed in base:
            by_method.setdefault(r.spec.method, []).append(r.last_miou - base[r.spec.seed])
    lines = [f"| method | gain over {baseline} (last mIoU) | worst seed | n |", "|---|---|---|---|"]
    for method, diffs in by_method.items():
        lines.append(f"| {method} | {_runs.mean_std(diffs)} | {min(diffs):+.2f} | {len(diffs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run every method at the split for every seed, print the tables and the gains."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _runs.add_options(parser, seeds="0,1,2", name="ssl_gain")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods to compare")
    parser.add_argument("--split", default="1_16", help="the labeled split every method trains on")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    specs = [_runs.RunSpec(m, args.split, seed) for seed in _runs.seeds_of(args) for m in methods]
    results = _runs.report(args, specs, f"Semi-supervised gain at {args.split} of the labels")
    if "supervised" in methods and len(methods) > 1:
        print(f"\nGain over the supervised baseline, paired by seed:\n\n{gains(results)}")
        last = {m: statistics.fmean(r.last_miou for r in results if r.spec.method == m) for m in methods}
        print(f"\nMean last mIoU: {', '.join(f'{m} {v:.2f}' for m, v in last.items())}.")


if __name__ == "__main__":
    main()
