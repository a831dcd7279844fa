"""Generation for every model of the book, through one protocol (chapter 9).

A :class:`Decoder` reads token ids call after call and returns the logits
of the last token read: the prompt in one call, then one call per new
token. Every model that generates has a ``decoder(batch, capacity)``
method returning one:

* :class:`~feedback_lib.FeedbackLM`: the cached feedback memory;
* :class:`~feedback_lib.ParallelLM`: a per-layer key/value cache
  (``kv_cache=True``), or a :class:`RereadingDecoder`;
* :class:`~feedback_lib.ParallelTwinLM`: a :class:`RereadingDecoder`.

:func:`generate_from` is the one generation loop, which
:meth:`GenerationMixin.generate` gives every model as its ``generate``;
:func:`sample_next_token` picks each token (greedy, temperature and top-k
sampling).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Callable, Iterator

import torch
from torch import nn

from feedback_lib.checks import (
    check_positive_int,
    check_tensor,
    check_token_ids,
    is_integer,
)


def check_sampling(
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None = None,
) -> None:
    """Raise a clear error unless ``temperature`` is a finite number >= 0,
    ``top_k`` None or a positive integer (Python's or NumPy's) and
    ``generator`` None or a ``torch.Generator``."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature < 0
    ):
        raise ValueError(
            "temperature must be a finite number >= 0 (0 means greedy), "
            f"got {temperature!r}"
        )
    if top_k is not None and (not is_integer(top_k) or top_k < 1):
        raise ValueError(
            f"top_k must be None or an integer >= 1, got {top_k!r}"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be None or a torch.Generator, got "
            f"{type(generator).__name__}"
        )


def check_logits(logits: object) -> None:
    """Raise a clear error unless ``logits`` is a float ``[batch,
    n_vocab]`` tensor whose every row can pick a token: no NaN, and not
    all ``-inf``."""
    check_tensor("logits", logits, ["batch", "n_vocab"], [None, None])
    if logits.is_meta:
        raise ValueError(
            "logits is on the meta device: it holds no values to pick from"
        )
    if not logits.is_floating_point():
        raise TypeError(
            f"logits must be a floating-point tensor, got {logits.dtype}"
        )
    nan = logits.isnan().any(-1)  # [batch]
    empty = logits.amax(-1) == float("-inf")
    if (nan | empty).any():
        kind, rows, hint = (
            ("NaN", nan, "the model's outputs are not finite")
            if nan.any()
            else ("only -inf", empty, "every token is masked out")
        )
        listed = rows.nonzero().flatten().tolist()
        raise ValueError(
            f"logits has {kind} in row(s) {listed}: no token can be picked "
            f"there ({hint})"
        )


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits [batch, n_vocab]``: ids
    ``[batch, 1]``.

    ``temperature=0`` (or ``top_k=1``) is greedy decoding, the argmax.
    Otherwise the logits are divided by ``temperature``; with ``top_k``,
    only tokens whose logit is at least the ``top_k``-th largest can be
    drawn (ties included); a token is drawn from the softmax, with
    ``generator`` for reproducible draws. A ``+inf`` logit is certain:
    one of the row's ``+inf`` tokens is drawn. Rows with NaN or only
    ``-inf`` are an error.
    """
    check_logits(logits)
    check_sampling(temperature, top_k, generator)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1, keepdim=True)
    # Shifted by the maximum and divided in float64: even a tiny
    # temperature gives 0 for the best token and -inf for the rest.
    logits = logits.double()
    best = logits.max(dim=-1, keepdim=True).values  # [batch, 1]
    scaled = torch.where(
        best.isinf(),  # a +inf maximum: its tokens get 0, the rest -inf
        (logits == best).double().log(),
        (logits - best) / temperature,
    )  # [batch, n_vocab]
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(scaled, int(top_k), dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)  # [batch, n_vocab]
    return torch.multinomial(probs, 1, generator=generator)  # [batch, 1]


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of ``device`` (the CPU's physical memory, a GPU's
    total), or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return None


def check_output_fits(
    batch: int, length: int, max_new_tokens: int, device: torch.device
) -> None:
    """Raise, naming ``max_new_tokens``, unless the ids ``generate`` returns
    (``[batch, length + max_new_tokens]``, int64) fit in the memory of
    ``device``: no memory window makes a larger request possible, and
    refusing it at once beats failing after hours of generation."""
    total = batch * (length + max_new_tokens) * 8  # bytes of int64 ids
    available = device_memory(device)
    if available is not None and total > available:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} asks for "
            f"{total / 2**30:,.0f} GiB of token ids, more than the "
            f"{available / 2**30:,.0f} GiB of memory of {device}; generate "
            "fewer tokens"
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run a block with ``model`` in eval mode (no dropout), then restore
    its previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Decoder:
    """Reads ``batch`` token sequences call after call, at most
    ``capacity`` tokens each; :meth:`step` returns the logits of the last
    token read. Every step checks its tokens against what the decoder
    was built for before anything runs; a subclass implements
    :meth:`read`."""

    def __init__(
        self,
        *,
        batch: int,
        capacity: int,
        n_vocab: int,
        device: torch.device,
    ):
        self.batch = check_positive_int("batch", batch)
        self.capacity = check_positive_int("capacity", capacity)
        self.n_vocab, self.device = n_vocab, device
        self.length = 0  # tokens read so far

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Read ``tokens [batch, n]`` after everything read before;
        returns the last one's logits ``[batch, n_vocab]``."""
        check_token_ids("tokens", tokens, self.n_vocab, self.device)
        batch, n = tokens.shape
        if batch != self.batch:
            raise ValueError(
                f"tokens has batch {batch}, but the decoder was built for "
                f"batch {self.batch}"
            )
        if self.length + n > self.capacity:
            raise ValueError(
                f"tokens has {n} tokens, but the decoder has room for "
                f"{self.capacity - self.length} more ({self.length} of "
                f"{self.capacity} read); build it with a larger capacity"
            )
        logits = self.read(tokens)
        self.length += n
        return logits

    def read(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`step` after the checks (each kind of model's own)."""
        raise NotImplementedError


class RereadingDecoder(Decoder):
    """A decoder that caches nothing: at every call it runs ``logits(ids
    [batch, seq]) -> [batch, seq, n_vocab]`` again on the last ``context``
    tokens read (chapter 9's baseline)."""

    def __init__(
        self,
        logits: Callable[[torch.Tensor], torch.Tensor],
        context: int,
        *,
        batch: int,
        capacity: int,
        n_vocab: int,
        device: torch.device,
    ):
        super().__init__(
            batch=batch, capacity=capacity, n_vocab=n_vocab, device=device
        )
        self.logits = logits
        self.context = check_positive_int("context", context)
        self.tokens: torch.Tensor | None = None

    def read(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tokens is not None:
            tokens = torch.cat([self.tokens, tokens], dim=1)
        self.tokens = tokens[:, -self.context :]
        return self.logits(self.tokens)[:, -1]


class GenerationMixin:
    """``generate`` for every model with a ``decoder(batch, capacity,
    **options)`` method (chapter 9)."""

    @torch.no_grad()
    def generate(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        generator: torch.Generator | None = None,
        **options,
    ) -> torch.Tensor:
        """Continue ``prompt [batch, seq]`` by ``max_new_tokens`` tokens:
        ``[batch, seq + max_new_tokens]``.

        The prompt is read once; each new token is then one step of the
        model's decoder. ``temperature=0`` (or ``top_k=1``) is greedy;
        ``generator`` makes sampling reproducible; ``options`` go to the
        model's ``decoder`` (e.g. a ``context``). Runs in eval mode and
        restores the previous mode.
        """
        device = next(self.parameters()).device
        check_token_ids("prompt", prompt, self.n_vocab, device)
        max_new_tokens = check_positive_int(
            "max_new_tokens", max_new_tokens
        )
        check_sampling(temperature, top_k, generator)
        check_output_fits(*prompt.shape, max_new_tokens, device)
        # The last token sampled is never read back: one row fewer.
        capacity = prompt.shape[1] + max_new_tokens - 1
        with eval_mode(self):
            decoder = self.decoder(prompt.shape[0], capacity, **options)
            return generate_from(
                decoder,
                prompt,
                max_new_tokens,
                temperature,
                top_k,
                generator,
            )


@torch.no_grad()
def generate_from(
    decoder: Decoder,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The generation loop: ``decoder`` reads ``prompt [batch, seq]``, then
    each sampled token in turn; returns ``[batch, seq + max_new_tokens]``.
    """
    tokens = [prompt]
    logits = decoder.step(prompt)  # [batch, n_vocab]
    for i in range(max_new_tokens):
        tokens.append(
            sample_next_token(logits, temperature, top_k, generator)
        )  # [batch, 1]
        if i + 1 < max_new_tokens:
            logits = decoder.step(tokens[-1])
    return torch.cat(tokens, dim=1)
