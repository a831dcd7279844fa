"""Training checkpoints (chapter 8): written atomically, read back with
``torch.load(weights_only=True)`` and checked key by key.

:func:`check_checkpoint_path` tells, before a run starts, whether
:func:`save_checkpoint` will be able to write a path;
:func:`remove_stale_temporaries` deletes what a killed save left behind.
:func:`save_model` keeps a trained model without its training state, with
its SHA-256 beside it, and :func:`load_model_file` reads it back after
checking it (chapter 9 loads chapter 8's model this way).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import torch

# A model file's checksum is the hash the verified downloads use.
from feedback_lib.training.data import sha256_of as sha256

#: What every checkpoint holds (see ``training.cli.train``): each key and
# the type of its value.
CHECKPOINT_TYPES: dict[str, type] = {
    "format": int,
    "config": dict,
    "model_kind": str,
    "model_config": dict,
    "tokenizer": str,
    "model": dict,
    "optimizer": dict,
    "scheduler": dict,
    "scaler": dict,
    "step": int,
    "rng": dict,
    "history": dict,
}
CHECKPOINT_KEYS = tuple(CHECKPOINT_TYPES)
#: What a trained model's file holds (:func:`save_model`): the checkpoint's
# keys but those only continuing the training needs.
MODEL_KEYS = (
    "format",
    "config",
    "model_kind",
    "model_config",
    "tokenizer",
    "model",
    "history",
)
FORMAT = 1
#: The name of save_checkpoint's temporary file after the checkpoint's
# name: ``.`` + tempfile.mkstemp's 8 random characters + ``.tmp``.
TEMPORARY_SUFFIX = re.compile(r"\.[a-z0-9_]{8}\.tmp")
#: A temporary file untouched for this long belongs to a save that was
# killed: a live save writes its file in one go, within seconds.
STALE_SECONDS = 600


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically (:func:`atomic_write`): a
    crash mid-write leaves the previous checkpoint intact."""
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"a checkpoint needs the keys {list(CHECKPOINT_KEYS)}; missing "
            f"{missing}"
        )
    return atomic_write(path, lambda f: torch.save(state, f))


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[IO], object],
    text: bool = False,
) -> Path:
    """Call ``write`` on a temporary file in ``path``'s directory, flush
    it to disk, then rename it over ``path``: a reader never sees half a
    file, and a failure leaves the earlier file as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=path.name + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint onto the CPU with ``weights_only=True`` (no code
    from the file runs) and check its format and every key of
    :data:`CHECKPOINT_TYPES`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    state = _read(path, CHECKPOINT_KEYS, "training checkpoint")
    if state["step"] < 0:
        raise ValueError(
            f"{str(path)!r} holds step {state['step']}; a checkpoint's "
            "step is an integer >= 0"
        )
    return state


def _read(path: Path, keys: tuple[str, ...], what: str) -> dict:
    """The dict torch.save wrote to ``path``, read with
    ``weights_only=True``, after checking its format and that it has each
    of ``keys`` with its type in :data:`CHECKPOINT_TYPES`; ``what`` names
    the kind of file in errors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # A truncated file, another format, or objects weights_only refuses:
    except Exception as error:
        raise ValueError(
            f"{str(path)!r} could not be read as a checkpoint with "
            f"weights_only=True ({load_error(error)}): it is not a file "
            "torch.save wrote, or it holds objects other than tensors and "
            "plain Python values"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = (
            f"format {state['format']!r}"
            if isinstance(state, dict) and "format" in state
            else f"a {type(state).__name__} without a format"
        )
        raise ValueError(
            f"{str(path)!r} is not a feedback_lib {what} "
            f"(format {FORMAT}): it holds {found}"
        )
    missing = [k for k in keys if k not in state]
    wrong = [
        f"{k!r} is a {type(state[k]).__name__}, expected "
        f"{CHECKPOINT_TYPES[k].__name__}"
        for k in keys
        if k in state and not isinstance(state[k], CHECKPOINT_TYPES[k])
    ]
    if missing or wrong:
        problems = ([f"it lacks {missing}"] if missing else []) + wrong
        raise ValueError(
            f"{str(path)!r} is not a complete feedback_lib {what} "
            f"(format {FORMAT}): {'; '.join(problems)}"
        )
    return state


def checksum_path(path: str | os.PathLike) -> Path:
    """Where :func:`save_model` writes the SHA-256 of ``path``:
    ``<path>.sha256``, in the format of ``sha256sum``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def save_model(path: str | os.PathLike, state: dict) -> Path:
    """Write the :data:`MODEL_KEYS` of ``state`` (a checkpoint's, or
    ``TrainResult.save_model``'s) to ``path``, then their SHA-256 to
    :func:`checksum_path`, each atomically."""
    missing = [k for k in MODEL_KEYS if k not in state]
    if missing:
        raise ValueError(
            f"a model file needs the keys {list(MODEL_KEYS)}; missing "
            f"{missing}"
        )
    model = {k: state[k] for k in MODEL_KEYS}
    path = atomic_write(path, lambda f: torch.save(model, f))
    line = f"{sha256(path)}  {path.name}\n"
    atomic_write(checksum_path(path), lambda f: f.write(line), text=True)
    return path


def load_model_file(path: str | os.PathLike) -> dict:
    """Read a file :func:`save_model` wrote, onto the CPU, once its
    SHA-256 matches the one beside it: a damaged or replaced file (a Git
    LFS pointer, say) is an error that says so before anything is
    loaded."""
    path, sums = Path(path), checksum_path(path)
    for needed in (path, sums):
        if not needed.is_file():
            raise FileNotFoundError(
                f"no file at {str(needed)!r}; a trained model is a file "
                "and its .sha256 beside it, as TrainResult.save_model "
                "writes them"
            )
    expected = (sums.read_text().split() or [""])[0]
    found = sha256(path)
    if found != expected:
        raise ValueError(
            f"{str(path)!r} has the SHA-256 {found}, but {str(sums)!r} "
            f"says {expected or 'nothing'}: the file is damaged or is not "
            "the one saved with it; write both again with "
            "TrainResult.save_model"
        )
    return _read(path, MODEL_KEYS, "trained model")


def load_error(error: Exception) -> str:
    """The gist of torch.load's error, in one line (its long message
    advises ``weights_only=False``, which would run code from the
    file)."""
    lines = [line.strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line]
    for i, line in enumerate(lines[:-1]):
        if line.endswith("WeightsUnpickler error:"):
            return lines[i + 1]
    return lines[0] if lines else type(error).__name__


def check_checkpoint_path(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` unless :func:`save_checkpoint` can write
    ``path``: it must be a regular file or absent (a directory, a FIFO or
    a device is never replaced), its directory must exist or be creatable
    in the nearest existing directory, which must be writable, and every
    name to create, the temporary file's included, must fit the file
    system. Nothing is written."""
    path = Path(path)
    try:
        if path.exists() and not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file"
            raise ValueError(
                f"{str(path)!r} is {kind}; a checkpoint is written to a "
                "regular file path (absent, or a previous checkpoint)"
            )
        existing, to_create = path.parent, [path.name]
        while not existing.exists():
            to_create.insert(0, existing.name)
            existing = existing.parent
    except PermissionError as error:
        raise ValueError(
            f"{str(path)!r} cannot be written: {error}"
        ) from None
    if not existing.is_dir():
        raise ValueError(
            f"{str(path)!r} lies under {str(existing)!r}, which is a file, "
            "not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"{str(path)!r} cannot be written: no permission to create "
            f"files in {str(existing)!r}"
        )
    name_max = (
        os.pathconf(existing, "PC_NAME_MAX")
        if hasattr(os, "pathconf")
        else 255
    )
    # The checkpoint is first written under a longer, temporary name.
    to_create[-1] = f"{path.name}.XXXXXXXX.tmp"
    for name in to_create:
        size = len(os.fsencode(name))
        if size > name_max:
            raise ValueError(
                f"{str(path)!r} needs the name {name!r}, {size} bytes "
                f"long, but this file system allows {name_max} bytes per "
                "name; choose a shorter name"
            )


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed saves of the checkpoint
    ``path`` left behind; returns them.

    Only this checkpoint's own temporaries are candidates: files in its
    directory named ``<name>.<8 random characters>.tmp``, as
    :func:`save_checkpoint` names them. One is stale when it has not been
    modified for :data:`STALE_SECONDS`: a live save (of this process or
    another one, on any machine sharing the directory) writes its
    temporary file in one go, so it never looks that old.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix, now, removed = path.name, time.time(), []
    for entry in path.parent.iterdir():
        name = entry.name
        if not (
            name.startswith(prefix)
            and TEMPORARY_SUFFIX.fullmatch(name[len(prefix) :])
        ):
            continue
        try:
            info = entry.lstat()  # a regular file, not a link
            if (
                stat.S_ISREG(info.st_mode)
                and now - info.st_mtime > STALE_SECONDS
            ):
                entry.unlink()
                removed.append(entry)
        except FileNotFoundError:  # removed meanwhile
            pass
    return removed
