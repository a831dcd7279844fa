"""The fused loop of the shared key/value transformer: the same numbers as the reference loop.

Every test runs twice, with the C++ step loops (feedback_lib/fused_kv.cpp) and with the Python ones.
"""

import copy

import pytest
import torch
from torch import nn

import feedback_lib as fl
from feedback_lib import native
from feedback_lib.fused_kv import FusedDecoder, Linear
from helpers import D_MODEL, HEADS, make_lm, make_transformer


@pytest.fixture(autouse=True, params=["C++ step loops", "Python step loops"])
def step_loops(request):
    """Runs the test with each implementation of the step loops (CI builds the C++ one or fails)."""
    if request.param == "Python step loops":
        with native.python_loops():
            yield
    elif native.load() is None:
        pytest.skip(f"the C++ step loops are not available here: {native.status()}")
    else:
        yield


def reference_copy(model: fl.FeedbackTransformerKV) -> fl.FeedbackTransformerKV:
    other = copy.deepcopy(model)
    other.fused = False
    return other


def outputs_and_gradients(model, x, memory):
    """Output, returned memory, and gradients of a random projection of both w.r.t. everything."""
    y, returned = model(x, memory, return_memory=True)
    torch.manual_seed(123)
    loss = (y * torch.randn_like(y)).sum() + sum((t * torch.randn_like(t)).sum() for t in returned.tensors)
    inputs = [x, *model.parameters(), *(memory.tensors if memory is not None else ())]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = ["x"] + [n for n, _ in model.named_parameters()] + ["memory key", "memory value"]
    return y, returned, dict(zip(names, grads))


@pytest.mark.parametrize("mem_len", [None, 4])
@pytest.mark.parametrize("n_prefix", [0, 3])
def test_fused_equals_reference_loop_outputs_memory_and_gradients(mem_len, n_prefix):
    model = make_transformer(True, mem_len=mem_len, dtype=torch.float64)
    reference = reference_copy(model)
    assert model.fused_loop_blocker() is None and reference.fused_loop_blocker() is not None
    x = torch.randn(7, 2, D_MODEL, dtype=torch.float64, requires_grad=True)
    memory = None
    if n_prefix:
        with torch.no_grad():
            _, memory = model(torch.randn(n_prefix, 2, D_MODEL, dtype=torch.float64), return_memory=True)
        memory = fl.FeedbackMemory(tuple(t.clone().requires_grad_() for t in memory.tensors), memory.signature)
    y, returned, grads = outputs_and_gradients(model, x, memory)
    y_ref, returned_ref, grads_ref = outputs_and_gradients(reference, x, memory)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(returned.tensors, returned_ref.tensors, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-11, msg=f"gradient of {name}")


def test_gradcheck_inputs_and_carried_memory():
    model = make_transformer(True, dtype=torch.float64)
    with torch.no_grad():
        _, memory = model(torch.randn(2, 1, D_MODEL, dtype=torch.float64), return_memory=True)

    def run(x, key, value):
        y, returned = model(x, fl.FeedbackMemory((key, value), memory.signature), return_memory=True)
        return y, returned.tensors[0], returned.tensors[1]

    x = torch.randn(3, 1, D_MODEL, dtype=torch.float64, requires_grad=True)
    key, value = (t.clone().requires_grad_() for t in memory.tensors)
    assert torch.autograd.gradcheck(run, (x, key, value))


def test_gradients_of_only_some_inputs():
    """Parameters only (input without grad), and the input only (frozen parameters)."""
    model = make_transformer(True, dtype=torch.float64)
    reference = reference_copy(model)
    x = torch.randn(5, 2, D_MODEL, dtype=torch.float64)
    for m in (model, reference):
        m.zero_grad()
        m(x).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for m in (model, reference):
        m.requires_grad_(False)
    x.requires_grad_()
    (g,) = torch.autograd.grad(model(x).sum(), x)
    (g_ref,) = torch.autograd.grad(reference(x).sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_float32_matches_reference_loop():
    model = make_transformer(True)
    x = torch.randn(9, 3, D_MODEL)
    torch.testing.assert_close(model(x), reference_copy(model)(x), atol=1e-5, rtol=1e-5)


def test_single_step_without_memory():
    model = make_transformer(True, dtype=torch.float64)
    x = torch.randn(1, 2, D_MODEL, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x)
    (g_ref,) = torch.autograd.grad(reference_copy(model)(x).sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_when_the_reference_loop_runs_instead():
    model = make_transformer(True)
    assert model.fused_loop_blocker() is None
    assert "fused=False" in reference_copy(model).fused_loop_blocker()
    assert "naive_stack" in make_transformer(True, naive_stack=True).fused_loop_blocker()
    dropped = fl.FeedbackLM(11, d_model=D_MODEL, heads=HEADS, n_layers=2, d_ff=32, dropout=0.1).transformer
    assert "dropout" in dropped.train().fused_loop_blocker()
    assert dropped.eval().fused_loop_blocker() is None           # dropout is off in eval mode
    gated = make_transformer(True)
    gated.layers[0].feed_forward = fl.FeedForward(D_MODEL, 32, 0.0, is_gated=True)
    assert "feed-forward" in gated.fused_loop_blocker()
    gelu = make_transformer(True)
    gelu.layers[1].feed_forward.activation = nn.GELU()
    assert "feed-forward" in gelu.fused_loop_blocker()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in model.fused_loop_blocker()
    with pytest.raises(TypeError, match="fused must be True or False"):
        fl.FeedbackTransformerKV(model.layers[0], 2, D_MODEL, HEADS, fused=1)


def test_training_with_dropout_runs_the_reference_loop():
    lm = fl.FeedbackLM(11, d_model=D_MODEL, heads=HEADS, n_layers=2, d_ff=32, dropout=0.5).train()
    tokens = torch.randint(0, 11, (2, 6))
    torch.manual_seed(0)
    a = lm(tokens)
    torch.manual_seed(0)
    lm.transformer.fused = False
    b = lm(tokens)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mem_len", [None, 3])
def test_decoder_steps_equal_one_forward(mem_len):
    model = make_transformer(True, mem_len=mem_len)
    x = torch.randn(8, 2, D_MODEL)
    decoder = model.decoder(2, 8)
    assert isinstance(decoder, FusedDecoder)
    out = torch.cat([decoder.step(chunk) for chunk in x.split([3, 1, 4])])
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="holds 8 steps"):
        decoder.step(x[:1])


def test_reference_decoder_carries_the_memory():
    model = reference_copy(make_transformer(True))
    x = torch.randn(5, 1, D_MODEL)
    decoder = model.decoder(1, 5)
    assert not isinstance(decoder, FusedDecoder)
    out = torch.cat([decoder.step(x[:2]), decoder.step(x[2:])])
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-5)


def test_generation_is_the_same_with_either_loop():
    lm = make_lm(True)
    prompt = torch.randint(0, 11, (2, 4))
    fused = lm.generate(prompt, 6, temperature=0)
    lm.transformer.fused = False
    assert torch.equal(fused, lm.generate(prompt, 6, temperature=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_addmm(dtype):
    weight, bias = torch.randn(32, 16, dtype=dtype), torch.randn(32, dtype=dtype)
    x = torch.randn(5, 16, dtype=dtype)
    with_bias, without = Linear(weight, bias, 5), Linear(weight, None, 5)
    torch.testing.assert_close(with_bias(x), torch.addmm(bias, x, weight.t()))
    torch.testing.assert_close(without(x), x @ weight.t())
    if dtype == torch.float64:
        assert with_bias.packed is None        # MKL packing is for float32 only


def test_a_training_step_frees_the_memory_it_returned():
    """The fused loop saves its outputs (keys, values) with save_for_backward, not on ctx: the
    latter is a reference cycle through autograd that leaked every graph."""
    import gc
    import weakref

    model = make_transformer(True)
    y, memory = model(torch.randn(5, 2, D_MODEL, requires_grad=True), return_memory=True)
    keys = weakref.ref(memory.tensors[0])
    (y.sum() + memory.tensors[1].sum()).backward()
    del y, memory
    gc.collect()
    assert keys() is None
