"""FeedbackLM: the feedback transformer as a language model over token ids.

The model readers call (chapters 1, 5 and 8-11): batch-major token ids in,
logits out; the time-major transformer inside. ``forward`` is the one
place where the two conventions meet.
"""

from __future__ import annotations

import torch
from torch import nn

from feedback_lib import fast
from feedback_lib.checks import (
    check_bool,
    check_positive_int,
    check_probability,
    check_token_ids,
)
from feedback_lib.decoding import Decoder, GenerationMixin, eval_mode
from feedback_lib.model.feedback import (
    FeedbackTransformer,
    FeedbackTransformerKV,
)
from feedback_lib.model.layer import make_layer
from feedback_lib.model.memory import FeedbackMemory
from feedback_lib.model.scores import MAX_POSITIONS

#: labml.ai's names of FeedbackLM's submodules (``AutoregressiveModel``).
LABML_NAMES = {"src_embed.": "embed.", "generator.": "head."}


class FeedbackLM(GenerationMixin, nn.Module):
    """Embedding -> feedback transformer -> linear head over the vocabulary.

    Args:
        n_vocab: vocabulary size; token ids are in ``[0, n_vocab)``.
        d_model, heads, n_layers, d_ff: width, heads, depth and the
            feed-forward width.
        dropout: dropout everywhere (attention weights, residual branches,
            the feed-forward hidden layer).
        shared_kv: keys and values computed once per step and shared by
            all layers (:class:`~feedback_lib.FeedbackTransformerKV`,
            chapter 7), else per layer (chapter 5).
        mem_len: attend to at most the last ``mem_len`` steps (None:
            everything, up to 4096 steps): the attention span.
        positions: the position scores: labml's ``"labml"`` (default)
            or the paper's ``"paper"`` (chapter 2,
            :class:`~feedback_lib.FeedbackAttention`).
        cross_attention: every layer also reads an encoder's output
            (chapter 11); every call then takes a ``context``.

    Submodules ``embed``, ``transformer`` and ``head``, created in the
    order of labml.ai's ``AutoregressiveModel``; its state_dicts load with
    :meth:`load_labml_state_dict`.
    """

    def __init__(
        self,
        n_vocab: int,
        *,
        d_model: int,
        heads: int,
        n_layers: int,
        d_ff: int,
        dropout: float = 0.0,
        shared_kv: bool = True,
        mem_len: int | None = None,
        cross_attention: bool = False,
        positions: str = "labml",
    ):
        check_positive_int("n_vocab", n_vocab)
        check_probability("dropout", dropout)
        check_bool("shared_kv", shared_kv)
        check_bool("cross_attention", cross_attention)
        super().__init__()
        self.config = dict(
            n_vocab=n_vocab,
            d_model=d_model,
            heads=heads,
            n_layers=n_layers,
            d_ff=d_ff,
            dropout=dropout,
            shared_kv=shared_kv,
            mem_len=mem_len,
            cross_attention=cross_attention,
            positions=positions,
        )
        layer = make_layer(
            d_model,
            heads,
            d_ff,
            dropout,
            is_kv_precomputed=shared_kv,
            positions=positions,
            cross_attention=cross_attention,
        )
        if shared_kv:
            transformer = FeedbackTransformerKV(
                layer, n_layers, d_model, heads, mem_len=mem_len
            )
        else:
            transformer = FeedbackTransformer(
                layer, n_layers, mem_len=mem_len
            )
        self.embed = nn.Embedding(n_vocab, d_model)
        self.transformer = transformer
        self.head = nn.Linear(d_model, n_vocab)
        self.n_vocab = n_vocab

    def forward(
        self,
        tokens: torch.Tensor,
        memory: FeedbackMemory | None = None,
        return_memory: bool = False,
        *,
        context: torch.Tensor | None = None,
        context_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, FeedbackMemory]:
        """Logits ``[batch, seq, n_vocab]`` for token ids ``tokens [batch,
        seq]``; position ``t`` predicts token ``t + 1``.

        ``memory`` (returned by a call with ``return_memory=True``)
        continues that text: the logits equal those of one call on the
        whole text. A model built with ``cross_attention=True`` reads
        ``context [batch, context_len, d_model]`` (an encoder's output)
        at every step, except where ``context_padding_mask [batch,
        context_len]`` is True.
        """
        check_token_ids(
            "tokens", tokens, self.n_vocab, self.head.weight.device
        )
        context = self.time_major(
            context, context_padding_mask, len(tokens), "tokens"
        )
        x = self.embed(tokens.t())  # time-major  [seq, batch, d_model]
        result = self.transformer(
            x,
            memory,
            context=context,
            context_padding_mask=context_padding_mask,
            return_memory=return_memory,
        )
        out, memory = result if return_memory else (result, None)
        logits = self.head(out).transpose(0, 1)  # [batch, seq, n_vocab]
        return (logits, memory) if return_memory else logits

    def time_major(
        self,
        context: torch.Tensor | tuple | None,
        mask: torch.Tensor | None,
        batch: int,
        input_name: str,
    ) -> torch.Tensor | tuple | None:
        """The batch-major ``context [batch, context_len, d_model]``,
        checked against an input of ``batch`` rows called ``input_name``,
        as the transformer takes it: ``[context_len, batch, d_model]``. A
        tuple from ``transformer.prepare_context`` is time-major already
        and passes through as it is."""
        self.transformer.check_context(
            context, mask, batch, input_name=input_name, batch_first=True
        )
        if context is None or isinstance(context, tuple):
            return context  # a prepared context is time-major already
        return context.transpose(0, 1)

    def decoder(
        self,
        batch: int,
        capacity: int,
        *,
        context: torch.Tensor | None = None,
        context_padding_mask: torch.Tensor | None = None,
    ) -> FeedbackDecoder:
        """A :class:`FeedbackDecoder` for ``batch`` texts of at most
        ``capacity`` tokens (chapter 9); ``context`` as in :meth:`forward`.
        """
        return FeedbackDecoder(
            self, batch, capacity, context, context_padding_mask
        )

    def load_labml_state_dict(self, state: dict) -> None:
        """Load a state_dict of labml.ai's ``AutoregressiveModel`` around
        its feedback transformer (``src_embed``, ``transformer``,
        ``generator``) with ``strict=True``."""
        renamed = {}
        for name, tensor in state.items():
            for theirs, ours in LABML_NAMES.items():
                if name.startswith(theirs):
                    name = ours + name[len(theirs) :]
            renamed[name] = tensor
        self.load_state_dict(renamed, strict=True)


class FeedbackDecoder(Decoder):
    """:class:`FeedbackLM`'s decoder (chapter 9): the memory of everything
    read so far, so that each new token is one step of the loop.

    The shared key/value model keeps its keys and values in one buffer
    of ``capacity`` steps (:class:`~feedback_lib.fast.FusedState`) where
    the fused loop may run; any other model carries its
    :class:`FeedbackMemory` from call to call.
    """

    def __init__(
        self,
        lm: FeedbackLM,
        batch: int,
        capacity: int,
        context: torch.Tensor | None = None,
        context_padding_mask: torch.Tensor | None = None,
    ):
        super().__init__(
            batch=batch,
            capacity=capacity,
            n_vocab=lm.n_vocab,
            device=lm.head.weight.device,
        )
        transformer = lm.transformer
        if lm.config["mem_len"] is None and capacity - 1 > MAX_POSITIONS:
            raise ValueError(
                f"a decoder of capacity {capacity} needs a memory of "
                f"{capacity - 1} steps, more than the {MAX_POSITIONS} "
                "relative positions; generate fewer tokens or build the "
                f"model with mem_len <= {MAX_POSITIONS}"
            )
        self.lm = lm
        context = lm.time_major(
            context, context_padding_mask, batch, "the decoder"
        )
        # The context's keys and values, projected once for every call
        # (chapter 11); the padding mask is inside.
        self.context = None
        if context is not None:
            with torch.no_grad():
                self.context = transformer.prepare_context(
                    context, context_padding_mask
                )
        self.memory: FeedbackMemory | None = None
        self.fused = None
        if fast.can_fuse(transformer):
            self.fused = fast.FusedState(transformer, batch, capacity)

    def read(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.lm.embed(tokens.t())  # [n, batch, d_model]
        if self.fused is not None:
            out = self.fused.read(x)
        else:
            out, self.memory = self.lm.transformer(
                x,
                self.memory,
                context=self.context,
                return_memory=True,
            )
        return self.lm.head(out[-1])  # [batch, n_vocab]


@torch.no_grad()
def cross_attention_maps(
    lm: FeedbackLM,
    tokens: torch.Tensor,
    context: torch.Tensor,
    context_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The cross-attention weights of every layer and step of a
    :class:`FeedbackLM` built with ``cross_attention=True`` (chapter 11),
    in eval mode, recorded with forward hooks.

    ``tokens [batch, seq]`` and ``context [batch, context_len, d_model]``
    as ``FeedbackLM.forward`` takes them. Returns ``[n_layers, batch,
    heads, seq, context_len]``: how much head ``h`` of layer ``l`` at step
    ``t`` reads context position ``i`` (0 at padding).
    """
    if not isinstance(lm, FeedbackLM) or not lm.config["cross_attention"]:
        raise TypeError(
            "lm must be a FeedbackLM built with cross_attention=True"
        )
    recorded: list[list[torch.Tensor]] = [[] for _ in lm.transformer.layers]

    def ask_for_weights(module, args, kwargs):
        return args, {**kwargs, "need_weights": True}

    def recorder(store: list[torch.Tensor]):
        def record(module, args, kwargs, output):
            out, weights = output  # weights [context_len, batch, heads]
            store.append(weights)
            return out

        return record

    handles = []
    try:
        for layer, store in zip(lm.transformer.layers, recorded):
            module = layer.cross_attn
            handles.append(
                module.register_forward_pre_hook(
                    ask_for_weights, with_kwargs=True
                )
            )
            handles.append(
                module.register_forward_hook(
                    recorder(store), with_kwargs=True
                )
            )
        with eval_mode(lm):
            lm(
                tokens,
                context=context,
                context_padding_mask=context_padding_mask,
            )
    finally:
        for handle in handles:
            handle.remove()
    # [n_layers, seq, context_len, batch, heads] -> [.., batch, heads, seq,
    # ..]
    maps = torch.stack([torch.stack(steps) for steps in recorded])
    return maps.permute(0, 3, 4, 1, 2)
