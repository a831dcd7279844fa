"""Choosing the next token from logits: greedy, temperature and top-k sampling (generation chapter)."""

from __future__ import annotations

import torch


def check_sampling(temperature: float, top_k: int | None) -> None:
    """Raise a clear error unless ``temperature >= 0`` and ``top_k`` is None or a positive integer."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits [batch, n_vocab]``; returns ids ``[batch, 1]``.

    ``temperature=0`` (or ``top_k=1``) is greedy decoding: the argmax. Otherwise the logits are
    divided by ``temperature``, all but the ``top_k`` largest are dropped when ``top_k`` is set,
    and a token is drawn from the softmax (with ``generator`` for reproducible draws).
    """
    check_sampling(temperature, top_k)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]          # [batch, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)                                 # [batch, n_vocab]
    return torch.multinomial(probs, 1, generator=generator)              # [batch, 1]
