"""Training checkpoints: written atomically, read back with
``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

#: Keys every checkpoint holds (see ``training.cli.train``).
CHECKPOINT_KEYS = (
    "format",
    "config",
    "model_kind",
    "model_config",
    "tokenizer",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "step",
    "rng",
    "history",
)
FORMAT = 1


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same
    directory, flushed to disk, then renamed over ``path``. A crash
    mid-write leaves the previous checkpoint intact."""
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"a checkpoint needs the keys {list(CHECKPOINT_KEYS)}; missing "
            f"{missing}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=path.name + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint onto the CPU with ``weights_only=True`` (no code
    from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # A truncated file, another format, or objects weights_only refuses:
    except Exception as error:
        raise ValueError(
            f"{str(path)!r} could not be read as a checkpoint with "
            f"weights_only=True: {error}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a feedback_lib training checkpoint "
            f"(format {FORMAT})"
        )
    return state
