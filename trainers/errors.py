"""Input errors shared by the trainer and the CLI (importable without torch, so the CLI starts fast)."""


class DataError(ValueError):
    """A split list, image or mask is missing, malformed or inconsistent."""
