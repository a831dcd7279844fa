"""The shared key/value transformer's loop as one autograd function with a
hand-derived backward pass (chapter 12).

The readable loop (chapter 5) lets autograd record every operation of
every step: a few dozen graph nodes per layer per step, each linear layer
adding a rank-``batch`` weight gradient per step. :class:`FusedKVLoop`
computes the same with autograd off inside, keeps what the backward pass
needs, and walks the steps backwards itself. Three things make it fast:

* per step it issues only the kernels the maths needs, into buffers
  allocated once per call (:mod:`feedback_lib.fast.tensors`);
* the weight gradients are not formed per step: the backward pass keeps
  each step's input and output gradient and forms every weight gradient
  with one matrix product over all steps (``sum_t g_t^T x_t = G^T X``);
* the per-step products use weights packed once per call (``Linear``),
  and on the CPU the step loops run in C++ (``step_loops.cpp``).

The tests check it against the readable loop and with
``torch.autograd.gradcheck``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from feedback_lib.fast.pool import POOL
from feedback_lib.fast.steps import backward_steps, forward_steps
from feedback_lib.fast.tensors import (
    Activations,
    Gradients,
    Layer,
    LayerTensors,
    Linear,
    LoopSpec,
    MemoryProjection,
)


def run(
    model: nn.Module, x_seq: torch.Tensor, prefix: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The shared key/value ``model``'s loop over ``x_seq [seq_len, batch,
    d_model]`` after the carried ``prefix`` (its keys and values, or
    ``()``), as the readable loop computes it: the top layer's output
    before the final norm, and the stored keys and values."""
    n_prefix = len(prefix[0]) if prefix else 0
    longest = max(1, model.longest_memory(n_prefix, len(x_seq)))
    tensors = [
        t for layer in model.layers for t in LayerTensors.of(layer, longest)
    ]
    prefix_key, prefix_value = prefix if prefix else (None, None)
    out, keys, values = FusedKVLoop.apply(
        LoopSpec.of(model),
        x_seq,
        prefix_key,
        prefix_value,
        torch.softmax(model.weights, 0),
        model.key.linear.weight,
        model.value.linear.weight,
        *tensors,
    )
    return out, (keys, values)


class FusedKVLoop(torch.autograd.Function):
    """``apply(spec, x_seq, prefix_key, prefix_value, weights, w_key,
    w_value, *layer_tensors)``:

    * ``x_seq [seq_len, batch, d_model]``: the inputs of the steps;
    * ``prefix_key``/``prefix_value [n_prefix, batch, heads, d_k]`` or
      None: the carried memory;
    * ``weights [n_layers + 1]``: the layer shares (after the softmax);
    * ``w_key``/``w_value [d_model, d_model]``: the shared projections;
    * ``layer_tensors``: every layer's :class:`LayerTensors`, in order.

    Returns ``(out [seq_len, batch, d_model], keys, values)``: the top
    layer's output at every step (before the final norm) and the whole
    memory ``[n_prefix + seq_len, batch, heads, d_k]``.
    """

    @staticmethod
    def forward(
        ctx,
        spec: LoopSpec,
        x_seq,
        prefix_key,
        prefix_value,
        weights,
        w_key,
        w_value,
        *tensors,
    ):
        seq_len, batch, d_model = x_seq.shape
        n_prefix = 0 if prefix_key is None else prefix_key.shape[0]
        # The memory, preallocated: step t writes row n_prefix + t.
        shape = (n_prefix + seq_len, batch, spec.heads, spec.d_k)
        keys = x_seq.new_empty(shape)
        values = torch.empty_like(keys)
        if n_prefix:
            keys[:n_prefix] = prefix_key
            values[:n_prefix] = prefix_value
        layers = Layer.all(spec, LayerTensors.split(tensors), batch)
        memory = MemoryProjection(
            Linear(w_key, None, batch), Linear(w_value, None, batch)
        )
        acts = Activations.allocate(
            spec, x_seq, n_prefix, layers[0].ff1.weight.shape[0]
        )
        forward_steps(spec, layers, memory, weights, acts, keys, values)
        if any(ctx.needs_input_grad):
            ctx.spec, ctx.acts, ctx.layers = spec, acts, layers
            ctx.n_prefix, ctx.has_prefix = n_prefix, prefix_key is not None
            # keys and values are outputs: saved with save_for_backward,
            # since on ctx they would close a reference cycle (output ->
            # its graph node -> output) that leaks.
            ctx.save_for_backward(weights, w_key, w_value, keys, values)
        return acts.xs[:, spec.n_layers].clone(), keys, values

    @staticmethod
    @once_differentiable  # the hand-written backward is not differentiable
    def backward(ctx, grad_out, grad_keys, grad_values):
        spec, acts, n_prefix = ctx.spec, ctx.acts, ctx.n_prefix
        weights, w_key, w_value, keys, values = ctx.saved_tensors
        seq_len, _, batch, d_model = acts.xs.shape
        if grad_out is None:
            grad_out = acts.xs.new_zeros((seq_len, batch, d_model))
        longest = ctx.layers[0].u_k.shape[-1]
        grads = Gradients.allocate(
            acts, keys, grad_keys, grad_values, longest
        )
        memory_t = MemoryProjection(  # g -> g W_k, g -> g W_v
            *(
                Linear(w.t().contiguous(), None, batch)
                for w in (w_key, w_value)
            )
        )
        backward_steps(
            spec,
            [layer.transposed() for layer in ctx.layers],
            memory_t,
            weights,
            acts,
            keys,
            values,
            grad_out,
            grads,
        )
        g_tensors = weight_gradients(
            spec, ctx.layers, acts, grads, n_prefix
        )
        new_rows = slice(n_prefix, n_prefix + seq_len)
        mem_flat = acts.mems.flatten(0, 1)  # [steps * batch, d_model]

        def projection_grad(g_rows: torch.Tensor) -> torch.Tensor:
            return g_rows[new_rows].flatten(0, 1).flatten(1).t() @ mem_flat

        g_w_key = projection_grad(grads.keys)
        g_w_value = projection_grad(grads.values)
        has = ctx.has_prefix
        g_prefix_key = grads.keys[:n_prefix] if has else None
        g_prefix_value = grads.values[:n_prefix] if has else None
        POOL.release(grads.pooled())
        return (
            None,
            grads.x_seq,
            g_prefix_key,
            g_prefix_value,
            grads.weights,
            g_w_key,
            g_w_value,
            *(g for layer in g_tensors for g in layer),
        )


def weight_gradients(
    spec: LoopSpec,
    layers: list[Layer],
    acts: Activations,
    grads: Gradients,
    n_prefix: int,
) -> list[LayerTensors]:
    """Every layer's weight gradients, as :class:`LayerTensors`: one
    matrix product over all steps each, ``sum_t g_t^T x_t = G^T X``."""
    seq_len = acts.xs.shape[0]
    scale = 1 / math.sqrt(spec.d_k)
    first = 0 if n_prefix else 1  # the first step with a memory
    x_hat = POOL.empty(acts.mids[0].shape, acts.mids)
    product = POOL.empty(acts.mids[0].shape, acts.mids)

    def flat(buffer: torch.Tensor) -> torch.Tensor:
        # [steps, batch, w] -> [steps * batch, w]
        return buffer.flatten(0, 1)

    def layer_norm_grads(x, mean, rstd, weight, bias, g_z, g_y):
        # z = x_hat * gamma + beta feeds y = z W^T: the gradients of gamma,
        # beta and W, from the statistics the forward pass kept.
        steps = x.shape[0]
        x_h = torch.sub(x, mean, out=x_hat[:steps]).mul_(rstd)
        g_gamma = torch.mul(g_z, x_h, out=product[:steps]).sum((0, 1))
        z = torch.addcmul(bias, x_h, weight, out=product[:steps])
        return g_gamma, g_z.sum((0, 1)), flat(g_y).t() @ flat(z)

    def position_grads(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # S and Q . U^K enter the scores scaled by 1/sqrt(d_k).
        if first == seq_len:  # a single step without memory: no attention
            return (
                torch.zeros_like(layers[i].u_k),
                torch.zeros_like(layers[i].s),
            )
        g_scores = grads.scores[i, :, first:].flatten(1, 2)  # [h, s*b, M]
        queries = acts.queries[i, first:].permute(2, 3, 0, 1).flatten(2)
        return (
            torch.bmm(queries, g_scores) * scale,
            g_scores.sum(1, keepdim=True) * scale,
        )

    out = []
    for i, layer in enumerate(layers):
        g_mid, g_out = flat(grads.mids[i]), flat(grads.outs[i])
        g_norm1_weight, g_norm1_bias, g_w_q = layer_norm_grads(
            acts.xs[first:, i],
            acts.mean1[i, first:],
            acts.rstd1[i, first:],
            layer.norm1_weight,
            layer.norm1_bias,
            grads.z1s[i, first:],
            grads.qs[i, first:],
        )
        g_u_k, g_s = position_grads(i)
        g_norm2_weight, g_norm2_bias, g_w_1 = layer_norm_grads(
            acts.mids[i],
            acts.mean2[i],
            acts.rstd2[i],
            layer.norm2_weight,
            layer.norm2_bias,
            grads.z2s[i],
            grads.hiddens[i],
        )
        out.append(
            LayerTensors(
                norm1_weight=g_norm1_weight,
                norm1_bias=g_norm1_bias,
                w_q=g_w_q,
                u_q=grads.qus[i].sum((0, 1)).view(spec.heads, spec.d_k)
                * scale,
                u_k=g_u_k,
                s=g_s,
                w_o=g_mid.t() @ flat(acts.att_outs[i]),
                b_o=g_mid.sum(0),
                norm2_weight=g_norm2_weight,
                norm2_bias=g_norm2_bias,
                w_1=g_w_1,
                b_1=flat(grads.hiddens[i]).sum(0),
                w_2=g_out.t() @ flat(acts.hiddens[i]),
                b_2=g_out.sum(0),
            )
        )
    POOL.release([x_hat, product])
    return out
