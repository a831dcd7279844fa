"""feedback_lib: the Feedback Transformer (Fan et al., 2020, arXiv:2002.09402) for the book.

Every chapter of the book imports its code from here; nothing reusable is pasted into a notebook.

Shape convention
----------------
The core modules are **time-major**, as in the paper's reference code and in labml.ai's
implementation:

* ``FeedbackAttention``: ``query [batch, d_model]``, ``key``/``value [seq_len, batch, d_model]``
  (or ``[seq_len, batch, heads, d_k]`` when the keys and values are precomputed);
* ``FeedbackTransformer`` / ``FeedbackTransformerKV``: ``x_seq [seq_len, batch, d_model]``;
* every memory tensor (:class:`FeedbackMemory`): ``[length, batch, ...]``, oldest step first;
* an encoder's output read by cross-attention (:class:`CrossAttention`, chapter 11): ``context
  [context_len, batch, d_model]``, its padding mask ``[batch, context_len]`` (bool, True = padding,
  as PyTorch's ``key_padding_mask``).

The language model the user calls, :class:`FeedbackLM`, is **batch-major** like the rest of
PyTorch's NLP code: token ids ``[batch, seq]`` in, logits ``[batch, seq, n_vocab]`` out, and
``context [batch, context_len, d_model]`` for a model built with ``cross_attention=True``.
``FeedbackLM.forward`` is the one place where the two conventions meet.

Training (chapter 8) is in submodules, imported by name: ``feedback_lib.data`` (Tiny Shakespeare,
the character tokenizer, batches), ``schedule`` (learning rate, curriculum), ``devices`` (device
and precision), ``distributed`` (torchrun), ``checkpoint``, ``warm_start`` (the parallel twin) and
``train`` (the loop; ``python -m feedback_lib.train --help``). Their batches are token ids
``[batch, seq]``, as ``FeedbackLM`` takes them.

Generation (chapter 9) uses ``feedback_lib.generation`` (sampling and the step-by-step loop) and
``kv_cache`` (the parallel baseline's per-layer key/value cache); ``code_execution`` generates the
paper's state-tracking task (programs over three variables, token ids ``[batch, seq]``).
Encoder-decoder use (chapter 11): ``feedback_lib.seq2seq`` (the sequence-reversal task, a small
encoder and the encoder-decoder wrapper around ``FeedbackLM(cross_attention=True)``).

Figures and interactive controls live in ``feedback_lib.plots`` and ``feedback_lib.widgets``
(they need matplotlib and ipywidgets: ``pip install "feedback_lib[book]"``). The environment
variable ``FEEDBACK_LIB_FAST=1`` switches the book's experiments to small sizes
(:func:`by_mode`); CI runs the notebooks that way.
"""

from feedback_lib.attention import MAX_POSITIONS, FeedbackAttention, HeadProjection, attention_maps
from feedback_lib.cross_attention import CrossAttention, cross_attention_maps
from feedback_lib.fast_mode import FAST_ENV, by_mode, fast_mode
from feedback_lib.feed_forward import FeedForward
from feedback_lib.generation import sample_next_token
from feedback_lib.information_flow import ancestors, computation_depth, flow_edges
from feedback_lib.lm import FeedbackLM
from feedback_lib.memory import FeedbackMemory
from feedback_lib.numpy_reference import (
    attention_weights_numpy,
    feedback_attention_numpy,
    score_terms_numpy,
    softmax_numpy,
)
from feedback_lib.parallel import ParallelLM
from feedback_lib.randomize import randomize_parameters_
from feedback_lib.stack import NaiveStack, SharedGradient, Stack, StackFunction
from feedback_lib.transformer import (
    FeedbackTransformer,
    FeedbackTransformerKV,
    FeedbackTransformerLayer,
    per_layer_copy,
)

__all__ = [
    "CrossAttention",
    "FAST_ENV",
    "FeedForward",
    "FeedbackAttention",
    "FeedbackLM",
    "FeedbackMemory",
    "FeedbackTransformer",
    "FeedbackTransformerKV",
    "FeedbackTransformerLayer",
    "HeadProjection",
    "MAX_POSITIONS",
    "NaiveStack",
    "ParallelLM",
    "SharedGradient",
    "Stack",
    "StackFunction",
    "ancestors",
    "attention_maps",
    "attention_weights_numpy",
    "by_mode",
    "computation_depth",
    "cross_attention_maps",
    "fast_mode",
    "feedback_attention_numpy",
    "flow_edges",
    "per_layer_copy",
    "randomize_parameters_",
    "sample_next_token",
    "score_terms_numpy",
    "softmax_numpy",
]

__version__ = "0.1.0"

#: Submodules that need the book's extras (matplotlib, ipywidgets, IPython); imported on first use,
#: so ``import feedback_lib`` needs only torch and numpy while ``fl.plots`` still works.
_BOOK_MODULES = ("display", "plots", "widgets")


def __getattr__(name: str):
    if name in _BOOK_MODULES:
        import importlib

        return importlib.import_module(f"feedback_lib.{name}")
    raise AttributeError(f"module 'feedback_lib' has no attribute {name!r}")
