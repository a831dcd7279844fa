"""What the feedback transformer is compared with: a parallel Transformer
and its key/value cache (``parallel``, ``kv_cache``), and the parallel
twin of the warm start (``twin``, chapter 8)."""
