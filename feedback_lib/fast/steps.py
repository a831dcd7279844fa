"""The fused loop's step loops, forward and backward (chapter 12).

:func:`run_steps` and :func:`run_steps_backward` are the Python loops;
``step_loops.cpp`` translates them to C++ for the CPU. The dispatchers
:func:`forward_steps` and :func:`backward_steps` run the C++ loops when
:mod:`feedback_lib.fast.native` has them for the tensors' device and
dtype, else the Python ones.
"""

from __future__ import annotations

import math

import torch

from feedback_lib.fast import native
from feedback_lib.fast.tensors import (
    Activations,
    Gradients,
    Layer,
    LoopSpec,
    MemoryProjection,
    TransposedLayer,
    native_args,
)


def native_forward_args(
    layers: list[Layer], memory: MemoryProjection
) -> tuple[list[torch.Tensor], list[float], list[torch.Tensor]]:
    """The layers and memory projections as the C++ ``forward_steps``
    takes them: every layer's tensors, two LayerNorm eps per layer."""
    return (
        [t for layer in layers for t in native_args(layer)],
        [eps for layer in layers for eps in (layer.eps1, layer.eps2)],
        native_args(memory),
    )


def forward_steps(
    spec: LoopSpec,
    layers: list[Layer],
    memory: MemoryProjection,
    weights: torch.Tensor,
    acts: Activations,
    keys: torch.Tensor,
    values: torch.Tensor,
    prepared: tuple | None = None,
) -> None:
    """Run the steps whose inputs are ``acts.xs[:, 0]`` over the memory
    ``keys``/``values [capacity, batch, heads, d_k]``, whose rows before
    the first step's are filled; step ``t`` writes row
    ``acts.spans[t][1]``. The top layer's outputs end in
    ``acts.xs[:, -1]``. ``prepared``: :func:`native_forward_args`, if
    already made (the decoder keeps them from token to token)."""
    extension = native.extension(acts.xs.device, acts.xs.dtype)
    if extension is None:
        run_steps(spec, layers, memory, weights, acts, keys, values)
        return
    layer_args, eps, memory_args = prepared or native_forward_args(
        layers, memory
    )
    extension.forward_steps(
        layer_args,
        eps,
        memory_args,
        weights,
        acts.buffers,
        keys,
        values,
        *acts.native_spans(),
    )


def run_steps(
    spec: LoopSpec,
    layers: list[Layer],
    memory: MemoryProjection,
    weights: torch.Tensor,
    acts: Activations,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """The forward loop: fills ``acts`` and the new memory rows."""
    seq_len, _, batch, d_model = acts.xs.shape
    heads, d_k = spec.heads, spec.d_k
    scale = 1 / math.sqrt(d_k)
    scratch = torch.empty_like(keys)  # a query's products with the memory
    for t, (start, n, offset) in enumerate(acts.spans):
        m = n - start  # step t writes row n and sees rows [start, n)
        # [m, batch, heads, d_k]
        key, value = keys[start:n], values[start:n]
        product = scratch[:m]
        x = acts.xs[t, 0]
        for i, layer in enumerate(layers):
            x_mid = acts.mids[i, t]
            if m:
                z1, acts.mean1[i, t], acts.rstd1[i, t] = layer.norm1(x)
                q = acts.queries[i, t]  # Q  [batch, heads, d_k]
                q.copy_(layer.query(z1).view(batch, heads, d_k))
                # (Q + U^Q) / sqrt(d_k)
                qs = torch.add(
                    layer.u_q, q, alpha=scale, out=acts.scaled[i, t]
                )
                scores = torch.mul(key, qs, out=product).sum(-1)  # A + C
                # B + D: (S_j + Q . U^K_j) / sqrt(d_k)   [heads, batch, m]
                pos = torch.baddbmm(
                    layer.s[..., -m:],
                    q.transpose(0, 1),
                    layer.u_k[..., -m:],
                    beta=scale,
                    alpha=scale,
                )
                scores += pos.permute(2, 1, 0)  # [m, batch, heads]
                attn = torch.softmax(
                    scores, dim=0, out=acts.attn[i, offset : offset + m]
                )
                att_out = acts.att_outs[i, t]
                torch.mul(attn.unsqueeze(-1), value, out=product)
                torch.sum(product, 0, out=att_out.view(batch, heads, d_k))
                torch.add(layer.output(att_out), x, out=x_mid)  # x + attn
            else:  # no memory yet: the attention block is skipped
                x_mid.copy_(x)
            z2, acts.mean2[i, t], acts.rstd2[i, t] = layer.norm2(x_mid)
            hidden = acts.hiddens[i, t]  # ReLU(W_1 z2 + b_1)  [batch, d_ff]
            torch.clamp_min(layer.ff1(z2), 0, out=hidden)
            x = torch.add(layer.ff2(hidden), x_mid, out=acts.xs[t, i + 1])
        # The memory vector and its key and value, into row n.
        mem = torch.mm(
            weights[None],
            acts.xs[t].view(len(layers) + 1, -1),
            out=acts.mems[t].view(1, -1),
        ).view(batch, d_model)
        keys[n] = memory.key(mem).view(batch, heads, d_k)
        values[n] = memory.value(mem).view(batch, heads, d_k)


def backward_steps(
    spec: LoopSpec,
    layers: list[TransposedLayer],
    memory: MemoryProjection,
    weights: torch.Tensor,
    acts: Activations,
    keys: torch.Tensor,
    values: torch.Tensor,
    grad_out: torch.Tensor,
    grads: Gradients,
) -> None:
    """Walk the steps backwards: :func:`run_steps_backward`, or its C++
    translation when :mod:`feedback_lib.fast.native` has one."""
    extension = native.extension(grad_out.device, grad_out.dtype)
    if extension is None:
        run_steps_backward(
            spec,
            layers,
            memory,
            weights,
            acts,
            keys,
            values,
            grad_out,
            grads,
        )
        return
    extension.backward_steps(
        [t for layer in layers for t in native_args(layer)],
        native_args(memory),
        weights,
        acts.buffers,
        keys,
        values,
        native_args(grads),
        grad_out.contiguous(),
        *acts.native_spans(),
    )


def run_steps_backward(
    spec: LoopSpec,
    layers: list[TransposedLayer],
    memory: MemoryProjection,
    weights: torch.Tensor,
    acts: Activations,
    keys: torch.Tensor,
    values: torch.Tensor,
    grad_out: torch.Tensor,
    grads: Gradients,
) -> None:
    """Backpropagation through the steps of :func:`run_steps`, last step
    first, into ``grads`` (``memory`` holds the transposed projections)."""
    seq_len, _, batch, d_model = acts.xs.shape
    n_layers, heads, d_k = spec.n_layers, spec.heads, spec.d_k
    scale = 1 / math.sqrt(d_k)
    xs, g_keys, g_values = acts.xs, grads.keys, grads.values
    scratch = torch.empty_like(keys)
    for t in reversed(range(seq_len)):
        start, n, offset = acts.spans[t]
        m = n - start
        key, value, product = keys[start:n], values[start:n], scratch[:m]
        # Row n is complete: every later step has added its share. Back
        # through its key and value:                   [batch, d_model]
        g_mem = torch.add(
            memory.key(g_keys[n].view(batch, d_model)),
            memory.value(g_values[n].view(batch, d_model)),
            out=grads.mems[t],
        )
        grads.weights += torch.mv(
            xs[t].view(n_layers + 1, -1), g_mem.view(-1)
        )
        g_layers = weights[:, None, None] * g_mem  # the memory's share
        g = torch.add(
            grad_out[t], g_layers[n_layers], out=grads.outs[n_layers - 1, t]
        )
        for i in reversed(range(n_layers)):
            layer = layers[i]
            # x = x_mid + W_2 relu(W_1 LayerNorm(x_mid) + b_1) + b_2
            g_hidden = torch.ops.aten.threshold_backward.grad_input(
                layer.ff2_t(g),
                acts.hiddens[i, t],
                0,
                grad_input=grads.hiddens[i, t],
            )  # [batch, d_ff]
            g_z2 = grads.z2s[i, t].copy_(layer.ff1_t(g_hidden))
            g_mid = torch.ops.aten.native_layer_norm_backward(
                g_z2,
                acts.mids[i, t],
                (d_model,),
                acts.mean2[i, t],
                acts.rstd2[i, t],
                layer.norm2_weight,
                layer.norm2_bias,
                [True, False, False],
            )[0].add_(g)
            if m:
                grads.mids[i, t] = g_mid
                attn, qs = (
                    acts.attn[i, offset : offset + m],
                    acts.scaled[i, t],
                )
                # x_mid = x + W_o att_out + b_o, att_out = sum_j a_j V_j
                g_att = layer.output_t(g_mid).view(batch, heads, d_k)
                g_attn = torch.mul(value, g_att, out=product).sum(-1)
                g_values[start:n].addcmul_(attn.unsqueeze(-1), g_att)
                g_scores = torch._softmax_backward_data(
                    g_attn, attn, 0, attn.dtype
                )  # [m, batch, heads]
                # scores = qs . K_j + (S_j + Q . U^K_j) / sqrt(d_k)
                torch.mul(g_scores.unsqueeze(-1), key, out=product)
                g_qu = torch.sum(
                    product, 0, out=grads.qus[i, t].view(batch, heads, d_k)
                )
                g_keys[start:n].addcmul_(g_scores.unsqueeze(-1), qs)
                g_scores_h = g_scores.permute(2, 1, 0)  # [heads, batch, m]
                grads.scores[i, :, t, :, -m:] = g_scores_h
                g_q = torch.bmm(g_scores_h, layer.u_k_t[:, -m:])
                g_q = torch.add(
                    g_qu,
                    g_q.transpose(0, 1),
                    out=grads.qs[i, t].view(batch, heads, d_k),
                ).mul_(scale)
                g_z1 = grads.z1s[i, t].copy_(
                    layer.query_t(g_q.view(batch, d_model))
                )
                g = torch.ops.aten.native_layer_norm_backward(
                    g_z1,
                    xs[t, i],
                    (d_model,),
                    acts.mean1[i, t],
                    acts.rstd1[i, t],
                    layer.norm1_weight,
                    layer.norm1_bias,
                    [True, False, False],
                )[0].add_(g_mid)
            else:
                g = g_mid
            out = grads.outs[i - 1, t] if i else grads.x_seq[t]
            g = torch.add(g, g_layers[i], out=out)
