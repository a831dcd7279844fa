"""The feedback transformer: one token-by-token loop (chapter 5), with
per-layer keys and values or keys and values shared by all layers
(chapter 7).

Parameter names, shapes and creation order follow
``labml_nn.transformers.feedback``, so labml's state_dicts load with
``strict=True``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from feedback_lib import fast
from feedback_lib.checks import (
    check_bool,
    check_like,
    check_positive_int,
    check_tensor,
)
from feedback_lib.model.attention import FeedbackAttention, HeadProjection
from feedback_lib.model.cross_attention import (
    PreparedContext,
    check_context,
)
from feedback_lib.model.layer import FeedbackTransformerLayer
from feedback_lib.model.memory import FeedbackMemory
from feedback_lib.model.scores import (
    MAX_POSITIONS,
    PositionTables,
    window_start,
)
from feedback_lib.model.stack import Stack
from feedback_lib.reference.naive_stack import NaiveStack


class FeedbackTransformer(nn.Module):
    """The feedback transformer of Fan et al. (chapter 5): every layer
    projects the shared memory into its own keys and values.

    Args:
        layer: the layer to copy ``n_layers`` times; its attention projects
            keys and values itself (``is_kv_precomputed=False``).
        n_layers: number of layers.
        mem_len: attend to at most the last ``mem_len`` memory steps
            (None: the whole memory).
        naive_stack: keep the memory in a
            :class:`~feedback_lib.NaiveStack` (to compare, chapter 6).

    Shapes: ``x_seq [seq_len, batch, d_model]`` in, the same out. The
    memory it carries from call to call is the memory vectors ``[length,
    batch, d_model]``.
    """

    #: Whether the layers' attention takes projected keys and values.
    shared_kv = False
    #: What one step stores: the memory vector.
    store_names: tuple[str, ...] = ("memory",)

    def __init__(
        self,
        layer: FeedbackTransformerLayer,
        n_layers: int,
        *,
        mem_len: int | None = None,
        naive_stack: bool = False,
    ):
        if not isinstance(layer, FeedbackTransformerLayer):
            raise TypeError(
                "layer must be a FeedbackTransformerLayer, got "
                f"{type(layer).__name__}"
            )
        if layer.attn.is_kv_precomputed != self.shared_kv:
            raise ValueError(
                f"{type(self).__name__} needs attention built with "
                f"is_kv_precomputed={self.shared_kv} (FeedbackTransformer "
                "projects keys and values per layer, "
                "FeedbackTransformerKV shares them)"
            )
        check_positive_int("n_layers", n_layers)
        check_bool("naive_stack", naive_stack)
        if mem_len is not None:
            check_positive_int("mem_len", mem_len)
            if mem_len > MAX_POSITIONS:
                raise ValueError(
                    f"mem_len must be at most {MAX_POSITIONS} (the number "
                    f"of relative positions), got {mem_len}"
                )
        super().__init__()
        # Copies of the layer: every layer starts from the same weights.
        self.layers = nn.ModuleList(
            [copy.deepcopy(layer) for _ in range(n_layers)]
        )
        self.norm = nn.LayerNorm([layer.size])
        # w: logits of the layer shares that mix the memory vector.
        self.weights = nn.Parameter(torch.ones(n_layers + 1))
        self.n_layers, self.d_model = n_layers, layer.size
        self.heads = layer.attn.heads
        self.mem_len, self.naive_stack = mem_len, naive_stack
        #: Only FeedbackTransformerKV has a fused loop (chapter 12).
        self.fused = False

    def forward(
        self,
        x_seq: torch.Tensor,
        memory: FeedbackMemory | None = None,
        *,
        context: torch.Tensor | None = None,
        context_padding_mask: torch.Tensor | None = None,
        return_memory: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, FeedbackMemory]:
        """Run ``x_seq [seq_len, batch, d_model]`` one step at a time;
        returns the normalised top layer ``[seq_len, batch, d_model]``.

        ``memory`` (returned by a call with ``return_memory=True``)
        continues that sequence: the result equals one call on the
        concatenated input. With ``return_memory=True`` the result is
        ``(output, memory)``. A model with cross-attention (chapter 11)
        reads ``context [context_len, batch, d_model]`` at every step.
        """
        self.check_inputs(
            x_seq, memory, context, context_padding_mask, return_memory
        )
        prefix = self.carried(memory)  # the steps a new step can see
        if fast.can_fuse(self):  # the same loop, fused (chapter 12)
            out, stored = fast.run(self, x_seq, prefix)
            return self.result(out, stored, return_memory)
        n_prefix = len(prefix[0]) if prefix else 0
        capacity = n_prefix + len(x_seq)
        stores = [self.new_store(capacity) for _ in self.store_names]
        for store, block in zip(stores, prefix):
            store.append(block)
        shares = torch.softmax(self.weights, dim=0)  # [n_layers + 1]
        tables = self.position_tables(n_prefix, len(x_seq))
        contexts = self.prepare_context(context, context_padding_mask)
        per_layer = list(zip(self.layers, tables, contexts))
        outputs = []
        for x in x_seq:  # x = x_t^0   [batch, d_model]
            key, value = self.read(stores)  # m_s of the steps s < t
            rows = [x]
            for layer, pos, ctx in per_layer:
                x = layer(x, key, value, tables=pos, context=ctx)  # x_t^l
                rows.append(x)
            # m_t = sum_l softmax(w)_l x_t^l            [batch, d_model]
            mem = torch.einsum("lbd,l->bd", torch.stack(rows), shares)
            for store, row in zip(stores, self.memory_rows(mem)):
                store.append(row[None])
            outputs.append(x)
        stored = tuple(store.get(0) for store in stores)
        return self.result(torch.stack(outputs), stored, return_memory)

    def memory_rows(self, mem: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What one step stores, from its memory vector ``[batch,
        d_model]``: the vector itself, which every layer projects."""
        return (mem,)

    def key_value(
        self, stored: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layers' ``key`` and ``value`` from what was read."""
        return stored[0], stored[0]

    def read(
        self, stores: list[Stack]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The memory a step attends to (the last ``mem_len`` stored
        steps) as the layers' key and value; None before the first step."""
        length = len(stores[0])
        if not length:
            return None, None
        start = window_start(length, self.mem_len)
        return self.key_value([store.get(start) for store in stores])

    def new_store(self, capacity: int) -> Stack | NaiveStack:
        """An empty store for ``capacity`` steps (chapter 6)."""
        return NaiveStack(capacity) if self.naive_stack else Stack(capacity)

    def position_tables(
        self, n_prefix: int, seq_len: int
    ) -> list[PositionTables | None]:
        """Each layer's ``U^K`` and ``S``, cut once for every step of a
        call (None when no step has a memory)."""
        longest = self.longest_memory(n_prefix, seq_len)
        if not longest:
            return [None] * self.n_layers
        return [
            layer.attn.position_tables(longest) for layer in self.layers
        ]

    def longest_memory(self, n_prefix: int, seq_len: int) -> int:
        """The most memory steps a step of this call attends to."""
        longest = n_prefix + seq_len - 1
        return (
            longest if self.mem_len is None else min(longest, self.mem_len)
        )

    def carried(self, memory: FeedbackMemory | None) -> tuple:
        """The tensors of ``memory`` cut to the steps a new step sees."""
        if memory is None:
            return ()
        start = window_start(len(memory), self.mem_len)
        return tuple(t[start:] for t in memory.tensors)

    def prepare_context(
        self,
        context: torch.Tensor | tuple[PreparedContext, ...] | None,
        context_padding_mask: torch.Tensor | None,
    ) -> tuple[PreparedContext | None, ...]:
        """Every layer's projected context, once per call (chapter 11). A
        tuple that this method made is used as it is: a decoder prepares
        its context once for all its calls."""
        if context is None:
            return (None,) * self.n_layers
        if isinstance(context, tuple):
            return context
        return tuple(
            layer.cross_attn.prepare(context, context_padding_mask)
            for layer in self.layers
        )

    def result(
        self, out: torch.Tensor, stored: tuple, return_memory: bool
    ) -> torch.Tensor | tuple[torch.Tensor, FeedbackMemory]:
        """The final norm of ``out [seq_len, batch, d_model]`` and, with
        ``return_memory``, the last ``mem_len`` stored steps."""
        out = self.norm(out)
        if not return_memory:
            return out
        start = window_start(len(stored[0]), self.mem_len)
        # A window is copied, so the memory does not keep the buffer alive.
        kept = tuple(t[start:].clone() if start else t for t in stored)
        return out, FeedbackMemory(kept, self.signature)

    @property
    def signature(self) -> tuple:
        """The configuration a :class:`FeedbackMemory` must come from."""
        return (
            type(self).__name__,
            self.n_layers,
            self.d_model,
            self.heads,
        )

    @property
    def has_cross_attention(self) -> bool:
        """Whether the layers read an encoder's context (chapter 11)."""
        return self.layers[0].cross_attn is not None

    def row_shape(self) -> tuple[list[str], list[int | None]]:
        """Axis names and sizes of one stored step (batch first)."""
        return ["batch", "d_model"], [None, self.d_model]

    def check_inputs(
        self,
        x_seq: torch.Tensor,
        memory: FeedbackMemory | None,
        context: torch.Tensor | None,
        context_padding_mask: torch.Tensor | None,
        return_memory: bool,
    ) -> None:
        """Raise an error naming the argument unless :meth:`forward` can
        run on these inputs; nothing is computed before."""
        check_tensor(
            "x_seq",
            x_seq,
            ["seq_len", "batch", "d_model"],
            [None, None, self.d_model],
        )
        check_like("x_seq", x_seq, self.norm.weight)
        check_bool("return_memory", return_memory)
        self.check_memory(memory, x_seq.shape[1])
        self.check_context(
            context,
            context_padding_mask,
            x_seq.shape[1],
            input_name="x_seq",
        )
        n_prefix = 0 if memory is None else len(memory)
        longest = self.longest_memory(n_prefix, x_seq.shape[0])
        if longest > MAX_POSITIONS:
            raise ValueError(
                f"the last step would attend to a memory of {longest} "
                f"steps, more than the {MAX_POSITIONS} relative positions; "
                f"set mem_len <= {MAX_POSITIONS} or use shorter inputs"
            )

    def check_context(
        self,
        context: object,
        context_padding_mask: object,
        batch: int,
        *,
        input_name: str,
        batch_first: bool = False,
    ) -> None:
        """Raise unless ``context`` (and its mask) can be read alongside an
        input of ``batch`` rows called ``input_name``: a context exactly
        when the layers have cross-attention (chapter 11), ``[context_len,
        batch, d_model]`` (``[batch, context_len, d_model]`` with
        ``batch_first``)."""
        if self.has_cross_attention and context is None:
            raise ValueError(
                "this model has cross-attention and needs a context, the "
                "encoder's output ([context_len, batch, d_model]; "
                "FeedbackLM takes [batch, context_len, d_model])"
            )
        if not self.has_cross_attention and context is not None:
            raise ValueError(
                "context was given, but this model has no cross-attention "
                "(build FeedbackLM with cross_attention=True)"
            )
        if isinstance(context, tuple):
            self.check_prepared_context(
                context, context_padding_mask, batch
            )
        elif context is not None:
            check_context(
                context,
                context_padding_mask,
                d_model=self.d_model,
                batch=batch,
                reference=self.norm.weight,
                batch_first=batch_first,
                input_name=input_name,
            )
        elif context_padding_mask is not None:
            raise ValueError(
                "context_padding_mask was given without a context"
            )

    def check_prepared_context(
        self,
        contexts: tuple,
        context_padding_mask: object,
        batch: int,
    ) -> None:
        """Raise unless ``contexts`` is what :meth:`prepare_context` makes
        for this model and ``batch`` rows: one :class:`PreparedContext`
        per layer, its padding mask already inside."""
        if len(contexts) != self.n_layers or not all(
            isinstance(c, PreparedContext) for c in contexts
        ):
            raise TypeError(
                "a prepared context must be the tuple of "
                f"{self.n_layers} PreparedContext that this model's "
                "prepare_context returns"
            )
        if context_padding_mask is not None:
            raise ValueError(
                "context_padding_mask must be None with a prepared context "
                "(prepare_context has put the mask inside)"
            )
        if contexts[0].key.shape[1] != batch:
            raise ValueError(
                f"the prepared context has batch {contexts[0].key.shape[1]}"
                f", but the input has {batch} rows"
            )

    def check_memory(self, memory: object, batch: int) -> None:
        """Raise unless ``memory`` is None or a :class:`FeedbackMemory`
        this model made, for an input of ``batch`` rows."""
        if memory is None:
            return
        if not isinstance(memory, FeedbackMemory):
            raise TypeError(
                "memory must be a FeedbackMemory returned by this model "
                f"with return_memory=True, got {type(memory).__name__}"
            )
        if memory.signature != self.signature:
            raise ValueError(
                "memory was made by a model with configuration "
                f"{memory.signature}, but this model is {self.signature} "
                "(class, n_layers, d_model, heads)"
            )
        names = self.store_names
        if len(memory.tensors) != len(names):
            raise ValueError(
                f"memory must hold {len(names)} tensor(s) "
                f"({', '.join(names)}), got {len(memory.tensors)}"
            )
        dims, sizes = self.row_shape()
        for name, tensor in zip(names, memory.tensors):
            check_tensor(
                f"memory ({name})",
                tensor,
                ["length", *dims],
                [None, *sizes],
            )
            check_like(f"memory ({name})", tensor, self.norm.weight)
        lengths = sorted({t.shape[0] for t in memory.tensors})
        if len(lengths) > 1:
            raise ValueError(
                f"memory tensors have different lengths {lengths}; they "
                "must be equal"
            )
        if memory.batch_size != batch:
            raise ValueError(
                f"batch sizes differ: the input has batch {batch}, memory "
                f"has batch {memory.batch_size}"
            )


class FeedbackTransformerKV(FeedbackTransformer):
    """The feedback transformer with key and value projections shared by
    all layers (chapter 7): each step's key and value are computed once
    from its memory vector and stored, instead of every layer projecting
    the whole memory at every step.

    Args:
        layer: the layer to copy; its attention takes precomputed keys
            and values (``is_kv_precomputed=True``).
        n_layers: number of layers.
        d_model, heads: width and heads (as in ``layer``).
        mem_len, naive_stack: as for :class:`FeedbackTransformer`.
        fused: run the fused loop of chapter 12 where it computes exactly
            what the readable loop computes (see
            :func:`feedback_lib.fast.can_fuse`).

    The memory it carries is the keys and the values, each ``[length,
    batch, heads, d_k]``.
    """

    shared_kv = True
    store_names = ("key", "value")

    def __init__(
        self,
        layer: FeedbackTransformerLayer,
        n_layers: int,
        d_model: int,
        heads: int,
        *,
        mem_len: int | None = None,
        naive_stack: bool = False,
        fused: bool = True,
    ):
        given = (d_model, heads)
        if isinstance(layer, FeedbackTransformerLayer) and given != (
            layer.size,
            layer.attn.heads,
        ):
            raise ValueError(
                f"d_model={d_model}, heads={heads} do not match the "
                f"layer's d_model={layer.size}, heads={layer.attn.heads}"
            )
        check_bool("fused", fused)
        super().__init__(
            layer, n_layers, mem_len=mem_len, naive_stack=naive_stack
        )
        d_k = d_model // heads
        self.key = HeadProjection(d_model, heads, d_k, bias=False)
        self.value = HeadProjection(d_model, heads, d_k, bias=False)
        # The fused loop computes exactly this class; a subclass may
        # change what a step does, so it runs the readable loop.
        self.fused = fused and type(self) is FeedbackTransformerKV

    def memory_rows(self, mem: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A step stores the key and value of its memory vector, each
        ``[batch, heads, d_k]``, computed once for all layers."""
        return self.key(mem), self.value(mem)

    def key_value(
        self, stored: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return stored[0], stored[1]

    def row_shape(self) -> tuple[list[str], list[int | None]]:
        d_k = self.d_model // self.heads
        return ["batch", "heads", "d_k"], [None, self.heads, d_k]


def per_layer_copy(kv_model: FeedbackTransformerKV) -> FeedbackTransformer:
    """A :class:`FeedbackTransformer` that computes exactly what
    ``kv_model`` computes (chapter 7): every layer gets its own key and
    value projections, set to the shared ones (value bias zero), and
    every other weight is copied."""
    if not isinstance(kv_model, FeedbackTransformerKV):
        raise TypeError(
            "kv_model must be a FeedbackTransformerKV, got "
            f"{type(kv_model).__name__}"
        )
    first = kv_model.layers[0]
    attn = FeedbackAttention(
        kv_model.heads,
        kv_model.d_model,
        first.attn.dropout.p,
        positions=first.attn.positions,
    )
    layer = FeedbackTransformerLayer(
        d_model=kv_model.d_model,
        attn=attn,
        feed_forward=copy.deepcopy(first.feed_forward),
        dropout_prob=first.dropout.p,
        cross_attn=copy.deepcopy(first.cross_attn),
    )
    model = FeedbackTransformer(
        layer, kv_model.n_layers, mem_len=kv_model.mem_len
    )
    weight = kv_model.norm.weight
    model = model.to(device=weight.device, dtype=weight.dtype)
    state = {
        k: v
        for k, v in kv_model.state_dict().items()
        if not k.startswith(("key.", "value."))
    }
    w_key = kv_model.key.linear.weight.detach()
    w_value = kv_model.value.linear.weight.detach()
    for i in range(kv_model.n_layers):
        state[f"layers.{i}.attn.key.linear.weight"] = w_key
        state[f"layers.{i}.attn.value.linear.weight"] = w_value
        state[f"layers.{i}.attn.value.linear.bias"] = torch.zeros_like(
            kv_model.norm.bias
        )
    model.load_state_dict(state, strict=True)
    return model.train(kv_model.training)
