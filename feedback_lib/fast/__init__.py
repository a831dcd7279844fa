"""The fast path of the shared key/value transformer (chapter 12).

``FeedbackTransformer.forward`` takes it through one branch,
``if fast.can_fuse(self): return ...fast.run(...)``, where it computes
exactly what the readable loop computes (the tests check this in float64,
outputs and gradients):

* ``supported``: :func:`can_fuse`, the exact model the fused loop computes;
* ``loop``: :func:`run` and the autograd function with its backward pass;
* ``tensors``: the named lists of tensors the loop passes around;
* ``steps``: the step loops in Python, and the dispatch to C++;
* ``native`` and ``step_loops.cpp``: the C++ step loops and their build;
* ``pool``: the buffers reused from call to call;
* ``decoder``: the state that generation keeps from token to token.
"""

from feedback_lib.fast.decoder import FusedState
from feedback_lib.fast.loop import FusedKVLoop, run
from feedback_lib.fast.supported import blocker, can_fuse

__all__ = ["FusedKVLoop", "FusedState", "blocker", "can_fuse", "run"]
