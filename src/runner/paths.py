"""Where runner keeps its files. `RUNNER_HOME` moves all of them (tests use a temporary one)."""

from __future__ import annotations

import os
from pathlib import Path


def _home(kind: str) -> Path:
    if os.environ.get("RUNNER_HOME"):
        return Path(os.environ["RUNNER_HOME"]).expanduser() / kind
    import platformdirs

    if kind == "cache":
        return Path(platformdirs.user_cache_dir("runner"))
    return Path(platformdirs.user_data_dir("runner"))


def models_dir() -> Path:
    """Models runner made itself: the imported default model, MLX conversions, NF4 caches."""
    return _home("cache") / "models"


def data_dir() -> Path:
    """User data that must survive: chat history."""
    return _home("data")


def user_path(text: str | os.PathLike) -> Path:
    """A path as the user typed it, with `~` and `~user` expanded. `~name` of a user this machine
    does not have (`~models/x` for `~/models/x`) stays as typed, to be reported as not found:
    pathlib's expanduser raises RuntimeError there."""
    return Path(os.path.expanduser(text))
