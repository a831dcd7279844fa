"""The fast path: the fused loop computes exactly what the readable loop computes, and it runs
only for the exact model it translates (anything else, subclasses and hooks included, takes the
readable loop).

The tests that compare numbers run twice, with the C++ step loops (step_loops.cpp) and with the
Python ones.
"""

import copy
import gc
import weakref

import feedback_lib as fl
import pytest
import torch
from feedback_lib import fast
from feedback_lib.fast import native
from feedback_lib.fast.tensors import Linear
from feedback_lib.model import feedback as feedback_module
from torch import nn

from helpers import D_MODEL, HEADS, make_lm, make_transformer


@pytest.fixture(params=["C++ step loops", "Python step loops"])
def step_loops(request, cpp_step_loops):
    """Runs the test with each implementation of the step loops (CI builds the C++ one or fails)."""
    if request.param == "Python step loops":
        with native.python_loops():
            yield
    elif cpp_step_loops is None:
        pytest.skip(f"the C++ step loops are not available here: {native.status()}")
    else:
        yield


def readable_copy(model: fl.FeedbackTransformerKV) -> fl.FeedbackTransformerKV:
    other = copy.deepcopy(model)
    other.fused = False
    return other


def outputs_and_gradients(model, x, memory):
    """Output, returned memory, and gradients of a random projection of both w.r.t. everything."""
    y, returned = model(x, memory, return_memory=True)
    torch.manual_seed(123)
    loss = (y * torch.randn_like(y)).sum() + sum(
        (t * torch.randn_like(t)).sum() for t in returned.tensors
    )
    inputs = [x, *model.parameters(), *(memory.tensors if memory is not None else ())]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    names = ["x"] + [n for n, _ in model.named_parameters()] + ["memory key", "memory value"]
    return y, returned, dict(zip(names, grads))


@pytest.mark.usefixtures("step_loops")
@pytest.mark.parametrize("mem_len", [None, 4])
@pytest.mark.parametrize("n_prefix", [0, 3])
def test_fused_equals_the_readable_loop_outputs_memory_and_gradients(mem_len, n_prefix):
    model = make_transformer(True, mem_len=mem_len, dtype=torch.float64)
    readable = readable_copy(model)
    assert fast.can_fuse(model) and not fast.can_fuse(readable)
    x = torch.randn(7, 2, D_MODEL, dtype=torch.float64, requires_grad=True)
    memory = None
    if n_prefix:
        with torch.no_grad():
            _, memory = model(
                torch.randn(n_prefix, 2, D_MODEL, dtype=torch.float64), return_memory=True
            )
        memory = fl.FeedbackMemory(
            tuple(t.clone().requires_grad_() for t in memory.tensors), memory.signature
        )
    y, returned, grads = outputs_and_gradients(model, x, memory)
    y_ref, returned_ref, grads_ref = outputs_and_gradients(readable, x, memory)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    for a, b in zip(returned.tensors, returned_ref.tensors, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(
            grads[name], grads_ref[name], rtol=1e-9, atol=1e-11, msg=f"gradient of {name}"
        )


@pytest.mark.usefixtures("step_loops")
def test_gradcheck_inputs_and_carried_memory():
    model = make_transformer(True, dtype=torch.float64)
    with torch.no_grad():
        _, memory = model(torch.randn(2, 1, D_MODEL, dtype=torch.float64), return_memory=True)

    def run(x, key, value):
        y, returned = model(
            x, fl.FeedbackMemory((key, value), memory.signature), return_memory=True
        )
        return y, returned.tensors[0], returned.tensors[1]

    x = torch.randn(3, 1, D_MODEL, dtype=torch.float64, requires_grad=True)
    key, value = (t.clone().requires_grad_() for t in memory.tensors)
    assert torch.autograd.gradcheck(run, (x, key, value))


@pytest.mark.usefixtures("step_loops")
def test_gradients_of_only_some_inputs():
    """Parameters only (input without grad), and the input only (frozen parameters)."""
    model = make_transformer(True, dtype=torch.float64)
    readable = readable_copy(model)
    x = torch.randn(5, 2, D_MODEL, dtype=torch.float64)
    for m in (model, readable):
        m.zero_grad()
        m(x).pow(2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), readable.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for m in (model, readable):
        m.requires_grad_(False)
    x.requires_grad_()
    (g,) = torch.autograd.grad(model(x).sum(), x)
    (g_ref,) = torch.autograd.grad(readable(x).sum(), x)
    torch.testing.assert_close(g, g_ref)


@pytest.mark.usefixtures("step_loops")
def test_float32_and_a_single_step_match_the_readable_loop():
    model = make_transformer(True)
    x = torch.randn(9, 3, D_MODEL)
    torch.testing.assert_close(model(x), readable_copy(model)(x), atol=1e-5, rtol=1e-5)
    model = make_transformer(True, dtype=torch.float64)
    x = torch.randn(1, 2, D_MODEL, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(model(x).sum(), x)
    (g_ref,) = torch.autograd.grad(readable_copy(model)(x).sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_the_default_training_step_goes_through_forward_and_its_fast_branch(monkeypatch):
    """FeedbackLM's defaults (shared keys and values, no dropout) take the fast branch of
    FeedbackTransformer.forward; the readable loop's layers are not called."""
    calls, run = [], fast.run
    monkeypatch.setattr(
        feedback_module.fast, "run", lambda *args: (calls.append("fast.run"), run(*args))[1]
    )
    monkeypatch.setattr(
        fl.FeedbackTransformerLayer, "forward", lambda *a, **k: pytest.fail("layer called")
    )
    lm = fl.FeedbackLM(11, d_model=D_MODEL, heads=HEADS, n_layers=2, d_ff=32).train()
    lm(torch.randint(0, 11, (2, 5))).sum().backward()
    assert calls == ["fast.run"]


class NoPositions(fl.FeedbackAttention):
    """Attention without the position terms: content scores only."""

    def get_scores(self, query, key, tables=None):
        return (query * key).sum(-1)


class DoubledFeedForward(fl.FeedForward):
    def forward(self, x):
        return 2 * super().forward(x)


class ScaledLayer(fl.FeedbackTransformerLayer):
    def forward(self, x, key=None, value=None, **kwargs):
        return 0.5 * super().forward(x, key, value, **kwargs)


class FirstLayerOnlyKV(fl.FeedbackTransformerKV):
    """Stores only the key projection, as key and value."""

    def memory_rows(self, mem):
        key = self.key(mem)
        return key, key


def swap_attention(model):
    for layer in model.layers:
        subclassed = NoPositions(HEADS, D_MODEL, 0.0, is_kv_precomputed=True)
        subclassed.load_state_dict(layer.attn.state_dict())
        layer.attn = subclassed
    return model


def swap_feed_forward(model):
    for layer in model.layers:
        subclassed = DoubledFeedForward(D_MODEL, 32, 0.0)
        subclassed.load_state_dict(layer.feed_forward.state_dict())
        layer.feed_forward = subclassed
    return model


def swap_layer(model):
    for i, layer in enumerate(model.layers):
        subclassed = ScaledLayer(
            d_model=D_MODEL, attn=layer.attn, feed_forward=layer.feed_forward, dropout_prob=0.0
        )
        subclassed.load_state_dict(layer.state_dict())
        model.layers[i] = subclassed
    return model


def subclass_transformer(model):
    other = FirstLayerOnlyKV(model.layers[0], model.n_layers, D_MODEL, HEADS)
    other.load_state_dict(model.state_dict())
    return other


@pytest.mark.parametrize(
    "change",
    [swap_attention, swap_feed_forward, swap_layer, subclass_transformer],
    ids=["attention", "feed-forward", "layer", "transformer"],
)
def test_a_subclass_takes_the_readable_loop_and_is_honoured(change):
    """The override changes the result; the same override in the readable loop of a copy with
    fused=False gives exactly that result: nothing is silently bypassed."""
    model = make_transformer(True, dtype=torch.float64)
    changed = change(copy.deepcopy(model)).double()
    assert not fast.can_fuse(changed)
    x = torch.randn(6, 2, D_MODEL, dtype=torch.float64)
    assert not torch.allclose(changed(x), model(x))
    torch.testing.assert_close(changed(x), readable_copy(changed)(x), rtol=0, atol=0)


@pytest.mark.parametrize("where", ["layer", "attention", "feed-forward", "transformer key"])
def test_a_forward_hook_takes_the_readable_loop_and_fires(where):
    model = make_transformer(True)
    module = {
        "layer": model.layers[1],
        "attention": model.layers[1].attn,
        "feed-forward": model.layers[0].feed_forward,
        "transformer key": model.key,
    }[where]
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    assert not fast.can_fuse(model) and "hooks" in fast.blocker(model)
    model(torch.randn(4, 2, D_MODEL))
    assert seen  # the hook ran, once per call of its module
    handle.remove()
    assert fast.can_fuse(model)


def test_global_and_backward_hooks_take_the_readable_loop():
    model = make_transformer(True)
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        assert "hooks" in fast.blocker(model)
    finally:
        handle.remove()
    handle = model.layers[0].register_full_backward_hook(lambda m, g_in, g_out: None)
    assert "hooks" in fast.blocker(model)
    handle.remove()
    handle = model.layers[0].attn.register_forward_pre_hook(lambda m, args: None)
    assert "hooks" in fast.blocker(model)
    handle.remove()
    assert fast.blocker(model) is None


def test_when_the_readable_loop_runs_instead():
    model = make_transformer(True)
    assert fast.blocker(model) is None
    assert "fused is False" in fast.blocker(readable_copy(model))
    assert "fused is False" in fast.blocker(make_transformer(False))
    assert "naive_stack" in fast.blocker(make_transformer(True, naive_stack=True))
    dropped = fl.FeedbackLM(
        11, d_model=D_MODEL, heads=HEADS, n_layers=2, d_ff=32, dropout=0.1
    ).transformer
    assert "dropout" in fast.blocker(dropped.train())
    assert fast.blocker(dropped.eval()) is None  # dropout is off in eval mode
    gated = make_transformer(True)
    gated.layers[0].feed_forward = fl.FeedForward(D_MODEL, 32, 0.0, is_gated=True)
    assert "gated" in fast.blocker(gated)
    gelu = make_transformer(True)
    gelu.layers[1].feed_forward.activation = nn.GELU()
    assert "activation is a GELU, not exactly ReLU" in fast.blocker(gelu)
    parametrized = make_transformer(True)
    nn.utils.parametrizations.weight_norm(parametrized.layers[0].attn.output)
    assert "layers.0.attn.output" in fast.blocker(parametrized)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "autocast" in fast.blocker(model)
    with pytest.raises(TypeError, match="fused must be True or False"):
        fl.FeedbackTransformerKV(model.layers[0], 2, D_MODEL, HEADS, fused=1)


def test_training_with_dropout_runs_the_readable_loop():
    lm = fl.FeedbackLM(11, d_model=D_MODEL, heads=HEADS, n_layers=2, d_ff=32, dropout=0.5).train()
    tokens = torch.randint(0, 11, (2, 6))
    torch.manual_seed(0)
    a = lm(tokens)
    torch.manual_seed(0)
    lm.transformer.fused = False
    b = lm(tokens)
    torch.testing.assert_close(a, b)


@pytest.mark.usefixtures("step_loops")
@pytest.mark.parametrize("mem_len", [None, 3])
def test_the_fused_state_reads_chunks_as_one_forward(mem_len):
    model = make_transformer(True, mem_len=mem_len)
    x = torch.randn(8, 2, D_MODEL)
    state = fast.FusedState(model, 2, 8)
    out = torch.cat([state.read(chunk) for chunk in x.split([3, 1, 4])])
    torch.testing.assert_close(out, model(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="holds 8 steps of batch 2 \\(8 used\\)"):
        state.read(x[:1])


@pytest.mark.usefixtures("step_loops")
def test_generation_is_the_same_with_either_loop():
    lm = make_lm(True)
    prompt = torch.randint(0, 11, (2, 4))
    fused = lm.generate(prompt, 6, temperature=0)
    assert lm.decoder(2, 9).fused is not None
    lm.transformer.fused = False
    assert lm.decoder(2, 9).fused is None
    assert torch.equal(fused, lm.generate(prompt, 6, temperature=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_matches_addmm(dtype):
    weight, bias = (torch.randn(32, 16, dtype=dtype), torch.randn(32, dtype=dtype))
    x = torch.randn(5, 16, dtype=dtype)
    with_bias, without = Linear(weight, bias, 5), Linear(weight, None, 5)
    torch.testing.assert_close(with_bias(x), torch.addmm(bias, x, weight.t()))
    torch.testing.assert_close(without(x), x @ weight.t())
    torch.testing.assert_close(
        with_bias.transposed()(x[:, :1].expand(5, 32).contiguous()), x[:, :1].expand(5, 32) @ weight
    )
    if dtype == torch.float64:
        assert with_bias.packed is None  # MKL packing is for float32 only


def test_a_training_step_frees_the_memory_it_returned():
    """The fused loop saves its outputs (keys, values) with save_for_backward, not on ctx: the
    latter is a reference cycle through autograd that leaked every graph."""
    model = make_transformer(True)
    y, memory = model(torch.randn(5, 2, D_MODEL, requires_grad=True), return_memory=True)
    keys = weakref.ref(memory.tensors[0])
    (y.sum() + memory.tensors[1].sum()).backward()
    del y, memory
    gc.collect()
    assert keys() is None
