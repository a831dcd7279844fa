"""feedback_lib: the Feedback Transformer (Fan et al., 2020, arXiv:2002.09402) for the book.

Every chapter of the book imports its code from here; nothing reusable is pasted into a notebook.

Shape convention
----------------
The core modules are **time-major**, as in the paper's reference code and in labml.ai's
implementation:

* ``FeedbackAttention``: ``query [batch, d_model]``, ``key``/``value [seq_len, batch, d_model]``
  (or ``[seq_len, batch, heads, d_k]`` when the keys and values are precomputed);
* ``FeedbackTransformer`` / ``FeedbackTransformerKV``: ``x_seq [seq_len, batch, d_model]``;
* every memory tensor (:class:`FeedbackMemory`): ``[length, batch, ...]``, oldest step first.

The language model the user calls, :class:`FeedbackLM`, is **batch-major** like the rest of
PyTorch's NLP code: token ids ``[batch, seq]`` in, logits ``[batch, seq, n_vocab]`` out.
``FeedbackLM.forward`` is the one place where the two conventions meet.
"""

from feedback_lib.attention import MAX_POSITIONS, FeedbackAttention, HeadProjection
from feedback_lib.feed_forward import FeedForward
from feedback_lib.generation import sample_next_token
from feedback_lib.lm import FeedbackLM
from feedback_lib.memory import FeedbackMemory
from feedback_lib.numpy_reference import (
    attention_weights_numpy,
    feedback_attention_numpy,
    score_terms_numpy,
    softmax_numpy,
)
from feedback_lib.stack import NaiveStack, Stack, StackFunction
from feedback_lib.transformer import (
    FeedbackTransformer,
    FeedbackTransformerKV,
    FeedbackTransformerLayer,
)

__all__ = [
    "MAX_POSITIONS",
    "FeedForward",
    "FeedbackAttention",
    "FeedbackLM",
    "FeedbackMemory",
    "FeedbackTransformer",
    "FeedbackTransformerKV",
    "FeedbackTransformerLayer",
    "HeadProjection",
    "NaiveStack",
    "Stack",
    "StackFunction",
    "attention_weights_numpy",
    "feedback_attention_numpy",
    "sample_next_token",
    "score_terms_numpy",
    "softmax_numpy",
]

__version__ = "0.1.0"
