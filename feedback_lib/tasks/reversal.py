"""A feedback decoder reading an encoder: the sequence-reversal task of
chapter 11.

The task: read a source sequence of symbols (3 to 8 of them, say) and write
it backwards. The decoder cannot do it from its own tokens alone; it must
find, at every step, the right source position through cross-attention,
which makes the learned attention easy to read (an anti-diagonal).

* :class:`ReversalTask` draws batches (deterministic from a
  ``torch.Generator``): source ids ``[batch, src_len]`` padded with
  :data:`PAD`, their padding mask, and the target ``[BOS, reversed source,
  EOS, PAD...]`` ``[batch, src_len + 2]``.
* :class:`SourceEncoder`: embedding + learned positions +
  ``nn.TransformerEncoder``, batch-major.
* :class:`EncoderDecoder`: the encoder and a
  ``FeedbackLM(cross_attention=True)`` decoder, its loss, greedy decoding
  and exact-match accuracy; :func:`train` trains it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from feedback_lib.checks import (
    check_positive_int,
    check_probability,
    check_token_ids,
)
from feedback_lib.decoding import eval_mode
from feedback_lib.model.lm import FeedbackLM
from feedback_lib.training.loop import fit, optimizer_and_schedule

#: Ids of the padding, begin and end tokens; the task's symbols are the ids
# after them.
PAD, BOS, EOS = 0, 1, 2
N_SPECIAL = 3


@dataclass(frozen=True)
class ReversalBatch:
    """One batch of the reversal task (all batch-major).

    ``source [batch, src_len]``: symbol ids, then :data:`PAD`;
    ``source_padding_mask [batch, src_len]``: True at the padding; ``target
    [batch, src_len + 2]``: :data:`BOS`, the reversed source, :data:`EOS`,
    then :data:`PAD`. ``src_len`` is the longest source of the batch.
    """

    source: torch.Tensor
    source_padding_mask: torch.Tensor
    target: torch.Tensor


@dataclass(frozen=True)
class ReversalTask:
    """Sources of ``min_len`` to ``max_len`` symbols, each drawn uniformly
    from ``n_symbols``."""

    n_symbols: int = 10
    min_len: int = 3
    max_len: int = 8

    def __post_init__(self):
        for name in ("n_symbols", "min_len", "max_len"):
            check_positive_int(name, getattr(self, name))
        if self.min_len > self.max_len:
            raise ValueError(
                "min_len must be at most max_len, got "
                f"min_len={self.min_len}, max_len={self.max_len}"
            )

    @property
    def n_vocab(self) -> int:
        """Vocabulary size: the special tokens and the symbols."""
        return N_SPECIAL + self.n_symbols

    def batch(
        self, batch_size: int, generator: torch.Generator
    ) -> ReversalBatch:
        """``batch_size`` random examples; the same generator state gives
        the same batch."""
        check_positive_int("batch_size", batch_size)
        if not isinstance(generator, torch.Generator):
            raise TypeError(
                "generator must be a torch.Generator, got "
                f"{type(generator).__name__}"
            )
        lengths = torch.randint(
            self.min_len,
            self.max_len + 1,
            (batch_size,),
            generator=generator,
        )  # [batch]
        src_len = int(lengths.max())
        symbols = torch.randint(
            N_SPECIAL,
            self.n_vocab,
            (batch_size, src_len),
            generator=generator,
        )
        positions = torch.arange(src_len)  # [src_len]
        padding = positions >= lengths[:, None]  # [batch, src_len]
        source = symbols.masked_fill(padding, PAD)  # [batch, src_len]
        # Reversed: position i holds source position length - 1 - i.
        # [batch, src_len]
        backwards = (lengths[:, None] - 1 - positions).clamp(min=0)
        reversed_source = source.gather(1, backwards).masked_fill(
            padding, PAD
        )
        # [batch, src_len + 2]
        target = F.pad(reversed_source, (1, 1), value=PAD)
        target[:, 0] = BOS
        target.scatter_(1, (lengths + 1)[:, None], EOS)
        return ReversalBatch(source, padding, target)


class SourceEncoder(nn.Module):
    """Token embedding + learned positions + a pre-norm
    ``nn.TransformerEncoder`` (chapter 11).

    ``source [batch, src_len]`` ids (``src_len <= max_len``) and
    ``padding_mask [batch, src_len]`` (True marks padding, which no position
    attends to) -> the context ``[batch, src_len, d_model]``.
    """

    def __init__(
        self,
        n_vocab: int,
        *,
        d_model: int,
        heads: int,
        n_layers: int,
        d_ff: int,
        max_len: int,
        dropout: float = 0.0,
    ):
        for name, value in (
            ("n_vocab", n_vocab),
            ("n_layers", n_layers),
            ("max_len", max_len),
        ):
            check_positive_int(name, value)
        check_probability("dropout", dropout)
        super().__init__()
        self.embed = nn.Embedding(n_vocab, d_model)
        self.positions = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, d_ff, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(
            layer,
            n_layers,
            norm=nn.LayerNorm(d_model),
            enable_nested_tensor=False,
        )
        self.n_vocab, self.max_len = n_vocab, max_len

    def forward(
        self, source: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_token_ids(
            "source", source, self.n_vocab, self.embed.weight.device
        )
        if source.shape[1] > self.max_len:
            raise ValueError(
                f"source has {source.shape[1]} positions; the encoder was "
                f"built for max_len={self.max_len}"
            )
        # [src_len]
        positions = torch.arange(source.shape[1], device=source.device)
        # [batch, src_len, d_model]
        x = self.embed(source) + self.positions(positions)
        # [batch, src_len, d_model]
        return self.encoder(x, src_key_padding_mask=padding_mask)


class EncoderDecoder(nn.Module):
    """:class:`SourceEncoder` -> context ->
    ``FeedbackLM(cross_attention=True)`` (chapter 11).

    Source and target share one vocabulary of ``n_vocab`` ids; :data:`PAD`,
    :data:`BOS` and :data:`EOS` are special. The decoder's layers each read
    the whole encoded source at every step.
    """

    def __init__(
        self,
        n_vocab: int,
        *,
        d_model: int,
        heads: int,
        encoder_layers: int,
        decoder_layers: int,
        d_ff: int,
        max_len: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.encoder = SourceEncoder(
            n_vocab,
            d_model=d_model,
            heads=heads,
            n_layers=encoder_layers,
            d_ff=d_ff,
            max_len=max_len,
            dropout=dropout,
        )
        self.decoder = FeedbackLM(
            n_vocab,
            d_model=d_model,
            heads=heads,
            n_layers=decoder_layers,
            d_ff=d_ff,
            dropout=dropout,
            cross_attention=True,
        )

    def forward(
        self,
        source: torch.Tensor,
        source_padding_mask: torch.Tensor | None,
        target_in: torch.Tensor,
    ) -> torch.Tensor:
        """Logits ``[batch, tgt_len, n_vocab]`` of the decoder reading
        ``target_in [batch, tgt_len]`` over the encoded ``source [batch,
        src_len]``; position ``t`` predicts target token ``t + 1``."""
        # [batch, src_len, d_model]
        context = self.encoder(source, source_padding_mask)
        return self.decoder(
            target_in,
            context=context,
            context_padding_mask=source_padding_mask,
        )

    def loss(self, batch: ReversalBatch) -> torch.Tensor:
        """Mean cross-entropy (nats per target token) of predicting
        ``target[:, 1:]``, padding excluded."""
        logits = self(
            batch.source, batch.source_padding_mask, batch.target[:, :-1]
        )  # [batch, tgt_len - 1, n_vocab]
        return F.cross_entropy(
            logits.flatten(0, 1),
            batch.target[:, 1:].flatten(),
            ignore_index=PAD,
        )

    @torch.no_grad()
    def greedy(
        self,
        source: torch.Tensor,
        source_padding_mask: torch.Tensor | None,
        max_new_tokens: int,
    ) -> torch.Tensor:
        """Greedy decoding from :data:`BOS`: ``[batch, 1 + max_new_tokens]``
        (in eval mode). The source is encoded once; every decoding step
        reads the encoded source."""
        with eval_mode(self):
            # [batch, src_len, d_model]
            context = self.encoder(source, source_padding_mask)
            prompt = torch.full(
                (source.shape[0], 1),
                BOS,
                dtype=torch.long,
                device=source.device,
            )
            return self.decoder.generate(
                prompt,
                max_new_tokens,
                temperature=0,
                context=context,
                context_padding_mask=source_padding_mask,
            )

    def matches(self, batch: ReversalBatch) -> torch.Tensor:
        """Greedy-decode ``batch``'s sources; bool ``[batch]``: the output
        is exactly its target (see :func:`is_exact`)."""
        output = self.greedy(
            batch.source,
            batch.source_padding_mask,
            batch.target.shape[1] - 1,
        )
        return is_exact(output, batch.target)

    def exact_match(self, batch: ReversalBatch) -> float:
        """Share of the examples whose greedy output matches the target up
        to and including EOS."""
        return self.matches(batch).float().mean().item()


def is_exact(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bool ``[batch]``: ``output [batch, tgt_len]`` equals ``target`` at
    every position before the target's padding (so up to and including EOS;
    what comes after EOS is not scored)."""
    return ((output == target) | (target == PAD)).all(1)


def train(
    model: EncoderDecoder,
    task: ReversalTask,
    *,
    steps: int,
    batch_size: int,
    lr: float = 3e-3,
    warmup_steps: int = 50,
    weight_decay: float = 0.01,
    grad_clip: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` on fresh batches of ``task`` with the book's training
    loop (:func:`~feedback_lib.training.loop.fit`: AdamW with decay on the
    weight matrices, linear warmup then cosine decay, clipping); step ``s``
    draws its batch from ``torch.Generator().manual_seed(seed + s)``.
    Returns the loss of every step (nats per target token)."""
    check_positive_int("steps", steps)
    optimizer, scheduler = optimizer_and_schedule(
        model,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=min(warmup_steps, steps),
        steps=steps,
        betas=(0.9, 0.98),
    )

    def examples(step: int) -> tuple[ReversalBatch]:
        return (
            task.batch(
                batch_size, torch.Generator().manual_seed(seed + step)
            ),
        )

    losses = fit(
        model,
        examples,
        steps=steps,
        optimizer=optimizer,
        scheduler=scheduler,
        loss=lambda model, batch: model.loss(batch),
        grad_clip=grad_clip,
    )
    model.eval()
    return losses
