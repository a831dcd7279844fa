"""The C++ step loops' loader, and the buffer pool of the fused loop."""

import contextlib
import gc

import pytest
import torch

import feedback_lib as fl
from feedback_lib import fused_kv, native
from helpers import D_MODEL, make_transformer


@pytest.fixture
def fresh_state(monkeypatch):
    """A loader that has not tried to build yet (the real one is restored afterwards)."""
    monkeypatch.setattr(native, "_state", {"module": None, "error": None, "tried": False, "disabled": 0})


@pytest.mark.parametrize("value, mode", [("", "auto"), ("1", "auto"), ("ON", "auto"), ("0", "off"),
                                         ("off", "off"), ("require", "require")])
def test_mode_from_the_environment(monkeypatch, value, mode):
    monkeypatch.setenv(native.NATIVE_ENV, value)
    assert native.mode() == mode


def test_a_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(native.NATIVE_ENV, "fast")
    with pytest.raises(ValueError, match="FEEDBACK_LIB_NATIVE must be auto, 1/on, 0/off or require.*'fast'"):
        native.mode()


def test_off_never_builds(monkeypatch, fresh_state):
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    monkeypatch.setattr(native, "_build", lambda: pytest.fail("built although switched off"))
    assert native.extension(torch.device("cpu"), torch.float32) is None
    assert native.status() == "Python step loops (FEEDBACK_LIB_NATIVE=0)"


def failing_build():
    raise RuntimeError("Error building extension:\n[1/2] c++ ...\nfused_kv.cpp:1:1: error: no compiler here\n")


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, fresh_state):
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    monkeypatch.setattr(native, "_build", failing_build)
    with pytest.warns(RuntimeWarning, match="could not build its C\\+\\+ step loops.*error: no compiler here"):
        assert native.load() is None
    assert native.load() is None               # no second attempt, no second warning
    assert "C++ build failed: RuntimeError: fused_kv.cpp:1:1: error: no compiler here" in native.status()
    model = make_transformer(True)             # the model still runs, on the Python loops
    model(torch.randn(3, 2, D_MODEL)).sum().backward()


def test_require_raises_when_the_build_fails(monkeypatch, fresh_state):
    monkeypatch.setenv(native.NATIVE_ENV, "require")
    monkeypatch.setattr(native, "_build", failing_build)
    with pytest.raises(RuntimeError, match="FEEDBACK_LIB_NATIVE=require, but the C\\+\\+ step loops could not be built"):
        native.load()


def test_only_cpu_tensors_use_the_extension(monkeypatch, fresh_state):
    monkeypatch.setattr(native, "_build", lambda: "the module")
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    assert native.extension(torch.device("cpu"), torch.float32) == "the module"
    assert native.extension(torch.device("meta"), torch.float32) is None


def test_only_float32_and_float64_use_the_extension(monkeypatch, fresh_state):
    monkeypatch.setattr(native, "_build", lambda: "the module")
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    assert native.extension(torch.device("cpu"), torch.float64) == "the module"
    assert native.extension(torch.device("cpu"), torch.bfloat16) is None


def test_a_bfloat16_model_trains_on_the_python_loops():
    model = make_transformer(True).to(torch.bfloat16)
    model(torch.randn(4, 2, D_MODEL, dtype=torch.bfloat16)).float().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_python_loops_nest(monkeypatch, fresh_state):
    monkeypatch.setattr(native, "_build", lambda: "the module")
    monkeypatch.setenv(native.NATIVE_ENV, "auto")
    with native.python_loops():
        with native.python_loops():
            assert native.extension(torch.device("cpu"), torch.float32) is None
        assert native.extension(torch.device("cpu"), torch.float32) is None
    assert native.extension(torch.device("cpu"), torch.float32) == "the module"



# The buffer pool.

def test_pool_reuses_a_released_buffer_and_zeroes_on_request():
    pool = fused_kv.BufferPool()
    like = torch.empty(0)
    a = pool.empty((3, 4), like)
    a.fill_(7)
    pool.release([a])
    b = pool.zeros((3, 4), like)
    assert b.data_ptr() == a.data_ptr() and not b.any()
    assert pool.empty((3, 4), like).data_ptr() != a.data_ptr()   # handed out: not handed out twice


def test_pool_takes_buffers_back_only_when_their_owner_is_gone():
    class Owner:
        pass

    pool = fused_kv.BufferPool()
    owner, buffer = Owner(), torch.empty(5)
    pool.release_when_gone(owner, [buffer])
    assert pool.bytes == 0
    del owner
    gc.collect()
    assert pool.empty((5,), buffer).data_ptr() == buffer.data_ptr()


def test_pool_limits_what_it_keeps():
    pool = fused_kv.BufferPool(keep=1, max_bytes=100)
    like = torch.empty(0)
    pool.release([torch.empty(4), torch.empty(4)])          # one kept per shape
    assert pool.bytes == 16
    pool.release([torch.empty(24)])                         # 96 bytes more: over 100, the oldest shape goes
    assert pool.bytes == 96 and ((4,), torch.float32) not in pool.free
    pool.release([torch.empty(1000)])                       # larger than the whole pool: not kept
    assert pool.bytes == 96
    assert pool.empty((4,), like).shape == (4,)             # a miss allocates
    pool.release([torch.empty(2, device="meta")])           # only CPU buffers are pooled
    assert pool.bytes == 96


def test_retained_graph_backward_twice_gives_the_same_gradients():
    """The second backward pass must not read buffers that the first gave back to the pool."""
    model = make_transformer(True, dtype=torch.float64)
    x = torch.randn(6, 2, D_MODEL, dtype=torch.float64, requires_grad=True)
    y = model(x)
    loss = (y * torch.randn_like(y)).sum()
    first = torch.autograd.grad(loss, [x, *model.parameters()], retain_graph=True)
    model(torch.randn(6, 2, D_MODEL, dtype=torch.float64)).sum().backward()   # takes buffers from the pool
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
    assert native.SOURCE.is_file() and native.SOURCE.parent.name == "feedback_lib"


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
    with pytest.raises(RuntimeError, match="differentiate twice a function that was marked with @once_differentiable"):
        g.sum().backward()


def test_cpp_loops_check_that_the_steps_fit():
    extension = native.load()
    if extension is None:
        pytest.skip(native.status())
    decoder = make_transformer(True).decoder(2, 4)          # position tables for 3 distances
    acts = decoder.one_step
    keys = decoder.keys.new_zeros((8, *decoder.keys.shape[1:]))
    args = (*decoder.native_args, decoder.weights, acts.native(), keys, torch.zeros_like(keys))
    with pytest.raises(RuntimeError, match="step 0 sees rows 0..5, beyond the 3 distances of the position tables"):
        extension.forward_steps(*args, [0], [0], 5)
    with pytest.raises(RuntimeError, match="the steps do not fit in the memory"):
        extension.forward_steps(*args, [7], [0], 8)
    with pytest.raises(RuntimeError, match="one start and one offset per step"):
        extension.forward_steps(*args, [0, 1], [0, 0], 1)
