"""Load backbone weights: UniMatch's published ImageNet files, torchvision's state dicts, or this
platform's own (a `tiny`/`small` backbone trained here, e.g. the `backbone.*` of a run's best.pth).

Files are read with `weights_only=True`: a file that needs unpickling arbitrary objects is refused.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

FORMATS = ("auto", "unimatch", "torchvision", "semiseg")
# Keys a backbone never has: the ImageNet classifier, BatchNorm counters, and the extra entries
# UniMatch filters out of xception.pth (names containing "itr" or "tmp").
IGNORED = re.compile(r"(^fc\.|num_batches_tracked$|itr|tmp)")
LISTED = 8


class WeightsError(ValueError):
    """A weights file cannot be read or does not fit the backbone."""


@dataclass
class LoadReport:
    path: str
    fmt: str
    """unimatch (deep-stem ResNet or aligned Xception) or torchvision (7x7-stem ResNet)."""
    loaded: int
    """Tensors copied into the backbone."""
    ignored: list[str] = field(default_factory=list)
    """File keys deliberately skipped (classifier, BatchNorm counters)."""


def load_backbone_weights(backbone: nn.Module, path: str | Path, fmt: str = "auto") -> LoadReport:
    """Copy the backbone tensors of `path` into `backbone`; every key must match in name and shape."""
    if fmt not in FORMATS:
        raise WeightsError(f"{path}: format {fmt!r}: expected one of {FORMATS}")
    state = backbone_state(read_state_dict(path), path)
    found = find_format(backbone, state, path)
    if fmt != "auto" and fmt != found:
        raise WeightsError(f"{path}: asked for {fmt} format, but the keys are in {found} format")
    check_stem(backbone, found, path)
    ignored = sorted(k for k in state if IGNORED.search(k))
    state = {k: v for k, v in state.items() if k not in ignored}
    check_keys(backbone.state_dict(), state, path)
    backbone.load_state_dict(state, strict=False)
    return LoadReport(str(path), found, len(state), ignored)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor dict stored in `path` (a bare state dict or one under "model"/"state_dict")."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's own message advises weights_only=False; keep only its line naming the culprit.
        reason = next((line for line in str(exc).splitlines() if "unsupported" in line.lower()), "")
        raise WeightsError(
            f"{path}: not a plain tensor state dict; refusing to unpickle anything else. {reason}".strip()
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise WeightsError(f"{path}: not a readable torch weights file ({exc})") from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise WeightsError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    return data


def backbone_state(state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """Strip DDP's `module.` prefix; from a whole segmentation model keep only `backbone.*`."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not state:
        raise WeightsError(f"{path}: holds no tensors")
    return state


def own_keys(backbone: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """True when `state` has exactly the backbone's own keys: weights this platform trained (e.g. the
    `backbone.*` of a `small` checkpoint), which need no format of their own."""
    wanted = {k for k in backbone.state_dict() if not IGNORED.search(k)}
    return wanted == {k for k in state if not IGNORED.search(k)}


def find_format(backbone: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> str:
    """A published format when the keys show one (`detect_format`); else `semiseg` when they are
    exactly this backbone's own."""
    try:
        return detect_format(state, path)
    except WeightsError:
        if own_keys(backbone, state):
            return "semiseg"
        raise


def detect_format(state: dict[str, torch.Tensor], path: str | Path) -> str:
    """unimatch: deep stem `conv1.0.weight` or Xception `block1.*`; torchvision: 7x7 `conv1.weight`."""
    if "conv1.0.weight" in state or any(k.startswith("block1.") for k in state):
        return "unimatch"
    stem = state.get("conv1.weight")
    if stem is not None and stem.dim() == 4 and stem.shape[-1] == 7:
        return "torchvision"
    raise WeightsError(
        f"{path}: unknown weights format: neither a deep stem (conv1.0.weight), an Xception "
        f"(block1.*), a torchvision 7x7 stem (conv1.weight) nor exactly the keys of this backbone "
        f"(weights trained here); first keys: {list(state)[:LISTED]}"
    )


def check_stem(backbone: nn.Module, fmt: str, path: str | Path) -> None:
    """Name the right backbone variant when the file's stem does not fit the model's."""
    keys = backbone.state_dict()
    if fmt == "torchvision" and "conv1.0.weight" in keys:
        raise WeightsError(
            f"{path}: torchvision-format weights (single 7x7 stem conv1.weight) do not fit this "
            f"deep-stem ResNet (conv1.0.weight); use the backbone resnet50_tv or resnet101_tv"
        )
    if fmt == "semiseg":
        return
    if fmt == "unimatch" and "conv1.0.weight" not in keys and "block1.skip.weight" not in keys:
        raise WeightsError(
            f"{path}: UniMatch-format weights (deep stem conv1.0.weight or Xception block1.*) do not "
            f"fit this backbone, which has neither; use the backbone resnet50, resnet101 or xception65"
        )


def check_keys(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise naming the missing, unexpected and mis-shaped keys (with shapes) if any."""
    wanted = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in wanted if k not in state]
    unexpected = [k for k in state if k not in wanted]
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in wanted.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = [
        f"{len(keys)} {what}: {keys[:LISTED]}" + (" ..." if len(keys) > LISTED else "")
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if keys
    ]
    hint = depth_hint(wanted, state)
    raise WeightsError(f"{path}: weights do not fit the backbone; " + "; ".join(parts) + hint)


def depth_hint(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> str:
    """For ResNets, compare the blocks per stage (e.g. resnet50 weights into resnet101)."""
    model, found = stage_depths(expected), stage_depths(state)
    if model == found or not (any(model) and any(found)):
        return ""
    return f" (blocks per stage: file {found}, model {model}: a different ResNet depth?)"


def stage_depths(state: dict[str, torch.Tensor]) -> tuple[int, ...]:
    blocks = {tuple(k.split(".")[:2]) for k in state if k.startswith("layer")}
    return tuple(sum(1 for layer, _ in blocks if layer == f"layer{i}") for i in range(1, 5))
