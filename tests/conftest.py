"""Shared fixtures: the C++ step loops are built (or found in PyTorch's cache) once per session."""

import pytest
from feedback_lib.fast import native


@pytest.fixture(scope="session")
def cpp_step_loops():
    """The compiled extension, or None where it cannot be built (FEEDBACK_LIB_NATIVE=require, as
    in CI, turns that into an error)."""
    return native.load()
