"""Cross-attention: every feedback layer reads an encoder's output (chapter
11).

For encoder-decoder tasks the decoder needs a second source besides its
memory: the encoder's output, the *context* ``[context_len, batch,
d_model]``. Each layer of a model built with cross-attention attends to it
after the feedback attention (see
:class:`~feedback_lib.model.layer.FeedbackTransformerLayer`). The context
is the same at every step, so the transformer projects its keys and values
once per call (:meth:`CrossAttention.prepare`) and each step projects only
its query.

The padding mask follows PyTorch's ``key_padding_mask``: a bool tensor
``[batch, context_len]``, True at padding that no query may attend to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from feedback_lib.checks import (
    check_heads,
    check_like,
    check_probability,
    check_tensor,
)
from feedback_lib.model.attention import HeadProjection


@dataclass(frozen=True)
class PreparedContext:
    """One layer's projected context, made once per call for every step.

    ``key``/``value``: ``[context_len, batch, heads, d_k]``; ``mask``:
    None (no padding) or the additive mask ``[context_len, batch, 1]``,
    ``-inf`` at padding and 0 elsewhere.
    """

    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None


class CrossAttention(nn.Module):
    r"""Multi-head attention of one step's ``x`` over the context
    (chapter 11).

    For head ``h``, with ``Q = W^Q x + b^Q``, ``K_i = W^K c_i`` (no bias:
    the softmax would cancel it) and ``V_i = W^V c_i + b^V``:

    .. math:: \mathrm{out} = W^O \big[\textstyle\sum_i
       \mathrm{softmax}_i(Q^\top K_i / \sqrt{d_k} + M_i) V_i\big]_h + b^O,

    where ``M_i`` is ``-inf`` at padding. There are no position terms: the
    encoder puts positions into the context itself.

    Args:
        heads: number of heads; must divide ``d_model``.
        d_model: width of the decoder and of the context.
        dropout_prob: dropout on the attention weights.

    Shapes: ``x [batch, d_model]``; ``context [context_len, batch,
    d_model]`` or a :class:`PreparedContext`; ``context_padding_mask
    [batch, context_len]``; output ``[batch, d_model]``.
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.0):
        d_k = check_heads(heads, d_model)
        check_probability("dropout_prob", dropout_prob)
        super().__init__()
        self.heads, self.d_model, self.d_k = heads, d_model, d_k
        self.query = HeadProjection(d_model, heads, d_k, bias=True)
        # A key bias would add the same Q . b to every score of a query.
        self.key = HeadProjection(d_model, heads, d_k, bias=False)
        self.value = HeadProjection(d_model, heads, d_k, bias=True)
        self.output = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout_prob)
        self.scale = 1 / math.sqrt(d_k)

    def prepare(
        self,
        context: torch.Tensor,
        context_padding_mask: torch.Tensor | None = None,
    ) -> PreparedContext:
        """Project ``context [context_len, batch, d_model]`` into keys and
        values once, and turn the padding mask into an additive one.
        Padding is zeroed first: whatever it holds (even NaN or inf), it
        never reaches an output."""
        mask = None
        if context_padding_mask is not None:
            padding = context_padding_mask.t()[..., None]  # [len, batch, 1]
            context = context.masked_fill(padding, 0)
            mask = torch.zeros(
                padding.shape, dtype=context.dtype, device=context.device
            )
            mask = mask.masked_fill(padding, float("-inf"))
        key = self.key(context)  # [context_len, batch, heads, d_k]
        value = self.value(context)  # [context_len, batch, heads, d_k]
        return PreparedContext(key, value, mask)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | PreparedContext,
        context_padding_mask: torch.Tensor | None = None,
        *,
        need_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``x`` over ``context``: ``[batch, d_model]``, or with
        ``need_weights=True`` the pair ``(output, weights [context_len,
        batch, heads])``. A :class:`PreparedContext` (the transformer's
        loop passes one per layer) is used as it is; a tensor is checked
        and prepared here."""
        if not isinstance(context, PreparedContext):
            check_tensor("x", x, ["batch", "d_model"], [None, self.d_model])
            check_like("x", x, self.output.weight)
            check_context(
                context,
                context_padding_mask,
                d_model=self.d_model,
                batch=x.shape[0],
                reference=self.output.weight,
            )
            context = self.prepare(context, context_padding_mask)
        query = self.query(x)  # [batch, heads, d_k]
        scores = (query * context.key).sum(-1) * self.scale  # Q . K_i
        if context.mask is not None:
            scores = scores + context.mask  # -inf at padding
        attn = torch.softmax(scores, dim=0)  # over the context positions
        attn = self.dropout(attn)  # [context_len, batch, heads]
        # [batch, heads, d_k]
        out = (attn[..., None] * context.value).sum(0)
        out = self.output(out.reshape(out.shape[0], -1))  # [batch, d_model]
        return (out, attn) if need_weights else out


def check_context(
    context: object,
    context_padding_mask: object,
    *,
    d_model: int,
    batch: int,
    reference: torch.Tensor,
    batch_first: bool = False,
    input_name: str = "x",
) -> None:
    """Raise a clear error unless ``context`` is ``[context_len, batch,
    d_model]`` (``[batch, context_len, d_model]`` with ``batch_first``)
    like ``reference`` (a parameter), with the ``batch`` of the input
    called ``input_name``, and ``context_padding_mask`` is None or a bool
    ``[batch, context_len]`` leaving every row a position."""
    if batch_first:
        dims = ["batch", "context_len", "d_model"]
    else:
        dims = ["context_len", "batch", "d_model"]
    check_tensor("context", context, dims, [None, None, d_model])
    check_like("context", context, reference)
    context_batch = context.shape[dims.index("batch")]
    context_len = context.shape[dims.index("context_len")]
    if context_batch != batch:
        raise ValueError(
            f"batch sizes differ: {input_name} has batch {batch}, context "
            f"has batch {context_batch}"
        )
    if context_padding_mask is None:
        return
    mask = context_padding_mask
    check_tensor(
        "context_padding_mask",
        mask,
        ["batch", "context_len"],
        [batch, context_len],
    )
    if mask.dtype != torch.bool:
        raise TypeError(
            "context_padding_mask must be a bool tensor (True marks "
            "padding, as PyTorch's key_padding_mask), got dtype "
            f"{mask.dtype}"
        )
    if mask.device != context.device:
        raise ValueError(
            f"context_padding_mask is on device {mask.device} but context "
            f"is on {context.device}"
        )
    empty = mask.all(1).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            "context_padding_mask marks every position of batch row(s) "
            f"{empty} as padding; each row needs at least one context "
            "position to attend to (True marks padding)"
        )
