"""The parallel baseline: a causal Transformer language model of the same
width and depth (chapters 1, 8, 9 and 12).

A standard (pre-norm) Transformer sees the whole training sequence at
once, so it trains with a few large matrix products instead of one small
step per token. It uses ``torch.nn.TransformerEncoder`` with a causal
mask and learned absolute positions, and generates either by re-reading
its context for every new token or with a per-layer key/value cache
(``kv_cache=True``), the fair comparison for the feedback memory.
"""

from __future__ import annotations

import torch
from torch import nn

from feedback_lib.baselines.kv_cache import KVCacheDecoder
from feedback_lib.checks import (
    check_bool,
    check_heads,
    check_positive_int,
    check_probability,
    check_token_ids,
)
from feedback_lib.decoding import Decoder, GenerationMixin, RereadingDecoder


class ParallelLM(GenerationMixin, nn.Module):
    """Embedding + positions -> causal ``nn.TransformerEncoder`` ->
    LayerNorm -> linear head.

    Args:
        n_vocab: vocabulary size.
        d_model, heads, n_layers, d_ff: width, heads, depth and the
            feed-forward width.
        dropout: dropout in every layer.
        max_len: the number of learned positions; generation without a
            cache keeps the last ``max_len`` tokens as its context.

    Shapes: token ids ``[batch, seq]`` in, logits ``[batch, seq,
    n_vocab]`` out, as :class:`~feedback_lib.FeedbackLM`.
    """

    def __init__(
        self,
        n_vocab: int,
        *,
        d_model: int,
        heads: int,
        n_layers: int,
        d_ff: int,
        dropout: float = 0.0,
        max_len: int = 1024,
    ):
        for name, value in (
            ("n_vocab", n_vocab),
            ("n_layers", n_layers),
            ("d_ff", d_ff),
            ("max_len", max_len),
        ):
            check_positive_int(name, value)
        check_heads(heads, d_model)
        check_probability("dropout", dropout)
        super().__init__()
        self.config = dict(
            n_vocab=n_vocab,
            d_model=d_model,
            heads=heads,
            n_layers=n_layers,
            d_ff=d_ff,
            dropout=dropout,
            max_len=max_len,
        )
        self.embed = nn.Embedding(n_vocab, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model,
            heads,
            d_ff,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer, n_layers, enable_nested_tensor=False
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_vocab)
        self.n_vocab, self.max_len = n_vocab, max_len

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, n_vocab]``; position ``t`` sees tokens
        ``0..t`` only."""
        check_token_ids(
            "tokens", tokens, self.n_vocab, self.head.weight.device
        )
        if tokens.shape[1] > self.max_len:
            raise ValueError(
                f"tokens has {tokens.shape[1]} positions, more than "
                f"max_len={self.max_len}"
            )
        return self.logits(tokens)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without the checks (its decoders call it)."""
        seq = tokens.shape[1]
        # [batch, seq, d_model]
        x = self.embed(tokens) + self.positions.weight[:seq]
        mask = nn.Transformer.generate_square_subsequent_mask(
            seq, device=tokens.device, dtype=x.dtype
        )
        x = self.encoder(x, mask=mask, is_causal=True)
        return self.head(self.norm(x))

    def decoder(
        self, batch: int, capacity: int, *, kv_cache: bool = False
    ) -> Decoder:
        """A decoder for ``batch`` texts of at most ``capacity`` tokens
        (chapter 9): a per-layer key/value cache (``capacity <= max_len``,
        eval mode), or by default one that re-reads the last ``max_len``
        tokens at every step."""
        check_bool("kv_cache", kv_cache)
        if kv_cache:
            return KVCacheDecoder(self, batch, capacity)
        return RereadingDecoder(
            self.logits,
            self.max_len,
            batch=batch,
            capacity=capacity,
            n_vocab=self.n_vocab,
            device=self.head.weight.device,
        )
