"""Exception types shared by the loaders (design §10)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be used: wrong layout, model family, format, corrupt or mismatched keys."""


class ModelDownloadError(OSError):
    """A model that is not on disk could not be downloaded (no network, offline mode, unknown or gated repo)."""
