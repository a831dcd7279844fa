"""The feedback transformer: the layer, the token-by-token loop, and the shared key/value variant.

Chapter 5 builds :class:`FeedbackTransformer`; the chapters on the Stack and on sharing keys and
values explain :class:`FeedbackTransformerKV`. Parameter names, shapes and creation order follow
``labml_nn.transformers.feedback``, so the reference's state_dicts load with ``strict=True``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from feedback_lib.attention import MAX_POSITIONS, FeedbackAttention, HeadProjection
from feedback_lib.checks import check_bool, check_like, check_positive_int, check_probability, check_tensor
from feedback_lib.cross_attention import CrossAttention, PreparedContext, check_context
from feedback_lib.fused_kv import FusedDecoder, FusedKVLoop, LoopSpec, fused_loop_blocker, layer_tensors
from feedback_lib.memory import FeedbackMemory, window_start
from feedback_lib.stack import NaiveStack, Stack


class FeedbackTransformerLayer(nn.Module):
    """One pre-norm layer: ``x + attn(norm(x), memory)``, then ``x + feed_forward(norm(x))``.

    The attention block is skipped while there is no memory yet (the first step of a sequence).
    With ``cross_attn`` (chapter 11) a third block sits between the two,
    ``x + cross_attn(norm(x), context)``; it runs at every step, the first included.
    Shapes: ``x [batch, d_model]``; ``key``/``value`` as :class:`FeedbackAttention` takes them;
    ``context`` a :class:`~feedback_lib.cross_attention.PreparedContext` of ``cross_attn``.
    """

    def __init__(self, *, d_model: int, attn: FeedbackAttention, feed_forward: nn.Module, dropout_prob: float,
                 cross_attn: CrossAttention | None = None):
        check_positive_int("d_model", d_model)
        check_probability("dropout_prob", dropout_prob)
        if not isinstance(attn, FeedbackAttention):
            raise TypeError(f"attn must be a FeedbackAttention, got {type(attn).__name__}")
        if attn.d_model != d_model:
            raise ValueError(f"attn was built for d_model={attn.d_model} but the layer has d_model={d_model}")
        if cross_attn is not None and not isinstance(cross_attn, CrossAttention):
            raise TypeError(f"cross_attn must be a CrossAttention or None, got {type(cross_attn).__name__}")
        if cross_attn is not None and cross_attn.d_model != d_model:
            raise ValueError(f"cross_attn was built for d_model={cross_attn.d_model} but the layer has "
                             f"d_model={d_model}")
        super().__init__()
        self.size = d_model
        self.attn = attn
        self.feed_forward = feed_forward
        self.dropout = nn.Dropout(dropout_prob)
        self.norm_self_attn = nn.LayerNorm([d_model])
        self.norm_ff = nn.LayerNorm([d_model])
        # Created only with cross-attention, so that a layer without it keeps labml's state_dict keys.
        self.cross_attn = cross_attn
        self.norm_cross_attn = None if cross_attn is None else nn.LayerNorm([d_model])

    def forward(self, x: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None, *,
                context: PreparedContext | None = None) -> torch.Tensor:
        """One step of the layer: ``x [batch, d_model]`` -> ``[batch, d_model]``."""
        check_tensor("x", x, ["batch", "d_model"], [None, self.size])
        if (key is None) != (value is None):
            raise ValueError("key and value must both be given (there is a memory) or both be None")
        if key is None:
            check_like("x", x, self.norm_ff.weight)
        else:
            self.attn.check_inputs(x, key, value, query_name="x")
        if (self.cross_attn is None) != (context is None):
            raise ValueError("a layer with cross_attn needs context=layer.cross_attn.prepare(...); a layer "
                             "without it takes no context")
        if context is not None and not isinstance(context, PreparedContext):
            raise TypeError(f"context must be a PreparedContext (from layer.cross_attn.prepare), "
                            f"got {type(context).__name__}")
        return self.step(x, key, value, context=context)

    def step(self, x: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None,
             tables: tuple[torch.Tensor, torch.Tensor] | None = None, *,
             context: PreparedContext | None = None) -> torch.Tensor:
        """:meth:`forward` without the input checks (the per-step path of the transformers);
        ``tables``: the attention's position tables, cut once per sequence (see
        :meth:`~feedback_lib.FeedbackAttention.position_tables`); ``context``: this layer's
        projected context (chapter 11), given exactly when the layer has ``cross_attn``."""
        if key is not None:
            z = self.norm_self_attn(x)
            x = x + self.dropout(self.attn.attend(z, key, value, tables=tables))
        if self.cross_attn is not None:
            z = self.norm_cross_attn(x)
            x = x + self.dropout(self.cross_attn.attend(z, context))
        z = self.norm_ff(x)
        return x + self.dropout(self.feed_forward(z))


class _FeedbackLoop(nn.Module):
    """The token-by-token loop shared by both transformers; they differ only in what they store.

    A subclass names its stores (``store_names``) and the shape of one stored row
    (:meth:`row_shape`), turns a step's memory vector into rows (:meth:`memory_rows`) and turns
    what it reads back into the layers' key and value (:meth:`key_value`).

    The loop checks its input once and then calls each layer's :meth:`~FeedbackTransformerLayer.step`
    directly, for speed: forward hooks registered on a layer or its attention do not run inside
    the loop. Hook the transformer itself, or call a layer on its own to inspect it.
    """

    store_names: tuple[str, ...] = ()

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, *, mem_len: int | None, naive_stack: bool):
        if not isinstance(layer, FeedbackTransformerLayer):
            raise TypeError(f"layer must be a FeedbackTransformerLayer, got {type(layer).__name__}")
        check_positive_int("n_layers", n_layers)
        check_bool("naive_stack", naive_stack)
        if mem_len is not None and (check_positive_int("mem_len", mem_len) > MAX_POSITIONS):
            raise ValueError(f"mem_len must be at most {MAX_POSITIONS} (the number of relative positions), "
                             f"got {mem_len}")
        super().__init__()
        # Copies of the layer: every layer starts from the same weights, as in the reference.
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(n_layers)])
        self.norm = nn.LayerNorm([layer.size])
        # Logits of the layer weights; the memory is the softmax-weighted sum of input and layer outputs.
        self.weights = nn.Parameter(torch.ones(n_layers + 1))
        self.mem_len = mem_len
        self.naive_stack = naive_stack
        self.d_model = layer.size
        self.heads = layer.attn.heads
        self.n_layers = n_layers

    @property
    def signature(self) -> tuple:
        """The configuration a :class:`FeedbackMemory` must come from to be fed to this model."""
        return (type(self).__name__, self.n_layers, self.d_model, self.heads)

    def row_shape(self) -> tuple[list[str], list[int | None]]:
        """Axis names and sizes of one stored step (the batch axis first, any size)."""
        raise NotImplementedError

    def memory_rows(self, mem: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What one step stores, given its memory vector ``[batch, d_model]``."""
        raise NotImplementedError

    def key_value(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers' ``key`` and ``value`` from what was read from the stores."""
        raise NotImplementedError

    @property
    def has_cross_attention(self) -> bool:
        """Whether the layers attend to an encoder's context (chapter 11)."""
        return self.layers[0].cross_attn is not None

    def forward(self, x_seq: torch.Tensor, memory: FeedbackMemory | None = None, *,
                context: torch.Tensor | None = None, context_padding_mask: torch.Tensor | None = None,
                return_memory: bool = False) -> torch.Tensor | tuple[torch.Tensor, FeedbackMemory]:
        """Run ``x_seq [seq_len, batch, d_model]`` step by step; returns normalised ``[seq_len, batch, d_model]``.

        ``memory`` (from an earlier call with ``return_memory=True``) continues that sequence:
        the result equals one call on the concatenated input. With ``return_memory=True`` the
        result is ``(output, memory)``. When ``mem_len`` is set, each step attends to at most the
        last ``mem_len`` memory entries (first in, first out).

        A model with cross-attention (chapter 11) needs ``context [context_len, batch, d_model]``
        at every call (the memory does not hold it), optionally with ``context_padding_mask
        [batch, context_len]`` (bool, True marks padding); a model without it takes none.
        """
        check_tensor("x_seq", x_seq, ["seq_len", "batch", "d_model"], [None, None, self.d_model])
        check_like("x_seq", x_seq, self.norm.weight)
        check_bool("return_memory", return_memory)
        self.check_memory(memory, x_seq.shape[1], x_seq.shape[0], input_name="x_seq")
        self.check_context(context, context_padding_mask, x_seq.shape[1], input_name="x_seq")
        contexts = self.prepare_context(context, context_padding_mask)   # once per call, for every step
        prefix = () if memory is None else memory.tensors
        if prefix and self.mem_len is not None:
            prefix = tuple(t[-self.mem_len:] for t in prefix)
        if self.fused_loop_blocker() is None:
            out, rows = self._fused_loop(x_seq, prefix)
        else:
            out, rows = self._reference_loop(x_seq, prefix, contexts)
        out = self.norm(out)                                                # [seq_len, batch, d_model]
        if not return_memory:
            return out
        start = self._window_start(rows[0].shape[0])
        kept = [t[start:] for t in rows]
        if start:   # copy the window, so the memory does not keep the whole buffer alive
            kept = [t.clone() for t in kept]
        return out, FeedbackMemory(tuple(kept), self.signature)

    def check_context(self, context: torch.Tensor | None, context_padding_mask: torch.Tensor | None, batch: int, *,
                      input_name: str, batch_first: bool = False) -> None:
        """Raise a clear error unless ``context`` (and its padding mask) can be read by this model
        alongside an input of ``batch`` rows called ``input_name`` (see
        :func:`~feedback_lib.cross_attention.check_context`); None exactly when the model has no
        cross-attention."""
        shape = "[batch, context_len, d_model]" if batch_first else "[context_len, batch, d_model]"
        if self.has_cross_attention and context is None:
            raise ValueError(f"this model has cross-attention and needs a context {shape} (the encoder's output)")
        if not self.has_cross_attention and context is not None:
            raise ValueError("context was given, but this model has no cross-attention (build FeedbackLM with "
                             "cross_attention=True, or its layers with a CrossAttention)")
        if context is None:
            if context_padding_mask is not None:
                raise ValueError("context_padding_mask was given without a context")
            return
        check_context(context, context_padding_mask, d_model=self.d_model, batch=batch, reference=self.norm.weight,
                      input_name=input_name, batch_first=batch_first)

    def prepare_context(self, context: torch.Tensor | None, context_padding_mask: torch.Tensor | None
                        ) -> list[PreparedContext] | None:
        """Every layer's projected ``context [context_len, batch, d_model]``, once per call (unchecked)."""
        if context is None:
            return None
        return [layer.cross_attn.prepare(context, context_padding_mask) for layer in self.layers]

    def fused_loop_blocker(self) -> str | None:
        """Why this model runs the reference loop rather than a fused one (None: it runs fused)."""
        return "only FeedbackTransformerKV has a fused loop"

    def _longest_memory(self, n_prefix: int, seq_len: int) -> int:
        """The most memory steps any step of this call attends to."""
        longest = n_prefix + seq_len - 1
        return longest if self.mem_len is None else min(longest, self.mem_len)

    def _reference_loop(self, x_seq: torch.Tensor, prefix: tuple[torch.Tensor, ...],
                        contexts: list[PreparedContext] | None = None
                        ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The token loop with autograd recording every step (chapter 5); returns the last layer's
        outputs ``[seq_len, batch, d_model]`` (before the final norm) and every memory row.
        ``contexts``: each layer's prepared context (chapter 11), or None without cross-attention."""
        seq_len = x_seq.shape[0]
        n_prefix = prefix[0].shape[0] if prefix else 0
        store_cls = NaiveStack if self.naive_stack else Stack
        stores = [store_cls(n_prefix + seq_len) for _ in self.store_names]
        for store, block in zip(stores, prefix):
            store.append(block)

        weights = torch.softmax(self.weights, dim=0)                       # [n_layers + 1]
        longest = self._longest_memory(n_prefix, seq_len)
        tables = [layer.attn.position_tables(longest) if longest else None for layer in self.layers]
        if contexts is None:
            contexts = [None] * self.n_layers
        outputs = []
        for x in x_seq.unbind(0):                                           # x: [batch, d_model]
            key, value = self._read(stores) if len(stores[0]) else (None, None)
            layer_outputs = [x]
            for layer, layer_tables, context in zip(self.layers, tables, contexts):
                x = layer.step(x, key, value, layer_tables, context=context)
                layer_outputs.append(x)
            # The memory vector: softmax-weighted sum of the input and every layer's output.
            mem = torch.einsum("lbd,l->bd", torch.stack(layer_outputs), weights)  # [batch, d_model]
            for store, row in zip(stores, self.memory_rows(mem)):
                store.append(row[None])
            outputs.append(x)
        return torch.stack(outputs), tuple(store.get(0) for store in stores)

    def decoder(self, batch: int, capacity: int, context: torch.Tensor | None = None,
                context_padding_mask: torch.Tensor | None = None) -> "FusedDecoder | MemoryDecoder":
        """An object whose ``step(x_seq)`` continues one sequence call after call (for generation):
        the outputs equal those of one ``forward`` on everything read so far. ``capacity`` is the
        most steps it will read; ``context [context_len, batch, d_model]`` (and its padding mask)
        is read by every step of a model with cross-attention (chapter 11)."""
        self.check_context(context, context_padding_mask, batch, input_name="the decoder")
        if self.fused_loop_blocker() is None:
            return FusedDecoder(self, batch, capacity)
        return MemoryDecoder(self, context, context_padding_mask)

    def _window_start(self, length: int) -> int:
        return window_start(length, self.mem_len)

    def _read(self, stores: list[Stack]) -> tuple[torch.Tensor, torch.Tensor]:
        start = self._window_start(len(stores[0]))
        return self.key_value([store.get(start) for store in stores])

    def check_memory(self, memory: FeedbackMemory | None, batch: int, seq_len: int, *, input_name: str) -> None:
        """Raise a clear error unless ``memory`` can continue an input of ``batch`` rows and
        ``seq_len`` steps (called ``input_name`` in the message) within the position limit."""
        n_prefix = 0
        if memory is not None:
            if not isinstance(memory, FeedbackMemory):
                raise TypeError(f"memory must be a FeedbackMemory returned by this model with "
                                f"return_memory=True, got {type(memory).__name__}")
            if memory.signature != self.signature:
                raise ValueError(f"memory was made by a model with configuration {memory.signature}, but this "
                                 f"model is {self.signature} (class, n_layers, d_model, heads)")
            if len(memory.tensors) != len(self.store_names):
                raise ValueError(f"memory must hold {len(self.store_names)} tensor(s) ({', '.join(self.store_names)}), "
                                 f"got {len(memory.tensors)}")
            dims, sizes = self.row_shape()
            for name, tensor in zip(self.store_names, memory.tensors):
                check_tensor(f"memory ({name})", tensor, ["length", *dims], [None, *sizes])
                check_like(f"memory ({name})", tensor, self.norm.weight)
            lengths = {t.shape[0] for t in memory.tensors}
            if len(lengths) > 1:
                raise ValueError(f"memory tensors have different lengths {sorted(lengths)}; they must be equal")
            if memory.batch_size != batch:
                raise ValueError(f"batch sizes differ: {input_name} has batch {batch}, "
                                 f"memory has batch {memory.batch_size}")
            n_prefix = len(memory)
        longest = n_prefix + seq_len - 1       # the memory the last step attends to
        if self.mem_len is not None:
            longest = min(longest, self.mem_len)
        if longest > MAX_POSITIONS:
            raise ValueError(f"the last step would attend to a memory of {longest} steps, more than the "
                             f"{MAX_POSITIONS} relative positions; set mem_len <= {MAX_POSITIONS} or use "
                             f"shorter inputs")


class MemoryDecoder:
    """The general decoder: calls the model with the :class:`FeedbackMemory` of the previous call,
    and with the same ``context [context_len, batch, d_model]`` (and padding mask) every time
    (chapter 11; each call projects the context again, as every ``forward`` call does)."""

    def __init__(self, model: _FeedbackLoop, context: torch.Tensor | None = None,
                 context_padding_mask: torch.Tensor | None = None):
        self.model = model
        self.context, self.context_padding_mask = context, context_padding_mask
        self.memory: FeedbackMemory | None = None

    @torch.no_grad()
    def step(self, x_seq: torch.Tensor) -> torch.Tensor:
        """Read ``x_seq [seq_len, batch, d_model]``; returns the normalised outputs ``[seq_len, batch, d_model]``."""
        out, self.memory = self.model(x_seq, self.memory, context=self.context,
                                      context_padding_mask=self.context_padding_mask, return_memory=True)
        return out


class FeedbackTransformer(_FeedbackLoop):
    """The original feedback transformer (chapter 5): every layer projects the shared memory itself.

    Args:
        layer: the layer to copy ``n_layers`` times; its attention must project keys and values
            (``is_kv_precomputed=False``).
        n_layers: number of layers.
        mem_len: attend to at most the last ``mem_len`` memory steps (None: the whole memory).
        naive_stack: store the memory in a :class:`~feedback_lib.NaiveStack` (for comparison).

    The memory it carries is the memory vectors ``[length, batch, d_model]``.
    """

    store_names = ("memory",)

    def row_shape(self) -> tuple[list[str], list[int | None]]:
        return ["batch", "d_model"], [None, self.d_model]

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, *, mem_len: int | None = None,
                 naive_stack: bool = False):
        if isinstance(layer, FeedbackTransformerLayer) and layer.attn.is_kv_precomputed:
            raise ValueError("FeedbackTransformer needs attention with its own key/value projections "
                             "(is_kv_precomputed=False); use FeedbackTransformerKV for precomputed keys and values")
        super().__init__(layer, n_layers, mem_len=mem_len, naive_stack=naive_stack)

    def memory_rows(self, mem: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (mem,)

    def key_value(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tensors[0], tensors[0]


class FeedbackTransformerKV(_FeedbackLoop):
    """The feedback transformer with key and value projections shared by all layers.

    Each step's keys and values are computed once from its memory vector and appended to two
    stacks, instead of every layer projecting the whole memory at every step.

    Args:
        layer: the layer to copy; its attention must take precomputed keys and values
            (``is_kv_precomputed=True``).
        n_layers: number of layers.
        d_model: width of the model; ``heads``: number of heads (as in ``layer``).
        mem_len: attend to at most the last ``mem_len`` memory steps (None: the whole memory).
        naive_stack: store keys and values in :class:`~feedback_lib.NaiveStack` (for comparison).

    The memory it carries is the keys and the values, each ``[length, batch, heads, d_k]``.
    """

    store_names = ("key", "value")

    def row_shape(self) -> tuple[list[str], list[int | None]]:
        return ["batch", "heads", "d_k"], [None, self.heads, self.d_model // self.heads]

    def __init__(self, layer: FeedbackTransformerLayer, n_layers: int, d_model: int, heads: int, *,
                 mem_len: int | None = None, naive_stack: bool = False, fused: bool = True):
        if isinstance(layer, FeedbackTransformerLayer):
            if not layer.attn.is_kv_precomputed:
                raise ValueError("FeedbackTransformerKV needs attention built with is_kv_precomputed=True")
            if (d_model, heads) != (layer.size, layer.attn.heads):
                raise ValueError(f"d_model={d_model}, heads={heads} do not match the layer's "
                                 f"d_model={layer.size}, heads={layer.attn.heads}")
        check_bool("fused", fused)
        super().__init__(layer, n_layers, mem_len=mem_len, naive_stack=naive_stack)
        self.fused = fused
        d_k = d_model // heads
        self.key = HeadProjection(d_model, heads, d_k, bias=False)
        self.value = HeadProjection(d_model, heads, d_k, bias=False)

    def fused_loop_blocker(self) -> str | None:
        if not self.fused:
            return "built with fused=False"
        if self.naive_stack:
            return "naive_stack=True runs the reference loop it is compared in"
        return fused_loop_blocker(self)

    def loop_spec(self) -> LoopSpec:
        """The sizes :class:`~feedback_lib.fused_kv.FusedKVLoop` needs."""
        return LoopSpec(self.n_layers, self.heads, self.d_model // self.heads,
                        tuple(layer.norm_self_attn.eps for layer in self.layers),
                        tuple(layer.norm_ff.eps for layer in self.layers), self.mem_len)

    def _fused_loop(self, x_seq: torch.Tensor, prefix: tuple[torch.Tensor, ...]
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The same computation as the reference loop, as one :class:`~feedback_lib.fused_kv.FusedKVLoop`."""
        n_prefix = prefix[0].shape[0] if prefix else 0
        longest = max(1, self._longest_memory(n_prefix, x_seq.shape[0]))
        spec = self.loop_spec()
        tensors = [t for layer in self.layers for t in layer_tensors(layer, longest)]
        prefix_key, prefix_value = prefix if prefix else (None, None)
        out, keys, values = FusedKVLoop.apply(spec, x_seq, prefix_key, prefix_value, torch.softmax(self.weights, 0),
                                              self.key.linear.weight, self.value.linear.weight, *tensors)
        return out, (keys, values)

    def memory_rows(self, mem: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.key(mem), self.value(mem)                               # [batch, heads, d_k] each

    def key_value(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tensors[0], tensors[1]


def per_layer_copy(kv_model: FeedbackTransformerKV) -> FeedbackTransformer:
    """A :class:`FeedbackTransformer` that computes exactly what ``kv_model`` computes (chapter on
    sharing keys and values): every layer gets its own key and value projections, all set to the
    shared ones (value bias zero), and every other weight is copied."""
    if not isinstance(kv_model, FeedbackTransformerKV):
        raise TypeError(f"kv_model must be a FeedbackTransformerKV, got {type(kv_model).__name__}")
    first = kv_model.layers[0]
    attn = FeedbackAttention(kv_model.heads, kv_model.d_model, first.attn.dropout.p)
    layer = FeedbackTransformerLayer(d_model=kv_model.d_model, attn=attn,
                                     feed_forward=copy.deepcopy(first.feed_forward),
                                     dropout_prob=first.dropout.p, cross_attn=copy.deepcopy(first.cross_attn))
    model = FeedbackTransformer(layer, kv_model.n_layers, mem_len=kv_model.mem_len)
    model = model.to(device=kv_model.norm.weight.device, dtype=kv_model.norm.weight.dtype)
    state = {k: v for k, v in kv_model.state_dict().items() if not k.startswith(("key.", "value."))}
    for i in range(kv_model.n_layers):
        state[f"layers.{i}.attn.key.linear.weight"] = kv_model.key.linear.weight.detach()
        state[f"layers.{i}.attn.value.linear.weight"] = kv_model.value.linear.weight.detach()
        state[f"layers.{i}.attn.value.linear.bias"] = torch.zeros_like(kv_model.norm.bias)
    model.load_state_dict(state, strict=True)
    return model.train(kv_model.training)
