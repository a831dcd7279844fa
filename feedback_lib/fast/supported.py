"""When the fused loop may run: exactly the model it computes (chapter 12).

The fused loop is a translation of the readable loop for one model: the
library's own shared key/value transformer, layer, attention and
feed-forward classes, with ReLU, biases and affine LayerNorms, no
dropout at work, no autocast and no hooks. Anything else, a subclass
included, runs the readable loop, which calls every module (and so every
override and hook) as written.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from feedback_lib.model.attention import FeedbackAttention, HeadProjection
from feedback_lib.model.feed_forward import FeedForward
from feedback_lib.model.layer import FeedbackTransformerLayer

#: PyTorch's hooks on every module (private; tests/test_fast.py checks
#: that registering each kind is seen here).
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)
MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def can_fuse(model: nn.Module) -> bool:
    """Whether the fused loop computes exactly what ``model``'s readable
    loop computes (see :func:`blocker`)."""
    return blocker(model) is None


def blocker(model: nn.Module) -> str | None:
    """Why the fused loop cannot run ``model``, a feedback transformer, or
    None when it can."""
    if not model.fused:
        return (
            f"{type(model).__name__}.fused is False: the fused loop runs "
            "only for FeedbackTransformerKV itself, built with fused=True"
        )
    if model.naive_stack:
        return "naive_stack=True is the readable loop's store"
    if torch.is_autocast_enabled(model.norm.weight.device.type):
        return "torch.autocast is on"
    if has_hooks(model):
        return "a module has hooks, which only the readable loop runs"
    for name, part, expected in parts(model):
        if type(part) is not expected:
            return (
                f"{name} is a {type(part).__name__}, not exactly "
                f"{expected.__name__}"
            )
    for layer in model.layers:
        ff = layer.feed_forward
        if layer.cross_attn is not None:
            return "the layers have cross-attention"
        if ff.is_gated or ff.layer1.bias is None or ff.layer2.bias is None:
            return "the feed-forward block is gated or has no biases"
        norms = (layer.norm_self_attn, layer.norm_ff)
        if any(n.weight is None or n.bias is None for n in norms):
            return "a LayerNorm has no affine parameters"
        dropouts = (layer.dropout, layer.attn.dropout, ff.dropout)
        if model.training and any(d.p > 0 for d in dropouts):
            return "dropout is active"
    return None


def has_hooks(model: nn.Module) -> bool:
    """Whether any hook, global or on a module of ``model``, is set."""
    if any(getattr(torch_module, name) for name in GLOBAL_HOOKS):
        return True
    return any(
        getattr(m, name) for m in model.modules() for name in MODULE_HOOKS
    )


def parts(model: nn.Module):
    """``(name, module, the exact class the fused loop computes)`` for
    every module whose work the fused loop does in its place."""
    for name in ("key", "value"):
        yield name, getattr(model, name), HeadProjection
        yield f"{name}.linear", getattr(model, name).linear, nn.Linear
    for i, layer in enumerate(model.layers):
        attn, ff = layer.attn, layer.feed_forward
        yield f"layers.{i}", layer, FeedbackTransformerLayer
        yield f"layers.{i}.attn", attn, FeedbackAttention
        yield f"layers.{i}.attn.query", attn.query, HeadProjection
        yield f"layers.{i}.attn.query.linear", attn.query.linear, nn.Linear
        yield f"layers.{i}.attn.output", attn.output, nn.Linear
        yield f"layers.{i}.feed_forward", ff, FeedForward
        for sub in ("layer1", "layer2"):
            yield (
                f"layers.{i}.feed_forward.{sub}",
                getattr(ff, sub),
                nn.Linear,
            )
        yield f"layers.{i}.feed_forward.activation", ff.activation, nn.ReLU
        for norm in ("norm_self_attn", "norm_ff"):
            yield f"layers.{i}.{norm}", getattr(layer, norm), nn.LayerNorm
        for drop, module in (
            ("dropout", layer.dropout),
            ("attn.dropout", attn.dropout),
            ("feed_forward.dropout", ff.dropout),
        ):
            yield f"layers.{i}.{drop}", module, nn.Dropout
