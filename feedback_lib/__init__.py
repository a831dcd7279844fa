"""feedback_lib: the Feedback Transformer (Fan et al., 2020,
arXiv:2002.09402) for the book. Every chapter imports its code from here.

The tree shows the architecture:

* ``model``: the model the book teaches. ``scores`` (the attention score,
  defined once), ``attention``, ``cross_attention``, ``feed_forward``,
  ``layer``, ``feedback`` (the transformer: one token-by-token forward),
  ``stack`` and ``memory`` (what it stores), ``lm`` (the language model);
* ``fast``: the fused loop of the shared key/value model, its C++ step
  loops, their build and buffers; the transformer takes it through one
  branch, where it computes exactly what the readable loop computes;
* ``reference``: from-scratch versions to check against (numpy attention,
  the naive stack);
* ``baselines``: the parallel Transformer with its key/value cache, the
  parallel twin of the warm start, and the span-limited Transformer of
  the paper's algorithmic task;
* ``decoding``: one decoder protocol and one ``generate`` for every model;
* ``training``: the training loop, the command line (``python -m
  feedback_lib.training``), data, schedules, devices, checkpoints;
* ``tasks``: recall beyond the attention span and the paper's
  algorithmic task with their multi-seed runs (chapter 10), sequence
  reversal (chapter 11);
* ``book``: the chapters' helpers: figures, widgets, showing source, the
  information-flow graphs, the fast mode, random parameters, the checks
  of the build-it-yourself exercises;
* ``bench``: ``python -m feedback_lib.bench``, speed and memory;
* ``checks`` (the input checks of the public entry points) and ``lazy``
  (subpackages imported on first use, so that ``import feedback_lib``
  needs neither matplotlib nor the training code).

Shapes: the core modules are **time-major**, as in labml.ai's
implementation: ``FeedbackAttention`` takes ``query [batch, d_model]``
and ``key``/``value [seq_len, batch, d_model]``; the transformers take
``x_seq [seq_len, batch, d_model]``; a memory is ``[length, batch, ...]``,
oldest step first. :class:`FeedbackLM` is **batch-major** like the rest of
PyTorch's NLP code: token ids ``[batch, seq]`` in, logits ``[batch, seq,
n_vocab]`` out; its ``forward`` is the one place where the two meet.

``FEEDBACK_LIB_FAST=1`` switches the book's experiments to small sizes
(:func:`by_mode`); CI runs the notebooks that way. The figures need the
book's extras (``pip install "feedback_lib[book]"``).
"""

from feedback_lib.baselines.parallel import ParallelLM
from feedback_lib.baselines.span import SpanTransformerLM
from feedback_lib.baselines.twin import ParallelTwinLM
from feedback_lib.book.fast_mode import FAST_ENV, by_mode, fast_mode
from feedback_lib.book.information_flow import (
    ancestors,
    computation_depth,
    flow_edges,
)
from feedback_lib.book.randomize import randomize_parameters_
from feedback_lib.decoding import sample_next_token
from feedback_lib.lazy import submodules
from feedback_lib.model.attention import (
    FeedbackAttention,
    HeadProjection,
    attention_maps,
)
from feedback_lib.model.cross_attention import CrossAttention
from feedback_lib.model.feed_forward import FeedForward
from feedback_lib.model.feedback import (
    FeedbackTransformer,
    FeedbackTransformerKV,
    per_layer_copy,
)
from feedback_lib.model.layer import FeedbackTransformerLayer
from feedback_lib.model.lm import FeedbackLM, cross_attention_maps
from feedback_lib.model.memory import FeedbackMemory
from feedback_lib.model.scores import MAX_POSITIONS
from feedback_lib.model.stack import SharedGradient, Stack, StackFunction
from feedback_lib.reference.naive_stack import NaiveStack
from feedback_lib.reference.numpy_attention import (
    attention_weights_numpy,
    feedback_attention_numpy,
    score_terms_numpy,
    softmax_numpy,
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
    "ParallelTwinLM",
    "SharedGradient",
    "SpanTransformerLM",
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

# fl.training, fl.book.plots, ...: imported on first use (lazy.py).
__getattr__ = submodules(__name__)
