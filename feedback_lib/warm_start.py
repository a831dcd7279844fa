"""The warm start of the training chapter: a parallel twin of the feedback model, and the copy.

The paper speeds up training by first training an ordinary (parallel) transformer and then
continuing as a feedback transformer from its weights. :class:`ParallelTwinLM` is that parallel
transformer, built from *the same modules* as :class:`~feedback_lib.FeedbackLM` with shared keys and
values, so the copy is one to one:

* layer ``l`` at position ``t`` attends to positions ``s < t`` of **its own input** (the output of
  layer ``l - 1``), all positions at once, instead of to the feedback memory of steps ``s < t``;
* its keys and values are the shared projections ``transformer.key``/``transformer.value`` of that
  input, and its scores use the same relative-position terms (``U^K``, ``U^Q``, ``S``), so every
  parameter means the same thing in both models;
* position 0 has nothing to attend to and skips the attention block, as step 0 of the feedback
  model does.

The one parameter without a counterpart is ``transformer.weights`` (the logits of the softmax that
mixes the layers into the memory): the twin has none, so after :func:`feedback_from_twin` the
feedback model starts with its initial, uniform mixture.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from feedback_lib.attention import MAX_POSITIONS
from feedback_lib.checks import check_token_ids
from feedback_lib.generation import generate_by_rereading
from feedback_lib.lm import FeedbackLM
from feedback_lib.transformer import FeedbackTransformerKV


class ParallelTwinLM(nn.Module):
    """The feedback model's layers run as a parallel (causal) transformer; see the module docstring.

    Takes the same arguments as :class:`~feedback_lib.FeedbackLM` (always with shared keys and
    values) and has the same parameter names, less ``transformer.weights``. Shapes: token ids
    ``[batch, seq]`` in, logits ``[batch, seq, n_vocab]`` out; ``seq`` is at most
    ``MAX_POSITIONS`` (the longest distance, ``seq - 1``, must have a position-table row).
    """

    def __init__(self, n_vocab: int, *, d_model: int, heads: int, n_layers: int, d_ff: int,
                 dropout: float = 0.0, mem_len: int | None = None):
        super().__init__()
        lm = FeedbackLM(n_vocab, d_model=d_model, heads=heads, n_layers=n_layers, d_ff=d_ff,
                        dropout=dropout, shared_kv=True, mem_len=mem_len)
        self.config = {k: v for k, v in lm.config.items() if k not in ("shared_kv", "cross_attention")}
        self.src_embed, self.transformer, self.generator = lm.src_embed, lm.transformer, lm.generator
        self.transformer.register_parameter("weights", None)   # no memory to mix: no counterpart
        self.n_vocab = n_vocab

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, n_vocab]``; position ``t`` sees tokens ``0..t`` only."""
        check_token_ids("tokens", tokens, self.n_vocab, self.generator.weight.device)
        if tokens.shape[1] > MAX_POSITIONS:
            raise ValueError(f"tokens has {tokens.shape[1]} positions; the twin takes at most {MAX_POSITIONS} "
                             f"(one position-table row per distance)")
        return self.logits(tokens)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` without the checks."""
        seq = tokens.shape[1]
        tr = self.transformer
        x = self.src_embed(tokens)                                          # [batch, seq, d_model]
        mask = self.attention_mask(seq, x.device)                           # [seq, seq]
        has_memory = (torch.arange(seq, device=x.device) > 0).to(x.dtype)[:, None]   # [seq, 1]
        for layer in tr.layers:
            attn = layer.attn
            key = tr.key(x).transpose(1, 2)                                 # K_s    [batch, heads, seq, d_k]
            value = tr.value(x).transpose(1, 2)                             # V_s    [batch, heads, seq, d_k]
            query = attn.query(layer.norm_self_attn(x)).transpose(1, 2)     # Q_t    [batch, heads, seq, d_k]
            # B + D = Q_t . U^K_(t-s) + S_(t-s), the position terms, added to the scores as a mask.
            positions = self.position_scores(attn, query) * attn.scale + mask   # [batch, heads, seq, seq]
            # A + C = (Q_t + U^Q) . K_s, scaled inside scaled_dot_product_attention.
            out = F.scaled_dot_product_attention(query + attn.query_pos_bias[:, None], key, value,
                                                 attn_mask=positions.to(query.dtype), scale=attn.scale,
                                                 dropout_p=attn.dropout.p if self.training else 0.0)
            out = attn.output(out.transpose(1, 2).flatten(2))               # [batch, seq, d_model]
            x = x + layer.dropout(out) * has_memory                         # position 0: no attention block
            x = x + layer.dropout(layer.feed_forward(layer.norm_ff(x)))
        return self.generator(tr.norm(x))                                   # [batch, seq, n_vocab]

    def attention_mask(self, seq: int, device: torch.device) -> torch.Tensor:
        """``0`` where position ``t`` may attend to ``s`` (``t - mem_len <= s < t``), else ``-inf``;
        row 0 may see position 0 so that its softmax is defined (its output is dropped)."""
        t = torch.arange(seq, device=device)[:, None]
        s = torch.arange(seq, device=device)[None, :]
        allowed = s < t
        if self.config["mem_len"] is not None:
            allowed &= s >= t - self.config["mem_len"]
        allowed[0, 0] = True
        return torch.zeros(seq, seq, device=device).masked_fill(~allowed, float("-inf"))

    @staticmethod
    def position_scores(attn: nn.Module, query: torch.Tensor) -> torch.Tensor:
        """``Q_t . U^K_(t-s) + S_(t-s)`` for every pair: ``[batch, heads, seq, seq]`` (any value where ``s >= t``).

        Row ``P - d`` of the tables belongs to distance ``d``, as in the feedback model's memory.
        """
        seq = query.shape[2]
        u_k = attn.key_pos_embeddings[-seq:]                     # distances seq..1  [seq, heads, d_k]
        by_row = torch.einsum("bhtd,rhd->bhtr", query, u_k) + attn.key_pos_bias[-seq:].t()[None, :, None, :]
        t = torch.arange(seq, device=query.device)[:, None]
        s = torch.arange(seq, device=query.device)[None, :]
        rows = (seq - t + s).clamp(max=seq - 1)                  # row of distance t - s  [seq, seq]
        return by_row.gather(-1, rows.expand(*query.shape[:2], seq, seq))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue ``prompt [batch, seq]``, re-reading the context (the last ``MAX_POSITIONS``
        tokens) for every new token; the options of ``FeedbackLM.generate``."""
        check_token_ids("prompt", prompt, self.n_vocab, self.generator.weight.device)
        return generate_by_rereading(self, prompt, max_new_tokens, MAX_POSITIONS, temperature, top_k, generator)


def load_twin_weights(lm: FeedbackLM, twin_state: dict) -> None:
    """Copy a twin's ``state_dict`` into the feedback model ``lm`` of the same shape: every name
    maps to itself; ``transformer.weights``, which the twin lacks, keeps ``lm``'s value."""
    if not isinstance(lm, FeedbackLM) or not isinstance(lm.transformer, FeedbackTransformerKV):
        raise TypeError("the warm start copies a twin into a FeedbackLM with shared keys and values (shared_kv=True)")
    missing, unexpected = lm.load_state_dict(twin_state, strict=False)
    if missing != ["transformer.weights"] or unexpected:
        raise ValueError(f"these weights are not a twin of this model: missing {missing}, unexpected {unexpected}")


def feedback_from_twin(twin: ParallelTwinLM) -> FeedbackLM:
    """A :class:`~feedback_lib.FeedbackLM` holding a copy of every weight of ``twin``.

    The parameter names are the same in both models; ``transformer.weights`` (the memory's layer
    mixture), which the twin does not have, keeps its initial value (all ones: a uniform mixture).
    """
    if not isinstance(twin, ParallelTwinLM):
        raise TypeError(f"twin must be a ParallelTwinLM, got {type(twin).__name__}")
    weight = twin.generator.weight
    lm = FeedbackLM(**twin.config, shared_kv=True).to(device=weight.device, dtype=weight.dtype)
    load_twin_weights(lm, twin.state_dict())
    return lm.train(twin.training)
