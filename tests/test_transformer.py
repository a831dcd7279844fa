"""The feedback transformers: causality, memory continuation, the shared key/value variant, gradients."""

import feedback_lib as fl
import pytest
import torch

from helpers import D_MODEL, assert_same_outputs_and_gradients, make_transformer

VARIANTS = pytest.mark.parametrize("shared_kv", [False, True], ids=["per-layer-kv", "shared-kv"])


@VARIANTS
def test_output_shape_and_normalisation(shared_kv):
    model = make_transformer(shared_kv)
    with torch.no_grad():
        model.norm.weight.fill_(1.0)
        model.norm.bias.zero_()
    y = model(torch.randn(6, 3, D_MODEL))
    assert y.shape == (6, 3, D_MODEL)
    torch.testing.assert_close(y.mean(-1), torch.zeros(6, 3), atol=1e-5, rtol=0)


@VARIANTS
def test_causality(shared_kv):
    """Changing step t changes no output before t, and does change the outputs after it."""
    model = make_transformer(shared_kv)
    x = torch.randn(8, 2, D_MODEL)
    x2 = x.clone()
    x2[5] += 1.0
    y, y2 = model(x), model(x2)
    assert torch.equal(y[:5], y2[:5])
    assert not torch.allclose(y[5:], y2[5:])


@VARIANTS
@pytest.mark.parametrize("mem_len", [None, 3])
def test_chunks_with_memory_equal_one_call(shared_kv, mem_len):
    model = make_transformer(shared_kv, mem_len=mem_len)
    x = torch.randn(10, 2, D_MODEL)
    whole = model(x)
    pieces, memory = [], None
    for chunk in x.split([4, 1, 5]):
        y, memory = model(chunk, memory, return_memory=True)
        pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces), whole, atol=1e-6, rtol=1e-5)
    assert len(memory) == (10 if mem_len is None else mem_len)


@VARIANTS
def test_mem_len_window(shared_kv):
    """A window at least as long as the past changes nothing; a shorter one changes only later steps."""
    x = torch.randn(7, 2, D_MODEL)
    full = make_transformer(shared_kv)(x)
    assert torch.equal(make_transformer(shared_kv, mem_len=6)(x), full)
    short = make_transformer(shared_kv, mem_len=3)(x)
    assert torch.equal(short[:4], full[:4])  # steps 0-3 see at most 3 entries anyway
    assert not torch.allclose(short[4:], full[4:])


def test_shared_kv_equals_per_layer_with_tied_weights():
    kv_model = make_transformer(True)
    per_layer = fl.per_layer_copy(kv_model)
    assert isinstance(per_layer, fl.FeedbackTransformer) and not per_layer.training
    x = torch.randn(9, 3, D_MODEL)
    torch.testing.assert_close(kv_model(x), per_layer(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="must be a FeedbackTransformerKV"):
        fl.per_layer_copy(per_layer)


@VARIANTS
@pytest.mark.parametrize("mem_len", [None, 4])
def test_stack_gradients_equal_naive_stack_gradients(shared_kv, mem_len):
    fast = make_transformer(shared_kv, mem_len=mem_len, dtype=torch.float64)
    naive = make_transformer(shared_kv, mem_len=mem_len, naive_stack=True, dtype=torch.float64)
    naive.load_state_dict(fast.state_dict())
    assert_same_outputs_and_gradients(fast, naive, torch.randn(12, 2, D_MODEL, dtype=torch.float64))


@VARIANTS
def test_gradients_flow_through_a_carried_memory(shared_kv):
    """Backpropagating through two chunks joined by a memory equals backpropagating through one call."""
    model = make_transformer(shared_kv, dtype=torch.float64)
    x = torch.randn(7, 2, D_MODEL, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, 2, D_MODEL, dtype=torch.float64)
    (whole,) = torch.autograd.grad(model(x), x, g)
    y1, memory = model(x[:3], return_memory=True)
    y2 = model(x[3:], memory)
    (chunked,) = torch.autograd.grad(torch.cat([y1, y2]), x, g)
    torch.testing.assert_close(chunked, whole)


@VARIANTS
def test_memory_is_the_softmax_weighted_sum_of_all_layers(shared_kv):
    model = make_transformer(shared_kv)
    x = torch.randn(3, 1, D_MODEL)
    _, memory = model(x, return_memory=True)
    assert len(memory) == 3 and memory.batch_size == 1
    assert memory.tensors[0].shape == ((3, 1, 4, 4) if shared_kv else (3, 1, D_MODEL))
    # Step 0 has no memory to attend to, so each layer is just its feed-forward block.
    h = [x[0]]
    for layer in model.layers:
        h.append(layer(h[-1]))
    weights = torch.softmax(model.weights, 0)
    m0 = sum(w * hi for w, hi in zip(weights, h))
    expected = (model.key(m0), model.value(m0)) if shared_kv else (m0,)
    for stored, want in zip(memory.tensors, expected, strict=True):
        torch.testing.assert_close(stored[0], want)


def test_layer_skips_attention_without_memory():
    model = make_transformer(False)
    layer = model.layers[0]
    x = torch.randn(2, D_MODEL)
    expected = x + layer.feed_forward(layer.norm_ff(x))
    torch.testing.assert_close(layer(x), expected)
