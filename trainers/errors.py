"""Input errors shared by the trainer and the CLI (importable without torch, so the CLI starts fast)."""


class DataError(ValueError):
    """A split list, image or mask is missing, malformed or inconsistent."""


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable, truncated, fails its checksum, or cannot be written."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops instead of writing a broken checkpoint."""
