"""The parallel twin of the feedback model, for the warm start (chapter 8).

A warm start (labml.ai's notes attribute it to the paper) speeds up
training by first training a parallel transformer and then continuing as
a feedback transformer from its weights. :class:`ParallelTwinLM` is that
transformer, built from *the same modules* as
:class:`~feedback_lib.FeedbackLM` with shared keys and
values, so the copy is one to one. It is an ablation, not a standard
Transformer (that is :class:`~feedback_lib.ParallelLM`):

* layer ``l`` at position ``t`` attends to positions ``s < t`` of **its own
  input** (the output of layer ``l - 1``), all positions at once, instead
  of to the feedback memory of steps ``s < t``;
* its keys and values are the shared projections of that input, and its
  scores have the same relative-position terms (``U^K``, ``U^Q``, ``S``,
  :mod:`feedback_lib.model.scores`), so every parameter means the same
  thing in both models;
* position 0 has nothing to attend to and skips the attention block, as
  step 0 of the feedback model does.

It shares one key/value projection over the un-normalised residual
stream, like the feedback model it mirrors, so it is not a standard
Transformer baseline (that is :class:`~feedback_lib.ParallelLM`). The one
parameter without a counterpart is ``transformer.weights``, the memory's
layer mixture: after :func:`feedback_from_twin` it starts uniform.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from feedback_lib.checks import check_token_ids
from feedback_lib.decoding import Decoder, GenerationMixin, RereadingDecoder
from feedback_lib.model.feedback import FeedbackTransformerKV
from feedback_lib.model.lm import FeedbackLM
from feedback_lib.model.scores import (
    MAX_POSITIONS,
    position_scores,
    window_start,
)


class ParallelTwinLM(GenerationMixin, nn.Module):
    """The feedback model's layers run as a parallel, causal transformer.

    Takes the arguments of :class:`~feedback_lib.FeedbackLM` (always with
    shared keys and values) and has its parameter names, less
    ``transformer.weights``. Token ids ``[batch, seq]`` in, logits
    ``[batch, seq, n_vocab]`` out; ``seq`` is at most ``MAX_POSITIONS``.
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
        mem_len: int | None = None,
    ):
        super().__init__()
        lm = FeedbackLM(
            n_vocab,
            d_model=d_model,
            heads=heads,
            n_layers=n_layers,
            d_ff=d_ff,
            dropout=dropout,
            shared_kv=True,
            mem_len=mem_len,
        )
        self.config = {
            k: v
            for k, v in lm.config.items()
            if k not in ("shared_kv", "cross_attention")
        }
        self.embed, self.transformer, self.head = (
            lm.embed,
            lm.transformer,
            lm.head,
        )
        # No memory to mix: no counterpart for the layer shares.
        self.transformer.register_parameter("weights", None)
        self.n_vocab = n_vocab

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, n_vocab]``; position ``t`` sees tokens
        ``0..t`` only."""
        check_token_ids(
            "tokens", tokens, self.n_vocab, self.head.weight.device
        )
        if tokens.shape[1] > MAX_POSITIONS:
            raise ValueError(
                f"tokens has {tokens.shape[1]} positions; the twin takes "
                f"at most {MAX_POSITIONS} (one position-table row per "
                "distance)"
            )
        return self.logits(tokens)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without the checks."""
        seq = tokens.shape[1]
        tr = self.transformer
        x = self.embed(tokens)  # [batch, seq, d_model]
        mask = self.attention_mask(seq, x.device)  # [seq, seq]
        # Position 0 has no memory: no attention block.
        has_memory = (torch.arange(seq, device=x.device) > 0).to(x.dtype)
        for layer in tr.layers:
            attn = layer.attn
            key = tr.key(x).transpose(1, 2)  # K_s  [batch, heads, seq, d_k]
            value = tr.value(x).transpose(1, 2)  # V_s
            # [batch, seq, heads, d_k]
            query = attn.query(layer.norm_self_attn(x))
            # B + D (the positions), added to the scores as a float mask.
            positions = self.positions(attn, query) * attn.scale + mask
            # A + C = (Q_t + U^Q) . K_s, scaled inside the attention.
            out = F.scaled_dot_product_attention(
                (query + attn.query_pos_bias).transpose(1, 2),
                key,
                value,
                attn_mask=positions.to(query.dtype),
                scale=attn.scale,
                dropout_p=attn.dropout.p if self.training else 0.0,
            )  # [batch, heads, seq, d_k]
            out = attn.output(out.transpose(1, 2).flatten(2))
            x = x + layer.dropout(out) * has_memory[:, None]
            x = x + layer.dropout(layer.feed_forward(layer.norm_ff(x)))
        return self.head(tr.norm(x))  # [batch, seq, n_vocab]

    def attention_mask(
        self, seq: int, device: torch.device
    ) -> torch.Tensor:
        """0 where position ``t`` may attend to ``s``, the feedback model's
        window (``window_start(t) <= s < t``), else ``-inf``; row 0 sees
        position 0 so that its softmax is defined (its output is dropped).
        """
        mem_len = self.config["mem_len"]
        starts = [window_start(t, mem_len) for t in range(seq)]
        t = torch.arange(seq, device=device)[:, None]
        s = torch.arange(seq, device=device)[None, :]
        allowed = (s < t) & (
            s >= torch.tensor(starts, device=device)[:, None]
        )
        allowed[0, 0] = True
        mask = torch.zeros(seq, seq, device=device)
        return mask.masked_fill(~allowed, float("-inf"))

    @staticmethod
    def positions(attn: nn.Module, query: torch.Tensor) -> torch.Tensor:
        """``Q_t . U^K_(t-s) + S_(t-s)`` for every pair, from
        :func:`~feedback_lib.model.scores.position_scores` of every
        distance: ``query [batch, seq, heads, d_k]`` -> ``[batch, heads,
        seq, seq]`` (any value where ``s >= t``)."""
        batch, seq, heads, _ = query.shape
        tables = attn.position_tables(seq)  # distances seq..1
        by_distance = position_scores(query.flatten(0, 1), tables)
        by_distance = by_distance.unflatten(1, (batch, seq)).transpose(0, 1)
        t = torch.arange(seq, device=query.device)[:, None]
        s = torch.arange(seq, device=query.device)[None, :]
        column = (seq - t + s).clamp(max=seq - 1)  # distance t - s
        return by_distance.gather(-1, column.expand(batch, heads, seq, seq))

    def decoder(self, batch: int, capacity: int) -> Decoder:
        """A decoder that re-reads the last ``MAX_POSITIONS`` tokens at
        every step (chapter 9)."""
        return RereadingDecoder(
            self.logits,
            MAX_POSITIONS,
            batch=batch,
            capacity=capacity,
            n_vocab=self.n_vocab,
            device=self.head.weight.device,
        )


def load_twin_weights(lm: FeedbackLM, twin_state: dict) -> None:
    """Copy a twin's ``state_dict`` into the feedback model ``lm`` of the
    same shape: every name maps to itself; ``transformer.weights``, which
    the twin lacks, keeps ``lm``'s value."""
    if not isinstance(lm, FeedbackLM) or not isinstance(
        lm.transformer, FeedbackTransformerKV
    ):
        raise TypeError(
            "the warm start copies a twin into a FeedbackLM with shared "
            "keys and values (shared_kv=True)"
        )
    missing, unexpected = lm.load_state_dict(twin_state, strict=False)
    if missing != ["transformer.weights"] or unexpected:
        raise ValueError(
            "these weights are not a twin of this model: missing "
            f"{missing}, unexpected {unexpected}"
        )


def feedback_from_twin(twin: ParallelTwinLM) -> FeedbackLM:
    """A :class:`~feedback_lib.FeedbackLM` holding a copy of every weight
    of ``twin``; ``transformer.weights`` (the memory's layer mixture),
    which the twin does not have, keeps its initial, uniform value."""
    if not isinstance(twin, ParallelTwinLM):
        raise TypeError(
            f"twin must be a ParallelTwinLM, got {type(twin).__name__}"
        )
    weight = twin.head.weight
    lm = FeedbackLM(**twin.config, shared_kv=True)
    lm = lm.to(device=weight.device, dtype=weight.dtype)
    load_twin_weights(lm, twin.state_dict())
    return lm.train(twin.training)
