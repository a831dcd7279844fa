"""Where and in what precision the training chapter trains: CUDA, then Apple
MPS, then the CPU."""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def pick_device(name: str = "auto") -> torch.device:
    """``"auto"``: CUDA if available, then MPS, then CPU; or an explicit
    ``"cuda"``, ``"cuda:1"``, ``"mps"`` or ``"cpu"``, which must be
    available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got "
            f"{name!r}"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was asked for but torch.cuda.is_available() "
            "is False (in Colab: Runtime > Change runtime type > GPU)"
        )
    count = torch.cuda.device_count()
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= count
    ):
        raise ValueError(
            f"device {name!r} was asked for but this machine has {count} "
            f"CUDA device(s), cuda:0 to cuda:{count - 1}"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"device {name!r} was asked for but this machine has no Apple "
            "MPS backend"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(
            "device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got "
            f"{name!r}"
        )
    return device


@dataclass(frozen=True)
class Precision:
    """The arithmetic of a run: ``dtype`` is the autocast type (None: plain
    float32) and ``scaled`` says whether the loss is scaled (float16 needs a
    GradScaler, bfloat16 does not)."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {
            None: "fp32",
            torch.bfloat16: "bf16",
            torch.float16: "fp16",
        }[self.dtype]

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context in which forward passes run."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A GradScaler, enabled only for float16."""
        return torch.amp.GradScaler(
            self.device_type if self.scaled else "cpu", enabled=self.scaled
        )


def pick_precision(device: torch.device, name: str = "auto") -> Precision:
    """``"auto"``: bfloat16 on a CUDA GPU that supports it, float16 (with
    loss scaling) on one that does not, float32 elsewhere. On the CPU the
    fused C++ loop runs only in float32, so ``bf16`` there is allowed but
    slower; MPS trains in float32."""
    if name not in PRECISIONS:
        raise ValueError(
            f"precision must be one of {PRECISIONS}, got {name!r}"
        )
    if name == "auto":
        if device.type != "cuda":
            return Precision(device.type, None)
        # including_emulation=False: a T4 (sm_75) only emulates bfloat16,
        # slowly; it gets float16.
        name = (
            "bf16"
            if torch.cuda.is_bf16_supported(including_emulation=False)
            else "fp16"
        )
    if name == "fp16" and device.type != "cuda":
        raise ValueError(
            f"precision 'fp16' needs a CUDA device, got {device}; use "
            "'fp32' (or 'bf16' on the CPU)"
        )
    if name != "fp32" and device.type == "mps":
        raise ValueError("on MPS use precision 'fp32'")
    return Precision(
        device.type,
        {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name],
    )


def configure_backends(device: torch.device) -> None:
    """On CUDA, let float32 matrix products use TF32 tensor cores (about 10
    bits of mantissa in the products, float32 accumulation), which Ampere
    and later GPUs run several times faster."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), or what
    :mod:`platform` knows of it elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip()
                for line in f
                if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
