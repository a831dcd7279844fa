"""Training (chapter 8): the loop (``loop``: ``fit``, ``train_step``), the
command line (``cli``; ``python -m feedback_lib.training --help``), Tiny
Shakespeare and batches (``data``), learning-rate and curriculum
schedules (``schedule``), devices and precision (``devices``), torchrun
(``distributed``) and checkpoints (``checkpoint``)."""

from feedback_lib.lazy import submodules

# The modules, imported on first use (feedback_lib.lazy).
__getattr__ = submodules(__name__)
