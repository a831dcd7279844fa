"""The parallel baseline: a causal Transformer language model of the same width and depth.

A standard (pre-norm) Transformer decoder sees the whole training sequence at once, so it trains
with a few large matrix products instead of one small step per token. Chapter 1 and the benchmark
chapter compare it with the feedback transformer. It uses ``torch.nn.TransformerEncoder`` with a
causal mask and learned absolute position embeddings. It generates in two ways (chapter 9): by
re-reading the whole context for every new token (the default), or with a per-layer key/value cache
(``kv_cache=True``, :class:`~feedback_lib.kv_cache.KVCacheDecoder`), the fair comparison for the
feedback transformer's cached memory.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from feedback_lib.checks import check_bool, check_positive_int, check_probability, check_token_ids
from feedback_lib.generation import eval_mode, generate_stepwise, rereading_step
from feedback_lib.kv_cache import KVCacheDecoder


class ParallelLM(nn.Module):
    """Embedding + positions -> causal ``nn.TransformerEncoder`` -> LayerNorm -> linear head.

    Args:
        n_vocab: vocabulary size.
        d_model, heads, n_layers, d_ff: width, attention heads, depth and feed-forward width.
        dropout: dropout in every layer.
        max_len: the longest sequence (number of learned positions); generation keeps the last
            ``max_len`` tokens as its context.

    Shapes: token ids ``[batch, seq]`` in, logits ``[batch, seq, n_vocab]`` out, as
    :class:`~feedback_lib.FeedbackLM`.
    """

    def __init__(self, n_vocab: int, *, d_model: int, heads: int, n_layers: int, d_ff: int,
                 dropout: float = 0.0, max_len: int = 1024):
        for name, value in (("n_vocab", n_vocab), ("d_model", d_model), ("heads", heads),
                            ("n_layers", n_layers), ("d_ff", d_ff), ("max_len", max_len)):
            check_positive_int(name, value)
        check_probability("dropout", dropout)
        if d_model % heads:
            raise ValueError(f"d_model must be divisible by heads, got d_model={d_model}, heads={heads}")
        super().__init__()
        self.config = dict(n_vocab=n_vocab, d_model=d_model, heads=heads, n_layers=n_layers, d_ff=d_ff,
                           dropout=dropout, max_len=max_len)
        self.embed = nn.Embedding(n_vocab, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, d_ff, dropout=dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_vocab)
        self.n_vocab = n_vocab
        self.max_len = max_len

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, n_vocab]``; position ``t`` sees tokens ``0..t`` only."""
        check_token_ids("tokens", tokens, self.n_vocab, self.head.weight.device)
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens has {tokens.shape[1]} positions, more than max_len={self.max_len}")
        return self.logits(tokens)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without the checks."""
        seq = tokens.shape[1]
        x = self.embed(tokens) + self.positions.weight[:seq]                    # [batch, seq, d_model]
        mask = nn.Transformer.generate_square_subsequent_mask(seq, device=tokens.device, dtype=x.dtype)
        return self.head(self.norm(self.encoder(x, mask=mask, is_causal=True)))

    def decoder(self, batch: int, capacity: int) -> KVCacheDecoder:
        """A per-layer key/value cache for reading up to ``capacity`` tokens one call after another
        (the model must be in eval mode)."""
        return KVCacheDecoder(self, batch, capacity)

    def stepper(self, batch: int, capacity: int, *, kv_cache: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        """A step function for :func:`~feedback_lib.generation.generate_stepwise` (chapter 9):
        ``step(ids [batch, n])`` reads ``n`` more tokens and returns the last one's logits
        ``[batch, n_vocab]``, over a key/value cache of ``capacity`` tokens, or by re-reading the
        last ``max_len`` tokens (``kv_cache=False``; ``capacity`` is then not used)."""
        check_bool("kv_cache", kv_cache)
        if not kv_cache:
            return rereading_step(self.logits, self.max_len)
        decoder = self.decoder(batch, capacity)
        return lambda ids: decoder.step(ids)[:, -1]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, *, generator: torch.Generator | None = None,
                 kv_cache: bool = False) -> torch.Tensor:
        """Continue ``prompt [batch, seq]`` by ``max_new_tokens`` tokens; same sampling options as
        ``FeedbackLM.generate``.

        By default every new token re-reads the context (the last ``max_len`` tokens). With
        ``kv_cache=True`` the prompt is read once and each new token is one step over the cached
        keys and values of every layer; prompt and new tokens must then fit in ``max_len``.
        """
        check_token_ids("prompt", prompt, self.n_vocab, self.head.weight.device)
        check_bool("kv_cache", kv_cache)
        check_positive_int("max_new_tokens", max_new_tokens)
        # The last token sampled is never read back, so a cache needs one row fewer.
        capacity = prompt.shape[1] + max_new_tokens - 1
        if kv_cache and capacity > self.max_len:
            raise ValueError(f"a prompt of {prompt.shape[1]} tokens plus max_new_tokens={max_new_tokens} needs "
                             f"{capacity} positions with kv_cache=True, more than max_len={self.max_len}")
        with eval_mode(self):
            step = self.stepper(prompt.shape[0], capacity, kv_cache=kv_cache)
            return generate_stepwise(step, prompt, max_new_tokens, temperature, top_k, generator)
