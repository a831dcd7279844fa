"""The book's tasks, trained with :func:`feedback_lib.training.loop.fit`:
the paper's code-execution task (``code_execution``, chapter 10) and
sequence reversal with an encoder (``reversal``, chapter 11)."""

from feedback_lib.lazy import submodules

# The modules, imported on first use (feedback_lib.lazy).
__getattr__ = submodules(__name__)
