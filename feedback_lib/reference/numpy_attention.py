"""FeedbackAttention in plain numpy (float64), one step at a time (chapters
2 and 3).

This is the from-scratch version the book builds first; the tests check that
it gives the torch module's float64 output within 1e-10 on the same weights.
"""

from __future__ import annotations

import numpy as np
import torch


def attention_weights_numpy(
    module: torch.nn.Module,
) -> dict[str, np.ndarray | int]:
    """The weights of a :class:`~feedback_lib.FeedbackAttention` as float64
    numpy arrays.

    Keys: ``W_q``, ``W_k``, ``W_v``, ``b_v`` (absent when keys and values
    are precomputed), ``W_o``, ``b_o`` (linear maps act as ``x @ W.T + b``),
    ``U_K [P, heads, d_k]``, ``S [P, heads]``, ``U_Q [heads, d_k]`` and
    ``heads``.
    """

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().double().numpy()

    weights: dict[str, np.ndarray | int] = {
        "W_q": arr(module.query.linear.weight)
    }
    if module.key is not None:
        weights.update(
            W_k=arr(module.key.linear.weight),
            W_v=arr(module.value.linear.weight),
            b_v=arr(module.value.linear.bias),
        )
    weights.update(
        W_o=arr(module.output.weight),
        b_o=arr(module.output.bias),
        # [P, heads, d_k] (the paper's form keeps one table for all heads)
        U_K=arr(module.key_pos_embeddings.expand(-1, module.heads, -1)),
        S=arr(module.key_pos_bias),
        U_Q=arr(module.query_pos_bias),
        heads=module.heads,
    )
    return weights


def softmax_numpy(x: np.ndarray, axis: int) -> np.ndarray:
    """Numerically stable softmax along ``axis``."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def score_terms_numpy(
    q: np.ndarray,
    k: np.ndarray,
    u_q: np.ndarray,
    u_k: np.ndarray,
    s: np.ndarray,
) -> dict[str, np.ndarray]:
    """The four terms of the relative-position score, each ``[seq_len,
    batch, heads]``.

    ``q [batch, heads, d_k]``, ``k [seq_len, batch, heads, d_k]``, ``u_q
    [heads, d_k]``, ``u_k [seq_len, heads, d_k]`` and ``s [seq_len, heads]``
    (already cut to the memory's length).

    * A = Q . K_j    (content to content)
    * B = Q . U^K_j  (content to relative position)
    * C = U^Q . K_j  (global bias on content)
    * D = S_j        (learned bias per relative position, in place of U^Q .
      U^K_j)
    """
    seq_len, batch = k.shape[:2]
    return {
        "A": np.einsum("bhd,jbhd->jbh", q, k),
        "B": np.einsum("bhd,jhd->jbh", q, u_k),
        "C": np.einsum("hd,jbhd->jbh", u_q, k),
        "D": np.broadcast_to(s[:, None, :], (seq_len, batch, s.shape[1])),
    }


def feedback_attention_numpy(
    weights: dict[str, np.ndarray | int],
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
) -> np.ndarray:
    """FeedbackAttention's forward pass (without dropout) in float64 numpy.

    ``weights`` from :func:`attention_weights_numpy`; ``query [batch,
    d_model]``; ``key``/``value [seq_len, batch, d_model]``, or ``[seq_len,
    batch, heads, d_k]`` when the weights have no key/value projections.
    Returns ``[batch, d_model]``.
    """
    heads = weights["heads"]
    query, key, value = (
        np.asarray(a, dtype=np.float64) for a in (query, key, value)
    )
    batch, d_model = query.shape
    d_k = d_model // heads
    seq_len = key.shape[0]

    # 1. Project and split into heads.
    # [batch, heads, d_k]
    q = (query @ weights["W_q"].T).reshape(batch, heads, d_k)
    if "W_k" in weights:
        # [seq_len, batch, heads, d_k]
        k = (key @ weights["W_k"].T).reshape(seq_len, batch, heads, d_k)
        v = (value @ weights["W_v"].T + weights["b_v"]).reshape(
            seq_len, batch, heads, d_k
        )
    else:
        k, v = key, value
    # 2. Relative position parameters for the last seq_len positions (the
    # newest entry is row P-1).
    u_k = weights["U_K"][-seq_len:]  # [seq_len, heads, d_k]
    s = weights["S"][-seq_len:]  # [seq_len, heads]
    # 3. The four score terms, summed and scaled.
    terms = score_terms_numpy(q, k, weights["U_Q"], u_k, s)
    total = terms["A"] + terms["B"] + terms["C"] + terms["D"]
    scores = total / np.sqrt(d_k)  # [seq_len, batch, heads]
    # 4. Softmax over the memory (time) axis.
    attn = softmax_numpy(scores, axis=0)  # [seq_len, batch, heads]
    # 5. Weighted sum of the values, heads concatenated.
    # [batch, d_model]
    x = np.einsum("jbh,jbhd->bhd", attn, v).reshape(batch, d_model)
    # 6. Output projection.
    return x @ weights["W_o"].T + weights["b_o"]  # [batch, d_model]
