"""The Stack store and its autograd function."""

import feedback_lib as fl
import pytest
import torch


def read_every_step(store_cls, x, start_of=lambda n: 0):
    """Append the rows of ``x [T, ...]`` one by one and read the stack after each append.

    Each read is used on its own: no read's output feeds a later append, unlike in the
    transformers, so only the Stack's own bookkeeping orders the backward passes of the reads.
    """
    store = store_cls(x.shape[0])
    outs = []
    for t in range(x.shape[0]):
        store.append(x[t : t + 1])
        rows = store.get(start_of(t + 1))
        position = torch.arange(1, rows.shape[0] + 1, dtype=x.dtype).view(-1, *[1] * (x.dim() - 1))
        outs.append((rows.sin() * position).sum(0))
    return torch.stack(outs)


def test_gradcheck_float64():
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: read_every_step(fl.Stack, x), (x,))


def test_gradcheck_with_a_window():
    x = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: read_every_step(fl.Stack, x, lambda n: max(0, n - 3)), (x,)
    )


def test_stack_equals_naive_stack_values_and_gradients():
    x = torch.randn(9, 4, 5, dtype=torch.float64, requires_grad=True)
    y_stack = read_every_step(fl.Stack, x)
    y_naive = read_every_step(fl.NaiveStack, x)
    assert torch.equal(y_stack, y_naive)
    g = torch.randn_like(y_stack)
    (gs,) = torch.autograd.grad(y_stack, x, g)
    (gn,) = torch.autograd.grad(y_naive, x, g)
    torch.testing.assert_close(gs, gn)


def test_reads_are_views_of_one_buffer():
    store = fl.Stack(4)
    for t in range(3):
        store.append(torch.full((1, 2), float(t)))
        rows = store.get()
        assert rows.data_ptr() == store.memory.data_ptr() and rows.shape == (t + 1, 2)
    assert store.memory.shape == (4, 2)


def test_a_second_backward_pass_gives_the_same_gradients():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = read_every_step(fl.Stack, x).sum()
    (g1,) = torch.autograd.grad(y, x, retain_graph=True)
    (g2,) = torch.autograd.grad(y, x)
    assert torch.equal(g1, g2)


def test_a_partial_backward_pass_leaves_nothing_behind():
    """A pass that skips some reads (gradient for one input only) must not disturb the next pass."""
    xs = [torch.randn(1, 3, dtype=torch.float64, requires_grad=True) for _ in range(5)]
    y = read_every_step(fl.Stack, torch.cat(xs))
    g = torch.randn_like(y)
    torch.autograd.grad(y, xs[3], g, retain_graph=True)
    full = torch.autograd.grad(y, xs, g)
    expected = torch.autograd.grad(read_every_step(fl.NaiveStack, torch.cat(xs)), xs, g)
    for a, b in zip(full, expected, strict=True):
        torch.testing.assert_close(a, b)


def test_block_append_carries_gradients_to_a_prefix():
    prefix = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    new = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    store = fl.Stack(4)
    store.append(prefix)
    a = store.get()
    store.append(new * a.sum())
    b = store.get(1)
    (b**2).sum().backward()
    expected_prefix, expected_new = torch.autograd.grad(
        (torch.cat([prefix, new * prefix.sum()])[1:] ** 2).sum(), [prefix, new]
    )
    torch.testing.assert_close(prefix.grad, expected_prefix)
    torch.testing.assert_close(new.grad, expected_new)


def test_protocol_errors():
    store = fl.Stack(2)
    store.append(torch.zeros(1, 3))
    with pytest.raises(RuntimeError, match="twice without a get"):
        store.append(torch.zeros(1, 3))
    store.get()
    with pytest.raises(ValueError, match="rows of shape"):
        store.append(torch.zeros(1, 4))
    with pytest.raises(RuntimeError, match="capacity"):
        store.append(torch.zeros(2, 3))
    with pytest.raises(IndexError, match="start"):
        store.get(5)
    with pytest.raises(ValueError, match="capacity"):
        fl.Stack(0)
    for store in (fl.Stack(3), fl.NaiveStack(3)):
        with pytest.raises(
            ValueError,
            match=r"block must be a tensor \[k, \*row_shape\] with k >= 1 rows, got \[\]",
        ):
            store.append(torch.tensor(1.0))
        store.append(torch.zeros(1, 3))
        store.get()
        with pytest.raises(
            ValueError, match=r"block rows have shape \[4\] but the stack holds rows of shape \[3\]"
        ):
            store.append(torch.zeros(1, 4))


def test_a_training_step_leaves_no_stack_alive():
    """Reads must not keep their Stack (which holds the last read): that cycle leaked every graph."""
    import gc

    model = fl.FeedbackLM(11, d_model=8, heads=2, n_layers=2, d_ff=16, shared_kv=False)
    model(torch.randint(0, 11, (2, 5))).sum().backward()
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is fl.Stack]
