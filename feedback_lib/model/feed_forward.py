"""The position-wise feed-forward block of every transformer layer (chapter
5)."""

from __future__ import annotations

import torch
from torch import nn

from feedback_lib.checks import check_positive_int, check_probability


class FeedForward(nn.Module):
    """``layer2(dropout(activation(layer1(x))))``, optionally gated (GLU
    variants).

    Parameter names and creation order follow
    ``labml_nn.transformers.feed_forward.FeedForward`` (``layer1``,
    ``layer2`` and, when gated, ``linear_v``). Shapes: ``[..., d_model] ->
    [..., d_model]``.

    Args:
        d_model: width of the model.
        d_ff: width of the hidden layer.
        dropout: dropout on the hidden layer.
        activation: the hidden activation module; ReLU when None.
        is_gated: multiply the activation by a second linear map of the
            input (``linear_v``).
        bias1, bias2, bias_gate: whether ``layer1``, ``layer2`` and
            ``linear_v`` have biases.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        dropout: float = 0.1,
        activation: nn.Module | None = None,
        is_gated: bool = False,
        bias1: bool = True,
        bias2: bool = True,
        bias_gate: bool = True,
    ):
        check_positive_int("d_model", d_model)
        check_positive_int("d_ff", d_ff)
        check_probability("dropout", dropout)
        if activation is not None and not isinstance(activation, nn.Module):
            raise TypeError(
                "activation must be None or an nn.Module such as "
                f"nn.GELU(), got {activation!r}"
            )
        super().__init__()
        self.layer1 = nn.Linear(d_model, d_ff, bias=bias1)
        self.layer2 = nn.Linear(d_ff, d_model, bias=bias2)
        self.dropout = nn.Dropout(dropout)
        self.activation = nn.ReLU() if activation is None else activation
        self.is_gated = is_gated
        if is_gated:
            self.linear_v = nn.Linear(d_model, d_ff, bias=bias_gate)

    @property
    def d_model(self) -> int:
        """The width it reads and writes."""
        return self.layer1.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.activation(self.layer1(x))  # [..., d_ff]
        if self.is_gated:
            g = g * self.linear_v(x)
        return self.layer2(self.dropout(g))  # [..., d_model]
