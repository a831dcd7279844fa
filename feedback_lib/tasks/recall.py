"""Recall a key beyond the reach of attention: the mechanism of feedback
in one figure (chapter 10).

A sequence starts with a key (one of :data:`N_KEYS` symbols) followed by
random filler from other symbols; at every position the target is the
key. A Transformer whose layers attend ``span`` positions back sees
position 0 from position ``t`` only if ``t <= n_layers * span`` (its
receptive field); beyond it, it can only guess (``1 / N_KEYS``). A
feedback model attends ``span`` positions back too, but what it attends
to is the memory, which at every step can hold the key again: its reach
has no such limit.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from feedback_lib.checks import check_positive_int

N_KEYS = 4
N_FILLER = 12
#: Keys are ids ``0..N_KEYS-1``, filler ``N_KEYS..N_VOCAB-1``.
N_VOCAB = N_KEYS + N_FILLER


def batch(
    seed: int, rows: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` sequences of ``length`` tokens from ``seed``: inputs
    ``[rows, length]`` (a key, then filler) and targets (the key at every
    position)."""
    check_positive_int("rows", rows)
    check_positive_int("length", length)
    g = torch.Generator().manual_seed(seed)
    keys = torch.randint(0, N_KEYS, (rows, 1), generator=g)
    filler = torch.randint(N_KEYS, N_VOCAB, (rows, length - 1), generator=g)
    return torch.cat([keys, filler], 1), keys.expand(rows, length).clone()


def loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the key at every position but the first (which
    reads the key itself)."""
    logits = model(x)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten())


@torch.no_grad()
def accuracy_by_distance(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """``[length]``: the fraction of sequences whose key the model
    predicts at each position (= distance from the key), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        predicted = model(x).argmax(-1)
    finally:
        model.train(was_training)
    return (predicted == y).float().mean(0)
