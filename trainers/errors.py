"""Input errors shared by the trainer and the CLI (importable without torch, so the CLI starts fast)."""

from trainers.config import ConfigError


class DataError(ValueError):
    """A split list, image or mask is missing, malformed or inconsistent."""


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, truncated, fails its checksum, or cannot be written."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops instead of writing a broken checkpoint."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError)
"""What a user's input or run caused, not the code: `semiseg` prints one `error:` line and exits 2, and the
launcher raises them as they are when a Ray worker meets one (not as Ray's WorkerGroupError)."""
