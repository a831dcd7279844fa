"""Subpackages and modules imported on first use.

``import feedback_lib as fl`` imports the model and what it needs, not the
training code or the book's figures (which need matplotlib); with
:func:`submodules` as a package's ``__getattr__``, ``fl.training.loop`` or
``fl.book.plots`` still work: the module is imported when first named.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from types import ModuleType


def submodules(package: str) -> Callable[[str], ModuleType]:
    """A module ``__getattr__`` for ``package`` that imports its modules
    and subpackages by name, and raises AttributeError for other names."""

    def __getattr__(name: str) -> ModuleType:
        full = f"{package}.{name}"
        if name.startswith("_") or importlib.util.find_spec(full) is None:
            raise AttributeError(
                f"module {package!r} has no attribute {name!r}"
            )
        return importlib.import_module(full)

    return __getattr__
