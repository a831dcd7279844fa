"""Feedback attention: one step's query over the memory (chapters 2-4).

The parameters have the names, shapes, creation order and initialisation
of ``labml_nn.transformers.feedback.FeedbackAttention``, so the same
``torch.manual_seed`` gives both the same weights and a labml
``state_dict`` loads with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from feedback_lib.checks import (
    check_bool,
    check_heads,
    check_like,
    check_probability,
    check_same_batch,
    check_tensor,
)
from feedback_lib.model.scores import (
    MAX_POSITIONS,
    PositionTables,
    position_tables,
    relative_scores,
)


class HeadProjection(nn.Module):
    """A linear map ``[..., d_model] -> [..., heads, d_k]``: the heads."""

    def __init__(self, d_model: int, heads: int, d_k: int, bias: bool):
        super().__init__()
        self.linear = nn.Linear(d_model, heads * d_k, bias=bias)
        self.heads = heads
        self.d_k = d_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [..., d_model] -> [..., heads * d_k] -> [..., heads, d_k]
        return self.linear(x).unflatten(-1, (self.heads, self.d_k))


class FeedbackAttention(nn.Module):
    r"""Attention of one step's query over the memory (chapter 4).

    Each head scores memory entry ``j`` with relative positions (chapter
    2, :mod:`feedback_lib.model.scores`),

    .. math:: e_j = Q^\top K_j + Q^\top U^K_j + {U^Q}^\top K_j + S_j,

    scales by ``1/sqrt(d_k)``, takes a softmax over the memory and sums
    the values. The learned bias ``S_j`` (``key_pos_bias``) stands for
    the fourth term of the expansion, ``{U^Q}^T U^K_j``. This is labml's
    form (``positions="labml"``). The paper's authors score
    ``Q^T K_j + Q^T U^K_j`` with one ``U^K`` table for all heads
    (``positions="paper"``): the same lines with ``U^Q = 0``, ``S = 0``
    and ``U^K`` shared by the heads (chapter 2).

    Args:
        heads: attention heads; must divide ``d_model``.
        d_model: width of the model.
        dropout_prob: dropout on the attention weights.
        is_kv_precomputed: ``key`` and ``value`` arrive projected and
            split into heads, ``[seq_len, batch, heads, d_k]``, and the
            module has no key/value projections (shared keys and values,
            chapter 7).
        positions: ``"labml"`` (default; labml's parameters and
            state_dict) or ``"paper"`` (the authors' ``q.k + q.p``: a
            ``U^K`` table ``[P, 1, d_k]`` shared by the heads,
            initialised from a standard normal as in their code; ``U^Q``
            and ``S`` are zero buffers, not parameters).

    Shapes: ``query [batch, d_model]``, ``key``/``value [seq_len, batch,
    d_model]``, output ``[batch, d_model]``. Entry 0 of the memory is the
    oldest, the last one the step just before the query; ``seq_len`` is
    at most :data:`MAX_POSITIONS`.
    """

    def __init__(
        self,
        heads: int,
        d_model: int,
        dropout_prob: float = 0.1,
        *,
        is_kv_precomputed: bool = False,
        positions: str = "labml",
    ):
        d_k = check_heads(heads, d_model)
        check_probability("dropout_prob", dropout_prob)
        check_bool("is_kv_precomputed", is_kv_precomputed)
        check_positions(positions)
        super().__init__()
        self.d_k = d_k
        self.heads = heads
        self.d_model = d_model
        self.is_kv_precomputed = is_kv_precomputed
        self.positions = positions
        # Created in labml's order: the same seed gives the same weights.
        self.query = HeadProjection(d_model, heads, d_k, bias=False)
        if is_kv_precomputed:
            self.key = None
            self.value = None
        else:
            self.key = HeadProjection(d_model, heads, d_k, bias=False)
            self.value = HeadProjection(d_model, heads, d_k, bias=True)
        self.output = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout_prob)
        self.scale = 1 / math.sqrt(d_k)
        self.P = MAX_POSITIONS
        if positions == "labml":
            # U^K_j, one row per distance: row P - 1 is the newest entry.
            shape = (self.P, heads, d_k)
            self.key_pos_embeddings = nn.Parameter(torch.zeros(shape))
            # S_j, the learned bias that replaces U^Q . U^K_j.
            self.key_pos_bias = nn.Parameter(torch.zeros((self.P, heads)))
            # U^Q: the query's position term, the same at every step.
            self.query_pos_bias = nn.Parameter(torch.zeros((heads, d_k)))
        else:  # the paper's q.k + q.p_j: one U^K for all heads
            table = torch.randn((self.P, 1, d_k))
            self.key_pos_embeddings = nn.Parameter(table)
            zeros = torch.zeros  # no S_j and no U^Q: zero buffers
            for name, shape in (
                ("key_pos_bias", (self.P, heads)),
                ("query_pos_bias", (heads, d_k)),
            ):
                self.register_buffer(name, zeros(shape), persistent=False)

    def position_tables(self, length: int) -> PositionTables:
        """``U^K`` and ``S`` of the last ``length`` distances (chapter 2);
        the transformer cuts them once per call for all its steps."""
        emb = self.key_pos_embeddings  # [P, heads or 1, d_k]
        return position_tables(
            emb.expand(-1, self.heads, -1), self.key_pos_bias, length
        )

    def get_scores(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        tables: PositionTables | None = None,
    ) -> torch.Tensor:
        """Unscaled ``e_j`` of the projected ``query [batch, heads, d_k]``
        over ``key [m, batch, heads, d_k]``: ``[m, batch, heads]``."""
        if tables is None:
            tables = self.position_tables(key.shape[0])
        return relative_scores(query, key, self.query_pos_bias, tables)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        tables: PositionTables | None = None,
        need_weights: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``query`` over the memory ``key``/``value``.

        Returns ``[batch, d_model]``, or with ``need_weights=True`` the
        pair ``(output, weights [seq_len, batch, heads])`` (the weights
        after dropout). ``tables``: :meth:`position_tables` of at least
        ``seq_len`` distances (cut here when None).
        """
        self.check_inputs(query, key, value)
        query = self.query(query)  # Q       [batch, heads, d_k]
        if self.key is not None:  # else shared keys and values
            key = self.key(key)  # K_j      [seq_len, batch, heads, d_k]
            value = self.value(value)  # V_j  [seq_len, batch, heads, d_k]
        scores = self.get_scores(query, key, tables)
        scores *= self.scale  # [seq_len, batch, heads]
        attn = torch.softmax(scores, dim=0)  # over the memory (time) axis
        attn = self.dropout(attn)
        x = (attn[..., None] * value).sum(0)  # sum_j a_j V_j
        x = self.output(x.reshape(x.shape[0], -1))  # [batch, d_model]
        return (x, attn) if need_weights else x

    def check_inputs(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> None:
        """Raise an error naming the argument unless the inputs fit."""
        check_tensor(
            "query", query, ["batch", "d_model"], [None, self.d_model]
        )
        if self.is_kv_precomputed:
            dims = ["seq_len", "batch", "heads", "d_k"]
            sizes = [None, None, self.heads, self.d_k]
        else:
            dims = ["seq_len", "batch", "d_model"]
            sizes = [None, None, self.d_model]
        check_tensor("key", key, dims, sizes)
        check_tensor("value", value, dims, sizes)
        check_same_batch(
            ["query", "key", "value"], [query, key, value], [0, 1, 1]
        )
        if key.shape[0] != value.shape[0]:
            raise ValueError(
                "key and value must have the same seq_len, got "
                f"{key.shape[0]} and {value.shape[0]}"
            )
        if key.shape[0] > self.P:
            raise ValueError(
                f"the memory (key/value seq_len) has {key.shape[0]} steps "
                f"but FeedbackAttention has only {self.P} relative "
                f"positions; keep the memory at most {self.P} long "
                "(FeedbackLM's mem_len does this)"
            )
        for name, tensor in (
            ("query", query),
            ("key", key),
            ("value", value),
        ):
            check_like(name, tensor, self.output.weight)


#: The forms of the position scores (chapter 2): labml's ``A+B+C+S_j``
#: and the paper authors' ``q.k + q.p_j``.
POSITION_FORMS = ("labml", "paper")


def check_positions(positions: object) -> str:
    """Return ``positions`` if it names a form of :data:`POSITION_FORMS`."""
    if not isinstance(positions, str) or positions not in POSITION_FORMS:
        raise ValueError(
            f"positions must be one of {POSITION_FORMS}, got {positions!r}"
        )
    return positions


@torch.no_grad()
def attention_maps(
    attn: FeedbackAttention, x_seq: torch.Tensor
) -> torch.Tensor:
    """Attention weights of every step of ``x_seq`` over the steps before
    it (chapters 3 and 4): step ``t`` of ``x_seq [steps, batch, d_model]``
    is the query and steps ``0..t-1`` the memory.

    Returns ``[batch, heads, steps, steps]``: ``[b, h, t, j]`` is the
    weight of entry ``j`` for query ``t`` (NaN where ``j >= t``; row 0
    has no memory). Dropout applies when the module is in training mode.
    """
    check_map_inputs(attn, x_seq)
    steps, batch = x_seq.shape[:2]
    maps = x_seq.new_full((batch, attn.heads, steps, steps), float("nan"))
    for t in range(1, steps):
        past = x_seq[:t]
        _, weights = attn(x_seq[t], past, past, need_weights=True)
        maps[:, :, t, :t] = weights.permute(1, 2, 0)  # of [t, batch, heads]
    return maps


def check_map_inputs(attn: object, x_seq: object) -> None:
    """Raise unless :func:`attention_maps` can run on these inputs."""
    if not isinstance(attn, FeedbackAttention) or attn.is_kv_precomputed:
        raise TypeError(
            "attn must be a FeedbackAttention with its own key/value "
            "projections (is_kv_precomputed=False)"
        )
    dims, sizes = ["steps", "batch", "d_model"], [None, None, attn.d_model]
    check_tensor("x_seq", x_seq, dims, sizes)
    steps = x_seq.shape[0]
    if steps < 2:
        raise ValueError(
            f"x_seq needs at least 2 steps (step 0 has no memory), got "
            f"{steps}"
        )
    if steps - 1 > attn.P:
        raise ValueError(
            f"x_seq has {steps} steps; the memory may hold at most {attn.P}"
        )
