"""One layer of the feedback transformer, run one step at a time (chapter
5).

Parameter names and creation order follow
``labml_nn.transformers.feedback.FeedbackTransformerLayer``.
"""

from __future__ import annotations

import torch
from torch import nn

from feedback_lib.checks import check_positive_int, check_probability
from feedback_lib.model.attention import FeedbackAttention
from feedback_lib.model.cross_attention import (
    CrossAttention,
    PreparedContext,
)
from feedback_lib.model.feed_forward import FeedForward
from feedback_lib.model.scores import PositionTables


class FeedbackTransformerLayer(nn.Module):
    """A pre-norm layer: ``x + attn(LN(x), memory)``, then
    ``x + feed_forward(LN(x))`` (chapter 5).

    The attention block is skipped while there is no memory (the first
    step of a sequence). With ``cross_attn`` (chapter 11) a third block
    sits between the two, ``x + cross_attn(LN(x), context)``, at every
    step.

    Args:
        d_model: width of the model.
        attn: the :class:`~feedback_lib.FeedbackAttention` over the memory.
        feed_forward: the position-wise block, ``[..., d_model]`` in and
            out.
        dropout_prob: dropout on the output of each block.
        cross_attn: a :class:`~feedback_lib.CrossAttention`, or None.
    """

    def __init__(
        self,
        *,
        d_model: int,
        attn: FeedbackAttention,
        feed_forward: nn.Module,
        dropout_prob: float,
        cross_attn: CrossAttention | None = None,
    ):
        check_positive_int("d_model", d_model)
        check_probability("dropout_prob", dropout_prob)
        check_part("attn", attn, FeedbackAttention, d_model)
        check_part("feed_forward", feed_forward, nn.Module, d_model)
        if cross_attn is not None:
            check_part("cross_attn", cross_attn, CrossAttention, d_model)
        super().__init__()
        self.size = d_model
        self.attn = attn
        self.feed_forward = feed_forward
        self.dropout = nn.Dropout(dropout_prob)
        self.norm_self_attn = nn.LayerNorm([d_model])
        self.norm_ff = nn.LayerNorm([d_model])
        # None without cross-attention, so that labml's state_dict keys
        # stay.
        self.cross_attn = cross_attn
        self.norm_cross_attn = (
            None if cross_attn is None else nn.LayerNorm([d_model])
        )

    def forward(
        self,
        x: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        tables: PositionTables | None = None,
        context: torch.Tensor | PreparedContext | None = None,
    ) -> torch.Tensor:
        """One step: ``x [batch, d_model]`` -> ``[batch, d_model]``.

        ``key``/``value``: the memory as :class:`FeedbackAttention` takes
        it (None at the first step); ``tables``: the attention's position
        tables, cut once per call by the transformer; ``context``: what
        ``cross_attn`` reads (chapter 11), a :class:`PreparedContext` (the
        transformer prepares one per call, with its padding mask) or a
        context tensor without padding.
        """
        self.check_memory_and_context(key, value, context)
        if key is not None:  # a memory to attend to
            z = self.norm_self_attn(x)
            x = x + self.dropout(self.attn(z, key, value, tables=tables))
        if self.cross_attn is not None:
            z = self.norm_cross_attn(x)
            x = x + self.dropout(self.cross_attn(z, context))
        z = self.norm_ff(x)
        return x + self.dropout(self.feed_forward(z))

    def check_memory_and_context(
        self, key: object, value: object, context: object
    ) -> None:
        """Both of ``key`` and ``value`` or neither; a context exactly when
        the layer has cross-attention."""
        if (key is None) != (value is None):
            raise ValueError(
                "key and value must both be given (a memory) or both be "
                "None"
            )
        if (context is None) != (self.cross_attn is None):
            raise ValueError(
                "a layer with cross_attn needs a context, and a layer "
                "without it takes none"
            )


def check_part(name: str, module: object, cls: type, d_model: int) -> None:
    """Raise unless ``module`` is a ``cls`` built for ``d_model`` (a module
    without a ``d_model`` attribute cannot say its width and is trusted).
    """
    if not isinstance(module, cls):
        raise TypeError(
            f"{name} must be a {cls.__name__}, got {type(module).__name__}"
        )
    if getattr(module, "d_model", d_model) != d_model:
        raise ValueError(
            f"{name} was built for d_model={module.d_model} but the layer "
            f"has d_model={d_model}"
        )


def make_layer(
    d_model: int,
    heads: int,
    d_ff: int,
    dropout: float,
    *,
    is_kv_precomputed: bool = False,
    positions: str = "labml",
    cross_attention: bool = False,
) -> FeedbackTransformerLayer:
    """The layer of the library's models (``FeedbackLM``,
    ``SpanTransformerLM``) from their sizes, its parts created in labml's
    order (the cross-attention last), so that a seed gives labml's
    weights."""
    attn = FeedbackAttention(
        heads,
        d_model,
        dropout,
        is_kv_precomputed=is_kv_precomputed,
        positions=positions,
    )
    feed_forward = FeedForward(d_model, d_ff, dropout)
    cross_attn = None
    if cross_attention:
        cross_attn = CrossAttention(heads, d_model, dropout)
    return FeedbackTransformerLayer(
        d_model=d_model,
        attn=attn,
        feed_forward=feed_forward,
        dropout_prob=dropout,
        cross_attn=cross_attn,
    )
