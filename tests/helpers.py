"""Small builders shared by the tests."""

from __future__ import annotations

import feedback_lib as fl
import torch

D_MODEL, HEADS, D_FF, N_LAYERS = 16, 4, 32, 2


def make_layer(shared_kv: bool, dropout: float = 0.0) -> fl.FeedbackTransformerLayer:
    return fl.FeedbackTransformerLayer(
        d_model=D_MODEL,
        attn=fl.FeedbackAttention(HEADS, D_MODEL, dropout, is_kv_precomputed=shared_kv),
        feed_forward=fl.FeedForward(D_MODEL, D_FF, dropout),
        dropout_prob=dropout,
    )


def make_transformer(
    shared_kv: bool,
    *,
    mem_len: int | None = None,
    naive_stack: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    torch.manual_seed(seed)
    layer = make_layer(shared_kv)
    if shared_kv:
        model = fl.FeedbackTransformerKV(
            layer, N_LAYERS, D_MODEL, HEADS, mem_len=mem_len, naive_stack=naive_stack
        )
    else:
        model = fl.FeedbackTransformer(layer, N_LAYERS, mem_len=mem_len, naive_stack=naive_stack)
    return fl.randomize_parameters_(model.to(dtype), seed=seed).eval()


def make_lm(
    shared_kv: bool = True, *, n_vocab: int = 11, mem_len: int | None = None, seed: int = 0
) -> fl.FeedbackLM:
    torch.manual_seed(seed)
    lm = fl.FeedbackLM(
        n_vocab,
        d_model=D_MODEL,
        heads=HEADS,
        n_layers=N_LAYERS,
        d_ff=D_FF,
        shared_kv=shared_kv,
        mem_len=mem_len,
    )
    return fl.randomize_parameters_(lm, seed=seed).eval()


def assert_same_outputs_and_gradients(
    model: torch.nn.Module, other: torch.nn.Module, x: torch.Tensor, **tolerance
) -> None:
    """Both models give the same output on ``x`` and the same gradients for ``x`` and every parameter."""
    x = x.detach().requires_grad_()
    y, y_other = model(x), other(x)
    torch.testing.assert_close(y, y_other, **tolerance)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *model.parameters()], g)
    grads_other = torch.autograd.grad(y_other, [x, *other.parameters()], g)
    names = ["x"] + [name for name, _ in model.named_parameters()]
    for name, a, b in zip(names, grads, grads_other, strict=True):
        torch.testing.assert_close(a, b, **tolerance, msg=f"gradient of {name}")
