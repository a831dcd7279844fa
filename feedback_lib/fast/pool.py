"""A pool of the fused loop's large CPU buffers, reused from call to call
(chapter 12)."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

import torch


class BufferPool:
    """Reuses the loop's large CPU buffers from one call to the next.

    A training step at the benchmark's size fills about 100 MB of
    activations and gradients. Fresh memory costs a page fault per 4 KB page
    (the C allocator hands large freed blocks back to the operating system),
    which was about a quarter of a step. Buffers come back to the pool only
    when nothing uses them any more: the gradients' at the end of the
    backward pass, the activations' when the object holding them is garbage
    (``weakref.finalize``), so a retained graph keeps its own. The pool
    keeps at most ``keep`` buffers per shape and dtype and ``max_bytes`` in
    all, dropping the shapes used longest ago first (sequence lengths change
    during a curriculum).
    """

    def __init__(self, keep: int = 8, max_bytes: int = 512 * 2**20):
        # one step uses eight buffers of the commonest shape
        self.keep, self.max_bytes = keep, max_bytes
        self.free: OrderedDict[tuple, list[torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()  # models may run in several threads

    def empty(
        self, shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        """An uninitialised buffer of ``shape`` with ``like``'s dtype and
        device."""
        key = (tuple(shape), like.dtype)
        with self.lock:
            stack = (
                self.free.get(key) if like.device.type == "cpu" else None
            )
            if not stack:
                return like.new_empty(shape)
            self.free.move_to_end(key)
            tensor = stack.pop()
            self.bytes -= tensor.nbytes
            return tensor

    def zeros(
        self, shape: tuple[int, ...], like: torch.Tensor
    ) -> torch.Tensor:
        return self.empty(shape, like).zero_()

    def release(self, tensors: list[torch.Tensor]) -> None:
        """Take back ``tensors``, which nothing else may use any more.
        Buffers made under ``torch.inference_mode`` are not kept: outside it
        they could not be written."""
        with self.lock:
            for tensor in tensors:
                if (
                    tensor.device.type != "cpu"
                    or tensor.is_inference()
                    or tensor.nbytes > self.max_bytes
                ):
                    continue
                key = (tuple(tensor.shape), tensor.dtype)
                stack = self.free.setdefault(key, [])
                self.free.move_to_end(key)
                if len(stack) < self.keep:
                    stack.append(tensor)
                    self.bytes += tensor.nbytes
            # drop the shapes used longest ago
            while self.bytes > self.max_bytes:
                _, stack = self.free.popitem(last=False)
                self.bytes -= sum(t.nbytes for t in stack)

    def release_when_gone(
        self, owner: object, tensors: list[torch.Tensor]
    ) -> None:
        """Take back ``tensors`` once ``owner``, which holds them, is
        garbage."""
        weakref.finalize(owner, self.release, tensors)

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.bytes = 0


#: The pool the fused loop allocates from.
POOL = BufferPool()
