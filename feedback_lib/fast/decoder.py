"""The fused loop's state for generation: one step per new token (chapter
9)."""

from __future__ import annotations

import torch
from torch import nn

from feedback_lib.fast.steps import forward_steps, native_forward_args
from feedback_lib.fast.tensors import (
    Activations,
    Layer,
    LayerTensors,
    Linear,
    LoopSpec,
    MemoryProjection,
    step_spans,
)


class FusedState:
    """Token-by-token inference of a shared key/value transformer over one
    preallocated memory for ``batch`` sequences of up to ``capacity``
    steps (twice ``mem_len`` steps when the model has one).

    The keys and values live in one buffer and the weights stay packed
    from call to call, instead of a new buffer and new packing per token.
    :meth:`read` returns what the model's ``forward`` returns for the new
    steps. :class:`~feedback_lib.model.lm.FeedbackDecoder` builds one when
    the model runs fused, and checks the tokens before they get here.
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int):
        self.model = model
        self.spec = spec = LoopSpec.of(model)
        longest = max(1, model.longest_memory(0, capacity))
        with torch.no_grad():
            tensors = [
                LayerTensors(
                    *(t.detach() for t in LayerTensors.of(layer, longest))
                )
                for layer in model.layers
            ]
            self.weights = torch.softmax(model.weights, 0).detach()
        self.layers = Layer.all(spec, tensors, batch)
        self.memory = MemoryProjection(
            Linear(model.key.linear.weight.detach(), None, batch),
            Linear(model.value.linear.weight.detach(), None, batch),
        )
        self.prepared = native_forward_args(self.layers, self.memory)
        weight = model.norm.weight
        # With mem_len, room for twice the window: when it is full, the
        # window slides back to the front (see make_room).
        rows = capacity if spec.mem_len is None else 2 * spec.mem_len
        shape = (min(capacity, rows), batch, spec.heads, spec.d_k)
        self.keys = weight.new_zeros(shape)
        self.values = weight.new_zeros(shape)
        self.batch, self.capacity, self.length = batch, capacity, 0
        self.used = 0  # rows of keys and values in use
        self.d_ff = self.layers[0].ff1.weight.shape[0]
        # One token at a time reuses one set of buffers, with room for
        # the attention weights of the longest memory.
        one = weight.new_zeros((1, batch, model.d_model))
        self.one_step = Activations.allocate(
            spec, one, 0, self.d_ff, attn_rows=longest
        )

    @torch.no_grad()
    def read(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Read ``x_seq [n, batch, d_model]`` after everything read before;
        returns the normalised outputs ``[n, batch, d_model]``."""
        n = x_seq.shape[0]
        expected = (n, self.batch, self.model.d_model)
        if (
            tuple(x_seq.shape) != expected
            or self.length + n > self.capacity
        ):
            raise ValueError(
                f"the fused state holds {self.capacity} steps of batch "
                f"{self.batch} ({self.length} used); got x_seq of shape "
                f"{list(x_seq.shape)}"
            )
        self.make_room(n)
        if n == 1:
            acts = self.one_step
            acts.xs[0, 0] = x_seq[0]
            acts.spans = step_spans(self.spec, self.used, 1)
        else:
            acts = Activations.allocate(
                self.spec, x_seq, self.used, self.d_ff
            )
        forward_steps(
            self.spec,
            self.layers,
            self.memory,
            self.weights,
            acts,
            self.keys,
            self.values,
            self.prepared,
        )
        self.length += n
        self.used += n
        return self.model.norm(acts.xs[:, -1])

    def make_room(self, n: int) -> None:
        """Make room for ``n`` more rows. Only a model with ``mem_len``
        runs out (the buffer holds every row otherwise): the last
        ``mem_len`` rows, all that later steps attend to, move to the
        front, in a larger buffer if ``n`` more would still not fit. The
        scores depend on distances only, so the rows may sit anywhere."""
        rows = len(self.keys)
        if self.used + n <= rows:
            return
        keep = min(self.used, self.spec.mem_len)
        old = slice(self.used - keep, self.used)
        if keep + n > rows:
            rows = keep + n
            shape = (rows, *self.keys.shape[1:])
            keys, values = (
                self.keys.new_empty(shape),
                self.keys.new_empty(shape),
            )
        else:
            keys, values = self.keys, self.values
        keys[:keep] = self.keys[old].clone()
        values[:keep] = self.values[old].clone()
        self.keys, self.values, self.used = keys, values, keep
