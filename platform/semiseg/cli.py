"""The `semiseg` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from trainers.config import ConfigError, TrainConfig, check_paths, load_config, merge, parse_override
from trainers.errors import USER_ERRORS

REPO = Path(__file__).resolve().parents[2]
"""The checkout this package was installed from (editable install), holding configs/ and experiments/."""


def _load(args: argparse.Namespace) -> TrainConfig:
    overrides: dict = {}
    for text in args.set or []:
        overrides = merge(overrides, parse_override(text))
    cfg = load_config(args.config, overrides)
    check_paths(cfg)
    return cfg


def cmd_train(args: argparse.Namespace) -> None:
    cfg = _load(args)
    if args.workers is None and not args.gpu:
        from trainers.entry import train_local

        result = train_local(cfg, restart=args.restart, force_resume=args.force_resume)
        print(f"mIoU {result.last_miou:.2f} (best {result.best_miou:.2f}) -> {result.out_dir}")
        return
    from semiseg.launch import LaunchError, train_distributed
    from semiseg.ray_local import RayClusterError, connect

    try:
        connect()
        run = train_distributed(
            cfg, args.workers or 1, use_gpu=args.gpu, restart=args.restart, force_resume=args.force_resume
        )
    except (LaunchError, RayClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    # Ctrl-C makes Ray abort the run and exit; the same command run again resumes it.
    miou, best = run.metrics["miou"], run.metrics["best_miou"]
    print(f"mIoU {miou:.2f} (best {best:.2f}) -> {cfg.out_dir} (Ray run: {run.path})")


def cmd_eval(args: argparse.Namespace) -> None:
    from trainers.entry import evaluate_checkpoint

    cfg = _load(args) if args.config else None
    out = evaluate_checkpoint(Path(args.checkpoint), cfg, Path(args.out) if args.out else None, args.mode)
    print(f"mIoU {out.result.miou:.2f}")
    for i, iou in enumerate(out.result.per_class):
        print(f"  class {i:3d}: IoU {iou:6.2f}")
    if out.predictions:
        print(f"predictions -> {out.predictions}")


def cmd_synth(args: argparse.Namespace) -> None:
    from trainers.synth import generate

    out = generate(Path(args.out), args.train, args.val, args.size, args.classes, args.seed)
    print(f"synthetic dataset -> {out}")


def cmd_split(args: argparse.Namespace) -> None:
    from trainers.datasets import read_list
    from trainers.splits import make_split, write_split

    count = float(args.labeled) if "." in args.labeled else int(args.labeled)
    labeled, unlabeled = make_split(read_list(Path(args.train_list)), count, args.seed)
    write_split(Path(args.out), labeled, unlabeled)
    print(f"{len(labeled)} labeled, {len(unlabeled)} unlabeled -> {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    """The README's main job: make the synthetic dataset if absent, train, print the mIoU."""
    from trainers.entry import train_local
    from trainers.synth import generate

    data = Path(args.data)
    if not (data / "synth.json").exists():
        generate(data, 320, 64, 96, 6, 0)
        print(f"synthetic dataset -> {data}")
    overrides = {"data": {"root": str(data)}, "out_dir": args.out}
    cfg = load_config(REPO / "configs" / "synthetic.yaml", overrides)
    result = train_local(cfg)
    print(
        f"demo: supervised, tiny backbone, 1/16 labels: val mIoU {result.last_miou:.2f} "
        f"(best {result.best_miou:.2f}; chance is about {100 / 6:.1f})"
    )


def cmd_grid(args: argparse.Namespace) -> None:
    """Run (or --resume) an experiment grid with Ray Tune; print the table built from MLflow. --dry-run:
    print the trials and their resolved configs instead, starting nothing."""
    from semiseg.grid import GridError, run
    from semiseg.grid_config import load_grid, plan

    if args.force and not args.resume:
        raise ConfigError("--force: only with --resume (it accepts a changed grid file when resuming)")
    grid = load_grid(args.file)
    if args.dry_run:
        print(plan(grid))
        return
    try:
        outcome = run(grid, args.resume, args.address, args.verbose, force=args.force)
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    print("\n" + outcome.table.paths["md"].read_text().rstrip("\n"))
    print(
        f"table -> {outcome.table.paths['md'].parent}; again: `semiseg table {args.file}`; "
        f"runs in MLflow: `semiseg ui {args.file}`"
    )
    if outcome.interrupted:
        print(f"interrupted: continue with `semiseg grid {args.file} --resume`", file=sys.stderr)
        sys.exit(130)


def cmd_table(args: argparse.Namespace) -> None:
    """Rebuild the paper-style table of a grid from its MLflow store alone."""
    from semiseg.grid import locate
    from semiseg.tables import build

    uri, name, storage = locate(args.target, args.tracking_uri)
    out = Path(args.out) if args.out else storage / "table"
    table = build(uri, name, out, args.parent, reference=not args.no_reference)
    print(table.paths["md"].read_text())
    print("written: " + ", ".join(str(p) for p in table.paths.values()))


def cmd_ui(args: argparse.Namespace) -> None:
    """Serve the MLflow UI of a grid's store on 127.0.0.1."""
    from semiseg.grid import locate
    from semiseg.ui import serve

    uri, name, storage = locate(args.target, args.tracking_uri)
    serve(uri, name, args.port, storage / "mlartifacts")


def cmd_cluster_check(args: argparse.Namespace) -> None:
    """List what a cluster.yaml still needs before `ray up`; exit 1 when something blocks it."""
    from semiseg.cluster import check_cluster

    findings = check_cluster(args.file)
    for finding in findings:
        print(f"{args.file}: {finding}" if finding.blocking else f"{args.file}: note: {finding}")
    if any(f.blocking for f in findings):
        sys.exit(1)
    print(f"{args.file}: ready for `ray up {args.file}`")


def cmd_cluster_address(args: argparse.Namespace) -> None:
    """Print this head's private address (used by cluster.yaml's head start commands)."""
    from semiseg.cluster import head_address

    print(head_address())


def cmd_cluster_mlflow(args: argparse.Namespace) -> None:
    """Start (or --stop) the head's MLflow tracking server that every trial logs to."""
    from semiseg.cluster import ClusterError, start_mlflow, stop_mlflow

    if args.stop:
        print("stopped the MLflow server" if stop_mlflow() else "no MLflow server of ours is running")
        return
    try:
        uri = start_mlflow(args.store, args.host, args.port, args.workers)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"MLflow tracking server: {uri} (store: {args.store})")


def cmd_data_check(args: argparse.Namespace) -> None:
    """Validate a real dataset tree against the published lists; exit 1 when there are problems."""
    from semiseg.datacheck import check_tree, format_report

    splits = [args.split] if args.split else None
    report = check_tree(args.dataset, args.root, splits, args.split_dir, args.val_list, args.decode)
    print(format_report(report))
    if not report.ok:
        sys.exit(1)


def cmd_weights_check(args: argparse.Namespace) -> None:
    """Which backbone weight files are present, their SHA-256, whether they load; exit 1 if one is broken."""
    from semiseg.weights import check_weights, format_status

    statuses = check_weights(args.dir)
    print(format_status(statuses))
    if not all(s.ok for s in statuses):
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options."""
    parser = argparse.ArgumentParser(prog="semiseg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_training(sub)
    _add_data(sub)
    _add_cluster(sub)
    _add_grids(sub)
    return parser


def _flag(parser: argparse.ArgumentParser, name: str, what: str) -> None:
    parser.add_argument(name, action="store_true", help=what)


def _add_training(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train one config, in-process or on Ray workers (resumes by itself)")
    train.add_argument("--config", required=True)
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. optim.epochs=3")
    train.add_argument(
        "--workers",
        type=int,
        help="DDP workers under Ray Train (joins $RAY_ADDRESS, else starts a local Ray); default: in-process",
    )
    _flag(train, "--gpu", "a GPU per Ray worker: NCCL, SyncBatchNorm")
    again = train.add_mutually_exclusive_group()
    _flag(
        again,
        "--restart",
        "train afresh: move out_dir's files into out_dir/replaced-<time>/ first (nothing is deleted)",
    )
    _flag(
        again,
        "--force-resume",
        "resume although the config differs from the checkpoint's (the differences are logged)",
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint; optionally write palette prediction PNGs")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--config", help="default: the config stored in the checkpoint")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE")
    ev.add_argument("--out", help="folder for prediction PNGs")
    ev.add_argument("--mode", choices=["original", "center_crop", "sliding_window"])
    ev.set_defaults(func=cmd_eval)

    demo = sub.add_parser("demo", help="synthetic data + supervised training on the tiny backbone")
    demo.add_argument("--data", default="data/synthetic")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=cmd_demo)


def _add_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets and splits").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="write the synthetic dataset in Pascal VOC's layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--train", type=int, default=320)
    synth.add_argument("--val", type=int, default=64)
    synth.add_argument("--size", type=int, default=96)
    synth.add_argument("--classes", type=int, default=6)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth)
    split = data.add_parser("split", help="draw a labeled/unlabeled split from a train list")
    split.add_argument("--train-list", required=True)
    split.add_argument("--labeled", required=True, help="a count (92) or a fraction (0.0625)")
    split.add_argument("--seed", type=int, default=0)
    split.add_argument("--out", required=True)
    split.set_defaults(func=cmd_split)
    check = data.add_parser("check", help="validate a real dataset tree against the published split lists")
    check.add_argument("dataset", choices=["pascal", "cityscapes", "coco"])
    check.add_argument("--root", required=True, help="the dataset folder (e.g. data/VOC2012)")
    check.add_argument("--split", help="one published split (e.g. 92, 1_16); default: all of them")
    check.add_argument("--split-dir", help="check the lists in this folder (labeled.txt, unlabeled.txt)")
    check.add_argument("--val-list", help="check this val list instead of the published one")
    _flag(check, "--decode", "also decode every unlabeled image (slow)")
    check.set_defaults(func=cmd_data_check)


def _add_cluster(sub: argparse._SubParsersAction) -> None:
    cluster = sub.add_parser("cluster", help="the cluster launcher's cluster.yaml and the head's services")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True)
    ccheck = cluster_sub.add_parser("check", help="list what a cluster.yaml still needs, and schema errors")
    ccheck.add_argument("file", help="e.g. cluster.yaml")
    ccheck.set_defaults(func=cmd_cluster_check)
    address = cluster_sub.add_parser("address", help="print this head's private address (run on the head)")
    address.set_defaults(func=cmd_cluster_address)
    server = cluster_sub.add_parser("mlflow", help="start the MLflow tracking server (run on the head)")
    server.add_argument("--store", default="~/semiseg-mlflow", help="its SQLite store and artifacts")
    server.add_argument("--host", help="address to bind (default: the head's private address)")
    server.add_argument("--port", type=int, default=5000)
    server.add_argument("--workers", type=int, default=1)
    _flag(server, "--stop", "stop the server this command started")
    server.set_defaults(func=cmd_cluster_mlflow)

    weights = sub.add_parser("weights", help="pretrained backbone weights").add_subparsers(
        dest="weights_command", required=True
    )
    wcheck = weights.add_parser("check", help="which of resnet50/resnet101/xception.pth are present and load")
    wcheck.add_argument("--dir", default="pretrained", help="folder of the weight files")
    wcheck.set_defaults(func=cmd_weights_check)


def _add_grids(sub: argparse._SubParsersAction) -> None:
    grid = sub.add_parser("grid", help="run an experiment grid (experiments/*.yaml) with Ray Tune and MLflow")
    grid.add_argument("file", help="grid file, e.g. experiments/demo.yaml")
    _flag(grid, "--resume", "continue an interrupted grid (Tuner.restore)")
    grid.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a private one)")
    _flag(
        grid,
        "--force",
        "with --resume: continue although the grid file changed, if the trials stay the same and no "
        "finished trial's config changes (unfinished ones take the new values)",
    )
    _flag(grid, "--verbose", "also show Ray's and the workers' output (else in each run.log)")
    _flag(
        grid,
        "--dry-run",
        "list the trials and each one's resolved config (YAML); start no Ray or MLflow, write nothing",
    )
    grid.set_defaults(func=cmd_grid)

    table = sub.add_parser("table", help="the paper-style mIoU table of a grid, from its MLflow store")
    table.add_argument("target", help="grid file, its storage folder (runs/<name>), or experiment name")
    table.add_argument("--out", help="folder for table.md/.csv/.parquet and the plot (<storage>/table)")
    table.add_argument("--tracking-uri", help="default: the grid's, or $MLFLOW_TRACKING_URI")
    table.add_argument("--parent", help="MLflow run id of the grid run (default: the latest)")
    _flag(table, "--no-reference", "leave out the published Pascal rows")
    table.set_defaults(func=cmd_table)

    ui = sub.add_parser("ui", help="the MLflow UI over a grid's store, on 127.0.0.1")
    ui.add_argument("target", help="grid file, its storage folder (runs/<name>), or experiment name")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--tracking-uri", help="default: the grid's, or $MLFLOW_TRACKING_URI")
    ui.set_defaults(func=cmd_ui)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `semiseg` console command."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the latest checkpoint", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader of the output went away (`semiseg grid ... --dry-run | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()
