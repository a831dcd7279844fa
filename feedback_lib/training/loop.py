"""The one training loop of the book (chapter 8), used by the command line
and by the tasks of chapters 10 and 11.

:func:`fit` runs optimizer steps on the batches a function gives for
each step; :func:`train_step` is one step (forward, loss, backward,
clipping, optimizer and schedule); :func:`optimizer_and_schedule` makes
AdamW with warmup and cosine decay over :func:`param_groups`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from feedback_lib.training import distributed
from feedback_lib.training.devices import Precision
from feedback_lib.training.schedule import WarmupCosine

#: A loss: ``loss(model, *batch)`` -> a scalar tensor.
Loss = Callable[..., torch.Tensor]


def next_token_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy (nats per token) of the model's predictions of
    ``y [batch, seq]`` from ``x [batch, seq]``; targets of -100 are not
    scored."""
    logits = model(x)  # [batch, seq, n_vocab]
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices (linear maps, embeddings, ``U^K``);
    none on biases (``U^Q`` and ``S`` are biases), LayerNorm gains and
    the memory's layer mixture."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and not name.endswith("bias")
        (decay if is_matrix else rest).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]


def optimizer_and_schedule(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    steps: int,
    min_lr_ratio: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    fused: bool = False,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups`, and its schedule: linear warmup
    over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at
    ``steps`` (:class:`~feedback_lib.training.schedule.WarmupCosine`)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused
    )
    schedule = WarmupCosine(warmup_steps, steps, min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return optimizer, scheduler


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    precision: Precision,
    grad_clip: float,
    loss: Loss,
    batch: tuple,
) -> torch.Tensor:
    """One optimizer step on ``batch``; returns the loss (detached).

    With float16 the scaler multiplies the loss before the backward pass
    (so that small gradients do not underflow) and divides the gradients
    again before clipping and the step, which it skips if they overflowed;
    otherwise the scaler is disabled and its calls do nothing.
    """
    with precision.autocast():
        value = loss(model, *batch)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(value).backward()
    if grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return value.detach()


@dataclass
class StepReport:
    """What :func:`fit` reports after each step."""

    step: int  # steps done
    loss: float  # of this step (the mean over processes)
    lr: float  # the learning rate this step used
    seconds: float  # the step's time, batch included
    batch: tuple  # what it trained on


def fit(
    model: nn.Module,
    batches: Callable[[int], tuple],
    *,
    steps: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss: Loss = next_token_loss,
    precision: Precision | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 1.0,
    start: int = 0,
    place: distributed.Distributed | None = None,
    after_step: Callable[[StepReport], Any] | None = None,
) -> list[float]:
    """Train ``model`` from step ``start`` to ``steps``; returns the losses.

    Step ``s`` trains on ``batches(s)``, a tuple given to ``loss(model,
    *batch)``, so a batch depends on nothing but its step and a resumed
    run sees the batches an uninterrupted one would. ``precision`` and
    ``scaler``: mixed precision (default: float32 on the model's device);
    ``place``: this process's share of a distributed run (its losses are
    averaged over processes); ``after_step`` is called with a
    :class:`StepReport` after each step, for logs, evaluations and
    checkpoints. A loss that is not finite stops the run with an error.
    """
    if precision is None:
        precision = Precision(next(model.parameters()).device.type, None)
    scaler = precision.scaler() if scaler is None else scaler
    place = distributed.Distributed() if place is None else place
    losses = []
    model.train()
    for step in range(start, steps):
        began = time.perf_counter()
        batch = batches(step)
        lr = scheduler.get_last_lr()[0]
        value = train_step(
            model,
            optimizer,
            scheduler,
            scaler,
            precision,
            grad_clip,
            loss,
            batch,
        )
        value = place.mean(value).item()  # waits for the GPU too
        if not math.isfinite(value):
            advice = f"lower the learning rate (it was {lr:.3g})"
            if not grad_clip:
                advice += " or clip the gradients (grad_clip)"
            raise FloatingPointError(
                f"the training loss became {value} at step {step}; {advice}"
            )
        losses.append(value)
        if after_step is not None:
            seconds = time.perf_counter() - began
            after_step(StepReport(step + 1, value, lr, seconds, batch))
    return losses


@torch.no_grad()
def evaluate(
    model: nn.Module,
    windows: tuple[torch.Tensor, torch.Tensor],
    precision: Precision,
    place: distributed.Distributed,
    device: torch.device,
    rows: int = 16,
) -> float:
    """Mean validation loss over ``windows`` (inputs and targets
    ``[count, seq]``), each process taking every ``world_size``-th window,
    in eval mode (no dropout); the previous mode is restored."""
    was_training = model.training
    model.eval()
    x_all, y_all = (w[place.rank :: place.world_size] for w in windows)
    total = 0.0
    for i in range(0, len(x_all), rows):
        x = to_device(x_all[i : i + rows], device)
        y = to_device(y_all[i : i + rows], device)
        with precision.autocast():
            total += next_token_loss(model, x, y).item() * len(x)
    model.train(was_training)
    # NCCL reduces CUDA tensors, gloo CPU ones.
    on = device if device.type == "cuda" else "cpu"
    mean = torch.tensor(total / len(x_all), dtype=torch.float64, device=on)
    return place.mean(mean).item()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Through pinned memory, without blocking, on CUDA; a plain move
    elsewhere."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
