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
from dataclasses import dataclass

import torch
from torch import nn

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
    gated, with biases), without active dropout and outside ``torch.autocast``; anything else runs
    the reference loop.
    """
    device_type = model.norm.weight.device.type
    if torch.is_autocast_enabled(device_type):
        return "torch.autocast is on"
    for layer in model.layers:
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
                              u_k, s_k, Linear(w_o, b_o, rows), (g2, b2, spec.eps_ff[i]),
                              Linear(w_1, c_1, rows), Linear(w_2, c_2, rows)))
        return layers


@dataclass
class Activations:
    """What the forward pass keeps for the backward pass, in buffers ``[layer, step, ...]``."""

    xs: torch.Tensor          # [steps, n_layers + 1, batch, d_model]: each layer's input, and the last output
    mems: torch.Tensor        # [steps, batch, d_model]: the memory vectors
    att_outs: torch.Tensor    # [n_layers, steps, batch, d_model]: attention outputs (before W_o)
    mids: torch.Tensor        # [n_layers, steps, batch, d_model]: x + attention
    hiddens: torch.Tensor     # [n_layers, steps, batch, d_ff]: the feed-forward hidden layer after ReLU
    per_step: list            # per step and layer: LayerNorm statistics, Q, (Q + U^Q)/sqrt(d_k), attention


def run_steps(spec: LoopSpec, layers: list[Layer], memory_proj: tuple[Linear, Linear], weights: torch.Tensor,
              x_seq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, n_prefix: int) -> Activations:
    """Run the steps of ``x_seq [seq_len, batch, d_model]`` over a memory whose first ``n_prefix``
    rows of ``keys``/``values [capacity, batch, heads, d_k]`` are filled; step ``t`` writes row
    ``n_prefix + t``. The last layer's outputs are ``activations.xs[:, -1]``."""
    seq_len, batch, d_model = x_seq.shape
    n_layers, heads, d_k = spec.n_layers, spec.heads, spec.d_k
    scale = 1 / math.sqrt(d_k)
    d_ff = layers[0].ff1.weight.shape[0]
    new = x_seq.new_empty
    acts = Activations(new((seq_len, n_layers + 1, batch, d_model)), new((seq_len, batch, d_model)),
                       x_seq.new_zeros((n_layers, seq_len, batch, d_model)), new((n_layers, seq_len, batch, d_model)),
                       new((n_layers, seq_len, batch, d_ff)), [])
    scratch = torch.empty_like(keys[:n_prefix + seq_len])   # a query's products with the memory, reused
    acts.xs[:, 0] = x_seq
    key_proj, value_proj = memory_proj
    for t in range(seq_len):
        n = n_prefix + t                         # this step's row in the memory; it sees rows [start, n)
        start = spec.window(n)
        m = n - start
        key, value, product = keys[start:n], values[start:n], scratch[:m]        # [m, batch, heads, d_k]
        x = acts.xs[t, 0]
        step = []
        for i, layer in enumerate(layers):
            if m:
                z1, mean1, rstd1 = torch.native_layer_norm(x, (d_model,), *layer.norm_attn)
                q = layer.query(z1).view(batch, heads, d_k)                     # Q        [batch, heads, d_k]
                qs = torch.add(layer.query_pos_bias, q, alpha=scale)            # (Q + U^Q) / sqrt(d_k)
                scores = torch.mul(key, qs, out=product).sum(-1)                 # A + C    [m, batch, heads]
                # B + D: (S_j + Q . U^K_j) / sqrt(d_k), one matmul per head       [heads, batch, m]
                pos = torch.baddbmm(layer.key_pos_bias[..., -m:], q.transpose(0, 1), layer.key_pos_emb[..., -m:],
                                    beta=scale, alpha=scale)
                scores += pos.permute(2, 1, 0)
                attn = torch.softmax(scores, dim=0)                              # over the memory axis
                att_out = acts.att_outs[i, t]
                torch.mul(attn.unsqueeze(-1), value, out=product)
                torch.sum(product, 0, out=att_out.view(batch, heads, d_k))       # sum_j attn_j V_j
                x_mid = torch.add(layer.output(att_out), x, out=acts.mids[i, t])   # x + attention
                step.append((mean1, rstd1, q, qs, attn))
            else:                                        # no memory yet: the attention block is skipped
                x_mid = acts.mids[i, t].copy_(x)
                step.append(None)
            z2, mean2, rstd2 = torch.native_layer_norm(x_mid, (d_model,), *layer.norm_ff)
            hidden = acts.hiddens[i, t].copy_(layer.ff1(z2).relu_())           # [batch, d_ff]
            x = torch.add(layer.ff2(hidden), x_mid, out=acts.xs[t, i + 1])       # x_mid + feed-forward
            step.append((mean2, rstd2))
        acts.per_step.append(step)
        # The memory vector and its key and value, written into row n of the buffers.
        mem = torch.mm(weights[None], acts.xs[t].view(n_layers + 1, -1), out=acts.mems[t].view(1, -1))
        mem = mem.view(batch, d_model)
        keys[n] = key_proj(mem).view(batch, heads, d_k)
        values[n] = value_proj(mem).view(batch, heads, d_k)
    return acts


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
        acts = run_steps(spec, layers, (Linear(w_key, None, batch), Linear(w_value, None, batch)), weights,
                         x_seq, keys, values, n_prefix)
        if any(ctx.needs_input_grad):
            ctx.spec, ctx.acts, ctx.n_prefix = spec, acts, n_prefix
            ctx.has_prefix = prefix_key is not None
            # keys and values are outputs: saved through save_for_backward, as an attribute of ctx
            # they would form a reference cycle (output -> its graph node -> output) that leaks.
            ctx.save_for_backward(weights, w_key, w_value, keys, values, *tensors)
        return acts.xs[:, spec.n_layers].clone(), keys, values

    @staticmethod
    def backward(ctx, grad_out, grad_keys, grad_values):
        spec, acts, n_prefix = ctx.spec, ctx.acts, ctx.n_prefix
        weights, w_key, w_value, keys, values, *tensors = ctx.saved_tensors
        xs, mems, att_outs, mids, hiddens, per_step = (acts.xs, acts.mems, acts.att_outs, acts.mids,
                                                       acts.hiddens, acts.per_step)
        seq_len, _, batch, d_model = xs.shape
        n_layers, heads, d_k = spec.n_layers, spec.heads, spec.d_k
        scale = 1 / math.sqrt(d_k)
        layers = [tensors[i * len(LAYER_TENSORS):(i + 1) * len(LAYER_TENSORS)] for i in range(n_layers)]
        if grad_out is None:
            grad_out = xs.new_zeros((seq_len, batch, d_model))
        # Gradients of the memory rows; later steps add into earlier rows (the Stack's shared buffer).
        g_keys = keys.new_zeros(keys.shape) if grad_keys is None else grad_keys.clone()
        g_values = values.new_zeros(values.shape) if grad_values is None else grad_values.clone()
        g_x_seq = torch.empty_like(grad_out)
        g_mems = torch.empty_like(mems)
        g_weights = weights.new_zeros(weights.shape)
        # Per-step gradients that the weight gradients are formed from at the end, [layer, step, ...]:
        g_outs = torch.empty_like(mids)            # of each layer's output (-> W_2, c_2)
        g_hiddens = torch.empty_like(hiddens)      # of the hidden layer before ReLU (-> W_1, c_1)
        g_z2s = torch.empty_like(mids)             # of the LayerNorm before the feed-forward block
        g_mids = torch.zeros_like(mids)            # of x + attention (-> W_o, b_o)
        g_qs = torch.zeros_like(mids)              # of Q (-> W_q)
        g_z1s = torch.zeros_like(mids)             # of the LayerNorm before attention
        g_qus = torch.zeros_like(mids)             # of (Q + U^Q) / sqrt(d_k) (-> U^Q)
        # Products with the transposed weights (g @ W), packed once like the forward ones.
        def transposed(w: torch.Tensor) -> Linear:
            return Linear(w.t().contiguous(), None, batch)

        back = [(transposed(w_q), transposed(w_o), transposed(w_1), transposed(w_2))
                for _, _, w_q, _, _, _, w_o, _, _, _, w_1, _, w_2, _ in layers]
        key_back, value_back = transposed(w_key), transposed(w_value)
        # The score gradients of every step, right-aligned by distance: the position tables'
        # gradients are formed from them at the end.           [layer, heads, step, batch, distance]
        g_scores_all = xs.new_zeros((n_layers, heads, seq_len, batch, layers[0][4].shape[-1]))
        scratch = torch.empty_like(keys)
        for t in reversed(range(seq_len)):
            n = n_prefix + t
            start = spec.window(n)
            m = n - start
            key, value, product = keys[start:n], values[start:n], scratch[:m]
            # Row n is complete: every later step has added its share. Back through key and value:
            g_mem = torch.add(key_back(g_keys[n].view(batch, d_model)), value_back(g_values[n].view(batch, d_model)),
                              out=g_mems[t])                                         # [batch, d_model]
            g_weights += torch.mv(xs[t].view(n_layers + 1, -1), g_mem.view(-1))
            g_layers = weights[:, None, None] * g_mem                               # the memory's share per layer
            g = torch.add(grad_out[t], g_layers[n_layers], out=g_outs[n_layers - 1, t])
            for i in reversed(range(n_layers)):
                g1, b1, w_q, u_q, u_k, s_k, w_o, b_o, g2, b2, w_1, c_1, w_2, c_2 = layers[i]
                q_back, o_back, ff1_back, ff2_back = back[i]
                attention, (mean2, rstd2) = per_step[t][2 * i], per_step[t][2 * i + 1]
                # x = x_mid + W_2 relu(W_1 LayerNorm(x_mid) + c_1) + c_2
                g_hidden = torch.ops.aten.threshold_backward.grad_input(
                    ff2_back(g), hiddens[i, t], 0, grad_input=g_hiddens[i, t])      # [batch, d_ff]
                g_z2 = g_z2s[i, t].copy_(ff1_back(g_hidden))
                g_mid = torch.ops.aten.native_layer_norm_backward(
                    g_z2, mids[i, t], (d_model,), mean2, rstd2, g2, b2, [True, False, False])[0].add_(g)
                if attention is not None:
                    mean1, rstd1, q, qs, attn = attention
                    g_mids[i, t] = g_mid
                    # x_mid = x + W_o att_out + b_o, att_out = sum_j attn_j V_j
                    g_att = o_back(g_mid).view(batch, heads, d_k)
                    g_attn = torch.mul(value, g_att, out=product).sum(-1)             # [m, batch, heads]
                    g_values[start:n].addcmul_(attn.unsqueeze(-1), g_att)
                    g_scores = torch._softmax_backward_data(g_attn, attn, 0, attn.dtype)
                    # scores = qs . K_j + (S_j + Q . U^K_j) / sqrt(d_k)
                    torch.mul(g_scores.unsqueeze(-1), key, out=product)
                    g_qu = torch.sum(product, 0, out=g_qus[i, t].view(batch, heads, d_k))
                    g_keys[start:n].addcmul_(g_scores.unsqueeze(-1), qs)
                    g_scores_h = g_scores.permute(2, 1, 0)                            # [heads, batch, m]
                    g_scores_all[i, :, t, :, -m:] = g_scores_h
                    g_q = torch.bmm(g_scores_h, u_k[..., -m:].transpose(1, 2))       # [heads, batch, d_k]
                    g_q = torch.add(g_qu, g_q.transpose(0, 1), out=g_qs[i, t].view(batch, heads, d_k)).mul_(scale)
                    g_z1 = g_z1s[i, t].copy_(q_back(g_q.view(batch, d_model)))
                    g = torch.ops.aten.native_layer_norm_backward(
                        g_z1, xs[t, i], (d_model,), mean1, rstd1, g1, b1, [True, False, False])[0].add_(g_mid)
                else:
                    g = g_mid
                g = torch.add(g, g_layers[i], out=g_outs[i - 1, t] if i else g_x_seq[t])

        # Weight gradients: one matrix product over all steps each, sum_t g_t^T x_t = G^T X.
        def flat(buffer: torch.Tensor) -> torch.Tensor:      # [steps, batch, width] -> [steps * batch, width]
            return buffer.flatten(0, 1)

        def normalized(x: torch.Tensor, eps: float) -> torch.Tensor:   # LayerNorm without its affine map
            return torch.native_layer_norm(x, (d_model,), None, None, eps)[0]

        first = 0 if n_prefix else 1               # the first step with a memory to attend to

        def position_grads(i: int) -> tuple[torch.Tensor, torch.Tensor]:
            # S_j and Q . U^K_j enter the scores scaled by 1/sqrt(d_k); sum over steps and batch.
            g_scores = g_scores_all[i, :, first:].flatten(1, 2)                          # [heads, steps * batch, M]
            if first == seq_len:                   # a single step with no memory: no attention at all
                return torch.zeros_like(layers[i][4]), torch.zeros_like(layers[i][5])
            queries = torch.stack([per_step[t][2 * i][2] for t in range(first, seq_len)])  # [steps, batch, heads, d_k]
            queries = queries.permute(2, 3, 0, 1).flatten(2)                             # [heads, d_k, steps * batch]
            return torch.bmm(queries, g_scores) * scale, g_scores.sum(1, keepdim=True) * scale
        g_tensors = []
        for i, (g1, b1, w_q, u_q, u_k, s_k, w_o, b_o, g2, b2, w_1, c_1, w_2, c_2) in enumerate(layers):
            x_hat1 = flat(normalized(xs[first:, i], spec.eps_attn[i]))
            x_hat2 = flat(normalized(mids[i], spec.eps_ff[i]))
            g_z1, g_z2 = flat(g_z1s[i, first:]), flat(g_z2s[i])
            g_mid, g_hidden, g_out = flat(g_mids[i]), flat(g_hiddens[i]), flat(g_outs[i])
            g_tensors += [
                (g_z1 * x_hat1).sum(0), g_z1.sum(0),                                  # LayerNorm 1
                flat(g_qs[i, first:]).t() @ torch.addcmul(b1, x_hat1, g1),            # W_q
                g_qus[i].sum((0, 1)).view(heads, d_k) * scale,                        # U^Q
                *position_grads(i),                                                   # U^K, S
                g_mid.t() @ flat(att_outs[i]), g_mid.sum(0),                          # W_o, b_o
                (g_z2 * x_hat2).sum(0), g_z2.sum(0),                                  # LayerNorm 2
                g_hidden.t() @ torch.addcmul(b2, x_hat2, g2), g_hidden.sum(0),        # W_1, c_1
                g_out.t() @ flat(hiddens[i]), g_out.sum(0),                           # W_2, c_2
            ]
        new_rows = slice(n_prefix, n_prefix + seq_len)
        mem_flat = flat(mems)
        g_w_key = flat(g_keys[new_rows]).flatten(1).t() @ mem_flat
        g_w_value = flat(g_values[new_rows]).flatten(1).t() @ mem_flat
        g_prefix_key = g_keys[:n_prefix] if ctx.has_prefix else None
        g_prefix_value = g_values[:n_prefix] if ctx.has_prefix else None
        return (None, g_x_seq, g_prefix_key, g_prefix_value, g_weights, g_w_key, g_w_value, *g_tensors)


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
        weight = model.norm.weight
        self.keys = weight.new_empty((capacity, batch, self.spec.heads, self.spec.d_k))
        self.values = torch.empty_like(self.keys)
        self.length = 0

    @torch.no_grad()
    def step(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Read ``x_seq [seq_len, batch, d_model]``; returns the normalised outputs ``[seq_len, batch, d_model]``."""
        if self.length + x_seq.shape[0] > self.keys.shape[0]:
            raise RuntimeError(f"the decoder holds {self.keys.shape[0]} steps; {self.length} are used and "
                               f"{x_seq.shape[0]} more do not fit")
        acts = run_steps(self.spec, self.layers, self.memory_proj, self.weights, x_seq, self.keys, self.values,
                         self.length)
        self.length += x_seq.shape[0]
        return self.model.norm(acts.xs[:, -1])
