"""The straightforward memory store, kept to measure the Stack against
(chapter 6)."""

from __future__ import annotations

import torch

from feedback_lib.checks import check_positive_int
from feedback_lib.model.stack import check_block


class NaiveStack:
    """The straightforward store: a list of blocks concatenated at every
    read (O(T^2) over T steps).

    Same interface as :class:`Stack`; the book measures the two against each
    other.
    """

    def __init__(self, capacity: int):
        self.capacity = check_positive_int("capacity", capacity)
        self.blocks: list[torch.Tensor] = []
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def append(self, block: torch.Tensor) -> None:
        """Add ``block [k, *row_shape]`` to the list."""
        check_block(
            block, self.blocks[0].shape[1:] if self.blocks else None
        )
        if self.length + block.shape[0] > self.capacity:
            raise RuntimeError(
                f"NaiveStack is full: {self.length} + {block.shape[0]} "
                f"rows exceed its capacity of {self.capacity}"
            )
        self.blocks.append(block)
        self.length += block.shape[0]

    def get(self, start: int = 0) -> torch.Tensor:
        """Rows ``[start, len(self))``, as a new tensor built by
        concatenating every block."""
        if not 0 <= start < self.length:
            raise IndexError(
                f"start must be in [0, {self.length}) for a stack of "
                f"{self.length} rows, got {start}"
            )
        return torch.cat(self.blocks)[start:]
