"""Settings: where state lives and which device computes. Read from the environment, never global state."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The decapflow home folder: ``$DECAPFLOW_HOME``, else ``~/.decapflow``. Created on first use."""
    path = Path(os.environ.get("DECAPFLOW_HOME") or Path.home() / ".decapflow").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_uri(store: str | None = None) -> str:
    """The LanceDB database holding the memory banks: ``store``, ``$DECAPFLOW_STORE``, else ``<home>/banks``.

    Any URI LanceDB accepts works (a local path, ``s3://bucket/prefix``, ``gs://...``)."""
    return store or os.environ.get("DECAPFLOW_STORE") or str(home() / "banks")


def cache_dir() -> Path:
    """Local derived data (vector copies, tokenised texts); always safe to delete."""
    path = home() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_device(device: str | None = None) -> str:
    """``device`` if given, else ``$DECAPFLOW_DEVICE``, else ``cuda`` when a GPU is visible, else ``cpu``."""
    if device:
        return device
    if os.environ.get("DECAPFLOW_DEVICE"):
        return os.environ["DECAPFLOW_DEVICE"]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
