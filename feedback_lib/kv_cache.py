"""The fair baseline for fast prediction: a parallel transformer with a per-layer key/value cache.

A standard transformer generating token ``t`` does not need to re-read tokens ``0..t-1``: their
keys and values in every layer do not change, so it keeps them and computes only the new token's
query, key and value per layer. This is how production decoders generate, and the comparison the
feedback transformer's cached memory deserves (chapter 9). The cache holds two vectors of
``d_model`` numbers per token **per layer**; the shared key/value feedback model holds two per
token for all layers together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from feedback_lib.checks import check_positive_int

if TYPE_CHECKING:
    from feedback_lib.parallel import ParallelLM


class KVCacheDecoder:
    """Token-by-token inference of a :class:`~feedback_lib.ParallelLM` over per-layer caches.

    Each layer's keys and values live in one preallocated buffer
    ``[n_layers, batch, heads, capacity, d_k]``; :meth:`step` appends the new tokens' keys and
    values and attends over everything cached so far. The logits equal those of
    ``model.logits`` on the whole text read so far (the test suite checks this). The model must
    be in eval mode (no dropout), and at most ``capacity <= model.max_len`` tokens can be read,
    since the learned absolute positions end there.

    Built by ``ParallelLM.decoder(batch, capacity)``.
    """

    def __init__(self, model: "ParallelLM", batch: int, capacity: int):
        check_positive_int("batch", batch)
        check_positive_int("capacity", capacity)
        if capacity > model.max_len:
            raise ValueError(f"capacity={capacity} is more than the model's max_len={model.max_len} learned "
                             f"positions; a key/value cache cannot slide past them (generate fewer tokens)")
        if model.training:
            raise ValueError("the key/value cache is for inference: call model.eval() first (dropout would "
                             "make the cached keys and values differ from a full forward pass)")
        self.model = model
        config = model.config
        self.heads, self.d_k = config["heads"], config["d_model"] // config["heads"]
        weight = model.head.weight
        shape = (config["n_layers"], batch, self.heads, capacity, self.d_k)
        self.keys = weight.new_empty(shape)                      # [n_layers, batch, heads, capacity, d_k]
        self.values = weight.new_empty(shape)
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the cache's buffers (keys and values of every layer, at full capacity)."""
        return self.keys.nbytes + self.values.nbytes

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Read ``tokens [batch, n]`` after everything read before; returns their logits ``[batch, n, n_vocab]``."""
        batch = self.keys.shape[1]
        if tokens.dim() != 2 or tokens.shape[0] != batch:
            raise ValueError(f"tokens must be [batch={batch}, n] token ids, got shape {tuple(tokens.shape)}")
        model = self.model
        start, end = self.length, self.length + tokens.shape[1]
        if end > self.keys.shape[3]:
            raise ValueError(f"the cache holds {self.keys.shape[3]} tokens; {start} are used and "
                             f"{tokens.shape[1]} more do not fit")
        x = model.embed(tokens) + model.positions.weight[start:end]                 # [batch, n, d_model]
        # New token i (at position start + i) sees cached positions 0..start + i.
        rows = torch.arange(start, end, device=x.device)[:, None]
        mask = None if end - start == 1 else torch.arange(end, device=x.device) <= rows     # [n, end]
        for i, layer in enumerate(model.encoder.layers):
            attn = layer.self_attn
            # Pre-norm self-attention block: one projection gives the new queries, keys and values.
            qkv = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias)  # [batch, n, 3 * d_model]
            q, k, v = (t.unflatten(-1, (self.heads, self.d_k)).transpose(1, 2)      # [batch, heads, n, d_k]
                       for t in qkv.chunk(3, dim=-1))
            self.keys[i, :, :, start:end] = k
            self.values[i, :, :, start:end] = v
            out = F.scaled_dot_product_attention(q, self.keys[i, :, :, :end], self.values[i, :, :, :end],
                                                 attn_mask=mask)                   # [batch, heads, n, d_k]
            x = x + attn.out_proj(out.transpose(1, 2).flatten(2))                   # [batch, n, d_model]
            # Pre-norm feed-forward block.
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        self.length = end
        return model.head(model.norm(x))                                            # [batch, n, n_vocab]
