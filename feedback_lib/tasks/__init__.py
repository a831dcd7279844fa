"""The book's tasks, trained with :func:`feedback_lib.training.loop.fit`:
recall beyond the reach of attention (``recall``) and the paper's
algorithmic task (``programs``) with their multi-seed runs
(``experiments``, chapter 10), and sequence reversal with an encoder
(``reversal``, chapter 11)."""

from feedback_lib.lazy import submodules

# The modules, imported on first use (feedback_lib.lazy).
__getattr__ = submodules(__name__)
