"""The shared key/value transformer's token loop as one autograd function with a hand-derived backward.

The reference loop (chapter 5) lets autograd record every operation of every step: a few dozen
graph nodes per layer per step, each linear layer computing a rank-``batch`` weight gradient per
step and adding it into the parameter's gradient. :class:`FusedKVLoop` runs the same computation
with autograd switched off inside, saves what the backward pass needs, and walks the steps
backwards itself (backpropagation through time written out by hand). Three things make it fast:

* per step it issues only the kernels the maths needs, with the position tables cut once per
  sequence and every step's results written into buffers preallocated once per call;
* the gradients of the weight matrices are not computed per step: the backward pass keeps each
  step's input and output gradient and forms every weight gradient with one large matrix product
  over all steps at the end (``sum_t g_t^T x_t`` as ``G^T X``);
* the per-step matrix products use weights packed once per call (:class:`Linear`).

Chapter 7 derives the backward pass; the tests check it against the reference loop and with
``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from feedback_lib import native
from feedback_lib.feed_forward import FeedForward
from feedback_lib.memory import window_start

#: Per layer, the tensors :class:`FusedKVLoop` takes, in this order.
LAYER_TENSORS = ("norm_self_attn.weight", "norm_self_attn.bias", "attn.query.linear.weight",
                 "attn.query_pos_bias", "key_pos_embeddings", "key_pos_bias", "attn.output.weight",
                 "attn.output.bias", "norm_ff.weight", "norm_ff.bias", "feed_forward.layer1.weight",
                 "feed_forward.layer1.bias", "feed_forward.layer2.weight", "feed_forward.layer2.bias")


@dataclass(frozen=True)
class LoopSpec:
    """The sizes the loop needs besides tensors."""

    n_layers: int
    heads: int
    d_k: int
    eps_attn: tuple[float, ...]   # LayerNorm eps before attention, per layer
    eps_ff: tuple[float, ...]     # LayerNorm eps before the feed-forward block, per layer
    mem_len: int | None

    def window(self, n: int) -> int:
        """First memory row that step ``n`` (which sees rows ``0..n-1``) attends to."""
        return window_start(n, self.mem_len)


def fused_loop_blocker(model: nn.Module) -> str | None:
    """Why ``model`` (a FeedbackTransformerKV) cannot run :class:`FusedKVLoop`, or None if it can.

    The fused loop implements pre-norm layers with :class:`~feedback_lib.FeedForward` (ReLU, not
    gated, with biases), without cross-attention (chapter 11), without active dropout and outside
    ``torch.autocast``; anything else runs the reference loop.
    """
    device_type = model.norm.weight.device.type
    if torch.is_autocast_enabled(device_type):
        return "torch.autocast is on"
    for layer in model.layers:
        if layer.cross_attn is not None:
            return "the layers have cross-attention"
        ff = layer.feed_forward
        if type(ff) is not FeedForward or type(ff.activation) is not nn.ReLU or ff.is_gated:
            return "the feed-forward block is not a plain ReLU FeedForward"
        if ff.layer1.bias is None or ff.layer2.bias is None:
            return "the feed-forward block has no biases"
        norms = (layer.norm_self_attn, layer.norm_ff)
        if any(norm.weight is None or norm.bias is None for norm in norms):
            return "a LayerNorm has no affine parameters"
        if model.training and any(m.p > 0 for m in (layer.dropout, layer.attn.dropout, ff.dropout)):
            return "dropout is active"
    return None


def layer_tensors(layer: nn.Module, longest: int) -> list[torch.Tensor]:
    """The tensors of one layer in :data:`LAYER_TENSORS` order, position tables cut to ``longest``."""
    key_pos_emb, key_pos_bias = layer.attn.position_tables(longest)
    attn, ff = layer.attn, layer.feed_forward
    return [layer.norm_self_attn.weight, layer.norm_self_attn.bias, attn.query.linear.weight,
            attn.query_pos_bias, key_pos_emb, key_pos_bias, attn.output.weight, attn.output.bias,
            layer.norm_ff.weight, layer.norm_ff.bias, ff.layer1.weight, ff.layer1.bias,
            ff.layer2.weight, ff.layer2.bias]


def _packing_available(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_linear"))


class Linear:
    """``x @ weight.T + bias`` for inputs of exactly ``rows`` rows, the product every step repeats.

    On a CPU with MKL (float32) the weight is packed once into MKL's internal layout, so the
    per-step products skip the repacking a plain ``torch.addmm`` does at every call: the same
    numbers, about twice as fast for the 16-row products of the benchmark. Elsewhere it is
    ``torch.addmm``/``torch.mm``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int):
        self.weight, self.bias, self.rows = weight, bias, rows
        self.packed = torch.ops.mkl._mkl_reorder_linear_weight(weight, rows) if _packing_available(weight) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.weight, self.bias, self.rows)
        if self.bias is None:
            return torch.mm(x, self.weight.t())
        return torch.addmm(self.bias, x, self.weight.t())

    def native(self) -> list[torch.Tensor]:
        """``[weight, packed weight]`` and the bias if there is one, for ``fused_kv.cpp`` (an empty
        tensor stands for no packing)."""
        packed = self.weight.new_empty(0) if self.packed is None else self.packed
        return [self.weight, packed] + ([] if self.bias is None else [self.bias])


class BufferPool:
    """Reuses the loop's large CPU buffers from one call to the next.

    A training step at the benchmark's size fills about 100 MB of activations and gradients. Fresh
    memory costs a page fault per 4 KB page (the C allocator hands large freed blocks back to the
    operating system), which was about a quarter of a step. Buffers come back to the pool only when
    nothing uses them any more: the gradients' at the end of the backward pass, the activations' when
    the object holding them is garbage (``weakref.finalize``), so a retained graph keeps its own.
    The pool keeps at most ``keep`` buffers per shape and dtype and ``max_bytes`` in all, dropping
    the shapes used longest ago first (sequence lengths change during a curriculum).
    """

    def __init__(self, keep: int = 8, max_bytes: int = 512 * 2**20):
        self.keep, self.max_bytes = keep, max_bytes   # one step uses eight buffers of the commonest shape
        self.free: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()               # models may run in several threads

    def empty(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised buffer of ``shape`` with ``like``'s dtype and device."""
        key = (tuple(shape), like.dtype)
        with self.lock:
            stack = self.free.get(key) if like.device.type == "cpu" else None
            if not stack:
                return like.new_empty(shape)
            self.free.move_to_end(key)
            tensor = stack.pop()
            self.bytes -= tensor.nbytes
            return tensor

    def zeros(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        return self.empty(shape, like).zero_()

    def release(self, tensors: list[torch.Tensor]) -> None:
        """Take back ``tensors``, which nothing else may use any more. Buffers made under
        ``torch.inference_mode`` are not kept: outside it they could not be written."""
        with self.lock:
            for tensor in tensors:
                if tensor.device.type != "cpu" or tensor.is_inference() or tensor.nbytes > self.max_bytes:
                    continue
                key = (tuple(tensor.shape), tensor.dtype)
                stack = self.free.setdefault(key, [])
                self.free.move_to_end(key)
                if len(stack) < self.keep:
                    stack.append(tensor)
                    self.bytes += tensor.nbytes
            while self.bytes > self.max_bytes:           # drop the shapes used longest ago
                _, stack = self.free.popitem(last=False)
                self.bytes -= sum(t.nbytes for t in stack)

    def release_when_gone(self, owner: object, tensors: list[torch.Tensor]) -> None:
        """Take back ``tensors`` once ``owner``, which holds them, is garbage."""
        weakref.finalize(owner, self.release, tensors)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.bytes = 0


#: The pool the fused loop allocates from.
POOL = BufferPool()


@dataclass
class Layer:
    """One layer's tensors as the loop uses them (see :data:`LAYER_TENSORS`)."""

    norm_attn: tuple[torch.Tensor, torch.Tensor, float]   # LayerNorm weight, bias, eps
    query: Linear                                          # z -> Q
    query_pos_bias: torch.Tensor                           # U^Q / sqrt(d_k)  [heads, d_k]
    key_pos_emb: torch.Tensor                              # U^K table [heads, d_k, longest]
    key_pos_bias: torch.Tensor                             # S table   [heads, 1, longest]
    output: Linear                                         # attention output -> W_o . + b_o
    norm_ff: tuple[torch.Tensor, torch.Tensor, float]
    ff1: Linear
    ff2: Linear

    @classmethod
    def unpack(cls, spec: LoopSpec, tensors: tuple[torch.Tensor, ...], rows: int) -> list["Layer"]:
        k = len(LAYER_TENSORS)
        layers = []
        for i in range(spec.n_layers):
            g1, b1, w_q, u_q, u_k, s_k, w_o, b_o, g2, b2, w_1, c_1, w_2, c_2 = tensors[i * k:(i + 1) * k]
            layers.append(cls((g1, b1, spec.eps_attn[i]), Linear(w_q, None, rows), u_q / math.sqrt(spec.d_k),
                              u_k.contiguous(), s_k.contiguous(), Linear(w_o, b_o, rows), (g2, b2, spec.eps_ff[i]),
                              Linear(w_1, c_1, rows), Linear(w_2, c_2, rows)))
        return layers

    def transposed(self, rows: int) -> "TransposedLayer":
        """What the backward pass needs: the LayerNorms, U^K (transposed) and the products with ``W`` (``g @ W``)."""
        def t(linear: Linear) -> Linear:
            return Linear(linear.weight.t().contiguous(), None, rows)

        return TransposedLayer(self.norm_attn, t(self.query), self.key_pos_emb.transpose(1, 2).contiguous(),
                               t(self.output), self.norm_ff, t(self.ff1), t(self.ff2))

    def native(self) -> list[torch.Tensor]:
        """The tensors in the order of ``enum Fwd`` in ``fused_kv.cpp``."""
        return [*self.norm_attn[:2], *self.query.native(), self.query_pos_bias, self.key_pos_emb,
                self.key_pos_bias, *self.output.native(), *self.norm_ff[:2], *self.ff1.native(), *self.ff2.native()]


@dataclass
class TransposedLayer:
    """One layer's tensors as the backward pass uses them (built by :meth:`Layer.transposed`)."""

    norm_attn: tuple[torch.Tensor, torch.Tensor, float]
    query_t: Linear                # g -> g W_q
    key_pos_emb_t: torch.Tensor    # U^K table, transposed [heads, longest, d_k]
    output_t: Linear               # g -> g W_o
    norm_ff: tuple[torch.Tensor, torch.Tensor, float]
    ff1_t: Linear                  # g -> g W_1
    ff2_t: Linear                  # g -> g W_2

    def native(self) -> list[torch.Tensor]:
        """The tensors in the order of ``enum Bwd`` in ``fused_kv.cpp``."""
        return [*self.norm_attn[:2], *self.query_t.native(), self.key_pos_emb_t, *self.output_t.native(),
                *self.norm_ff[:2], *self.ff1_t.native(), *self.ff2_t.native()]


def step_spans(spec: LoopSpec, n_prefix: int, seq_len: int) -> list[tuple[int, int, int]]:
    """Per step ``t``: ``(start, n, offset)``. Step ``t`` writes memory row ``n = n_prefix + t`` and
    attends to rows ``[start, n)``; its attention weights are rows ``offset..offset + n - start``
    of :attr:`Activations.attn`."""
    spans, offset = [], 0
    for t in range(seq_len):
        n = n_prefix + t
        start = spec.window(n)
        spans.append((start, n, offset))
        offset += n - start
    return spans


@dataclass
class Activations:
    """What the forward pass keeps for the backward pass, in buffers allocated once per call."""

    xs: torch.Tensor          # [steps, n_layers + 1, batch, d_model]: each layer's input, and the last output
    mems: torch.Tensor        # [steps, batch, d_model]: the memory vectors
    att_outs: torch.Tensor    # [n_layers, steps, batch, d_model]: attention outputs (before W_o)
    mids: torch.Tensor        # [n_layers, steps, batch, d_model]: x + attention
    hiddens: torch.Tensor     # [n_layers, steps, batch, d_ff]: the feed-forward hidden layer after ReLU
    mean1: torch.Tensor       # [n_layers, steps, batch, 1]: LayerNorm statistics before attention
    rstd1: torch.Tensor
    mean2: torch.Tensor       # ... and before the feed-forward block
    rstd2: torch.Tensor
    queries: torch.Tensor     # [n_layers, steps, batch, heads, d_k]: Q
    scaled: torch.Tensor      # [n_layers, steps, batch, heads, d_k]: (Q + U^Q) / sqrt(d_k)
    attn: torch.Tensor        # [n_layers, sum of memory lengths, batch, heads]: attention weights
    spans: list               # step_spans(): where each step's memory and attention weights are

    @classmethod
    def allocate(cls, spec: LoopSpec, x_seq: torch.Tensor, n_prefix: int, d_ff: int,
                 attn_rows: int | None = None) -> "Activations":
        """Buffers for the steps of ``x_seq`` after ``n_prefix`` memory rows, with ``x_seq`` copied
        into ``xs[:, 0]``; ``attn_rows`` (default: exactly enough) sizes the attention weights."""
        seq_len, batch, d_model = x_seq.shape
        n_layers, heads, d_k = spec.n_layers, spec.heads, spec.d_k
        spans = step_spans(spec, n_prefix, seq_len)
        if attn_rows is None:
            attn_rows = spans[-1][2] + spans[-1][1] - spans[-1][0]

        def new(*shape: int) -> torch.Tensor:
            return POOL.empty(shape, x_seq)

        per_layer = (n_layers, seq_len, batch)
        acts = cls(new(seq_len, n_layers + 1, batch, d_model), new(seq_len, batch, d_model),
                   POOL.zeros((*per_layer, d_model), x_seq), new(*per_layer, d_model), new(*per_layer, d_ff),
                   *(new(*per_layer, 1) for _ in range(4)), new(*per_layer, heads, d_k), new(*per_layer, heads, d_k),
                   new(n_layers, attn_rows, batch, heads), spans)
        acts.xs[:, 0] = x_seq
        POOL.release_when_gone(acts, acts.native())
        return acts

    def native(self) -> list[torch.Tensor]:
        """The buffers in the order of ``enum Act`` in ``fused_kv.cpp``."""
        return [self.xs, self.mems, self.att_outs, self.mids, self.hiddens, self.mean1, self.rstd1, self.mean2,
                self.rstd2, self.queries, self.scaled, self.attn]

    def native_spans(self) -> tuple[list[int], list[int], int]:
        """The spans as ``fused_kv.cpp`` takes them: per-step starts and offsets, and ``n_prefix``."""
        return [s for s, _, _ in self.spans], [o for _, _, o in self.spans], self.spans[0][1]


def native_forward_args(layers: list[Layer], memory_proj: tuple[Linear, Linear]) -> tuple[list, list, list]:
    """The layers and memory projections as ``fused_kv.cpp``'s ``forward_steps`` takes them."""
    return ([t for layer in layers for t in layer.native()],
            [eps for layer in layers for eps in (layer.norm_attn[2], layer.norm_ff[2])],
            [t for linear in memory_proj for t in linear.native()])


def forward_steps(spec: LoopSpec, layers: list[Layer], memory_proj: tuple[Linear, Linear], weights: torch.Tensor,
                  acts: Activations, keys: torch.Tensor, values: torch.Tensor,
                  native_args: tuple[list, list, list] | None = None) -> None:
    """Run the steps whose inputs are ``acts.xs[:, 0] [seq_len, batch, d_model]`` over the memory
    ``keys``/``values [capacity, batch, heads, d_k]``, whose rows before the first step's are
    filled; step ``t`` writes row ``acts.spans[t][1]``. The last layer's outputs end in ``acts.xs[:, -1]``.

    The loop is :func:`run_steps`, or its C++ translation when :mod:`feedback_lib.native` has one
    for this device (``native_args``: :func:`native_forward_args`, if already made)."""
    extension = native.extension(acts.xs.device, acts.xs.dtype)
    if extension is None:
        run_steps(spec, layers, memory_proj, weights, acts, keys, values)
        return
    layer_args, eps, memory_args = native_args or native_forward_args(layers, memory_proj)
    extension.forward_steps(layer_args, eps, memory_args, weights, acts.native(), keys, values, *acts.native_spans())


def run_steps(spec: LoopSpec, layers: list[Layer], memory_proj: tuple[Linear, Linear], weights: torch.Tensor,
              acts: Activations, keys: torch.Tensor, values: torch.Tensor) -> None:
    """The forward loop: fills ``acts`` (whose ``xs[:, 0]`` holds the inputs) and the new memory rows."""
    seq_len, _, batch, d_model = acts.xs.shape
    heads, d_k = spec.heads, spec.d_k
    scale = 1 / math.sqrt(d_k)
    scratch = torch.empty_like(keys)            # a query's products with the memory, reused
    for t, (start, n, offset) in enumerate(acts.spans):   # step t writes row n and sees rows [start, n)
        m = n - start
        key, value, product = keys[start:n], values[start:n], scratch[:m]        # [m, batch, heads, d_k]
        x = acts.xs[t, 0]
        for i, layer in enumerate(layers):
            x_mid = acts.mids[i, t]
            if m:
                z1, acts.mean1[i, t], acts.rstd1[i, t] = torch.native_layer_norm(x, (d_model,), *layer.norm_attn)
                q = acts.queries[i, t].copy_(layer.query(z1).view(batch, heads, d_k))   # Q   [batch, heads, d_k]
                qs = torch.add(layer.query_pos_bias, q, alpha=scale, out=acts.scaled[i, t])  # (Q + U^Q) / sqrt(d_k)
                scores = torch.mul(key, qs, out=product).sum(-1)                 # A + C    [m, batch, heads]
                # B + D: (S_j + Q . U^K_j) / sqrt(d_k), one matmul per head       [heads, batch, m]
                pos = torch.baddbmm(layer.key_pos_bias[..., -m:], q.transpose(0, 1), layer.key_pos_emb[..., -m:],
                                    beta=scale, alpha=scale)
                scores += pos.permute(2, 1, 0)
                attn = torch.softmax(scores, dim=0, out=acts.attn[i, offset:offset + m])   # over the memory axis
                att_out = acts.att_outs[i, t]
                torch.mul(attn.unsqueeze(-1), value, out=product)
                torch.sum(product, 0, out=att_out.view(batch, heads, d_k))       # sum_j attn_j V_j
                torch.add(layer.output(att_out), x, out=x_mid)                   # x + attention
            else:                                        # no memory yet: the attention block is skipped
                x_mid.copy_(x)
            z2, acts.mean2[i, t], acts.rstd2[i, t] = torch.native_layer_norm(x_mid, (d_model,), *layer.norm_ff)
            hidden = torch.clamp_min(layer.ff1(z2), 0, out=acts.hiddens[i, t])  # ReLU     [batch, d_ff]
            x = torch.add(layer.ff2(hidden), x_mid, out=acts.xs[t, i + 1])       # x_mid + feed-forward
        # The memory vector and its key and value, written into row n of the buffers.
        mem = torch.mm(weights[None], acts.xs[t].view(len(layers) + 1, -1), out=acts.mems[t].view(1, -1))
        mem = mem.view(batch, d_model)
        keys[n] = memory_proj[0](mem).view(batch, heads, d_k)
        values[n] = memory_proj[1](mem).view(batch, heads, d_k)


@dataclass
class Gradients:
    """The backward pass's buffers: gradients of the memory rows, and per step those that the
    weight gradients are formed from at the end, ``[layer, step, ...]``."""

    keys: torch.Tensor        # [n_prefix + steps, batch, heads, d_k]: later steps add into earlier rows
    values: torch.Tensor
    x_seq: torch.Tensor       # [steps, batch, d_model]: of the inputs
    mems: torch.Tensor        # [steps, batch, d_model]: of the memory vectors (-> W_k, W_v)
    weights: torch.Tensor     # [n_layers + 1]: of the layer weights
    outs: torch.Tensor        # of each layer's output (-> W_2, c_2)
    hiddens: torch.Tensor     # of the hidden layer before ReLU (-> W_1, c_1)
    z2s: torch.Tensor         # of the LayerNorm before the feed-forward block
    mids: torch.Tensor        # of x + attention (-> W_o, b_o)
    qs: torch.Tensor          # of Q (-> W_q)
    z1s: torch.Tensor         # of the LayerNorm before attention
    qus: torch.Tensor         # of (Q + U^Q) / sqrt(d_k) (-> U^Q)
    # The score gradients of every step, right-aligned by distance: the position tables'
    # gradients are formed from them at the end.           [layer, heads, step, batch, distance]
    scores: torch.Tensor

    @classmethod
    def allocate(cls, acts: Activations, keys: torch.Tensor, grad_keys: torch.Tensor | None,
                 grad_values: torch.Tensor | None, longest: int) -> "Gradients":
        seq_len, _, batch, d_model = acts.xs.shape
        n_layers, heads = acts.mids.shape[0], acts.queries.shape[3]

        def memory_grad(grad: torch.Tensor | None) -> torch.Tensor:
            return keys.new_zeros(keys.shape) if grad is None else grad.clone(memory_format=torch.contiguous_format)

        # The first four are returned to autograd (or viewed by what is); the rest are pooled.
        mids = acts.mids
        return cls(memory_grad(grad_keys), memory_grad(grad_values), mids.new_empty((seq_len, batch, d_model)),
                   POOL.empty(acts.mems.shape, mids), mids.new_zeros(n_layers + 1), POOL.empty(mids.shape, mids),
                   POOL.empty(acts.hiddens.shape, mids), POOL.empty(mids.shape, mids), POOL.zeros(mids.shape, mids),
                   POOL.zeros(mids.shape, mids), POOL.zeros(mids.shape, mids), POOL.zeros(mids.shape, mids),
                   POOL.zeros((n_layers, heads, seq_len, batch, longest), mids))

    def pooled(self) -> list[torch.Tensor]:
        """The buffers that come from :data:`POOL` (nothing outside the backward pass sees them)."""
        return [self.mems, self.outs, self.hiddens, self.z2s, self.mids, self.qs, self.z1s, self.qus, self.scores]

    def native(self) -> list[torch.Tensor]:
        """The buffers in the order of ``enum Grad`` in ``fused_kv.cpp``."""
        return [self.keys, self.values, self.x_seq, self.mems, self.weights, self.outs, self.hiddens, self.z2s,
                self.mids, self.qs, self.z1s, self.qus, self.scores]


def backward_steps(spec: LoopSpec, layers: list[TransposedLayer], memory_back: tuple[Linear, Linear],
                   weights: torch.Tensor, acts: Activations, keys: torch.Tensor, values: torch.Tensor,
                   grad_out: torch.Tensor, grads: Gradients) -> None:
    """Walk the steps backwards: :func:`run_steps_backward`, or its C++ translation when
    :mod:`feedback_lib.native` has one for this device."""
    extension = native.extension(grad_out.device, grad_out.dtype)
    if extension is None:
        run_steps_backward(spec, layers, memory_back, weights, acts, keys, values, grad_out, grads)
    else:
        extension.backward_steps([t for layer in layers for t in layer.native()],
                                 [t for linear in memory_back for t in linear.native()], weights,
                                 acts.native(), keys, values, grads.native(), grad_out.contiguous(),
                                 *acts.native_spans())


def run_steps_backward(spec: LoopSpec, layers: list[TransposedLayer], memory_back: tuple[Linear, Linear],
                       weights: torch.Tensor, acts: Activations, keys: torch.Tensor, values: torch.Tensor,
                       grad_out: torch.Tensor, grads: Gradients) -> None:
    """Backpropagation through the steps of :func:`run_steps`, last step first, into ``grads``."""
    seq_len, _, batch, d_model = acts.xs.shape
    n_layers, heads, d_k = spec.n_layers, spec.heads, spec.d_k
    scale = 1 / math.sqrt(d_k)
    xs, g_keys, g_values = acts.xs, grads.keys, grads.values
    scratch = torch.empty_like(keys)
    for t in reversed(range(seq_len)):
        start, n, offset = acts.spans[t]
        m = n - start
        key, value, product = keys[start:n], values[start:n], scratch[:m]
        # Row n is complete: every later step has added its share. Back through key and value:
        g_mem = torch.add(memory_back[0](g_keys[n].view(batch, d_model)),
                          memory_back[1](g_values[n].view(batch, d_model)), out=grads.mems[t])   # [batch, d_model]
        grads.weights += torch.mv(xs[t].view(n_layers + 1, -1), g_mem.view(-1))
        g_layers = weights[:, None, None] * g_mem                               # the memory's share per layer
        g = torch.add(grad_out[t], g_layers[n_layers], out=grads.outs[n_layers - 1, t])
        for i in reversed(range(n_layers)):
            layer = layers[i]
            # x = x_mid + W_2 relu(W_1 LayerNorm(x_mid) + c_1) + c_2
            g_hidden = torch.ops.aten.threshold_backward.grad_input(
                layer.ff2_t(g), acts.hiddens[i, t], 0, grad_input=grads.hiddens[i, t])   # [batch, d_ff]
            g_z2 = grads.z2s[i, t].copy_(layer.ff1_t(g_hidden))
            g_mid = torch.ops.aten.native_layer_norm_backward(
                g_z2, acts.mids[i, t], (d_model,), acts.mean2[i, t], acts.rstd2[i, t], *layer.norm_ff[:2],
                [True, False, False])[0].add_(g)
            if m:
                grads.mids[i, t] = g_mid
                attn, qs = acts.attn[i, offset:offset + m], acts.scaled[i, t]
                # x_mid = x + W_o att_out + b_o, att_out = sum_j attn_j V_j
                g_att = layer.output_t(g_mid).view(batch, heads, d_k)
                g_attn = torch.mul(value, g_att, out=product).sum(-1)             # [m, batch, heads]
                g_values[start:n].addcmul_(attn.unsqueeze(-1), g_att)
                g_scores = torch._softmax_backward_data(g_attn, attn, 0, attn.dtype)
                # scores = qs . K_j + (S_j + Q . U^K_j) / sqrt(d_k)
                torch.mul(g_scores.unsqueeze(-1), key, out=product)
                g_qu = torch.sum(product, 0, out=grads.qus[i, t].view(batch, heads, d_k))
                g_keys[start:n].addcmul_(g_scores.unsqueeze(-1), qs)
                g_scores_h = g_scores.permute(2, 1, 0)                            # [heads, batch, m]
                grads.scores[i, :, t, :, -m:] = g_scores_h
                g_q = torch.bmm(g_scores_h, layer.key_pos_emb_t[:, -m:])               # [heads, batch, d_k]
                g_q = torch.add(g_qu, g_q.transpose(0, 1), out=grads.qs[i, t].view(batch, heads, d_k)).mul_(scale)
                g_z1 = grads.z1s[i, t].copy_(layer.query_t(g_q.view(batch, d_model)))
                g = torch.ops.aten.native_layer_norm_backward(
                    g_z1, xs[t, i], (d_model,), acts.mean1[i, t], acts.rstd1[i, t], *layer.norm_attn[:2],
                    [True, False, False])[0].add_(g_mid)
            else:
                g = g_mid
            g = torch.add(g, g_layers[i], out=grads.outs[i - 1, t] if i else grads.x_seq[t])


class FusedKVLoop(torch.autograd.Function):
    """``apply(spec, x_seq, prefix_key, prefix_value, weights, w_key, w_value, *layer_tensors)``.

    * ``x_seq [seq_len, batch, d_model]``: the inputs of the steps;
    * ``prefix_key``/``prefix_value [n_prefix, batch, heads, d_k]`` or None: the carried memory;
    * ``weights [n_layers + 1]``: the layer weights after their softmax;
    * ``w_key``/``w_value [d_model, d_model]``: the shared key and value projections;
    * ``layer_tensors``: per layer, the tensors of :func:`layer_tensors`.

    Returns ``(out [seq_len, batch, d_model], keys, values)``: the last layer's output at every step
    (before the final LayerNorm) and the whole memory ``[n_prefix + seq_len, batch, heads, d_k]``.
    """

    @staticmethod
    def forward(ctx, spec: LoopSpec, x_seq, prefix_key, prefix_value, weights, w_key, w_value, *tensors):
        seq_len, batch, d_model = x_seq.shape
        n_prefix = 0 if prefix_key is None else prefix_key.shape[0]
        # The memory, preallocated: step t writes row n_prefix + t.
        keys = x_seq.new_empty((n_prefix + seq_len, batch, spec.heads, spec.d_k))
        values = torch.empty_like(keys)
        if n_prefix:
            keys[:n_prefix] = prefix_key
            values[:n_prefix] = prefix_value
        layers = Layer.unpack(spec, tensors, batch)
        acts = Activations.allocate(spec, x_seq, n_prefix, layers[0].ff1.weight.shape[0])
        forward_steps(spec, layers, (Linear(w_key, None, batch), Linear(w_value, None, batch)), weights, acts,
                      keys, values)
        if any(ctx.needs_input_grad):
            ctx.spec, ctx.acts, ctx.layers, ctx.n_prefix = spec, acts, layers, n_prefix
            ctx.has_prefix = prefix_key is not None
            # keys and values are outputs: saved through save_for_backward, as an attribute of ctx
            # they would form a reference cycle (output -> its graph node -> output) that leaks.
            ctx.save_for_backward(weights, w_key, w_value, keys, values)
        return acts.xs[:, spec.n_layers].clone(), keys, values

    @staticmethod
    @once_differentiable                   # the hand-written backward pass is not itself differentiable
    def backward(ctx, grad_out, grad_keys, grad_values):
        spec, acts, n_prefix = ctx.spec, ctx.acts, ctx.n_prefix
        weights, w_key, w_value, keys, values = ctx.saved_tensors
        seq_len, _, batch, d_model = acts.xs.shape
        if grad_out is None:
            grad_out = acts.xs.new_zeros((seq_len, batch, d_model))
        longest = ctx.layers[0].key_pos_emb.shape[-1]
        grads = Gradients.allocate(acts, keys, grad_keys, grad_values, longest)
        back = [layer.transposed(batch) for layer in ctx.layers]
        memory_back = (Linear(w_key.t().contiguous(), None, batch), Linear(w_value.t().contiguous(), None, batch))
        backward_steps(spec, back, memory_back, weights, acts, keys, values, grad_out, grads)
        g_tensors = weight_gradients(spec, ctx.layers, acts, grads, n_prefix)
        new_rows = slice(n_prefix, n_prefix + seq_len)
        mem_flat = acts.mems.flatten(0, 1)
        g_w_key = grads.keys[new_rows].flatten(0, 1).flatten(1).t() @ mem_flat
        g_w_value = grads.values[new_rows].flatten(0, 1).flatten(1).t() @ mem_flat
        g_prefix_key = grads.keys[:n_prefix] if ctx.has_prefix else None
        g_prefix_value = grads.values[:n_prefix] if ctx.has_prefix else None
        POOL.release(grads.pooled())
        return (None, grads.x_seq, g_prefix_key, g_prefix_value, grads.weights, g_w_key, g_w_value, *g_tensors)


def weight_gradients(spec: LoopSpec, layers: list[Layer], acts: Activations, grads: Gradients,
                     n_prefix: int) -> list[torch.Tensor]:
    """Every layer's weight gradients in :data:`LAYER_TENSORS` order: one matrix product over all
    steps each, ``sum_t g_t^T x_t = G^T X``."""
    seq_len = acts.xs.shape[0]
    scale = 1 / math.sqrt(spec.d_k)
    first = 0 if n_prefix else 1               # the first step with a memory to attend to
    x_hat, product = POOL.empty(acts.mids[0].shape, acts.mids), POOL.empty(acts.mids[0].shape, acts.mids)

    def flat(buffer: torch.Tensor) -> torch.Tensor:      # [steps, batch, width] -> [steps * batch, width]
        return buffer.flatten(0, 1)

    def layer_norm_grads(x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, norm: tuple, g_z: torch.Tensor,
                         g_y: torch.Tensor) -> list[torch.Tensor]:
        # z = x_hat * gamma + beta feeds y = z W^T: the gradients of gamma, beta and W, from the
        # statistics the forward pass kept (x_hat = (x - mean) * rstd), in two reused buffers.
        steps = x.shape[0]
        x_h = torch.sub(x, mean, out=x_hat[:steps]).mul_(rstd)
        g_gamma = torch.mul(g_z, x_h, out=product[:steps]).sum((0, 1))
        z = torch.addcmul(norm[1], x_h, norm[0], out=product[:steps])
        return [g_gamma, g_z.sum((0, 1)), flat(g_y).t() @ flat(z)]

    def position_grads(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # S_j and Q . U^K_j enter the scores scaled by 1/sqrt(d_k); sum over steps and batch.
        if first == seq_len:                   # a single step with no memory: no attention at all
            return torch.zeros_like(layers[i].key_pos_emb), torch.zeros_like(layers[i].key_pos_bias)
        g_scores = grads.scores[i, :, first:].flatten(1, 2)                          # [heads, steps * batch, M]
        queries = acts.queries[i, first:].permute(2, 3, 0, 1).flatten(2)             # [heads, d_k, steps * batch]
        return torch.bmm(queries, g_scores) * scale, g_scores.sum(1, keepdim=True) * scale

    g_tensors = []
    for i, layer in enumerate(layers):
        g_mid, g_hidden, g_out = flat(grads.mids[i]), flat(grads.hiddens[i]), flat(grads.outs[i])
        ln1_gamma, ln1_beta, w_q = layer_norm_grads(acts.xs[first:, i], acts.mean1[i, first:], acts.rstd1[i, first:],
                                                    layer.norm_attn, grads.z1s[i, first:], grads.qs[i, first:])
        g_tensors += [ln1_gamma, ln1_beta, w_q,                                   # LayerNorm 1, W_q
                      grads.qus[i].sum((0, 1)).view(spec.heads, spec.d_k) * scale,   # U^Q
                      *position_grads(i),                                         # U^K, S
                      g_mid.t() @ flat(acts.att_outs[i]), g_mid.sum(0)]           # W_o, b_o
        ln2_gamma, ln2_beta, w_1 = layer_norm_grads(acts.mids[i], acts.mean2[i], acts.rstd2[i], layer.norm_ff,
                                                    grads.z2s[i], grads.hiddens[i])
        g_tensors += [ln2_gamma, ln2_beta, w_1, g_hidden.sum(0),                  # LayerNorm 2, W_1, c_1
                      g_out.t() @ flat(acts.hiddens[i]), g_out.sum(0)]            # W_2, c_2
    POOL.release([x_hat, product])
    return g_tensors


class FusedDecoder:
    """Token-by-token inference of a shared key/value transformer over one preallocated memory.

    Generation reads a new token at every call; this keeps the keys and values in one buffer of
    ``capacity`` rows and the weights packed (:class:`Linear`) across calls, instead of copying the
    memory into a new buffer and repacking the weights per token. Built by
    ``FeedbackTransformerKV.decoder``; :meth:`step` returns what the model's ``forward`` returns.
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int):
        self.model = model
        self.spec = model.loop_spec()
        longest = max(1, model._longest_memory(0, capacity))
        with torch.no_grad():
            tensors = [t.detach() for layer in model.layers for t in layer_tensors(layer, longest)]
            self.weights = torch.softmax(model.weights, 0).detach()
        self.layers = Layer.unpack(self.spec, tuple(tensors), batch)
        self.memory_proj = (Linear(model.key.linear.weight.detach(), None, batch),
                            Linear(model.value.linear.weight.detach(), None, batch))
        self.native_args = native_forward_args(self.layers, self.memory_proj)
        weight = model.norm.weight
        self.keys = weight.new_empty((capacity, batch, self.spec.heads, self.spec.d_k))
        self.values = torch.empty_like(self.keys)
        self.length = 0
        # One token at a time reuses one set of buffers (attention weights: room for the longest memory).
        self.one_step = Activations.allocate(self.spec, weight.new_empty((1, batch, model.d_model)), 0,
                                             self.layers[0].ff1.weight.shape[0], attn_rows=longest)

    @torch.no_grad()
    def step(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Read ``x_seq [seq_len, batch, d_model]``; returns the normalised outputs ``[seq_len, batch, d_model]``."""
        if self.length + x_seq.shape[0] > self.keys.shape[0]:
            raise RuntimeError(f"the decoder holds {self.keys.shape[0]} steps; {self.length} are used and "
                               f"{x_seq.shape[0]} more do not fit")
        if x_seq.shape[0] == 1:
            acts = self.one_step
            acts.xs[0, 0] = x_seq[0]
            acts.spans = step_spans(self.spec, self.length, 1)
        else:
            acts = Activations.allocate(self.spec, x_seq, self.length, self.layers[0].ff1.weight.shape[0])
        forward_steps(self.spec, self.layers, self.memory_proj, self.weights, acts, self.keys, self.values,
                      self.native_args)
        self.length += x_seq.shape[0]
        return self.model.norm(acts.xs[:, -1])
