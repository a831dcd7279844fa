"""FeedbackLM: the feedback transformer as a language model over token ids (the model readers call)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from feedback_lib.attention import MAX_POSITIONS, FeedbackAttention
from feedback_lib.checks import check_bool, check_positive_int, check_probability, check_token_ids
from feedback_lib.cross_attention import CrossAttention
from feedback_lib.feed_forward import FeedForward
from feedback_lib.generation import check_sampling, eval_mode, generate_stepwise
from feedback_lib.memory import FeedbackMemory
from feedback_lib.transformer import FeedbackTransformer, FeedbackTransformerKV, FeedbackTransformerLayer


class FeedbackLM(nn.Module):
    """Embedding -> feedback transformer -> linear head over the vocabulary.

    Args:
        n_vocab: vocabulary size; token ids are in ``[0, n_vocab)``.
        d_model, heads, n_layers, d_ff: width, attention heads, depth and feed-forward width.
        dropout: dropout everywhere (attention weights, residual branches, feed-forward hidden layer).
        shared_kv: use :class:`~feedback_lib.FeedbackTransformerKV` (keys and values computed once per
            step and shared by all layers) instead of :class:`~feedback_lib.FeedbackTransformer`.
        mem_len: attend to at most the last ``mem_len`` steps (None: everything, up to 4096 steps).
        cross_attention: give every layer a :class:`~feedback_lib.cross_attention.CrossAttention`
            over an encoder's output (chapter 11); every call then takes a ``context``.

    The submodules are named ``src_embed``, ``transformer`` and ``generator`` and are created in the
    same order as labml.ai's ``AutoregressiveModel``, whose state_dicts therefore load here.
    """

    def __init__(self, n_vocab: int, *, d_model: int, heads: int, n_layers: int, d_ff: int,
                 dropout: float = 0.0, shared_kv: bool = True, mem_len: int | None = None,
                 cross_attention: bool = False):
        check_positive_int("n_vocab", n_vocab)
        check_probability("dropout", dropout)
        check_bool("shared_kv", shared_kv)
        check_bool("cross_attention", cross_attention)
        super().__init__()
        self.config = dict(n_vocab=n_vocab, d_model=d_model, heads=heads, n_layers=n_layers, d_ff=d_ff,
                           dropout=dropout, shared_kv=shared_kv, mem_len=mem_len, cross_attention=cross_attention)
        layer = FeedbackTransformerLayer(
            d_model=d_model,
            attn=FeedbackAttention(heads, d_model, dropout, is_kv_precomputed=shared_kv),
            feed_forward=FeedForward(d_model, d_ff, dropout),
            dropout_prob=dropout,
            cross_attn=CrossAttention(heads, d_model, dropout) if cross_attention else None)
        if shared_kv:
            transformer = FeedbackTransformerKV(layer, n_layers, d_model, heads, mem_len=mem_len)
        else:
            transformer = FeedbackTransformer(layer, n_layers, mem_len=mem_len)
        self.src_embed = nn.Embedding(n_vocab, d_model)
        self.transformer = transformer
        self.generator = nn.Linear(d_model, n_vocab)
        self.n_vocab = n_vocab

    def forward(self, tokens: torch.Tensor, memory: FeedbackMemory | None = None, return_memory: bool = False, *,
                context: torch.Tensor | None = None, context_padding_mask: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, FeedbackMemory]:
        """Logits ``[batch, seq, n_vocab]`` for token ids ``tokens [batch, seq]``.

        Position ``t`` of the logits predicts token ``t + 1``. Pass the ``memory`` returned by an
        earlier call (``return_memory=True``) to continue that text: the logits equal those of one
        call on the whole text. With ``return_memory=True`` returns ``(logits, memory)``.

        A model built with ``cross_attention=True`` reads ``context [batch, context_len, d_model]``
        (an encoder's output; pass it again with each continuation) at every step, except where
        ``context_padding_mask [batch, context_len]`` is True (padding).
        """
        self.check_tokens("tokens", tokens)
        # Checked here as well as in the transformer, so that a mismatch is reported against `tokens`
        # and the context's batch-major shape.
        self.transformer.check_memory(memory, tokens.shape[0], tokens.shape[1], input_name="tokens")
        self.transformer.check_context(context, context_padding_mask, tokens.shape[0], input_name="tokens",
                                       batch_first=True)
        x = self.src_embed(tokens.t())                     # batch-major ids -> time-major [seq, batch, d_model]
        context = _time_major(context)                     # -> time-major [context_len, batch, d_model]
        result = self.transformer(x, memory, context=context, context_padding_mask=context_padding_mask,
                                  return_memory=return_memory)
        out, memory = result if return_memory else (result, None)
        logits = self.generator(out).transpose(0, 1)       # [batch, seq, n_vocab]
        return (logits, memory) if return_memory else logits

    def check_tokens(self, name: str, tokens: torch.Tensor) -> None:
        """Raise a clear error unless ``tokens`` are integer ids ``[batch, seq]`` in ``[0, n_vocab)``."""
        check_token_ids(name, tokens, self.n_vocab, self.generator.weight.device)

    def stepper(self, batch: int, capacity: int, *, context: torch.Tensor | None = None,
                context_padding_mask: torch.Tensor | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """A step function for :func:`~feedback_lib.generation.generate_stepwise` (chapter 9):
        ``step(ids [batch, n])`` reads ``n`` more tokens after everything read before, over the
        cached memory (at most ``capacity`` tokens in all), and returns the last one's logits
        ``[batch, n_vocab]``. Call it in eval mode and without gradients, as ``generate`` does.
        ``context [batch, context_len, d_model]`` (and its mask) as in :meth:`forward`, read at every call."""
        decoder = self.transformer.decoder(batch, capacity, _time_major(context), context_padding_mask)
        return lambda ids: self.generator(decoder.step(self.src_embed(ids.t()))[-1])

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, *, generator: torch.Generator | None = None,
                 context: torch.Tensor | None = None, context_padding_mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Continue ``prompt [batch, seq]`` by ``max_new_tokens`` tokens; returns ``[batch, seq + max_new_tokens]``.

        The prompt is read once; each new token is then one step of the transformer over the cached
        memory, never a re-run of the prefix. ``temperature=0`` (or ``top_k=1``) is greedy decoding.
        Runs in eval mode (no dropout) and restores the previous mode. A model with cross-attention
        reads ``context [batch, context_len, d_model]`` (and its mask) as in :meth:`forward`.
        """
        self.check_tokens("prompt", prompt)
        self.transformer.check_context(context, context_padding_mask, prompt.shape[0], input_name="prompt",
                                       batch_first=True)
        check_positive_int("max_new_tokens", max_new_tokens)
        check_sampling(temperature, top_k, generator)
        # The last forward call reads the token before the final one, over all earlier steps.
        longest = prompt.shape[1] + max_new_tokens - 2
        if self.config["mem_len"] is None and longest > MAX_POSITIONS:
            raise ValueError(f"a prompt of {prompt.shape[1]} tokens plus max_new_tokens={max_new_tokens} needs a "
                             f"memory of {longest} steps, more than the {MAX_POSITIONS} relative positions; "
                             f"generate fewer tokens or build the model with mem_len <= {MAX_POSITIONS}")
        with eval_mode(self):
            step = self.stepper(prompt.shape[0], prompt.shape[1] + max_new_tokens - 1, context=context,
                                context_padding_mask=context_padding_mask)
            return generate_stepwise(step, prompt, max_new_tokens, temperature, top_k, generator)


def _time_major(context: torch.Tensor | None) -> torch.Tensor | None:
    """The batch-major ``context [batch, context_len, d_model]`` as the transformer takes it,
    ``[context_len, batch, d_model]`` (None stays None)."""
    return None if context is None else context.transpose(0, 1)
