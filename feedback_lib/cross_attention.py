"""Cross-attention: every feedback layer reads an encoder's output (chapter 11).

For encoder-decoder tasks (translation, speech, the book's sequence reversal) the decoder needs a
second source of information besides its own memory: the encoder's output, the *context*
``[context_len, batch, d_model]``. Each layer of a model built with cross-attention attends to it
after the feedback attention (see :class:`~feedback_lib.FeedbackTransformerLayer`). The context is
the same for every step of the decoder, so its keys and values are projected once per call
(:meth:`CrossAttention.prepare`) and each step only projects its own query
(:meth:`CrossAttention.attend`).

The padding mask follows PyTorch's ``key_padding_mask``: a bool tensor ``[batch, context_len]``
where True marks a padding position that no query may attend to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from feedback_lib.attention import HeadProjection
from feedback_lib.checks import check_heads, check_like, check_probability, check_tensor
from feedback_lib.generation import eval_mode


@dataclass(frozen=True)
class PreparedContext:
    """One layer's projected context, computed once per call and read by every step.

    ``key``/``value``: ``[context_len, batch, heads, d_k]``; ``mask``: None (no padding) or the
    additive mask ``[context_len, batch, 1]``, ``-inf`` at padding positions and 0 elsewhere.
    """

    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None


class CrossAttention(nn.Module):
    r"""Multi-head scaled dot-product attention of one step's ``x`` over the context (chapter 11).

    For head ``h``, with ``Q = W^Q x + b^Q``, ``K_i = W^K c_i`` (no bias: the softmax would cancel
    it) and ``V_i = W^V c_i + b^V`` for context position ``c_i``:

    .. math:: \mathrm{out} = W^O \big[\textstyle\sum_i \mathrm{softmax}_i(Q^\top K_i / \sqrt{d_k} + M_i) V_i\big]_h + b^O,

    where ``M_i`` is ``-inf`` at padding positions. There are no position terms: the encoder puts
    positions into the context itself.

    Args:
        heads: number of heads; must divide ``d_model``.
        d_model: width of the decoder and of the context.
        dropout_prob: dropout on the attention weights.

    Shapes: ``x [batch, d_model]``, ``context [context_len, batch, d_model]``,
    ``context_padding_mask [batch, context_len]`` (bool, True = padding), output ``[batch, d_model]``.
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.0):
        d_k = check_heads(heads, d_model)
        check_probability("dropout_prob", dropout_prob)
        super().__init__()
        self.heads, self.d_model, self.d_k = heads, d_model, d_k
        self.query = HeadProjection(d_model, heads, d_k, bias=True)
        # A key bias would add the same Q . b to every score of a query; the softmax cancels it.
        self.key = HeadProjection(d_model, heads, d_k, bias=False)
        self.value = HeadProjection(d_model, heads, d_k, bias=True)
        self.output = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout_prob)
        self.scale = 1 / math.sqrt(d_k)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_padding_mask: torch.Tensor | None = None, *,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``x`` over ``context`` (checked); returns ``[batch, d_model]``, or with
        ``need_weights=True`` the pair ``(output, weights [context_len, batch, heads])``."""
        check_tensor("x", x, ["batch", "d_model"], [None, self.d_model])
        check_like("x", x, self.output.weight)
        check_context(context, context_padding_mask, d_model=self.d_model, batch=x.shape[0],
                      reference=self.output.weight, input_name="x")
        return self.attend(x, self.prepare(context, context_padding_mask), need_weights=need_weights)

    def prepare(self, context: torch.Tensor, context_padding_mask: torch.Tensor | None = None) -> PreparedContext:
        """Project ``context [context_len, batch, d_model]`` into keys and values once (unchecked;
        see :func:`check_context`) and turn the padding mask into an additive one."""
        key = self.key(context)                                       # [context_len, batch, heads, d_k]
        value = self.value(context)                                   # [context_len, batch, heads, d_k]
        mask = None
        if context_padding_mask is not None:
            mask = torch.zeros(context_padding_mask.t()[..., None].shape, dtype=key.dtype, device=key.device)
            mask = mask.masked_fill(context_padding_mask.t()[..., None], float("-inf"))  # [context_len, batch, 1]
        return PreparedContext(key, value, mask)

    def attend(self, x: torch.Tensor, context: PreparedContext, *, need_weights: bool = False
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One step: ``x [batch, d_model]`` over a :meth:`prepare`-d context; :meth:`forward`'s results."""
        query = self.query(x)                                         # [batch, heads, d_k]
        scores = (query * context.key).sum(-1) * self.scale           # Q . K_i / sqrt(d_k)  [context_len, batch, heads]
        if context.mask is not None:
            scores = scores + context.mask                            # -inf at padding  [context_len, batch, heads]
        attn = torch.softmax(scores, dim=0)                           # over the context positions
        attn = self.dropout(attn)
        out = (attn[..., None] * context.value).sum(0)                # [batch, heads, d_k]
        out = self.output(out.reshape(out.shape[0], -1))              # [batch, d_model]
        return (out, attn) if need_weights else out


def check_context(context: object, context_padding_mask: object, *, d_model: int, batch: int,
                  reference: torch.Tensor, input_name: str, batch_first: bool = False) -> None:
    """Raise a clear error unless ``context`` is ``[context_len, batch, d_model]`` (``[batch,
    context_len, d_model]`` with ``batch_first``) like ``reference`` (a parameter), with the
    ``batch`` of the input called ``input_name``, and ``context_padding_mask`` is None or a bool
    ``[batch, context_len]`` that leaves every row at least one position to attend to."""
    dims = ["batch", "context_len", "d_model"] if batch_first else ["context_len", "batch", "d_model"]
    check_tensor("context", context, dims, [None, None, d_model])
    check_like("context", context, reference)
    context_len, context_batch = (context.shape[1], context.shape[0]) if batch_first else context.shape[:2]
    if context_batch != batch:
        raise ValueError(f"batch sizes differ: {input_name} has batch {batch}, context has batch {context_batch}")
    if context_padding_mask is None:
        return
    check_tensor("context_padding_mask", context_padding_mask, ["batch", "context_len"], [batch, context_len])
    if context_padding_mask.dtype != torch.bool:
        raise TypeError(f"context_padding_mask must be a bool tensor (True marks padding, as PyTorch's "
                        f"key_padding_mask), got dtype {context_padding_mask.dtype}")
    if context_padding_mask.device != context.device:
        raise ValueError(f"context_padding_mask is on device {context_padding_mask.device} but context is on "
                         f"{context.device}")
    empty = context_padding_mask.all(1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"context_padding_mask marks every position of batch row(s) {empty} as padding; each row "
                         f"needs at least one context position to attend to (True marks padding)")


@torch.no_grad()
def cross_attention_maps(lm: nn.Module, tokens: torch.Tensor, context: torch.Tensor,
                         context_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The cross-attention weights of every layer and step of a :class:`~feedback_lib.FeedbackLM`
    built with ``cross_attention=True`` (chapter 11), in eval mode (no dropout).

    ``tokens [batch, seq]`` and the batch-major ``context [batch, context_len, d_model]`` as
    ``FeedbackLM.forward`` takes them. Returns ``[n_layers, batch, heads, seq, context_len]``: entry
    ``[l, b, h, t, i]`` is how much head ``h`` of layer ``l`` at step ``t`` reads context position
    ``i`` (0 at padding positions).
    """
    from feedback_lib.lm import FeedbackLM   # here, not at the top: lm imports this module

    if not isinstance(lm, FeedbackLM) or not lm.config["cross_attention"]:
        raise TypeError("lm must be a FeedbackLM built with cross_attention=True")
    recorded: list[list[torch.Tensor]] = [[] for _ in lm.transformer.layers]

    def recording(attend: Callable, store: list[torch.Tensor]) -> Callable:
        def attend_and_record(x: torch.Tensor, prepared: PreparedContext, *, need_weights: bool = False):
            out, weights = attend(x, prepared, need_weights=True)     # weights [context_len, batch, heads]
            store.append(weights)
            return (out, weights) if need_weights else out
        return attend_and_record

    # The loop calls each layer's cross_attn.attend directly (module hooks do not run there), so
    # the recording wrapper is set on the instances for this one call and removed after it.
    modules = [layer.cross_attn for layer in lm.transformer.layers]
    try:
        for module, store in zip(modules, recorded):
            module.attend = recording(module.attend, store)
        with eval_mode(lm):
            lm(tokens, context=context, context_padding_mask=context_padding_mask)
    finally:
        for module in modules:
            module.__dict__.pop("attend", None)
    maps = torch.stack([torch.stack(steps) for steps in recorded])   # [n_layers, seq, context_len, batch, heads]
    return maps.permute(0, 3, 4, 1, 2)                                 # [n_layers, batch, heads, seq, context_len]
