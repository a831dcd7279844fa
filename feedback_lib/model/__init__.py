"""The model the book teaches, in the order the chapters build it.

``scores`` (the attention score, chapter 2) -> ``attention`` (chapters
3-4) -> ``feed_forward`` and ``layer`` -> ``feedback`` (the transformer's
token-by-token loop, chapter 5; shared keys and values, chapter 7) with
``stack`` (chapter 6) and ``memory`` -> ``lm`` (the language model);
``cross_attention`` (chapter 11).
"""
