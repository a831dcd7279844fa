"""The Transformer baseline of the paper's algorithmic task: every layer
attends to the ``span`` positions before each token, over segments
(chapter 10).

This is the model the authors compare against (``TransformerSeq`` in
facebookresearch/transformer-sequential): a pre-norm Transformer whose
layer ``l`` reads the layer-``l - 1`` states of the last ``span``
positions (not the token's own), with relative position scores, and
which carries those states from one segment to the next (as
Transformer-XL does). Its layers are :class:`FeedbackTransformerLayer`
parts (the same attention, position scores and feed-forward block as the
feedback model) run over a whole segment at once: only what the memory
holds differs. Position ``t``'s output depends on the tokens
``t - n_layers * span .. t``: the receptive field of chapter 10.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from feedback_lib.checks import (
    check_bool,
    check_like,
    check_positive_int,
    check_probability,
    check_tensor,
    check_token_ids,
)
from feedback_lib.model.attention import FeedbackAttention
from feedback_lib.model.layer import FeedbackTransformerLayer, make_layer
from feedback_lib.model.memory import FeedbackMemory
from feedback_lib.model.scores import MAX_POSITIONS


class SpanTransformerLM(nn.Module):
    """Embedding -> ``n_layers`` span-limited layers -> LayerNorm -> head.

    Args:
        n_vocab, d_model, heads, n_layers, d_ff, dropout: as for
            :class:`~feedback_lib.FeedbackLM`.
        span: how many earlier positions each layer attends to (the
            paper's attention span tau).
        positions: the position scores, ``"paper"`` (default, the
            authors' ``q.k + q.p``) or ``"labml"``.

    Shapes: token ids ``[batch, seq]`` in, logits ``[batch, seq,
    n_vocab]`` out. The memory it carries (``return_memory=True``) holds
    each layer's inputs at the last ``span`` positions, ``[length, batch,
    d_model]`` per layer.
    """

    def __init__(
        self,
        n_vocab: int,
        *,
        d_model: int,
        heads: int,
        n_layers: int,
        d_ff: int,
        span: int,
        dropout: float = 0.0,
        positions: str = "paper",
    ):
        for name, value in (
            ("n_vocab", n_vocab),
            ("n_layers", n_layers),
            ("span", span),
        ):
            check_positive_int(name, value)
        if span > MAX_POSITIONS:
            raise ValueError(
                f"span must be at most {MAX_POSITIONS} (the number of "
                f"relative positions), got {span}"
            )
        check_probability("dropout", dropout)
        super().__init__()
        self.config = dict(
            n_vocab=n_vocab,
            d_model=d_model,
            heads=heads,
            n_layers=n_layers,
            d_ff=d_ff,
            span=span,
            dropout=dropout,
            positions=positions,
        )
        layer = make_layer(
            d_model, heads, d_ff, dropout, positions=positions
        )
        self.embed = nn.Embedding(n_vocab, d_model)
        self.layers = nn.ModuleList(
            [copy.deepcopy(layer) for _ in range(n_layers)]
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_vocab)
        self.n_vocab, self.d_model, self.span = n_vocab, d_model, span

    def forward(
        self,
        tokens: torch.Tensor,
        memory: FeedbackMemory | None = None,
        return_memory: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, FeedbackMemory]:
        """Logits ``[batch, seq, n_vocab]`` of ``tokens [batch, seq]``;
        ``memory`` (from a call with ``return_memory=True``) continues the
        text, so that position 0 of this segment sees the last ``span``
        positions of the previous one."""
        check_token_ids(
            "tokens", tokens, self.n_vocab, self.head.weight.device
        )
        check_bool("return_memory", return_memory)
        self.check_memory(memory, tokens.shape[0])
        x = self.embed(tokens.t())  # time-major  [seq, batch, d_model]
        past = (
            [x[:0]] * len(self.layers) if memory is None else memory.tensors
        )
        kept = []
        for layer, before in zip(self.layers, past):
            inputs = torch.cat([before, x])  # [length + seq, batch, d]
            kept.append(inputs[-self.span :])
            x = span_layer(layer, x, inputs, self.span)
        logits = self.head(self.norm(x)).transpose(0, 1)
        if not return_memory:
            return logits
        return logits, FeedbackMemory(tuple(kept), self.signature)

    @property
    def signature(self) -> tuple:
        """The configuration a carried memory must come from."""
        return (type(self).__name__, len(self.layers), self.d_model)

    def check_memory(self, memory: object, batch: int) -> None:
        """Raise unless ``memory`` is None or this model's memory for an
        input of ``batch`` rows."""
        if memory is None:
            return
        if not isinstance(memory, FeedbackMemory) or (
            memory.signature != self.signature
        ):
            raise TypeError(
                "memory must be what this model returned with "
                "return_memory=True"
            )
        for tensor in memory.tensors:
            check_tensor(
                "memory",
                tensor,
                ["length", "batch", "d_model"],
                [None, batch, self.d_model],
            )
            check_like("memory", tensor, self.head.weight)
            if len(tensor) > self.span:
                raise ValueError(
                    f"memory holds {len(tensor)} positions, more than "
                    f"span={self.span}"
                )


def span_layer(
    layer: FeedbackTransformerLayer,
    x: torch.Tensor,
    inputs: torch.Tensor,
    span: int,
) -> torch.Tensor:
    """One layer over a segment: ``x [seq, batch, d_model]`` (the last
    ``seq`` rows of ``inputs [length + seq, batch, d_model]``) attends to
    the ``span`` rows of ``inputs`` before each position; a position
    with none (the first of a text) skips the attention block, as the
    feedback layer does at its first step."""
    attn = layer.attn
    z = layer.norm_self_attn(inputs)  # pre-norm keys, values and queries
    query = attn.query(z[-len(x) :])  # [seq, batch, heads, d_k]
    key, value = attn.key(z), attn.value(z)  # [length + seq, ...]
    scores, allowed = span_scores(attn, query, key, span)
    scores = scores.masked_fill(~allowed, float("-inf")) * attn.scale
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    weights = attn.dropout(weights)  # [batch, heads, seq, length + seq]
    out = torch.einsum("bhij,jbhd->ibhd", weights, value)
    out = attn.output(out.flatten(2))  # [seq, batch, d_model]
    has_memory = allowed[0, 0].any(-1)[:, None, None]  # [seq, 1, 1]
    x = x + layer.dropout(out) * has_memory
    return x + layer.dropout(layer.feed_forward(layer.norm_ff(x)))


def span_scores(
    attn: FeedbackAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    span: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unscaled scores of every query of a segment over every key,
    the same ``e_j`` as :func:`~feedback_lib.model.scores.relative_scores`
    computes for one query: ``query [seq, batch, heads, d_k]`` (the last
    ``seq`` of the ``n`` positions of ``key [n, batch, heads, d_k]``) ->
    ``(scores [batch, heads, seq, n], allowed [1, 1, seq, n])``, where
    ``allowed`` marks the keys ``1..span`` positions back."""
    seq, n = len(query), len(key)
    tables = attn.position_tables(span)  # column c: distance span - c
    content = torch.einsum(
        "ibhd,jbhd->bhij", query + attn.query_pos_bias, key
    )  # A + C
    by_distance = torch.einsum("ibhd,hdc->bhic", query, tables.key_pos_emb)
    by_distance = by_distance + tables.key_pos_bias[None]  # B + D
    rows = torch.arange(n - seq, n, device=key.device)[:, None]
    distance = rows - torch.arange(n, device=key.device)  # [seq, n]
    allowed = (distance >= 1) & (distance <= span)
    column = (span - distance).clamp(0, span - 1)
    positions = by_distance.gather(
        -1, column.expand(*by_distance.shape[:2], seq, n)
    )
    return content + positions, allowed[None, None]
