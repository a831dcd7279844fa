"""The C++ step loops of the fused loop, compiled on first use (chapter 12).

:mod:`feedback_lib.fast.steps` runs its forward and backward step loops in
Python or, on the CPU, in their C++ translation ``step_loops.cpp``: the
same operations in the same order, without the interpreter's few
microseconds per tensor operation. The extension is built with
``torch.utils.cpp_extension`` the first time it is needed (about a minute;
it needs a C++ compiler, which Linux, macOS with the command-line tools
and Colab have) and cached by PyTorch under ``~/.cache/torch_extensions``.
If it cannot be built, the Python loops run, after one warning. When it
loads, its argument layouts are checked against
:mod:`feedback_lib.fast.tensors`.

``FEEDBACK_LIB_NATIVE`` chooses: ``auto`` (or unset) builds and uses it
when possible, ``0``/``off`` never builds it, ``require`` raises if it
cannot be built (CI uses that, so the tests never silently skip the C++
loops). :func:`python_loops` switches it off for a block of code.

A build that is killed (a Jupyter kernel restarted during the first model
call) leaves PyTorch's ``lock`` file in the build directory, and PyTorch
would wait for it forever. So a build first takes its own lock,
``feedback_lib.flock`` in the same directory, with ``flock``, which the
operating system releases when its process ends: whoever holds it is the
only live builder, and a ``lock`` file it finds is stale and removed, with
a warning. A second process waits for a live build, with a warning, at
most :data:`WAIT_SECONDS`, then raises an error naming the lock. Where
there is no ``flock`` (Windows), a ``lock`` file is waited for the same
way, and the error says to delete it if no build is running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import torch

from feedback_lib.fast.tensors import NATIVE_LAYOUTS, native_layout

#: The environment variable that chooses whether the C++ loops are used.
NATIVE_ENV = "FEEDBACK_LIB_NATIVE"
SOURCE = Path(__file__).with_name("step_loops.cpp")
#: The dtypes the C++ loops are compiled for.
DTYPES = (torch.float32, torch.float64)
#: How long a build waits for another process's build (seconds).
WAIT_SECONDS = 600.0

_MODES = {
    "": "auto",
    "auto": "auto",
    "1": "auto",
    "on": "auto",
    "0": "off",
    "off": "off",
    "require": "require",
}
_state: dict[str, object] = {
    "module": None,
    "error": None,
    "tried": False,
    "disabled": 0,
}


def mode() -> str:
    """``"auto"``, ``"off"`` or ``"require"``, from the environment."""
    value = os.environ.get(NATIVE_ENV, "").strip().lower()
    if value not in _MODES:
        raise ValueError(
            f"{NATIVE_ENV} must be auto, 1/on, 0/off or require (or "
            f"unset), got {os.environ[NATIVE_ENV]!r}"
        )
    return _MODES[value]


def _arch_flags() -> list[str]:
    """Vector instructions matching what PyTorch uses on this CPU."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return [
            "-mavx512f",
            "-mavx512dq",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx2",
            "-mfma",
        ]
    if capability.startswith("AVX2"):
        return ["-mavx2", "-mfma"]
    return []


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    # pip puts ninja next to the interpreter; a venv's python run without
    # activating the venv has that folder off PATH, where torch looks.
    here = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None and shutil.which("ninja", path=here):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    # Reassociating sums lets the compiler vectorize the dot products;
    # NaN and infinity keep their meaning.
    flags = [
        "-O3",
        "-fno-math-errno",
        "-fassociative-math",
        "-fno-signed-zeros",
        "-fno-trapping-math",
        *_arch_flags(),
    ]
    # OpenMP lets the attention kernels use PyTorch's threads. Apple's
    # compiler has no -fopenmp: there they run on one thread.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    capability = torch.backends.cpu.get_cpu_capability().lower()
    name = "feedback_lib_step_loops_" + capability
    # $TORCH_EXTENSIONS_DIR/name, else ~/.cache/torch_extensions/...
    directory = Path(cpp_extension._get_build_directory(name, False))
    with build_lock(directory):
        return cpp_extension.load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=flags + openmp,
            extra_ldflags=openmp,
            build_directory=str(directory),
            verbose=False,
        )


def _wait(acquire: Callable[[], bool], waiting: str, error: str) -> None:
    """Warn ``waiting``, then call ``acquire`` until it returns True;
    raise ``TimeoutError(error)`` after :data:`WAIT_SECONDS`."""
    warnings.warn(waiting, RuntimeWarning, stacklevel=2)
    deadline = time.monotonic() + WAIT_SECONDS
    while not acquire():
        if time.monotonic() > deadline:
            raise TimeoutError(error)
        time.sleep(0.2)


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Within the block, this process is the only one building into
    ``directory``, and PyTorch's ``lock`` file there is not stale."""
    stale = directory / "lock"
    try:
        import fcntl
    except ImportError:  # Windows: no flock to tell a stale lock
        if stale.exists():
            _wait(
                lambda: not stale.exists(),
                f"waiting for {stale} to go: another process is building "
                "the C++ step loops, or a build was interrupted and left "
                "it (then delete it)",
                f"{stale} still exists after {WAIT_SECONDS:.0f} s; delete "
                "it if no other process is building the C++ step loops",
            )
        yield
        return
    path = directory / "feedback_lib.flock"
    with open(path, "a+") as ours:  # closing it releases the lock

        def acquire() -> bool:
            try:
                fcntl.flock(ours, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True

        if not acquire():
            holder = path.read_text().strip() or "?"
            _wait(
                acquire,
                f"waiting for process {holder}, which is building the C++ "
                f"step loops into {directory} (it holds {path})",
                f"process {holder} still holds {path} after "
                f"{WAIT_SECONDS:.0f} s; end it to build the C++ step loops",
            )
        ours.truncate(0)
        ours.write(str(os.getpid()))
        ours.flush()
        if stale.exists():  # and no live build holds our lock
            warnings.warn(
                f"removed {stale}, left by a build that was interrupted",
                RuntimeWarning,
                stacklevel=2,
            )
            stale.unlink(missing_ok=True)
        yield


def check_layouts(module: ModuleType) -> None:
    """Raise unless the extension's argument lists (its enums) list the
    tensors in the order of :mod:`feedback_lib.fast.tensors`."""
    theirs = module.layouts()
    for cls in NATIVE_LAYOUTS:
        ours = native_layout(cls)
        if theirs.get(cls.__name__) != ours:
            raise RuntimeError(
                f"{SOURCE.name} lists the tensors of {cls.__name__} as "
                f"{theirs.get(cls.__name__)}, but "
                f"feedback_lib.fast.tensors as {ours}; the two must change "
                "together"
            )


def _summary(error: Exception) -> str:
    """The first compiler error of a failed build, else the last line."""
    lines = [
        line.strip() for line in str(error).splitlines() if line.strip()
    ]
    last = lines[-1] if lines else ""
    detail = next((line for line in lines if "error:" in line), last)
    return f"{type(error).__name__}: {detail}"


def load() -> ModuleType | None:
    """The compiled extension, built on the first call; None if it is off
    or cannot be built."""
    current = mode()
    if current == "off":
        return None
    if not _state["tried"]:
        _state["tried"] = True
        try:
            module = _build()
            check_layouts(module)
            _state["module"] = module
        except Exception as error:  # no compiler, a failed build, ...
            _state["error"] = _summary(error)
            if current != "require":
                warnings.warn(
                    "feedback_lib could not build its C++ step loops "
                    f"({_state['error']}); the Python loops compute the "
                    f"same, more slowly. Set {NATIVE_ENV}=0 to skip the "
                    "build.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    if _state["module"] is None and current == "require":
        raise RuntimeError(
            f"{NATIVE_ENV}=require, but the C++ step loops could not be "
            f"built: {_state['error']}"
        )
    return _state["module"]


def extension(
    device: torch.device, dtype: torch.dtype
) -> ModuleType | None:
    """The extension when the step loops for tensors of ``dtype`` on
    ``device`` use it: float32 or float64 CPU tensors, not switched off.
    Otherwise (a GPU, bfloat16, ...) the Python loops run."""
    if device.type != "cpu" or dtype not in DTYPES or _state["disabled"]:
        return None
    return load()


def status() -> str:
    """One line for reports: whether the fused loop runs in C++, and if
    not, why."""
    if mode() == "off":
        return f"Python step loops ({NATIVE_ENV}=0)"
    if load() is not None:
        return "C++ step loops (CPU tensors)"
    return f"Python step loops (C++ build failed: {_state['error']})"


@contextlib.contextmanager
def python_loops() -> Iterator[None]:
    """Within the block, the step loops run in Python even where the C++
    ones exist (to compare them)."""
    _state["disabled"] = int(_state["disabled"]) + 1
    try:
        yield
    finally:
        _state["disabled"] = int(_state["disabled"]) - 1
