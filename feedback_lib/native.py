"""The C++ step loops of the fused shared key/value loop, compiled on first use (chapter 7).

:mod:`feedback_lib.fused_kv` runs its forward and backward step loops either in Python
(:func:`~feedback_lib.fused_kv.run_steps`, :func:`~feedback_lib.fused_kv.run_steps_backward`) or,
on the CPU, in their C++ translation ``fused_kv.cpp``: the same operations in the same order,
without the interpreter's few microseconds per tensor operation. The extension is built with
``torch.utils.cpp_extension`` the first time it is needed (about a minute; it needs a C++
compiler, which Linux, macOS with the command-line tools, and Colab have) and cached by PyTorch
under ``~/.cache/torch_extensions``. If it cannot be built, the Python loops run, with one warning.

The environment variable ``FEEDBACK_LIB_NATIVE`` chooses: ``auto`` (or unset) builds and uses it
when possible, ``0``/``off`` never builds it, ``require`` raises if it cannot be built (CI uses
that, so the tests never silently skip the C++ loops). :func:`python_loops` switches it off for a
block of code, to compare the two.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Iterator

import torch

#: Name of the environment variable that chooses whether the C++ loops are built and used.
NATIVE_ENV = "FEEDBACK_LIB_NATIVE"
SOURCE = Path(__file__).with_name("fused_kv.cpp")

_MODES = {"": "auto", "auto": "auto", "1": "auto", "on": "auto", "0": "off", "off": "off", "require": "require"}
_state: dict[str, object] = {"module": None, "error": None, "tried": False, "disabled": 0}


def mode() -> str:
    """``"auto"``, ``"off"`` or ``"require"``, from ``FEEDBACK_LIB_NATIVE``."""
    value = os.environ.get(NATIVE_ENV, "").strip().lower()
    if value not in _MODES:
        raise ValueError(f"{NATIVE_ENV} must be auto, 1/on, 0/off or require (or unset), got {os.environ[NATIVE_ENV]!r}")
    return _MODES[value]


def _arch_flags() -> list[str]:
    """Vector instructions for the loops, matching what PyTorch itself uses on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"]
    if capability.startswith("AVX2"):
        return ["-mavx2", "-mfma"]
    return []


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    # pip puts ninja next to the interpreter; a venv's python run without activating it has that
    # folder off PATH, where torch looks.
    here = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=here):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")

    # Reassociating sums lets the compiler vectorize the dot products; NaN and infinity keep their meaning.
    flags = ["-O3", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
             *_arch_flags()]
    # OpenMP lets the attention kernels use PyTorch's threads. Apple's compiler has no -fopenmp;
    # there the kernels run on one thread (the matrix products still use all of PyTorch's).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    name = "feedback_lib_native_" + torch.backends.cpu.get_cpu_capability().lower()
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags + openmp, extra_ldflags=openmp,
                              verbose=False)


def _summary(error: Exception) -> str:
    """The first compiler error of a failed build (the whole log is long), else the exception's last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = next((line for line in lines if "error:" in line), lines[-1] if lines else "")
    return f"{type(error).__name__}: {detail}"


def load() -> ModuleType | None:
    """The compiled extension, building it on the first call; None if it is off or cannot be built."""
    current = mode()
    if current == "off":
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["module"] = _build()
        except Exception as error:   # no compiler, no ninja, a failed build: the Python loops still work
            _state["error"] = _summary(error)
            if current != "require":
                warnings.warn(f"feedback_lib could not build its C++ step loops ({_state['error']}); the Python "
                              f"loops compute the same, more slowly. Set {NATIVE_ENV}=0 to skip the build.",
                              RuntimeWarning, stacklevel=3)
    if _state["module"] is None and current == "require":
        raise RuntimeError(f"{NATIVE_ENV}=require, but the C++ step loops could not be built: {_state['error']}")
    return _state["module"]


#: The dtypes the C++ loops are compiled for.
DTYPES = (torch.float32, torch.float64)


def extension(device: torch.device, dtype: torch.dtype) -> ModuleType | None:
    """The extension if the loops for tensors of ``dtype`` on ``device`` should use it: float32 or
    float64 CPU tensors, not switched off. Otherwise (a GPU, bfloat16, ...) the Python loops run."""
    if device.type != "cpu" or dtype not in DTYPES or _state["disabled"]:
        return None
    return load()


def status() -> str:
    """One line for reports: whether the fused loop runs in C++ on the CPU, and if not, why."""
    if mode() == "off":
        return f"Python step loops ({NATIVE_ENV}=0)"
    module = load()
    return "C++ step loops (CPU tensors)" if module is not None else f"Python step loops (C++ build failed: {_state['error']})"


@contextlib.contextmanager
def python_loops() -> Iterator[None]:
    """Within the block, the fused loop runs its Python step loops even where the C++ ones exist."""
    _state["disabled"] = int(_state["disabled"]) + 1
    try:
        yield
    finally:
        _state["disabled"] = int(_state["disabled"]) - 1
