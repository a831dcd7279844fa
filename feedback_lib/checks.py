"""Input checks of the public entry points.

Each check raises an error that names the argument and the expected value
or shape, so that a mistake surfaces at the call that made it, before any
work, instead of deep inside torch. Only a failing check builds its
message.
"""

from __future__ import annotations

import argparse
import numbers
from collections.abc import Sequence

import torch

#: The dtypes of token ids (what ``nn.Embedding`` takes).
TOKEN_DTYPES = (torch.int64, torch.int32)


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer (Python's or NumPy's), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(
        value, bool
    )


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` holds integers (not bool, not floating point)."""
    return not (dtype.is_floating_point or dtype.is_complex) and (
        dtype != torch.bool
    )


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 1 (NumPy's
    too), else raise naming it."""
    if not is_integer(value) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer, got {value!r}"
        )
    return int(value)


def check_nonnegative_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 0, else raise
    naming it."""
    if not is_integer(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return int(value)


def check_probability(name: str, value: object) -> float:
    """Return ``value`` if it is a number in [0, 1), else raise."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value < 1
    ):
        raise ValueError(
            f"{name} must be a probability in [0, 1), got {value!r}"
        )
    return float(value)


def check_heads(heads: object, d_model: object) -> int:
    """Check that ``heads`` and ``d_model`` are positive integers and
    ``heads`` divides ``d_model``; return the width of one head, ``d_k =
    d_model // heads``."""
    check_positive_int("heads", heads)
    check_positive_int("d_model", d_model)
    if d_model % heads:
        raise ValueError(
            f"d_model must be divisible by heads, got d_model={d_model}, "
            f"heads={heads} (d_model % heads = {d_model % heads})"
        )
    return d_model // heads


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool``, else raise naming it."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_tensor(
    name: str,
    tensor: object,
    dims: Sequence[str],
    sizes: Sequence[int | None],
) -> None:
    """Check that ``tensor`` is a tensor of rank ``len(dims)`` whose sizes
    match ``sizes``.

    ``dims`` names each axis (``["seq_len", "batch", "d_model"]``);
    ``sizes`` gives the required size of each axis, ``None`` for any
    size. Zero-sized axes are refused.
    """
    if (
        isinstance(tensor, torch.Tensor)
        and tensor.dim() == len(dims)
        and all(
            n > 0 and (s is None or n == s)
            for n, s in zip(tensor.shape, sizes)
        )
    ):
        return
    named = (d if s is None else f"{d}={s}" for d, s in zip(dims, sizes))
    expected = "[" + ", ".join(named) + "]"
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape [{', '.join(dims)}], "
            f"got {type(tensor).__name__}"
        )
    shape = list(tensor.shape)
    if tensor.dim() != len(dims):
        raise ValueError(
            f"{name} must have shape {expected} ({len(dims)} dimensions), "
            f"got shape {shape}"
        )
    for axis, (dim, size) in enumerate(zip(dims, sizes)):
        if shape[axis] == 0:
            raise ValueError(
                f"{name} has an empty {dim} axis (shape {shape}); expected "
                f"{expected} with every axis >= 1"
            )
        if size is not None and shape[axis] != size:
            raise ValueError(
                f"{name} must have shape {expected}, got {shape} ({dim} is "
                f"{shape[axis]}, expected {size})"
            )


def check_same_batch(
    names: Sequence[str],
    tensors: Sequence[torch.Tensor],
    axes: Sequence[int],
) -> None:
    """Check that the batch axis (``axes[i]`` of ``tensors[i]``) has the
    same size in all tensors."""
    sizes = [t.shape[a] for t, a in zip(tensors, axes)]
    if len(set(sizes)) > 1:
        listed = ", ".join(
            f"{n} has batch {s}" for n, s in zip(names, sizes)
        )
        raise ValueError(
            f"batch sizes differ: {listed}; they must be equal"
        )


def check_like(
    name: str, tensor: torch.Tensor, reference: torch.Tensor
) -> None:
    """Check that ``tensor`` lives on the device of ``reference`` (a
    parameter) and has its dtype.

    Under ``torch.autocast`` the autocast dtype is accepted too, since
    autocast hands lower precision activations from one module to the
    next.
    """
    if tensor.device != reference.device:
        raise ValueError(
            f"{name} is on device {tensor.device} but the module's "
            f"parameters are on {reference.device}; move one of them (e.g. "
            f"tensor.to({str(reference.device)!r}))"
        )
    if tensor.dtype == reference.dtype:
        return
    device_type = tensor.device.type
    autocast = torch.is_autocast_enabled(device_type)
    if autocast and tensor.dtype == torch.get_autocast_dtype(device_type):
        return
    raise TypeError(
        f"{name} has dtype {tensor.dtype} but the module's parameters are "
        f"{reference.dtype}; convert one of them (or run under "
        "torch.autocast, which also accepts its own dtype)"
    )


def check_token_ids(
    name: str, tokens: object, n_vocab: int, device: torch.device
) -> None:
    """Raise a clear error unless ``tokens`` are token ids ``[batch, seq]``
    (int64 or int32) in ``[0, n_vocab)`` on ``device``."""
    check_tensor(name, tokens, ["batch", "seq"], [None, None])
    if tokens.dtype not in TOKEN_DTYPES:
        raise TypeError(
            f"{name} must hold integer token ids of dtype torch.long (or "
            f"torch.int32), got dtype {tokens.dtype}"
        )
    if tokens.device != device:
        raise ValueError(
            f"{name} is on device {tokens.device} but the model is on "
            f"{device}"
        )
    low, high = (int(v) for v in torch.aminmax(tokens))
    if low < 0 or high >= n_vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"{name} holds id {bad}, outside the vocabulary [0, {n_vocab})"
        )


def positive_int_argument(text: str) -> int:
    """argparse type: an integer >= 1, else a usage error."""
    try:
        return check_positive_int("the value", int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
