"""Whether a run may continue from its out_dir's checkpoint, and `--restart`, which moves the old run aside.

A run resumes only with the config its checkpoint was trained with, except for the keys of MAY_CHANGE;
any other difference is one ConfigError naming each dotted key, unless the user forces the resume.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

from trainers import checkpoint as ckpt
from trainers.config import ConfigError, MethodConfig, TrainConfig, flatten
from trainers.errors import CheckpointError
from trainers.methods import METHODS

log = logging.getLogger(__name__)

MAY_CHANGE = (
    "optim.epochs",
    "log_interval",
    "data.num_workers",
    "data.loader_timeout_s",
    "dist.timeout_s",
    "out_dir",
)
"""Keys a resume may change: the epoch count (to extend a run, never below the epochs trained; the poly
schedule follows the new total), how often losses are logged, loader processes, how long loaders and
collectives wait before failing, and the run's folder."""

REPLACED = "replaced-"
"""Prefix of the folders in out_dir that `--restart` moves an earlier run's files into."""


def differences(saved: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """`key: checkpoint A, config B` for each dotted key whose value differs, MAY_CHANGE aside.

    Keys a checkpoint predates count as their default (the saved method's, whose keys are its own); paths
    naming the same file are the same value. When the method itself changed, its own keys are not listed.
    """
    name = saved.get("method", {}).get("name", MethodConfig.name)
    defaults = TrainConfig(method=MethodConfig(name=name)) if name in METHODS else TrainConfig()
    before, now = flatten(defaults.to_dict()) | flatten(saved), flatten(cfg.to_dict())
    if name != cfg.method.name:
        common = {f"method.{f.name}" for f in dataclasses.fields(MethodConfig)}
        before, now = ({k: v for k, v in flat.items() if _not_own(k, common)} for flat in (before, now))
    changed = changed_keys(before, now, MAY_CHANGE)
    return [f"{k}: checkpoint {a!r}, config {b!r}" for k, a, b in changed]


def _not_own(key: str, common: set[str]) -> bool:
    """Whether a flat key is outside the method's own settings (the `method.` keys that are not common)."""
    return not key.startswith("method.") or key in common


ABSENT = "<absent>"


def changed_keys(
    before: dict[str, Any], now: dict[str, Any], skip: tuple[str, ...] = ()
) -> list[tuple[str, Any, Any]]:
    """(dotted key, before, now) for each key of two flat mappings whose values differ, `skip` aside, in
    key order; a key missing on one side is ABSENT there, and paths naming the same file are the same."""
    keys = sorted((before.keys() | now.keys()) - set(skip))
    pairs = [(k, before.get(k, ABSENT), now.get(k, ABSENT)) for k in keys]
    return [(k, a, b) for k, a, b in pairs if not _same(a, b)]


def _same(a: Any, b: Any) -> bool:
    # A Ray run stores absolute paths, an in-process run the ones it was given.
    if a == b:
        return True
    paths = isinstance(a, str) and isinstance(b, str) and os.path.exists(a) and os.path.exists(b)
    return paths and os.path.samefile(a, b)


def check(state: dict[str, Any], cfg: TrainConfig, path: Path, force: bool = False) -> None:
    """Refuse to resume `state` (loaded from `path`) under `cfg` when the configs differ (unless `force`),
    and always when `cfg` asks for fewer epochs than the checkpoint has trained."""
    trained = state["epoch"]
    if cfg.optim.epochs < trained:
        raise ConfigError(
            f"optim.epochs: {cfg.optim.epochs} is below the {trained} epochs {path} has already trained "
            "(raise it to extend the run, or pass `--restart` to train afresh)"
        )
    changed = differences(state.get("config", {}), cfg)
    if changed and not force:
        raise ConfigError(
            f"{path} was trained with another config: {'; '.join(changed)}. "
            "Resume with the checkpoint's values, choose another out_dir, pass `--restart` to train "
            "afresh (the old files are moved aside, not deleted), or `--force-resume` to continue with "
            "the new values"
        )
    if changed:
        log.warning("%s: resuming with a changed config (--force-resume): %s", path, "; ".join(changed))


def resumable(cfg: TrainConfig, force: bool = False) -> dict[str, Any] | None:
    """The newest good checkpoint of `cfg.out_dir` after `check`, or None when there is none to resume."""
    found = ckpt.load_resumable(Path(cfg.out_dir))
    if found is None:
        return None
    path, state = found
    check(state, cfg, path, force)
    return state


def move_aside(out_dir: Path) -> Path | None:
    """Move everything in `out_dir` (earlier moved-aside folders excepted) into a new
    `out_dir/replaced-<time>/`; returns that folder, or None when there was nothing to move."""
    if not out_dir.is_dir():
        return None
    entries = [e for e in out_dir.iterdir() if not e.name.startswith(REPLACED)]
    if not entries:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        for n in itertools.count():
            target = out_dir / (f"{REPLACED}{stamp}" + (f"-{n}" if n else ""))
            if not target.exists():
                target.mkdir()
                break
        for entry in entries:
            os.replace(entry, target / entry.name)
    except OSError as exc:
        # Whatever moved is in `target`: nothing is lost, and the run does not start.
        raise CheckpointError(f"{out_dir}: cannot move the previous run aside ({exc})") from exc
    log.warning("--restart: moved %d entries of the previous run to %s", len(entries), target)
    return target


def prepare(cfg: TrainConfig, restart: bool = False, force: bool = False) -> dict[str, Any] | None:
    """What a run of `cfg` starts from: its out_dir's checkpoint (`resumable`), or None for a fresh run;
    `restart` moves the old run aside first."""
    if restart:
        move_aside(Path(cfg.out_dir))
        return None
    return resumable(cfg, force)
