"""Choosing the next token from logits: greedy, temperature and top-k sampling (chapter 9)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from feedback_lib.checks import check_positive_int, check_tensor


def check_sampling(temperature: float, top_k: int | None, generator: torch.Generator | None = None) -> None:
    """Raise a clear error unless ``temperature`` is a finite number >= 0, ``top_k`` is None or a
    positive integer and ``generator`` is None or a ``torch.Generator``."""
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of ``logits [batch, n_vocab]``; returns ids ``[batch, 1]``.

    ``temperature=0`` (or ``top_k=1``) is greedy decoding: the argmax. Otherwise the logits are
    divided by ``temperature``; with ``top_k`` set, only tokens whose logit is at least the
    ``top_k``-th largest can be drawn (ties with it included); a token is then drawn from the
    softmax, with ``generator`` for reproducible draws.
    """
    check_tensor("logits", logits, ["batch", "n_vocab"], [None, None])
    check_sampling(temperature, top_k, generator)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    # Shift by the maximum and divide in float64: even a tiny temperature then gives 0 for the
    # best token and -inf for the rest, never inf - inf.
    logits = logits.double()
    scaled = (logits - logits.max(dim=-1, keepdim=True).values) / temperature        # [batch, n_vocab]
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]                        # [batch, 1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)                                             # [batch, n_vocab]
    return torch.multinomial(probs, 1, generator=generator)                           # [batch, 1]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run a block with ``model`` in eval mode (no dropout), then restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def generate_stepwise(step: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor, max_new_tokens: int,
                      temperature: float = 1.0, top_k: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``prompt [batch, seq]`` with a model that caches what it has read (chapter 9).

    ``step(ids [batch, n])`` reads ``n`` more tokens after everything it read before and returns the
    logits of the last one ``[batch, n_vocab]``: the prompt is read once, then one call per new
    token. Returns ``[batch, seq + max_new_tokens]``.
    """
    check_positive_int("max_new_tokens", max_new_tokens)
    check_sampling(temperature, top_k, generator)
    tokens = [prompt]
    logits = step(prompt)                                                    # [batch, n_vocab]
    for i in range(max_new_tokens):
        tokens.append(sample_next_token(logits, temperature, top_k, generator))    # [batch, 1]
        if i + 1 < max_new_tokens:
            logits = step(tokens[-1])
    return torch.cat(tokens, dim=1)


def rereading_step(logits: Callable[[torch.Tensor], torch.Tensor], context: int
                   ) -> Callable[[torch.Tensor], torch.Tensor]:
    """A step function for :func:`generate_stepwise` that caches nothing (chapter 9): it keeps the
    tokens read so far and, at every call, runs ``logits(tokens [batch, seq]) -> [batch, seq, n_vocab]``
    on the last ``context`` of them again, returning the last position's logits ``[batch, n_vocab]``."""
    check_positive_int("context", context)
    tokens: torch.Tensor | None = None

    def step(ids: torch.Tensor) -> torch.Tensor:
        nonlocal tokens
        tokens = (ids if tokens is None else torch.cat([tokens, ids], dim=1))[:, -context:]
        return logits(tokens)[:, -1]

    return step


def generate_by_rereading(model: nn.Module, prompt: torch.Tensor, max_new_tokens: int, context: int,
                          temperature: float = 1.0, top_k: int | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue ``prompt [batch, seq]`` with a parallel model that re-reads its context (the last
    ``context`` tokens, through ``model.logits``) for every new token; returns
    ``[batch, seq + max_new_tokens]``. Runs in eval mode and restores the previous mode."""
    with eval_mode(model):
        return generate_stepwise(rereading_step(model.logits, context), prompt, max_new_tokens,
                                 temperature, top_k, generator)
