"""The C++ step loops: their loader and build failures, the layouts they check when they load, the
sizes they check on every call, and the buffer pool of the fused loop."""

import contextlib
import gc
import os
import re
import signal
import subprocess
import sys
import time

import feedback_lib as fl
import pytest
import torch
from feedback_lib.fast import native, pool
from feedback_lib.fast.decoder import FusedState
from feedback_lib.fast.tensors import NATIVE_LAYOUTS, native_args, native_layout, step_spans

from helpers import D_MODEL, make_transformer


@pytest.fixture
def fresh_state(monkeypatch):
    """A loader that has not tried to build yet (the real one is restored afterwards)."""
    monkeypatch.setattr(
        native, "_state", {"module": None, "error": None, "tried": False, "disabled": 0}
    )


@pytest.mark.parametrize(
    "value, mode",
    [
        ("", "auto"),
        ("1", "auto"),
        ("ON", "auto"),
        ("0", "off"),
        ("off", "off"),
        ("require", "require"),
    ],
)
def test_mode_from_the_environment(monkeypatch, value, mode):
    monkeypatch.setenv(native.NATIVE_ENV, value)
    assert native.mode() == mode


def test_a_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "fast")
    with pytest.raises(
        ValueError, match="FEEDBACK_LIB_NATIVE must be auto, 1/on, 0/off or require.*'fast'"
    ):
        native.mode()


def test_off_never_builds(monkeypatch, fresh_state):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("built although switched off"))
    assert native.extension(torch.device("cpu"), torch.float32) is None
    assert native.status() == "Python step loops (FEEDBACK_LIB_NATIVE=0)"


def fake_build(monkeypatch):
    """A build that returns a stand-in module (the layouts are not checked)."""
    monkeypatch.setattr(native, "_build", lambda: "the module")
    monkeypatch.setattr(native, "check_layouts", lambda module: None)


def failing_build():
    raise RuntimeError(
        "Error building extension:\n[1/2] c++ ...\nstep_loops.cpp:1:1: error: no compiler here\n"
    )


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, fresh_state):
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    monkeypatch.setattr(native, "_build", failing_build)
    with pytest.warns(
        RuntimeWarning, match="could not build its C\\+\\+ step loops.*error: no compiler here"
    ):
        assert native.load() is None
    assert native.load() is None  # no second attempt, no second warning
    assert (
        "C++ build failed: RuntimeError: step_loops.cpp:1:1: error: no compiler here"
        in native.status()
    )
    model = make_transformer(True)  # the model still runs, on the Python loops
    model(torch.randn(3, 2, D_MODEL)).sum().backward()


def test_require_raises_when_the_build_fails(monkeypatch, fresh_state):
    monkeypatch.setenv(native.NATIVE_ENV, "require")
    monkeypatch.setattr(native, "_build", failing_build)
    with pytest.raises(
        RuntimeError,
        match="FEEDBACK_LIB_NATIVE=require, but the C\\+\\+ step loops could not be built",
    ):
        native.load()


def test_only_cpu_tensors_use_the_extension(monkeypatch, fresh_state):
    fake_build(monkeypatch)
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    assert native.extension(torch.device("cpu"), torch.float32) == "the module"
    assert native.extension(torch.device("meta"), torch.float32) is None


def test_only_float32_and_float64_use_the_extension(monkeypatch, fresh_state):
    fake_build(monkeypatch)
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    assert native.extension(torch.device("cpu"), torch.float64) == "the module"
    assert native.extension(torch.device("cpu"), torch.bfloat16) is None


def test_a_bfloat16_model_trains_on_the_python_loops():
    model = make_transformer(True).to(torch.bfloat16)
    model(torch.randn(4, 2, D_MODEL, dtype=torch.bfloat16)).float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_python_loops_nest(monkeypatch, fresh_state):
    fake_build(monkeypatch)
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    with native.python_loops():
        with native.python_loops():
            assert native.extension(torch.device("cpu"), torch.float32) is None
        assert native.extension(torch.device("cpu"), torch.float32) is None
    assert native.extension(torch.device("cpu"), torch.float32) == "the module"


# The build lock: a build killed half-way must not leave the next one waiting forever.


needs_flock = pytest.mark.skipif(sys.platform == "win32", reason="Windows has no flock")


def build_directory(root):
    """Where _build builds when TORCH_EXTENSIONS_DIR is ``root``."""
    return root / ("feedback_lib_step_loops_" + torch.backends.cpu.get_cpu_capability().lower())


def test_without_the_private_build_directory_api_the_python_loops_run(monkeypatch, fresh_state):
    """The lock needs ``cpp_extension._get_build_directory`` (private); a PyTorch without it
    gives the usual fall-back warning, never a crash."""
    from torch.utils import cpp_extension

    monkeypatch.delattr(cpp_extension, "_get_build_directory")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: pytest.fail("built anyway"))
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    with pytest.warns(RuntimeWarning, match="could not build its C.. step loops.*AttributeError"):
        assert native.load() is None


@needs_flock
def test_a_stale_torch_lock_is_removed_before_the_build(monkeypatch, tmp_path, fresh_state):
    import fcntl

    from torch.utils import cpp_extension

    directory = build_directory(tmp_path)
    directory.mkdir()
    (directory / "lock").touch()  # left by a build that was killed
    seen = {}

    def fake_load(**kwargs):  # what cpp_extension.load finds
        seen.update(kwargs, lock=(directory / "lock").exists())
        with open(directory / "feedback_lib.flock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held during the build
        return "the module"

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv(native.NATIVE_ENV, "require")
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(native, "check_layouts", lambda module: None)
    with pytest.warns(
        RuntimeWarning,
        match=f"removed {re.escape(str(directory / 'lock'))}, left by a build that was interrupted",
    ):
        assert native.load() == "the module"
    assert seen["lock"] is False and seen["build_directory"] == str(directory)
    assert (directory / "feedback_lib.flock").read_text() == str(os.getpid())
    with open(directory / "feedback_lib.flock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released after the build


def test_no_warning_without_a_stale_lock(tmp_path, recwarn):
    with native.build_lock(tmp_path):
        pass
    assert not recwarn.list


@contextlib.contextmanager
def live_builder(directory, seconds):
    """Another process that holds the build lock for ``seconds`` (a build in progress)."""
    code = (
        "import fcntl, os, sys, time\n"
        "f = open(sys.argv[1], 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write(str(os.getpid())); f.flush()\n"
        "print('held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
    )
    path = str(directory / "feedback_lib.flock")
    with subprocess.Popen(
        [sys.executable, "-c", code, path, str(seconds)], stdout=subprocess.PIPE, text=True
    ) as process:
        assert process.stdout.readline() == "held\n"
        try:
            yield process
        finally:
            process.kill()


@needs_flock
def test_a_live_build_is_waited_for(tmp_path):
    with live_builder(tmp_path, 1) as other:
        with pytest.warns(
            RuntimeWarning,
            match=f"waiting for process {other.pid}, which is building the C\\+\\+ step loops into {re.escape(str(tmp_path))}",
        ):
            start = time.monotonic()
            with native.build_lock(tmp_path):
                waited = time.monotonic() - start
    assert waited > 0.5  # entered once the other build ended, after about a second


@needs_flock
def test_waiting_for_a_live_build_ends_in_an_error_naming_the_lock(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "WAIT_SECONDS", 1)
    with live_builder(tmp_path, 60) as other:
        with (
            pytest.warns(RuntimeWarning, match=f"waiting for process {other.pid}"),
            pytest.raises(
                TimeoutError,
                match=f"process {other.pid} still holds {re.escape(str(tmp_path / 'feedback_lib.flock'))} after 1 s",
            ),
        ):
            with native.build_lock(tmp_path):
                pytest.fail("built while another process builds")


def test_without_flock_a_torch_lock_is_waited_for_then_named(monkeypatch, tmp_path):
    """Windows has no flock: a lock that stays is named, with what to do."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl fails
    monkeypatch.setattr(native, "WAIT_SECONDS", 1)
    (tmp_path / "lock").touch()
    with (
        pytest.warns(
            RuntimeWarning, match=f"waiting for {re.escape(str(tmp_path / 'lock'))} to go"
        ),
        pytest.raises(
            TimeoutError,
            match=f"{re.escape(str(tmp_path / 'lock'))} still exists after 1 s; delete it if no other process is building",
        ),
    ):
        with native.build_lock(tmp_path):
            pytest.fail("built past the lock")


@pytest.mark.slow
@needs_flock
def test_a_build_after_a_killed_build_finishes(tmp_path):
    """A real build is killed while it compiles (its whole process group, as when a Jupyter
    kernel is restarted); the next build removes PyTorch's stale lock and completes."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), native.NATIVE_ENV: "require"}
    command = [sys.executable, "-c", "from feedback_lib.fast import native; native.load()"]
    lock = build_directory(tmp_path) / "lock"
    first = subprocess.Popen(command, env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (build_directory(tmp_path) / "build.ninja").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the build never started"
        time.sleep(0.1)
    time.sleep(2)  # the compiler is running
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert lock.exists()
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert f"removed {lock}, left by a build that was interrupted" in second.stderr
    assert not lock.exists()


# The buffer pool.


def test_pool_reuses_a_released_buffer_and_zeroes_on_request():
    buffers = pool.BufferPool()
    like = torch.empty(0)
    a = buffers.empty((3, 4), like)
    a.fill_(7)
    buffers.release([a])
    b = buffers.zeros((3, 4), like)
    assert b.data_ptr() == a.data_ptr() and not b.any()
    assert (
        buffers.empty((3, 4), like).data_ptr() != a.data_ptr()
    )  # handed out: not handed out twice


def test_pool_takes_buffers_back_only_when_their_owner_is_gone():
    class Owner:
        pass

    buffers = pool.BufferPool()
    owner, buffer = Owner(), torch.empty(5)
    buffers.release_when_gone(owner, [buffer])
    assert buffers.bytes == 0
    del owner
    gc.collect()
    assert buffers.empty((5,), buffer).data_ptr() == buffer.data_ptr()


def test_pool_limits_what_it_keeps():
    buffers = pool.BufferPool(keep=1, max_bytes=100)
    like = torch.empty(0)
    buffers.release([torch.empty(4), torch.empty(4)])  # one kept per shape
    assert buffers.bytes == 16
    buffers.release([torch.empty(24)])  # 96 bytes more: over 100, the oldest shape goes
    assert buffers.bytes == 96 and ((4,), torch.float32) not in buffers.free
    buffers.release([torch.empty(1000)])  # larger than the whole pool: not kept
    assert buffers.bytes == 96
    assert buffers.empty((4,), like).shape == (4,)  # a miss allocates
    buffers.release([torch.empty(2, device="meta")])  # only CPU buffers are pooled
    assert buffers.bytes == 96


def test_retained_graph_backward_twice_gives_the_same_gradients():
    """The second backward pass must not read buffers that the first gave back to the pool."""
    model = make_transformer(True, dtype=torch.float64)
    x = torch.randn(6, 2, D_MODEL, dtype=torch.float64, requires_grad=True)
    y = model(x)
    loss = (y * torch.randn_like(y)).sum()
    first = torch.autograd.grad(loss, [x, *model.parameters()], retain_graph=True)
    model(
        torch.randn(6, 2, D_MODEL, dtype=torch.float64)
    ).sum().backward()  # takes buffers from the pool
    second = torch.autograd.grad(loss, [x, *model.parameters()])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpp_and_python_step_loops_agree_in_float32():
    if native.load() is None:
        pytest.skip(native.status())
    lm = fl.FeedbackLM(13, d_model=32, heads=4, n_layers=3, d_ff=64)
    tokens = torch.randint(0, 13, (3, 9))
    results = []
    for context in (native.python_loops, contextlib.nullcontext):
        with context():
            lm.zero_grad()
            logits = lm(tokens)
            logits.logsumexp(-1).sum().backward()
            results.append((logits.detach(), [p.grad.clone() for p in lm.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_cpp_source_ships_inside_the_package():
    assert native.SOURCE.is_file() and native.SOURCE.parent.name == "fast"


def test_training_after_inference_mode():
    """Buffers made under inference_mode are inference tensors; the pool must not hand them out later."""
    model = make_transformer(True)
    with torch.inference_mode():
        model(torch.randn(6, 2, D_MODEL))
    model(torch.randn(6, 2, D_MODEL)).sum().backward()


def test_the_backward_pass_is_not_differentiated_again():
    model = make_transformer(True, dtype=torch.float64)
    x = torch.randn(5, 2, D_MODEL, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((model(x) ** 2).sum(), x, create_graph=True)
    with pytest.raises(
        RuntimeError,
        match="differentiate twice a function that was marked with @once_differentiable",
    ):
        g.sum().backward()


def test_a_layout_that_differs_from_the_python_one_is_refused(monkeypatch, fresh_state):
    """The C++ enums must list each argument list's tensors in the order of fast/tensors.py."""

    class Swapped:
        @staticmethod
        def layouts():
            layouts = {cls.__name__: native_layout(cls) for cls in NATIVE_LAYOUTS}
            layouts["Layer"][0:2] = layouts["Layer"][1::-1]
            return layouts

    monkeypatch.setenv(native.NATIVE_ENV, "require")
    monkeypatch.setattr(native, "_build", Swapped)
    with pytest.raises(
        RuntimeError,
        match="step_loops.cpp lists the tensors of Layer as \\['norm1_bias', "
        "'norm1_weight'.*the two must change together",
    ):
        native.load()


def test_the_built_extension_has_the_python_layouts(cpp_step_loops):
    if cpp_step_loops is None:
        pytest.skip(native.status())
    native.check_layouts(cpp_step_loops)
    assert cpp_step_loops.layouts()["Gradients"][-1] == "scores"


def fused_call(batch=2, capacity=4, n_prefix=1):
    """The arguments of one C++ forward_steps call of a real model, with every size consistent."""
    model = make_transformer(True)
    state = FusedState(model, batch, capacity)
    acts = state.one_step
    acts.spans = step_spans(state.spec, n_prefix, 1)
    args = dict(
        layers=state.prepared[0],
        eps=state.prepared[1],
        proj=state.prepared[2],
        weights=state.weights,
        acts=native_args(acts),
        keys=state.keys,
        values=state.values,
    )
    starts, offsets, prefix = acts.native_spans()
    return args, (starts, offsets, prefix)


def call_forward(extension, args, spans):
    extension.forward_steps(
        args["layers"],
        args["eps"],
        args["proj"],
        args["weights"],
        args["acts"],
        args["keys"],
        args["values"],
        *spans,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda a: a.update(keys=torch.zeros(4, 3, 4, 4)),
            r"values has shape \[4, 2, 4, 4\], expected \[4, 3, 4, 4\]",
        ),
        (
            lambda a: a.update(keys=torch.zeros(4, 1, 4, 4), values=torch.zeros(4, 1, 4, 4)),
            r"xs has shape \[1, 3, 2, 16\], expected \[1, 3, 1, 16\]",
        ),
        (
            lambda a: a.update(values=torch.zeros(4, 2, 4, 4, dtype=torch.float64)),
            "values has dtype Double, expected Float",
        ),
        (lambda a: a.update(weights=torch.ones(2)), r"weights has shape \[2\], expected \[3\]"),
        (lambda a: a.update(eps=[1e-5]), "two LayerNorm eps per layer"),
        (
            lambda a: a["layers"].__setitem__(2, torch.zeros(16, 8)),
            r"query.weight has shape \[16, 8\], expected \[16, 16\]",
        ),
        (
            lambda a: a["layers"].__setitem__(3, torch.zeros(10)),
            "query.packed is not MKL's packed copy of a \\[16, 16\\] weight",
        ),
        (
            lambda a: a["layers"].__setitem__(10, torch.zeros(3)),
            r"output.bias has shape \[3\], expected \[16\]",
        ),
        (
            lambda a: a["layers"].__setitem__(7, torch.zeros(4, 1, 2)),
            r"s has shape \[4, 1, 2\], expected \[4, 1, 3\]",
        ),
        (
            lambda a: a["acts"].__setitem__(11, torch.zeros(2, 3, 2, 5)),
            r"attn has shape \[2, 3, 2, 5\], expected \[2, 3, 2, 4\]",
        ),
        (
            lambda a: a["acts"].__setitem__(4, torch.zeros(2, 1, 32, 2).transpose(2, 3)),
            "hiddens must be contiguous",
        ),
        (lambda a: a["proj"].pop(), "6 projection tensors expected"),
        (lambda a: a["layers"].pop(), "19 tensors per layer expected"),
    ],
)
def test_the_cpp_loops_refuse_buffers_of_the_wrong_size(cpp_step_loops, change, message):
    """No argument the C++ loops index goes unchecked: a wrong size is an error, never a read or
    write outside a buffer."""
    if cpp_step_loops is None:
        pytest.skip(native.status())
    args, spans = fused_call()
    call_forward(cpp_step_loops, args, spans)  # the consistent call runs
    args, spans = fused_call()
    change(args)
    with pytest.raises(RuntimeError, match=message):
        call_forward(cpp_step_loops, args, spans)


def test_the_cpp_loops_check_that_the_steps_fit(cpp_step_loops):
    if cpp_step_loops is None:
        pytest.skip(native.status())
    args, _ = fused_call(capacity=4)  # position tables for 3 distances
    with pytest.raises(RuntimeError, match="the steps do not fit in the memory"):
        call_forward(cpp_step_loops, args, ([0], [0], 4))
    with pytest.raises(RuntimeError, match="step 0 sees rows -1..3, beyond the 3 distances"):
        call_forward(cpp_step_loops, args, ([-1], [0], 3))
    with pytest.raises(RuntimeError, match="one start and one offset per step"):
        call_forward(cpp_step_loops, args, ([0, 1], [0, 0], 1))
    with pytest.raises(RuntimeError, match="attention weights do not fit in their buffer"):
        call_forward(cpp_step_loops, args, ([0], [2], 3))


def test_the_cpp_source_fits_the_website():
    """Chapter 12 shows functions of step_loops.cpp: like the Python, its lines fit a code block."""
    wide = [n for n, line in enumerate(native.SOURCE.read_text().splitlines(), 1) if len(line) > 76]
    assert not wide, (
        f"lines wider than 76 characters: {wide} (clang-format with fast/.clang-format)"
    )
