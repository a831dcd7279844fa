"""The fair baseline for fast prediction: a per-layer key/value cache for
:class:`~feedback_lib.ParallelLM` (chapter 9).

A standard transformer generating token ``t`` need not re-read tokens
``0..t-1``: their keys and values in every layer do not change, so it
keeps them and computes only the new token's query, key and value per
layer, as production decoders do. The cache holds two vectors of
``d_model`` numbers per token **per layer**; the shared key/value feedback
model holds two per token for all layers together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from feedback_lib.decoding import Decoder


class KVCacheDecoder(Decoder):
    """Token-by-token inference of a ``ParallelLM`` over per-layer caches.

    Each layer's keys and values live in one preallocated buffer
    ``[n_layers, batch, heads, capacity, d_k]``; :meth:`read` appends the
    new tokens' keys and values and attends over everything cached. The
    logits equal those of the model on the whole text read so far (the
    tests check this). The model must be in eval mode, and ``capacity``
    at most its ``max_len`` learned positions.
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int):
        super().__init__(
            batch=batch,
            capacity=capacity,
            n_vocab=model.n_vocab,
            device=model.head.weight.device,
        )
        if capacity > model.max_len:
            raise ValueError(
                f"capacity={capacity} is more than the model's "
                f"max_len={model.max_len} learned positions; a key/value "
                "cache cannot slide past them (generate fewer tokens)"
            )
        if model.training:
            raise ValueError(
                "the key/value cache is for inference: call model.eval() "
                "first (dropout would make the cached keys and values "
                "differ from a full forward pass)"
            )
        self.model = model
        config = model.config
        self.heads = config["heads"]
        self.d_k = config["d_model"] // config["heads"]
        shape = (config["n_layers"], batch, self.heads, capacity, self.d_k)
        weight = model.head.weight
        # [n_layers, batch, heads, capacity, d_k]
        self.keys = weight.new_zeros(shape)
        self.values = weight.new_zeros(shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the cache (keys and values of every layer, full)."""
        return self.keys.nbytes + self.values.nbytes

    def read(self, tokens: torch.Tensor) -> torch.Tensor:
        model = self.model
        start, end = self.length, self.length + tokens.shape[1]
        # [batch, n, d_model]
        x = model.embed(tokens) + model.positions.weight[start:end]
        # New token i (at position start + i) sees positions 0..start + i;
        # a single new token sees everything cached (no mask needed).
        mask = None
        if end - start > 1:
            rows = torch.arange(start, end, device=x.device)[:, None]
            mask = torch.arange(end, device=x.device) <= rows  # [n, end]
        for i, layer in enumerate(model.encoder.layers):
            attn = layer.self_attn
            # Pre-norm attention: one product gives the new Q, K and V.
            qkv = F.linear(
                layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias
            )  # [batch, n, 3 * d_model]
            q, k, v = (
                t.unflatten(-1, (self.heads, self.d_k)).transpose(1, 2)
                for t in qkv.chunk(3, dim=-1)
            )  # [batch, heads, n, d_k]
            self.keys[i, :, :, start:end] = k
            self.values[i, :, :, start:end] = v
            out = F.scaled_dot_product_attention(
                q,
                self.keys[i, :, :, :end],
                self.values[i, :, :, :end],
                attn_mask=mask,
            )  # [batch, heads, n, d_k]
            x = x + attn.out_proj(out.transpose(1, 2).flatten(2))
            # Pre-norm feed-forward block.
            ff = layer.linear2(
                layer.activation(layer.linear1(layer.norm2(x)))
            )
            x = x + ff  # [batch, n, d_model]
        return model.head(model.norm(x[:, -1]))  # [batch, n_vocab]
