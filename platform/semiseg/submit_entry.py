"""What `ray submit cluster.yaml platform/semiseg/submit_entry.py <semiseg arguments>` runs on the head.

`ray submit` copies only this file to the head (as ~/submit_entry.py) and runs it with the head's
`python`, where `ray up` installed the platform. It runs the `semiseg` command line there, joined to the
running cluster (address "auto") instead of starting a private Ray, logging to the MLflow server that
the head started, with relative paths (experiments/pascal.yaml) taken from the platform's checkout.

    ray submit cluster.yaml platform/semiseg/submit_entry.py grid experiments/pascal.yaml
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    """Set the cluster's Ray address and MLflow URI (unless already set), then run `semiseg argv`."""
    from semiseg import cli, cluster

    os.environ.setdefault("RAY_ADDRESS", "auto")
    uri = cluster.running_tracking_uri()
    if uri is not None:
        os.environ.setdefault("MLFLOW_TRACKING_URI", uri)
    os.chdir(cli.REPO)
    mlflow = os.environ.get("MLFLOW_TRACKING_URI", "the grid file's")
    print(
        f"semiseg {' '.join(argv)}: Ray {os.environ['RAY_ADDRESS']}, MLflow {mlflow}, in {cli.REPO}",
        flush=True,
    )
    cli.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
