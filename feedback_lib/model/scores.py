"""The attention score of feedback attention, defined once (derived in
chapter 2, read line by line in chapter 4).

A step's query ``Q`` scores memory entry ``j`` of a memory of ``m``
entries (``j = 0`` is the oldest; entry ``j`` lies ``m - j`` steps back):

    e_j = (Q + U^Q) . K_j + Q . U^K_(m-j) + S_(m-j)

``A + C`` (content, and the query's position bias ``U^Q``) and ``B + D``
(the position of the key: a learned vector ``U^K`` and bias ``S`` per
distance). This is labml.ai's form, after Transformer-XL. The readable
loop of the transformer (chapter 5) scores one query at a time with
:func:`relative_scores`; the parallel twin (chapter 8) scores every pair
at once with the same :func:`position_scores`. The fused loop (chapter 12)
and the numpy reference (chapter 3) are translations of these lines,
checked against them by the tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Relative positions with a learned embedding: the memory a step attends
#: to holds at most this many entries.
MAX_POSITIONS = 2**12


def window_start(length: int, mem_len: int | None) -> int:
    """The first of ``length`` memory entries a step attends to: all of
    them (0), or the last ``mem_len`` (None: no limit)."""
    return 0 if mem_len is None else max(0, length - mem_len)


class PositionTables(NamedTuple):
    """``U^K`` and ``S`` of the last ``length`` distances, laid out for one
    batched matrix product: column ``i`` holds distance ``length - i``."""

    key_pos_emb: torch.Tensor  # U^K  [heads, d_k, length]
    key_pos_bias: torch.Tensor  # S   [heads, 1, length]

    def last(self, m: int) -> PositionTables:
        """The columns of a memory of ``m`` entries (distances ``m..1``)."""
        return PositionTables(
            self.key_pos_emb[..., -m:], self.key_pos_bias[..., -m:]
        )


def position_tables(
    key_pos_embeddings: torch.Tensor,
    key_pos_bias: torch.Tensor,
    length: int,
) -> PositionTables:
    """Cut the learned tables ``[P, heads, d_k]`` and ``[P, heads]`` (row
    ``P - d`` is distance ``d``) to the last ``length`` distances."""
    return PositionTables(
        # [heads, d_k, length]
        key_pos_embeddings[-length:].permute(1, 2, 0),
        key_pos_bias[-length:].t()[:, None, :],  # [heads, 1, length]
    )


def content_scores(
    query: torch.Tensor, key: torch.Tensor, query_pos_bias: torch.Tensor
) -> torch.Tensor:
    """``A + C = (Q + U^Q) . K_j``: ``query [batch, heads, d_k]``,
    ``key [m, batch, heads, d_k]``, ``U^Q [heads, d_k]`` ->
    ``[m, batch, heads]``."""
    return ((query + query_pos_bias) * key).sum(-1)


def position_scores(
    query: torch.Tensor, tables: PositionTables
) -> torch.Tensor:
    """``B + D = Q . U^K + S`` for every distance of ``tables``:
    ``query [batch, heads, d_k]`` -> ``[heads, batch, length]``."""
    q = query.transpose(0, 1)  # [heads, batch, d_k]
    return torch.baddbmm(tables.key_pos_bias, q, tables.key_pos_emb)


def relative_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    query_pos_bias: torch.Tensor,
    tables: PositionTables,
) -> torch.Tensor:
    """The unscaled scores ``e_j`` of one query over a memory of ``m``
    entries: ``query [batch, heads, d_k]``, ``key [m, batch, heads, d_k]``,
    ``tables`` of at least ``m`` distances -> ``[m, batch, heads]``."""
    positions = position_scores(query, tables.last(key.shape[0]))
    return content_scores(query, key, query_pos_bias) + positions.permute(
        2, 1, 0
    )
