"""The memory a feedback transformer carries from one call to the next
(chunked processing, generation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FeedbackMemory:
    """The memory after a call, ready to continue the sequence in the next
    call.

    ``tensors`` are time-major, oldest step first: for
    :class:`~feedback_lib.FeedbackTransformer` one tensor, the memory
    vectors ``[length, batch, d_model]``; for
    :class:`~feedback_lib.FeedbackTransformerKV` two, the keys and the
    values ``[length, batch, heads, d_k]``. ``signature`` records the
    configuration of the model that made it, so a memory is never silently
    fed to a model it does not fit.
    """

    tensors: tuple[torch.Tensor, ...]
    signature: tuple

    def __len__(self) -> int:
        """Number of time steps held."""
        return self.tensors[0].shape[0]

    @property
    def batch_size(self) -> int:
        return self.tensors[0].shape[1]

    def detach(self) -> FeedbackMemory:
        """The same memory cut from the autograd graph (truncated
        backpropagation through time)."""
        return FeedbackMemory(
            tuple(t.detach() for t in self.tensors), self.signature
        )

    def nbytes(self) -> int:
        """Bytes taken by the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors)
