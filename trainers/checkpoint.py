"""Self-describing checkpoints, written atomically, verified on load, resumed automatically."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

LATEST = "latest.pth"
BEST = "best.pth"
PREVIOUS = "previous.pth"


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, truncated or fails its checksum."""


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


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` atomically (temp file, fsync, rename) with a SHA-256 sidecar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    digest = _digest(tmp)
    sidecar_tmp = path.with_suffix(path.suffix + ".sha256.tmp")
    sidecar_tmp.write_text(digest)
    os.replace(tmp, path)
    os.replace(sidecar_tmp, path.with_suffix(path.suffix + ".sha256"))


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint, checking its SHA-256 sidecar when present."""
    sidecar = path.with_suffix(path.suffix + ".sha256")
    if sidecar.exists() and sidecar.read_text().strip() != _digest(path):
        raise CheckpointError(f"{path}: SHA-256 does not match {sidecar.name} (truncated or corrupted)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint: {exc}") from exc


def save_latest(state: dict[str, Any], out_dir: Path) -> Path:
    """Keep the previous latest as a fallback, then write the new latest."""
    latest = out_dir / LATEST
    if latest.exists():
        os.replace(latest, out_dir / PREVIOUS)
        sidecar = latest.with_suffix(".pth.sha256")
        if sidecar.exists():
            os.replace(sidecar, out_dir / (PREVIOUS + ".sha256"))
    save(state, latest)
    return latest


def load_resumable(out_dir: Path) -> dict[str, Any] | None:
    """The newest good checkpoint in `out_dir` (latest, else previous), or None to start fresh."""
    for name in (LATEST, PREVIOUS):
        path = out_dir / name
        if not path.exists():
            continue
        try:
            return load(path)
        except CheckpointError as exc:
            log.warning("skipping bad checkpoint: %s", exc)
    return None
