"""The fused loop's tensors, each list named once (chapter 12).

Every list of tensors the fused loop passes around is a dataclass here,
and the order of its fields is the order everywhere else: the arguments
of :class:`~feedback_lib.fast.loop.FusedKVLoop` and their gradients
(:class:`LayerTensors`), the step loops' views (:class:`Layer`,
:class:`TransposedLayer`, :class:`MemoryProjection`) and their buffers
(:class:`Activations`, :class:`Gradients`), and the argument lists of the
C++ step loops, whose enums mirror :func:`native_layout` and are checked
against it when the extension loads (:mod:`feedback_lib.fast.native`).
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass, fields

import torch
from torch import nn

from feedback_lib.fast.pool import POOL
from feedback_lib.model.scores import window_start


@dataclass(frozen=True)
class LoopSpec:
    """The sizes the loop needs besides tensors."""

    n_layers: int
    heads: int
    d_k: int
    eps_attn: tuple[float, ...]  # LayerNorm eps before attention, per layer
    eps_ff: tuple[float, ...]  # ... and before the feed-forward block
    mem_len: int | None

    @classmethod
    def of(cls, model: nn.Module) -> LoopSpec:
        """The spec of a shared key/value transformer."""
        layers = model.layers
        return cls(
            model.n_layers,
            model.heads,
            model.d_model // model.heads,
            tuple(layer.norm_self_attn.eps for layer in layers),
            tuple(layer.norm_ff.eps for layer in layers),
            model.mem_len,
        )


def native_args(obj: object) -> list[torch.Tensor]:
    """The tensors of a dataclass in field order, each :class:`Linear`
    as ``weight, packed, bias``: what the C++ step loops take."""
    out: list[torch.Tensor] = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Linear):
            out += value.native()
        elif isinstance(value, torch.Tensor):
            out.append(value)
    return out


def native_layout(cls: type) -> list[str]:
    """The names of :func:`native_args`' entries for a dataclass ``cls``:
    the C++ enum of the same name lists them in this order."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in fields(cls):
        if hints[f.name] is Linear:
            names += [f"{f.name}.{part}" for part in Linear.PARTS]
        elif hints[f.name] is torch.Tensor:
            names.append(f.name)
    return names


def _packing_available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkl.is_available()
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


class Linear:
    """``x @ weight.T + bias`` for inputs of exactly ``rows`` rows.

    On a CPU with MKL (float32) the weight is packed once into MKL's
    layout, so the per-step products skip the repacking ``torch.addmm``
    does at every call: the same numbers, faster by an amount that
    depends on the CPU (chapter 12 measures it). Elsewhere it is
    ``torch.addmm``.
    """

    #: Its entries in the C++ argument lists (an empty tensor: none).
    PARTS = ("weight", "packed", "bias")

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int
    ):
        self.weight, self.bias, self.rows = weight, bias, rows
        self.packed = None
        if _packing_available(weight):
            reorder = torch.ops.mkl._mkl_reorder_linear_weight
            self.packed = reorder(weight, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkl._mkl_linear(
                x, self.packed, self.weight, self.bias, self.rows
            )
        if self.bias is None:
            return torch.mm(x, self.weight.t())
        return torch.addmm(self.bias, x, self.weight.t())

    def transposed(self) -> Linear:
        """``g -> g @ weight`` (no bias), for the backward pass."""
        return Linear(self.weight.t().contiguous(), None, self.rows)

    def native(self) -> list[torch.Tensor]:
        """``weight, packed, bias`` (empty tensors: no packing, no bias)."""
        empty = self.weight.new_empty(0)
        packed = empty if self.packed is None else self.packed
        return [
            self.weight,
            packed,
            empty if self.bias is None else self.bias,
        ]


@dataclass
class LayerTensors:
    """One layer's tensors as :class:`~feedback_lib.fast.loop.FusedKVLoop`
    takes them and returns their gradients, in this field order."""

    norm1_weight: torch.Tensor  # LayerNorm before attention  [d_model]
    norm1_bias: torch.Tensor
    w_q: torch.Tensor  # query projection               [d_model, d_model]
    u_q: torch.Tensor  # U^Q                            [heads, d_k]
    u_k: torch.Tensor  # U^K table, cut                 [heads, d_k, M]
    s: torch.Tensor  # S table, cut                     [heads, 1, M]
    w_o: torch.Tensor  # output projection              [d_model, d_model]
    b_o: torch.Tensor
    norm2_weight: torch.Tensor  # LayerNorm before the feed-forward
    norm2_bias: torch.Tensor
    w_1: torch.Tensor  # feed-forward, first layer      [d_ff, d_model]
    b_1: torch.Tensor
    w_2: torch.Tensor  # feed-forward, second layer     [d_model, d_ff]
    b_2: torch.Tensor

    @classmethod
    def of(cls, layer: nn.Module, longest: int) -> LayerTensors:
        """The tensors of a layer, position tables cut to ``longest``."""
        attn, ff = layer.attn, layer.feed_forward
        tables = attn.position_tables(longest)
        return cls(
            layer.norm_self_attn.weight,
            layer.norm_self_attn.bias,
            attn.query.linear.weight,
            attn.query_pos_bias,
            tables.key_pos_emb,
            tables.key_pos_bias,
            attn.output.weight,
            attn.output.bias,
            layer.norm_ff.weight,
            layer.norm_ff.bias,
            ff.layer1.weight,
            ff.layer1.bias,
            ff.layer2.weight,
            ff.layer2.bias,
        )

    def __iter__(self) -> typing.Iterator[torch.Tensor]:
        return (getattr(self, f.name) for f in fields(self))

    @classmethod
    def split(cls, flat: tuple[torch.Tensor, ...]) -> list[LayerTensors]:
        """The layers of a flat tuple of every layer's tensors in order."""
        k = len(fields(cls))
        if len(flat) % k:
            raise ValueError(f"{len(flat)} tensors are not layers of {k}")
        return [cls(*flat[i : i + k]) for i in range(0, len(flat), k)]


@dataclass
class Layer:
    """One layer as the forward step loop uses it (:meth:`of`)."""

    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    query: Linear  # z -> Q
    u_q: torch.Tensor  # U^Q / sqrt(d_k)                 [heads, d_k]
    u_k: torch.Tensor  # U^K table                      [heads, d_k, M]
    s: torch.Tensor  # S table                          [heads, 1, M]
    output: Linear  # attention output -> W_o . + b_o
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    ff1: Linear
    ff2: Linear
    eps1: float
    eps2: float

    @classmethod
    def of(
        cls, t: LayerTensors, eps1: float, eps2: float, rows: int, d_k: int
    ) -> Layer:
        return cls(
            t.norm1_weight,
            t.norm1_bias,
            Linear(t.w_q, None, rows),
            t.u_q / math.sqrt(d_k),
            t.u_k.contiguous(),
            t.s.contiguous(),
            Linear(t.w_o, t.b_o, rows),
            t.norm2_weight,
            t.norm2_bias,
            Linear(t.w_1, t.b_1, rows),
            Linear(t.w_2, t.b_2, rows),
            eps1,
            eps2,
        )

    def norm1(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The LayerNorm before attention, with its mean and 1/std."""
        return torch.native_layer_norm(
            x, x.shape[-1:], self.norm1_weight, self.norm1_bias, self.eps1
        )

    def norm2(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The LayerNorm before the feed-forward block, likewise."""
        return torch.native_layer_norm(
            x, x.shape[-1:], self.norm2_weight, self.norm2_bias, self.eps2
        )

    @classmethod
    def all(
        cls, spec: LoopSpec, tensors: list[LayerTensors], rows: int
    ) -> list[Layer]:
        return [
            cls.of(t, e1, e2, rows, spec.d_k)
            for t, e1, e2 in zip(tensors, spec.eps_attn, spec.eps_ff)
        ]

    def transposed(self) -> TransposedLayer:
        """What the backward pass needs: the LayerNorms, ``U^K``
        transposed and the products with ``W`` (``g @ W``)."""
        return TransposedLayer(
            self.norm1_weight,
            self.norm1_bias,
            self.query.transposed(),
            self.u_k.transpose(1, 2).contiguous(),
            self.output.transposed(),
            self.norm2_weight,
            self.norm2_bias,
            self.ff1.transposed(),
            self.ff2.transposed(),
        )


@dataclass
class TransposedLayer:
    """One layer as the backward step loop uses it."""

    norm1_weight: torch.Tensor
    norm1_bias: torch.Tensor
    query_t: Linear  # g -> g W_q
    u_k_t: torch.Tensor  # U^K table, transposed     [heads, M, d_k]
    output_t: Linear  # g -> g W_o
    norm2_weight: torch.Tensor
    norm2_bias: torch.Tensor
    ff1_t: Linear  # g -> g W_1
    ff2_t: Linear  # g -> g W_2


@dataclass
class MemoryProjection:
    """The shared key and value projections of the memory vector (or,
    transposed, their products for the backward pass)."""

    key: Linear
    value: Linear


def step_spans(
    spec: LoopSpec, n_prefix: int, seq_len: int
) -> list[tuple[int, int, int]]:
    """Per step ``t``: ``(start, n, offset)``. Step ``t`` writes memory row
    ``n = n_prefix + t`` and attends to rows ``[start, n)``; its attention
    weights are rows ``offset..offset + n - start`` of
    :attr:`Activations.attn`."""
    spans, offset = [], 0
    for t in range(seq_len):
        n = n_prefix + t
        start = window_start(n, spec.mem_len)
        spans.append((start, n, offset))
        offset += n - start
    return spans


@dataclass
class Activations:
    """What the forward pass keeps for the backward pass, in buffers
    allocated once per call (``[layer, step, batch, ...]``)."""

    xs: torch.Tensor  # [steps, n_layers + 1, batch, d_model]: x_t^0..x_t^L
    mems: torch.Tensor  # [steps, batch, d_model]: the memory vectors
    att_outs: torch.Tensor  # attention outputs, before W_o
    mids: torch.Tensor  # x + attention
    hiddens: torch.Tensor  # [.., d_ff]: feed-forward hidden after ReLU
    mean1: torch.Tensor  # [.., 1]: LayerNorm statistics before attention
    rstd1: torch.Tensor
    mean2: torch.Tensor  # ... and before the feed-forward block
    rstd2: torch.Tensor
    queries: torch.Tensor  # [.., heads, d_k]: Q
    scaled: torch.Tensor  # [.., heads, d_k]: (Q + U^Q) / sqrt(d_k)
    attn: torch.Tensor  # [layer, sum of memory lengths, batch, heads]
    spans: list  # step_spans(): each step's memory and weights

    @functools.cached_property
    def buffers(self) -> list[torch.Tensor]:
        """:func:`native_args` of these buffers, listed once."""
        return native_args(self)

    @classmethod
    def allocate(
        cls,
        spec: LoopSpec,
        x_seq: torch.Tensor,
        n_prefix: int,
        d_ff: int,
        attn_rows: int | None = None,
    ) -> Activations:
        """Buffers for the steps of ``x_seq`` after ``n_prefix`` memory
        rows, ``x_seq`` copied into ``xs[:, 0]``; ``attn_rows`` (default:
        exactly enough) sizes the attention weights."""
        seq_len, batch, d_model = x_seq.shape
        n_layers, heads, d_k = spec.n_layers, spec.heads, spec.d_k
        spans = step_spans(spec, n_prefix, seq_len)
        if attn_rows is None:
            start, n, offset = spans[-1]
            attn_rows = offset + n - start

        def new(*shape: int) -> torch.Tensor:
            return POOL.empty(shape, x_seq)

        per_layer = (n_layers, seq_len, batch)
        acts = cls(
            new(seq_len, n_layers + 1, batch, d_model),
            new(seq_len, batch, d_model),
            POOL.zeros((*per_layer, d_model), x_seq),
            new(*per_layer, d_model),
            new(*per_layer, d_ff),
            *(new(*per_layer, 1) for _ in range(4)),
            new(*per_layer, heads, d_k),
            new(*per_layer, heads, d_k),
            new(n_layers, attn_rows, batch, heads),
            spans,
        )
        acts.xs[:, 0] = x_seq
        POOL.release_when_gone(acts, acts.buffers)
        return acts

    def native_spans(self) -> tuple[list[int], list[int], int]:
        """The spans as the C++ loops take them: per-step starts and
        offsets, and ``n_prefix``."""
        starts = [s for s, _, _ in self.spans]
        offsets = [o for _, _, o in self.spans]
        return starts, offsets, self.spans[0][1]


@dataclass
class Gradients:
    """The backward pass's buffers: gradients of the memory rows, and per
    step those the weight gradients are formed from at the end."""

    keys: torch.Tensor  # [n_prefix + steps, batch, heads, d_k]
    values: torch.Tensor
    x_seq: torch.Tensor  # [steps, batch, d_model]: of the inputs
    mems: torch.Tensor  # [steps, batch, d_model]: of the memory vectors
    weights: torch.Tensor  # [n_layers + 1]: of the layer weights
    outs: torch.Tensor  # of each layer's output (-> W_2, b_2)
    hiddens: torch.Tensor  # of the hidden layer before ReLU (-> W_1, b_1)
    z2s: torch.Tensor  # of the LayerNorm before the feed-forward
    mids: torch.Tensor  # of x + attention (-> W_o, b_o)
    qs: torch.Tensor  # of Q (-> W_q)
    z1s: torch.Tensor  # of the LayerNorm before attention
    qus: torch.Tensor  # of (Q + U^Q) / sqrt(d_k) (-> U^Q)
    # The score gradients of every step, right-aligned by distance, for
    # the tables' gradients: [layer, heads, step, batch, distance].
    scores: torch.Tensor

    @classmethod
    def allocate(
        cls,
        acts: Activations,
        keys: torch.Tensor,
        grad_keys: torch.Tensor | None,
        grad_values: torch.Tensor | None,
        longest: int,
    ) -> Gradients:
        seq_len, _, batch, d_model = acts.xs.shape
        n_layers, heads = acts.mids.shape[0], acts.queries.shape[3]

        def memory_grad(grad: torch.Tensor | None) -> torch.Tensor:
            if grad is None:
                return keys.new_zeros(keys.shape)
            return grad.clone(memory_format=torch.contiguous_format)

        # The first five go back to autograd; the rest are pooled.
        mids = acts.mids

        def pooled(shape: tuple[int, ...], zero: bool) -> torch.Tensor:
            return (POOL.zeros if zero else POOL.empty)(shape, mids)

        return cls(
            memory_grad(grad_keys),
            memory_grad(grad_values),
            mids.new_empty((seq_len, batch, d_model)),
            pooled(acts.mems.shape, False),
            mids.new_zeros(n_layers + 1),
            pooled(mids.shape, False),
            pooled(acts.hiddens.shape, False),
            pooled(mids.shape, False),
            pooled(mids.shape, True),
            pooled(mids.shape, True),
            pooled(mids.shape, True),
            pooled(mids.shape, True),
            pooled((n_layers, heads, seq_len, batch, longest), True),
        )

    def pooled(self) -> list[torch.Tensor]:
        """The buffers that come from the pool (only the backward pass
        sees them)."""
        return [
            self.mems,
            self.outs,
            self.hiddens,
            self.z2s,
            self.mids,
            self.qs,
            self.z1s,
            self.qus,
            self.scores,
        ]


#: The dataclasses whose :func:`native_layout` the C++ enums mirror.
NATIVE_LAYOUTS = (
    Layer,
    TransposedLayer,
    MemoryProjection,
    Activations,
    Gradients,
)
