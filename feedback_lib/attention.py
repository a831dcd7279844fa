"""Feedback attention: one query step attending over the memory with relative positions.

Chapters 2-4 of the book derive and build this module. The parameters have the same names,
shapes, creation order and initialisation as ``labml_nn.transformers.feedback.FeedbackAttention``,
so the same ``torch.manual_seed`` gives both identical weights and a labml ``state_dict`` loads
with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from feedback_lib.checks import check_heads, check_like, check_probability, check_same_batch, check_tensor

#: Number of relative positions with a learned embedding; the memory may hold at most this many steps.
MAX_POSITIONS = 2 ** 12


class HeadProjection(nn.Module):
    """A linear map ``[..., d_model] -> [..., heads, d_k]`` that splits the result into heads."""

    def __init__(self, d_model: int, heads: int, d_k: int, bias: bool):
        super().__init__()
        self.linear = nn.Linear(d_model, heads * d_k, bias=bias)
        self.heads = heads
        self.d_k = d_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., d_model] -> [..., heads * d_k] -> [..., heads, d_k]
        return self.linear(x).unflatten(-1, (self.heads, self.d_k))


class FeedbackAttention(nn.Module):
    r"""Attention of one step's query over the memory, scored with relative positions.

    For memory entry ``j`` (``j = 0`` is the oldest; entry ``j`` lies ``seq_len - j`` steps back),
    the score of each head is (chapter 2)

    .. math:: A_j = Q^\top K_j + Q^\top U^K_j + {U^Q}^\top K_j + S_j,

    scaled by ``1/sqrt(d_k)`` and normalised with a softmax over the memory (time) axis. The
    fourth term of the full expansion, ``{U^Q}^T U^K_j``, depends only on ``j`` and is replaced by
    the learned bias ``S_j`` (``key_pos_bias``).

    Args:
        heads: number of attention heads; must divide ``d_model``.
        d_model: width of the model.
        dropout_prob: dropout on the attention weights.
        is_kv_precomputed: if True, ``key`` and ``value`` arrive already projected and split into
            heads (``[seq_len, batch, heads, d_k]``) and the module has no key/value projections,
            as in the shared key/value transformer (chapter on sharing keys and values).

    Shapes: ``query [batch, d_model]``, ``key``/``value [seq_len, batch, d_model]``
    (or ``[seq_len, batch, heads, d_k]``), output ``[batch, d_model]``. Memory entry ``0`` is the
    oldest; the last one is the step just before the query. ``seq_len`` is at most
    :data:`MAX_POSITIONS`.
    """

    def __init__(self, heads: int, d_model: int, dropout_prob: float = 0.1, *,
                 is_kv_precomputed: bool = False):
        d_k = check_heads(heads, d_model)
        check_probability("dropout_prob", dropout_prob)
        super().__init__()
        self.d_k = d_k
        self.heads = heads
        self.d_model = d_model
        self.is_kv_precomputed = is_kv_precomputed
        # Projections, created in the reference's order so that the same seed gives the same weights.
        self.query = HeadProjection(d_model, heads, self.d_k, bias=False)
        if is_kv_precomputed:
            self.key = None
            self.value = None
        else:
            self.key = HeadProjection(d_model, heads, self.d_k, bias=False)
            self.value = HeadProjection(d_model, heads, self.d_k, bias=True)
        self.output = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout_prob)
        self.scale = 1 / math.sqrt(self.d_k)
        self.P = MAX_POSITIONS
        # U^K_j: relative key position embeddings; row P-1 is the most recent memory entry.
        self.key_pos_embeddings = nn.Parameter(torch.zeros((self.P, heads, self.d_k)))
        # S_j: the learned bias that replaces U^Q . U^K_j.
        self.key_pos_bias = nn.Parameter(torch.zeros((self.P, heads)))
        # U^Q: the query's position term, the same for every step (positions are relative).
        self.query_pos_bias = nn.Parameter(torch.zeros((heads, self.d_k)))

    def position_tables(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``U^K_j`` and ``S_j`` for the last ``seq_len`` distances, laid out for one batched matmul:
        ``([heads, d_k, seq_len], [heads, 1, seq_len])``; column ``j`` is memory entry ``j`` of a
        memory of ``seq_len`` steps, and the last ``k`` columns are those of a memory of ``k`` steps.

        The feedback transformers cut the tables once per forward pass and pass them to every step.
        """
        key_pos_emb = self.key_pos_embeddings[-seq_len:].permute(1, 2, 0)   # U^K_j  [heads, d_k, seq_len]
        key_pos_bias = self.key_pos_bias[-seq_len:].t()[:, None, :]         # S_j    [heads, 1, seq_len]
        return key_pos_emb, key_pos_bias

    def get_scores(self, query: torch.Tensor, key: torch.Tensor,
                   tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Unscaled scores ``A_j`` for projected ``query [batch, heads, d_k]`` and
        ``key [seq_len, batch, heads, d_k]``; returns ``[seq_len, batch, heads]``.

        ``tables`` are :meth:`position_tables` of at least ``seq_len`` distances (cut here if None).
        """
        seq_len = key.shape[0]
        if tables is None:
            tables = self.position_tables(seq_len)
        key_pos_emb = tables[0][..., -seq_len:]                # U^K_j   [heads, d_k, seq_len]
        key_pos_bias = tables[1][..., -seq_len:]               # S_j     [heads, 1, seq_len]
        # A + C = (Q + U^Q) . K_j: a product and a sum over d_k  [seq_len, batch, heads]
        ac = ((query + self.query_pos_bias) * key).sum(-1)
        # B + D = Q . U^K_j + S_j: one matmul per head, S_j added as its bias  [heads, batch, seq_len]
        bd = torch.baddbmm(key_pos_bias, query.transpose(0, 1), key_pos_emb)
        return ac + bd.permute(2, 1, 0)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                need_weights: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``query`` over the memory ``key``/``value``.

        Returns ``[batch, d_model]``, or with ``need_weights=True`` the pair
        ``(output, attention [seq_len, batch, heads])`` (attention after dropout).
        """
        self.check_inputs(query, key, value)
        return self.attend(query, key, value, need_weights=need_weights)

    def check_inputs(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                     query_name: str = "query") -> None:
        """Raise a clear error if the inputs do not fit this module (see the class docstring).

        ``query_name`` is the name the caller knows the query by (the layer calls it ``x``).
        """
        check_tensor(query_name, query, ["batch", "d_model"], [None, self.d_model])
        if self.is_kv_precomputed:
            dims, sizes = ["seq_len", "batch", "heads", "d_k"], [None, None, self.heads, self.d_k]
        else:
            dims, sizes = ["seq_len", "batch", "d_model"], [None, None, self.d_model]
        check_tensor("key", key, dims, sizes)
        check_tensor("value", value, dims, sizes)
        check_same_batch([query_name, "key", "value"], [query, key, value], [0, 1, 1])
        if key.shape[0] != value.shape[0]:
            raise ValueError(f"key and value must have the same seq_len, got {key.shape[0]} and {value.shape[0]}")
        if key.shape[0] > self.P:
            raise ValueError(f"the memory (key/value seq_len) has {key.shape[0]} steps but FeedbackAttention "
                             f"has only {self.P} relative positions; keep the memory at most {self.P} long "
                             f"(FeedbackLM's mem_len does this)")
        weight = self.output.weight
        for name, tensor in ((query_name, query), ("key", key), ("value", value)):
            check_like(name, tensor, weight)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               need_weights: bool = False, tables: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` without the input checks; ``tables`` as in :meth:`get_scores`.

        The feedback transformers call this directly at every step, so neither the checks nor
        module hooks on the attention run there (see :class:`~feedback_lib.FeedbackTransformer`).
        """
        query = self.query(query)                      # [batch, heads, d_k]
        if self.key is not None:
            key = self.key(key)                        # [seq_len, batch, heads, d_k]
            value = self.value(value)                  # [seq_len, batch, heads, d_k]
        scores = self.get_scores(query, key, tables)   # [seq_len, batch, heads]
        scores *= self.scale
        attn = torch.softmax(scores, dim=0)            # softmax over the memory (time) axis
        attn = self.dropout(attn)
        x = (attn[..., None] * value).sum(0)           # weighted sum over the memory  [batch, heads, d_k]
        x = self.output(x.reshape(x.shape[0], -1))     # [batch, d_model]
        return (x, attn) if need_weights else x


@torch.no_grad()
def attention_maps(attn: FeedbackAttention, x_seq: torch.Tensor) -> torch.Tensor:
    """Attention weights of every step of ``x_seq`` over the steps before it (chapters 3 and 4).

    Step ``t`` of ``x_seq [steps, batch, d_model]`` is the query and steps ``0..t-1`` are the memory,
    as in a feedback transformer whose memory vectors are ``x_seq`` itself. Returns
    ``[batch, heads, steps, steps]``: entry ``[b, h, t, j]`` is the weight of memory entry ``j`` for
    query ``t`` (NaN where ``j >= t``; row 0 has no memory and is all NaN). Dropout applies when the
    module is in training mode.
    """
    if not isinstance(attn, FeedbackAttention) or attn.is_kv_precomputed:
        raise TypeError("attn must be a FeedbackAttention with its own key/value projections "
                        "(is_kv_precomputed=False)")
    check_tensor("x_seq", x_seq, ["steps", "batch", "d_model"], [None, None, attn.d_model])
    check_like("x_seq", x_seq, attn.output.weight)
    steps, batch = x_seq.shape[:2]
    if steps < 2:
        raise ValueError(f"x_seq needs at least 2 steps (step 0 has no memory), got {steps}")
    if steps - 1 > attn.P:
        raise ValueError(f"x_seq has {steps} steps; the memory may hold at most {attn.P} of them")
    maps = torch.full((batch, attn.heads, steps, steps), float("nan"), dtype=x_seq.dtype, device=x_seq.device)
    for t in range(1, steps):
        _, weights = attn.attend(x_seq[t], x_seq[:t], x_seq[:t], need_weights=True)  # [t, batch, heads]
        maps[:, :, t, :t] = weights.permute(1, 2, 0)
    return maps
