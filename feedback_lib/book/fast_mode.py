"""The book's fast mode: CI re-executes every chapter with small step
counts.

Set the environment variable ``FEEDBACK_LIB_FAST=1`` and every experiment
cell that asks :func:`by_mode` for a size gets the small one. The stored
outputs of the chapters come from a run without it (the full mode), so the
website shows the real numbers.
"""

from __future__ import annotations

import os
from typing import TypeVar

#: Name of the environment variable that switches the fast mode on.
FAST_ENV = "FEEDBACK_LIB_FAST"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

T = TypeVar("T")


def fast_mode() -> bool:
    """True when ``FEEDBACK_LIB_FAST`` is set to 1/true/yes/on
    (case-insensitive); False when unset or 0/false/no/off."""
    value = os.environ.get(FAST_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(
        f"{FAST_ENV} must be one of 1/true/yes/on or 0/false/no/off (or "
        f"unset), got {os.environ[FAST_ENV]!r}"
    )


def by_mode(full: T, fast: T) -> T:
    """``fast`` in the fast mode, else ``full``: ``steps =
    by_mode(full=2000, fast=20)``."""
    return fast if fast_mode() else full
