"""Self-describing checkpoints, written atomically, verified on load, resumed automatically; and the one
atomic text write the other state files (split lists, a grid's grid.json) use."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from trainers.config import ConfigError
from trainers.errors import CheckpointError

log = logging.getLogger(__name__)

LATEST = "latest.pth"
BEST = "best.pth"
PREVIOUS = "previous.pth"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states (CUDA too when present)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain types and tensors only, so checkpoints load with weights_only=True.
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks (checkpoint sidecars, `semiseg weights check`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".sha256")


def write_text_atomic(path: Path, write: Callable[[TextIO], None]) -> None:
    """Let `write` fill a temp file beside `path` (fsynced), then rename it over `path`: a reader sees the
    old file or the new one, never a part; if `write` fails, the old file stays and no temp file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stage(state: dict[str, Any], path: Path) -> tuple[Path, Path]:
    """Write `state` and its SHA-256 beside `path` as temp files, fsynced; nothing is left if that fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    sidecar_tmp = _sidecar(path).with_suffix(".sha256.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        sidecar_tmp.write_text(sha256(tmp))
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        sidecar_tmp.unlink(missing_ok=True)
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there"
        raise CheckpointError(
            f"{path}: cannot write the checkpoint ({exc}; {free}); the previous one is kept"
        ) from exc
    return tmp, sidecar_tmp


def _commit(path: Path, tmp: Path, sidecar_tmp: Path) -> None:
    # The old sidecar goes first: a crash between the renames leaves a file without a sidecar (still
    # checked by torch's zip reader), never a good file whose stale sidecar condemns it.
    _sidecar(path).unlink(missing_ok=True)
    os.replace(tmp, path)
    os.replace(sidecar_tmp, _sidecar(path))


def save(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically (temp file, fsync, rename) with a SHA-256 sidecar.

    A failed write (disk full, quota) raises CheckpointError and leaves `path` as it was, with no temp files.
    """
    _commit(path, *_stage(state, path))


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint, checking its SHA-256 sidecar when present."""
    sidecar = _sidecar(path)
    if sidecar.exists() and sidecar.read_text().strip() != sha256(path):
        raise CheckpointError(f"{path}: SHA-256 does not match {sidecar.name} (truncated or corrupted)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint: {exc}") from exc


def save_latest(state: dict[str, Any], out_dir: Path) -> Path:
    """Write the new latest, keeping the one it replaces as previous; a failed write changes neither."""
    latest = out_dir / LATEST
    staged = _stage(state, latest)
    if latest.exists():
        # Same rule as `_commit`: at every instant a file's sidecar is its own or absent.
        _sidecar(out_dir / PREVIOUS).unlink(missing_ok=True)
        os.replace(latest, out_dir / PREVIOUS)
        if _sidecar(latest).exists():
            os.replace(_sidecar(latest), _sidecar(out_dir / PREVIOUS))
    _commit(latest, *staged)
    return latest


def check_writable(folder: Path, key: str = "out_dir") -> None:
    """Create `folder` and write a probe file in it; one ConfigError naming `key` if either fails."""
    probe = folder / f".write-check-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            # Some blocks, not an empty file: an empty file still fits on a full disk.
            f.write(bytes(1 << 16))
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as exc:
        with contextlib.suppress(OSError):
            probe.unlink()
        raise ConfigError(f"{key}: {str(folder)!r} is not a writable folder ({exc})") from None


def load_resumable(out_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest good checkpoint in `out_dir` (latest, else previous) and its file, or None to start fresh.

    A bad latest is skipped with a warning. When none is good but checkpoints are there, a fresh run would
    overwrite best.pth: one CheckpointError naming them instead.
    """
    problems = []
    for name in (LATEST, PREVIOUS):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            state = load(path)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        for problem in problems:
            log.warning("skipping bad checkpoint: %s", problem)
        return path, state
    present = [name for name in (LATEST, PREVIOUS, BEST) if (out_dir / name).exists()]
    if present:
        why = "; ".join(problems) or f"no {LATEST} or {PREVIOUS} beside {BEST}"
        raise CheckpointError(
            f"{out_dir}: no checkpoint to resume from ({why}); a fresh run would overwrite "
            f"{', '.join(present)}: pass `--restart` to move them aside and train afresh, or move them away"
        )
    return None
