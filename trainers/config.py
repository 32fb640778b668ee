"""Training configuration: frozen dataclasses loaded from YAML and validated on load.

Every error names the file and the dotted key, and says what was expected, before any compute.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, mistyped or out of range."""


EVAL_MODES = ("original", "center_crop", "sliding_window")
CRITERIA = ("ce", "ohem")
LR_SCALING = ("keep_global_batch", "linear")
OPTIMIZERS = ("sgd", "adamw")
SCALE_RANGE = (0.5, 2.0)
"""UniMatch's random rescale: the long side becomes U(0.5, 2.0) x itself (`data.scale_range`)."""
DECODERS = ("pil", "torchvision")
EPOCHS = ("unlabeled", "labeled")
MAX_SEED = 2**31 - 1
"""NumPy takes seeds below 2**32; the headroom covers the per-rank and per-epoch offsets added to it."""

T = TypeVar("T")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"
    """Key of `trainers.datasets.DATASETS` (pascal, cityscapes, coco, synthetic)."""
    root: str = "data/synthetic"
    """Dataset root; split files list paths relative to it."""
    split: str = "1_16"
    """Split name: a folder with labeled.txt and unlabeled.txt."""
    split_dir: str | None = None
    """Explicit split folder; default: the shipped published splits, or <root>/splits/<split>."""
    val_list: str | None = None
    """Explicit val list; default: the shipped val.txt, or <root>/splits/val.txt."""
    num_classes: int | None = None
    """Overrides the dataset's class count (synthetic datasets choose theirs)."""
    crop_size: int = 321
    scale_range: tuple[float, float] = SCALE_RANGE
    """Random rescale before the crop: the long side becomes U(lo, hi) x itself (UniMatch's 0.5-2.0).
    [1.0, 1.0] keeps the size, for data whose generator already varies the scale (configs/synthetic.yaml)."""
    eval_mode: str | None = None
    """original | center_crop | sliding_window; default: the dataset's."""
    epoch_over: str = "unlabeled"
    """What one epoch passes over: `unlabeled`, the unlabeled list with the labeled one repeated to its
    length (UniMatch's protocol for every method, unimatch.py); or `labeled`, the labeled list once,
    sharded with padding as torch's DistributedSampler does (UniMatch's supervised.py:130-141: 11 steps
    per epoch at 92 labels on 4 GPUs x 2). `labeled` is for methods without unlabeled images."""
    num_workers: int = 2
    """DataLoader worker processes per training process."""
    loader_timeout_s: float = 300.0
    """Seconds a training process waits for one batch from its loader workers before failing with an
    error (a hung worker, a stalled file system) instead of waiting forever; 0 = wait forever. Only with
    num_workers > 0: without workers there is nothing to wait for."""

    def __post_init__(self) -> None:
        positive(self, "data", "crop_size")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: expected >= 0, got {self.num_workers}")
        if self.loader_timeout_s < 0:
            raise ConfigError(
                f"data.loader_timeout_s: expected >= 0 (0 = no timeout), got {self.loader_timeout_s}"
            )
        if self.num_classes is not None:
            positive(self, "data", "num_classes")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ConfigError(
                f"data.scale_range: expected [low, high] with 0 < low <= high, got {list(self.scale_range)}"
            )
        if self.eval_mode is not None and self.eval_mode not in EVAL_MODES:
            raise ConfigError(f"data.eval_mode: expected one of {EVAL_MODES}, got {self.eval_mode!r}")
        if self.epoch_over not in EPOCHS:
            raise ConfigError(f"data.epoch_over: expected one of {EPOCHS}, got {self.epoch_over!r}")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "resnet101"
    """resnet50 | resnet101 (deep stem) | resnet50_tv | resnet101_tv (7x7 stem) | xception65 | tiny."""
    pretrained: str | None = None
    """Backbone weights file (UniMatch or torchvision format); null trains from scratch."""
    dilations: tuple[int, int, int] = (6, 12, 18)
    """ASPP atrous rates: UniMatch's 6/12/18 at output stride 16; the OS8 recipes use 12/24/36."""
    output_stride: int | None = None
    """8 or 16 for the ResNets (8 dilates stage 3 as well: U2PL's, ST++'s and PS-MT's DeepLabV3+);
    null = the backbone's own (16; 8 for small)."""

    def __post_init__(self) -> None:
        if self.output_stride not in (None, 8, 16):
            raise ConfigError(f"model.output_stride: expected 8, 16 or null, got {self.output_stride!r}")


@dataclass(frozen=True)
class MethodConfig:
    """The `method:` section: the keys every method shares, and the named method's own settings.

    In YAML the section is flat (`method: {name: psmt, conf_thresh: 0.6, weight_u: 0.06}`); the keys
    below are common, every other key belongs to the method's settings dataclass (its `Settings`, see
    trainers.methods), which checks them. `to_dict` writes the section flat again.
    """

    name: str = "mspl"
    """supervised | fixmatch | unimatch | mspl | u2pl | stpp | psmt."""
    conf_thresh: float = 0.95
    """Pseudo-label confidence threshold of the methods that threshold (fixmatch, unimatch, mspl, psmt)."""
    criterion: str = "ce"
    """Labeled loss: ce, or ohem (Cityscapes)."""
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 200_000
    settings: Any = None
    """The method's own settings (an instance of its `Settings`); None = that method's defaults."""

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ConfigError(f"method.criterion: expected one of {CRITERIA}, got {self.criterion!r}")
        if not 0.0 <= self.conf_thresh <= 1.0:
            raise ConfigError(f"method.conf_thresh: expected a value in [0, 1], got {self.conf_thresh}")
        expected = settings_type(self.name, "method.name")
        if self.settings is None:
            object.__setattr__(self, "settings", expected())
        elif type(self.settings) is not expected:
            raise ConfigError(
                f"method: settings of method {self.name!r} must be {expected.__name__}, "
                f"got {type(self.settings).__name__}"
            )


def settings_type(name: str, key: str) -> type:
    """The settings dataclass of method `name` (one ConfigError under `key` when no method has that name)."""
    from trainers.methods import METHODS  # the methods import this module

    return choice(key, name, METHODS).settings_type


def read_method(data: Any, where: str) -> MethodConfig:
    """The flat `method:` section as a MethodConfig: common keys, then the named method's own keys."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    name = _coerce(str, data.get("name", MethodConfig.name), f"{where}.name")
    own_type = settings_type(name, f"{where}.name")
    common = {f.name for f in dataclasses.fields(MethodConfig)} - {"settings"}
    own = {f.name for f in dataclasses.fields(own_type)}
    unknown = sorted(set(data) - common - own)
    if unknown:
        raise ConfigError(
            f"{where}.{unknown[0]}: unknown key for method {name!r} (expected one of {sorted(common | own)})"
        )
    settings = _fields(own_type, {k: v for k, v in data.items() if k in own}, where)
    head = _fields(MethodConfig, {k: v for k, v in data.items() if k in common}, where)
    return dataclasses.replace(head, settings=settings)


def positive(obj: Any, section: str, *keys: str) -> None:
    """One ConfigError naming `section.key` for the first of `keys` whose value is not > 0."""
    for key in keys:
        value = getattr(obj, key)
        if value <= 0:
            raise ConfigError(f"{section}.{key}: expected > 0, got {value}")


def at_least(obj: Any, section: str, low: float, *keys: str) -> None:
    """One ConfigError naming `section.key` for the first of `keys` whose value is below `low`."""
    for key in keys:
        value = getattr(obj, key)
        if value < low:
            raise ConfigError(f"{section}.{key}: expected >= {low}, got {value}")


def within(obj: Any, section: str, low: float, high: float, *keys: str) -> None:
    """One ConfigError naming `section.key` for the first of `keys` whose value is outside [low, high]."""
    for key in keys:
        value = getattr(obj, key)
        if not low <= value <= high:
            raise ConfigError(f"{section}.{key}: expected a value in [{low}, {high}], got {value}")


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "sgd"
    """sgd (every paper's, with `momentum`) | adamw (decoupled `weight_decay`; `momentum` unused): the CPU
    recipe of the synthetic task uses adamw, which learns its shapes in half the steps SGD needs."""
    epochs: int = 200
    batch_size: int = 2
    """Images per worker per step, labeled and unlabeled each."""
    lr: float = 0.001
    """Backbone learning rate at the reference global batch."""
    lr_multi: float = 10.0
    """Head learning rate = lr * lr_multi."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True
    """False: no weight decay on BatchNorm parameters and biases (PS-MT's `group_weight`,
    VocCode/Utils/helpers.py:38-68); UniMatch decays every parameter."""
    poly_power: float = 0.9
    reference_global_batch: int = 8
    """Global batch the lr was tuned for (the seed: 4 GPUs x 2)."""
    lr_scaling: str = "linear"
    """linear: lr scales with global batch / reference; keep_global_batch: per-worker batch adapts."""
    max_iters_per_epoch: int | None = None
    """Caps an epoch (for demos and tests); null = one pass over the unlabeled set."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "reference_global_batch"):
            positive(self, "optim", key)
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: expected > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optim.optimizer: expected one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_scaling not in LR_SCALING:
            raise ConfigError(f"optim.lr_scaling: expected one of {LR_SCALING}, got {self.lr_scaling!r}")
        if self.max_iters_per_epoch is not None:
            positive(self, "optim", "max_iters_per_epoch")


@dataclass(frozen=True)
class FastConfig:
    """Switches of the fast path; null picks what benchmarks/README.md measured to win on the device."""

    channels_last: bool | None = None
    """Model and activations in channels_last (NHWC); null = on (it won on CPU and is the GPU norm)."""
    autocast_bf16: bool | None = None
    """bf16 autocast for training steps and evaluation; null = on GPU only."""
    device_augment: bool | None = None
    """Where the strong views are built (batched, from per-sample parameters drawn in the loader
    workers): on the training device after the copy, or in the workers' collate; null = on GPU only
    (on CPU the workers build them in parallel with the step)."""
    decode: str = "torchvision"
    """Image decoding and geometry: torchvision (torchvision.io + uint8 tensor ops) or pil (the seed's)."""
    foreach: bool = True
    """Multi-tensor (foreach) SGD update instead of one kernel per parameter."""
    compile: bool = False
    """torch.compile the backbone and decoder (compilation takes minutes; pays off on long runs)."""

    def __post_init__(self) -> None:
        if self.decode not in DECODERS:
            raise ConfigError(f"fast.decode: expected one of {DECODERS}, got {self.decode!r}")


@dataclass(frozen=True)
class DistConfig:
    """Settings of the process group, which the launcher (Ray Train's TorchConfig) initialises."""

    timeout_s: int = 600
    """Seconds a collective (all-reduce, broadcast, barrier) waits for the other ranks before it fails,
    so a hung or lost rank ends in an error (and a restart from the checkpoint) after 10 minutes, not
    torch's 30. Raise it when one rank may work alone for longer (a slow checkpoint store)."""

    def __post_init__(self) -> None:
        positive(self, "dist", "timeout_s")


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    fast: FastConfig = field(default_factory=FastConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    seed: int = 0
    out_dir: str = "runs/default"
    """Checkpoints (latest.pth, best.pth) and logs of this run."""
    log_interval: int = 20
    """Iterations between loss read-backs and log lines."""

    def __post_init__(self) -> None:
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed: expected an int in 0..{MAX_SEED}, got {self.seed}")
        if self.log_interval <= 0:
            raise ConfigError(f"log_interval: expected > 0, got {self.log_interval}")

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (for checkpoints and tracking), its `method:` section flat as
        YAML writes it."""
        data = _plain(dataclasses.asdict(self))
        method = data["method"]
        data["method"] = method | method.pop("settings")
        return data


def choice(key: str, value: str, known: Mapping[str, T]) -> T:
    """`known[value]`, or one ConfigError naming `key`, the value and the known names."""
    if value not in known:
        raise ConfigError(f"{key}: expected one of {sorted(known)}, got {value!r}")
    return known[value]


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"data.crop_size": 321, ...}."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from nested plain data, rejecting unknown keys and wrong types."""
    if cls is MethodConfig:  # its keys depend on the method it names
        return read_method(data, where or "method")
    return _fields(cls, data, where)


def _fields(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"{key}: unknown key (expected one of {sorted(names)})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        # YAML reads .nan and .inf as floats; no setting means either, and NaN passes every `<=` check.
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    if hint in (int, float, str, bool):
        if isinstance(value, bool) and hint is not bool or not isinstance(value, hint):
            hint_text = " (quote it: YAML reads 1_16 as the number 116)" if hint is str else ""
            raise ConfigError(
                f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__}){hint_text}"
            )
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, naming the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `override` into a copy of `base`."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load and validate a training config file, with optional nested overrides."""
    data = merge(load_yaml(path), overrides or {})
    try:
        return from_dict(TrainConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_override(text: str) -> dict[str, Any]:
    """Turn `optim.epochs=3` into {"optim": {"epochs": 3}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    dotted, raw = text.split("=", 1)
    value: Any = yaml.safe_load(raw)
    for part in reversed(dotted.split(".")):
        value = {part: value}
    return value


def check_paths(cfg: TrainConfig) -> None:
    """Fail before any compute when a configured path does not exist."""
    checks = [("data.root", cfg.data.root, "a dataset folder")]
    if cfg.data.split_dir:
        checks.append(("data.split_dir", cfg.data.split_dir, "a folder with labeled.txt and unlabeled.txt"))
    if cfg.data.val_list:
        checks.append(("data.val_list", cfg.data.val_list, "a val list file"))
    if cfg.model.pretrained:
        checks.append(
            (
                "model.pretrained",
                cfg.model.pretrained,
                "a backbone weights file (or null to train from scratch)",
            )
        )
    for key, value, what in checks:
        if not Path(value).exists():
            raise ConfigError(f"{key}: {value!r} does not exist (expected {what})")
