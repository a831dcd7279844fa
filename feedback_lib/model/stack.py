"""The memory store of a feedback transformer: a preallocated stack with its
own autograd function.

A feedback transformer reads the whole memory at every step. Keeping the
steps in a Python list and calling ``torch.stack`` before each read copies
the past every step: O(T^2) time and memory over a sequence of T steps
(:class:`~feedback_lib.reference.naive_stack.NaiveStack`, kept for
comparison). :class:`Stack` instead writes each step into one preallocated
buffer and reads the first rows as a view, and :class:`StackFunction` routes
the gradients of all those overlapping views through one shared gradient
buffer (the chapter on the Stack autograd function explains it).

Both stores have the same interface. Values are appended as *blocks* ``[k,
*row_shape]`` (one step is ``k = 1``; a memory carried over from an earlier
call is one block of many rows), and appends and reads alternate:
``append``, ``get``, ``append``, ``get``, ...
"""

from __future__ import annotations

import torch

from feedback_lib.checks import check_positive_int


def check_block(block: object, row_shape: torch.Size | None) -> None:
    """Raise unless ``block`` is a tensor ``[k, *row_shape]`` with ``k >=
    1`` (any rows if ``row_shape`` is None)."""
    if (
        not isinstance(block, torch.Tensor)
        or block.dim() < 1
        or block.shape[0] == 0
    ):
        shape = (
            list(block.shape)
            if isinstance(block, torch.Tensor)
            else type(block).__name__
        )
        raise ValueError(
            "block must be a tensor [k, *row_shape] with k >= 1 rows, got "
            f"{shape}"
        )
    if row_shape is not None and block.shape[1:] != row_shape:
        raise ValueError(
            f"block rows have shape {list(block.shape[1:])} but the stack "
            f"holds rows of shape {list(row_shape)}"
        )


class SharedGradient:
    """The gradient buffer ``[capacity, *row_shape]`` that every read of one
    :class:`Stack` adds into.

    Reads keep this object rather than the Stack itself: the Stack holds the
    output of its last read, so a read's graph node holding the Stack would
    close a reference cycle (output -> node -> Stack -> output) that runs
    through autograd's C++ objects, where Python's garbage collector cannot
    see it, and every training step's graph would leak.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.buffer: torch.Tensor | None = None
        self._backward_pass: int | None = (
            None  # the backward pass the buffer belongs to
        )

    def get(self, like: torch.Tensor) -> torch.Tensor:
        """The buffer of the running backward pass, shaped ``[capacity,
        *like.shape[1:]]``.

        It is allocated (zeroed) by the first read that runs backward in
        each pass, so that a pass which skipped some reads
        (``torch.autograd.grad`` with only some inputs) leaves nothing
        behind for the next one.
        """
        backward_pass = torch._C._current_graph_task_id()
        if self.buffer is None or backward_pass != self._backward_pass:
            self.buffer = like.new_zeros((self.capacity, *like.shape[1:]))
            self._backward_pass = backward_pass
        return self.buffer


class StackFunction(torch.autograd.Function):
    """Return rows ``[start, end)`` of a :class:`Stack` buffer as a view,
    without copying.

    Inputs of ``apply(memory, gradient, last, previous, start, end)``:

    * ``memory``: the stack's buffer ``[capacity, *row_shape]`` (no gradient
      of its own);
    * ``gradient``: the stack's :class:`SharedGradient`, the buffer that all
      its reads add into;
    * ``last``: the block ``[k, *row_shape]`` appended since the previous
      read, whose copy sits in rows ``[end - k, end)`` (``None`` if nothing
      was appended); its gradient is what flows back;
    * ``previous``: the output of the previous read (or ``None``). It is not
      used in the forward pass; it is an input only so that autograd must
      run this read's backward before the previous one's. PyTorch's engine
      usually runs nodes newest first anyway; the edge makes the order a
      rule of the graph rather than a detail of the scheduler;
    * ``start``, ``end``: the rows to read.

    Backward adds the incoming gradient into rows ``[start, end)`` of the
    shared gradient buffer. Reads run backward newest first, so when a
    read's backward runs, every later read has already added its gradient
    for the rows of ``last``: the read returns (a copy of) those rows as
    ``last``'s gradient. Each backward pass gets a fresh gradient buffer
    (see :meth:`SharedGradient.get`), so a second pass over the same graph
    starts from zero.
    """

    @staticmethod
    def forward(
        ctx,
        memory: torch.Tensor,
        gradient: SharedGradient,
        last: torch.Tensor | None,
        previous: torch.Tensor | None,
        start: int,
        end: int,
    ) -> torch.Tensor:
        ctx.gradient = gradient
        ctx.start, ctx.end = start, end
        ctx.n_last = 0 if last is None else last.shape[0]
        return memory[start:end]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad = ctx.gradient.get(grad_output)
        grad[ctx.start : ctx.end] += grad_output
        grad_last = (
            grad[ctx.end - ctx.n_last : ctx.end].clone()
            if ctx.n_last
            else None
        )
        return None, None, grad_last, None, None, None


class Stack:
    """A preallocated stack of time steps; reads are views of one buffer
    (see :class:`StackFunction`).

    Args:
        capacity: the most rows the stack will hold; the buffer is allocated
            with this many rows on the first append (the transformers size
            it from their input and memory).
    """

    #: The autograd function of a read (chapter 6's exercise checks a
    #: reader's own through a subclass that sets it).
    function: type[torch.autograd.Function] = StackFunction

    def __init__(self, capacity: int):
        self.capacity = check_positive_int("capacity", capacity)
        self.memory: torch.Tensor | None = None  # [capacity, *row_shape]
        self.gradient = SharedGradient(capacity)
        self.length = 0
        self._last: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.length

    def append(self, block: torch.Tensor) -> None:
        """Write ``block [k, *row_shape]`` after the rows already stored (in
        place, no copy of the past)."""
        if self._last is not None:
            raise RuntimeError(
                "Stack.append called twice without a get() in between; "
                "read the stack after each append"
            )
        check_block(
            block, None if self.memory is None else self.memory.shape[1:]
        )
        if self.memory is None:
            self.memory = block.new_empty((self.capacity, *block.shape[1:]))
        end = self.length + block.shape[0]
        if end > self.capacity:
            raise RuntimeError(
                f"Stack is full: {self.length} + {block.shape[0]} rows "
                f"exceed its capacity of {self.capacity}"
            )
        # `.data` writes without bumping the version counter that autograd
        # checks on the views returned by earlier reads: those rows are
        # never overwritten, so the views stay valid.
        self.memory.data[self.length : end] = block.detach()
        self.length = end
        self._last = block

    def get(self, start: int = 0) -> torch.Tensor:
        """Rows ``[start, len(self))`` as a view ``[len(self) - start,
        *row_shape]``."""
        if not 0 <= start < self.length:
            raise IndexError(
                f"start must be in [0, {self.length}) for a stack of "
                f"{self.length} rows, got {start}"
            )
        out = self.function.apply(
            self.memory,
            self.gradient,
            self._last,
            self._previous,
            start,
            self.length,
        )
        self._last = None
        self._previous = out
        return out
